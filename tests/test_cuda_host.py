"""The CUDA extension on a machine without a GPU: it is built when nvcc is present, for
sm_80 and sm_90a, links no torch and no CUDA runtime library, and rejects bad arguments
with a ValueError naming them before any launch; with valid arguments and no GPU it raises
a RuntimeError naming the cause, as does the Python launcher.
"""
import os
import re
import shutil
import subprocess

import pytest
import torch

from attnctl.backends import cuda_backend
from attnctl import Capture, OwnTerm
from attnctl.backends.cuda_backend import ABI_VERSION, MODULE, attention_cuda, cuda_unavailable_reason, launch_arguments

NO_GPU = not torch.cuda.is_available()
SM80_SHARED_MEMORY = 163 * 1024  # opt-in maximum per block on sm_80 (sm_90: 227 KB)


def _nvcc_present() -> bool:
    roots = (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"))
    return shutil.which("nvcc") is not None or any(r and os.path.isfile(os.path.join(r, "bin", "nvcc")) for r in roots)


def test_extension_is_built_when_nvcc_is_present():
    if os.environ.get("ATTNCTL_BUILD_CUDA") == "0":
        pytest.skip("ATTNCTL_BUILD_CUDA=0: the CUDA extension build is switched off")
    if not _nvcc_present():
        pytest.skip("nvcc not found: setup.py skips the CUDA extension")
    # setup.py installs without the extension if its build fails (unless ATTNCTL_BUILD_CUDA=1);
    # here, with nvcc present, a missing module is that failure.
    assert cuda_backend._C is not None, (
        f"nvcc is on PATH but {MODULE} does not import ({cuda_backend._import_error!r}); "
        "reinstall with ATTNCTL_BUILD_CUDA=1 pip install -e . to see the build error")


@pytest.fixture(scope="module")
def C():
    if cuda_backend._C is None:
        pytest.skip(f"{MODULE} is not built: {cuda_unavailable_reason()}")
    return cuda_backend._C


def _so_path(C) -> str:
    return C.__file__


def test_module_reports_its_abi_archs_and_codes(C):
    assert C.ABI_VERSION == ABI_VERSION
    # The archs it names are those its fat binary holds, whatever ATTNCTL_CUDA_ARCHS was at build time.
    archs = C.CUDA_ARCHS.split(";")
    assert all(re.fullmatch(r"\d+a?", a) for a in archs), C.CUDA_ARCHS
    built = set(re.findall(rb"-arch sm_(\d+a?) ", open(_so_path(C), "rb").read()))
    assert {a.encode() for a in archs} <= built, (C.CUDA_ARCHS, built)
    assert C.dtype_codes == {"float16": 0, "bfloat16": 1, "float32": 2, "int32": 3, "int64": 4}
    assert C.head_dim_tiles == [48, 64, 80, 128, 160, 256]


@pytest.mark.skipif(shutil.which("readelf") is None or shutil.which("nm") is None, reason="binutils not installed")
def test_module_links_neither_torch_nor_the_cuda_runtime_library(C):
    """The ABI promise: no libtorch/c10 (no undefined symbols after a torch upgrade) and the
    CUDA runtime linked statically (no libcudart.so of one release), its symbols kept local
    so that they cannot bind to torch's libcudart loaded into the same process."""
    dynamic = subprocess.run(["readelf", "-d", _so_path(C)], capture_output=True, text=True, check=True).stdout
    needed = re.findall(r"\(NEEDED\).*\[(.+)\]", dynamic)
    assert needed, dynamic
    assert not [lib for lib in needed if re.search(r"torch|c10|cudart|libcuda", lib)], needed
    exported = subprocess.run(["nm", "-D", "--defined-only", _so_path(C)], capture_output=True, text=True,
                              check=True).stdout
    names = [line.split()[-1] for line in exported.splitlines() if line.strip()]
    assert "PyInit__attnctl_cuda" in names
    assert not [n for n in names if n.startswith(("cuda", "__cuda", "_ZN7attnctl"))], names
    undefined = subprocess.run(["nm", "-D", "--undefined-only", _so_path(C)], capture_output=True, text=True,
                               check=True).stdout
    assert not re.search(r"\b(cuda\w+|_ZN(2at|3c10|5torch)\w*)", undefined)


def test_module_holds_kernels_for_every_requested_arch(C):
    """Each cubin in the fat binary records the ptxas options it was built with; every
    kernel instantiation must be there once per requested architecture."""
    data = open(_so_path(C), "rb").read()
    archs = [a.strip() for a in C.CUDA_ARCHS.split(";")]
    counts = {a: len(re.findall(rb"-arch sm_" + a.encode() + rb" ", data)) for a in archs}
    instantiations = 2 * len(C.head_dim_tiles)  # {fp16, bf16} x tiles
    assert counts == {a: instantiations for a in archs}, counts


@pytest.mark.parametrize("d", range(8, 257, 8))
def test_kernel_config_pads_head_dims_only_to_the_next_tile(C, d):
    cfg = C.kernel_config(d, d)
    tile = cfg["head_dim_tile"]
    assert tile >= d and tile % 16 == 0
    assert [t for t in C.head_dim_tiles if d <= t][0] == tile
    assert cfg["smem_bytes"] <= SM80_SHARED_MEMORY, cfg
    assert cfg["smem_bytes"] < cfg["own_smem_bytes"] <= SM80_SHARED_MEMORY, cfg  # + item b's query tile
    assert cfg["block_m"] == 16 * cfg["threads"] // 32  # one warp per 16 query rows


def test_sd_head_dims_are_not_padded_to_a_power_of_two(C):
    # FlashAttention pads 40 -> 64, 80 -> 96, 160 -> 192.
    assert {d: C.kernel_config(d, d)["head_dim_tile"] for d in (40, 64, 80, 160)} == {40: 48, 64: 64, 80: 80, 160: 160}
    assert C.kernel_config(40, 160)["head_dim_tile"] == 160  # the tile holds max(D, Dv)
    assert C.kernel_config(64, 64)["block_n"] >= 77  # SD's 77 text tokens fit one key block


@pytest.mark.parametrize("d,dv", [(41, 40), (40, 12), (264, 264), (0, 8)])
def test_kernel_config_rejects_unsupported_head_dims(C, d, dv):
    with pytest.raises(ValueError, match="multiple of 8 from 8 to 256"):
        C.kernel_config(d, dv)


# ---- host-side validation of attention_forward ---------------------------------------------

ADDR = 1 << 20  # a 16-byte aligned fake device address: validation never dereferences it


def valid_arguments(**changes) -> dict:
    """Arguments of a (B=2, H=3, M=5, N=7, D=Dv=40) call with every control, capture,
    injection and the two-source form's own term (values, prob_mult, every capture)."""
    B, H, M, N, D, T = 2, 3, 5, 7, 40, 4
    kw = dict(
        q=ADDR, k=2 * ADDR, v=3 * ADDR, out=4 * ADDR, bias=5 * ADDR, prob_mult=6 * ADDR,
        token_mass=7 * ADDR, maps=8 * ADDR, head_maps=9 * ADDR, lse=10 * ADDR, tokens=11 * ADDR,
        head_weights=12 * ADDR, source=13 * ADDR,
        own_values=14 * ADDR, own_prob_mult=15 * ADDR, own_token_mass=16 * ADDR, own_maps=17 * ADDR,
        own_head_maps=18 * ADDR, own_lse=19 * ADDR, own_tokens=20 * ADDR, own_head_weights=21 * ADDR,
        q_stride=(H * M * D, M * D, D, 1), k_stride=(H * N * D, N * D, D, 1), v_stride=(H * N * D, N * D, D, 1),
        out_stride=(H * M * D, M * D, D, 1), bias_stride=(0, 0, N, 1), prob_mult_stride=(0, 0, 0, 1),
        token_mass_stride=(H * N, N, 1), maps_stride=(M * T, T, 1), head_maps_stride=(H * M * T, M * T, T, 1),
        lse_stride=(H * M, M, 1), tokens_stride=(0, 1), head_weights_stride=(0, 1), source_stride=1,
        own_values_stride=(1, 2, 6 * 2, 6 * 2 * 7), own_prob_mult_stride=(N, 0, 0, 1),
        own_token_mass_stride=(H * N, N, 1), own_maps_stride=(M * 3, 3, 1),
        own_head_maps_stride=(H * M * 3, M * 3, 3, 1), own_lse_stride=(H * M, M, 1), own_tokens_stride=(3, 1),
        own_head_weights_stride=(H, 1),
        B=B, H=H, M=M, N=N, D=D, Dv=D, T=T, own_T=3, scale=D ** -0.5,
        dtype=0, bias_dtype=2, prob_mult_dtype=1, head_weights_dtype=2, tokens_dtype=4, source_dtype=3,
        own_prob_mult_dtype=2, own_head_weights_dtype=0, own_tokens_dtype=3,
        device=0, stream=0,
    )
    kw.update(changes)
    return kw


BAD_ARGUMENTS = [
    (dict(q=0), r"q: null device pointer"),
    (dict(k=0), r"k: null device pointer"),
    (dict(v=0), r"v: null device pointer"),
    (dict(out=0), r"out: null device pointer"),
    (dict(B=0), r"B: expected >= 1, got 0"),
    (dict(H=-1), r"H: expected >= 1, got -1"),
    (dict(M=0), r"M: expected >= 1, got 0"),
    (dict(N=0), r"N: expected >= 1, got 0"),
    (dict(D=41), r"D \(q/k head dim\): expected a multiple of 8 from 8 to 256, got 41"),
    (dict(D=264), r"D \(q/k head dim\): expected a multiple of 8 from 8 to 256, got 264"),
    (dict(Dv=0), r"Dv \(v head dim\): expected a multiple of 8 from 8 to 256, got 0"),
    (dict(dtype=2), r"dtype: q, k, v must be float16 \(code 0\) or bfloat16 \(code 1\), got code 2 \(float32\)"),
    (dict(dtype=9), r"dtype: .* got code 9 \(unknown\)"),
    (dict(bias_dtype=3), r"bias: expected dtype code 0 \(float16\), 1 \(bfloat16\) or 2 \(float32\), got 3"),
    (dict(prob_mult_dtype=-1), r"prob_mult: expected dtype code .* got -1"),
    (dict(head_weights_dtype=4), r"head_weights: expected dtype code .* got 4"),
    (dict(tokens=0), r"tokens: maps and head_maps need token indices, got a null pointer"),
    (dict(maps=0, tokens=0, head_weights=0), r"tokens: maps and head_maps need token indices"),
    (dict(T=0), r"T \(number of tokens\): expected >= 1, got 0"),
    (dict(tokens_dtype=2), r"tokens: expected dtype code 3 \(int32\) or 4 \(int64\), got 2"),
    (dict(maps=0), r"head_weights: given without maps, which is what they weight"),
    (dict(source_dtype=2), r"source: expected dtype code 3 \(int32\) or 4 \(int64\), got 2"),
    (dict(source_dtype=4, source=13 * ADDR + 4), r"source: pointer \d+ is not aligned to its 8-byte elements"),
    (dict(H=70000), r"H: at most 65535 heads, got 70000"),
    (dict(B=65536), r"B: at most 65535 batch items, got 65536"),
    (dict(q=ADDR + 1), r"q: pointer \d+ is not aligned to its 2-byte elements"),
    (dict(bias=5 * ADDR + 2), r"bias: pointer \d+ is not aligned to its 4-byte elements"),
    (dict(tokens=11 * ADDR + 4), r"tokens: pointer \d+ is not aligned to its 8-byte elements"),
    (dict(lse=10 * ADDR + 2), r"lse: pointer \d+ is not aligned to its 4-byte elements"),
    (dict(out_stride=(0, 200, 40, 1)), r"out: stride 0 on dim 0 \(B, H, M, Dv\) of size 2"),
    (dict(head_maps_stride=(60, 20, 0, 1)), r"head_maps: stride 0 on dim 2 \(B, H, M, T\) of size 5"),
    (dict(maps_stride=(20, 4, 0)), r"maps: stride 0 on dim 2 \(B, M, T\) of size 4"),
    (dict(lse_stride=(15, 0, 1)), r"lse: stride 0 on dim 1 \(B, H, M\) of size 3"),
    (dict(token_mass_stride=(21, 7, 0)), r"token_mass: stride 0 on dim 2 \(B, H, N\) of size 7"),
    (dict(q_stride=(600, 200, 40)), r"q_stride: expected 4 strides, got 3"),
    (dict(tokens_stride=(0, 1, 1)), r"tokens_stride: expected 2 strides, got 3"),
    # The two-source form's own term: checked as the operands and capture of the first term.
    (dict(own_values=0), r"own_values: null device pointer, but own_prob_mult or an own capture buffer"),
    (dict(own_values=0, own_prob_mult=0), r"own_values: null device pointer, but .* an own capture buffer"),
    (dict(own_values=14 * ADDR + 1), r"own_values: pointer \d+ is not aligned to its 2-byte elements"),
    (dict(own_prob_mult_dtype=3), r"own_prob_mult: expected dtype code 0 \(float16\), 1 \(bfloat16\) or 2 "
                                  r"\(float32\), got 3"),
    (dict(own_prob_mult=15 * ADDR + 2), r"own_prob_mult: pointer \d+ is not aligned to its 4-byte elements"),
    (dict(own_head_weights_dtype=4), r"own_head_weights: expected dtype code .* got 4"),
    (dict(own_head_weights=21 * ADDR + 1), r"own_head_weights: pointer \d+ is not aligned to its 2-byte elements"),
    (dict(own_tokens=0), r"own_tokens: maps and head_maps need token indices, got a null pointer"),
    (dict(own_T=0), r"own_T \(number of tokens\): expected >= 1, got 0"),
    (dict(own_tokens_dtype=1), r"own_tokens: expected dtype code 3 \(int32\) or 4 \(int64\), got 1"),
    (dict(own_tokens_dtype=4, own_tokens=20 * ADDR + 4), r"own_tokens: pointer \d+ is not aligned to its 8-byte"),
    (dict(own_maps=0), r"own_head_weights: given without maps, which is what they weight"),
    (dict(own_lse=19 * ADDR + 2), r"own_lse: pointer \d+ is not aligned to its 4-byte elements"),
    (dict(own_token_mass=16 * ADDR + 1), r"own_token_mass: pointer \d+ is not aligned to its 4-byte elements"),
    (dict(own_maps_stride=(15, 0, 1)), r"own_maps: stride 0 on dim 1 \(B, M, T\) of size 5"),
    (dict(own_head_maps_stride=(45, 15, 3, 0)), r"own_head_maps: stride 0 on dim 3 \(B, H, M, T\) of size 3"),
    (dict(own_lse_stride=(0, 5, 1)), r"own_lse: stride 0 on dim 0 \(B, H, M\) of size 2"),
    (dict(own_values_stride=(1, 2, 12)), r"own_values_stride: expected 4 strides, got 3"),
    (dict(own_tokens_stride=(1,)), r"own_tokens_stride: expected 2 strides, got 1"),
]


@pytest.mark.parametrize("changes,message", BAD_ARGUMENTS, ids=[m.split(":")[0].replace("\\", "") + "-" + str(i)
                                                              for i, (_, m) in enumerate(BAD_ARGUMENTS)])
def test_bad_arguments_raise_value_error_before_any_launch(C, changes, message):
    with pytest.raises(ValueError, match="attnctl CUDA backend: " + message):
        C.attention_forward(**valid_arguments(**changes))


@pytest.mark.parametrize("changes", [
    {},
    # Optional operands absent: their dtype codes and strides are not looked at.
    dict(bias=0, prob_mult=0, token_mass=0, maps=0, head_maps=0, lse=0, tokens=0, head_weights=0, source=0,
         bias_dtype=99, prob_mult_dtype=99, head_weights_dtype=99, tokens_dtype=99, source_dtype=99, T=0,
         own_values=0, own_prob_mult=0, own_token_mass=0, own_maps=0, own_head_maps=0, own_lse=0, own_tokens=0,
         own_head_weights=0, own_prob_mult_dtype=99, own_head_weights_dtype=99, own_tokens_dtype=99, own_T=0),
    # The own term alone (no own prob_mult or capture); its values any layout.
    dict(own_prob_mult=0, own_token_mass=0, own_maps=0, own_head_maps=0, own_lse=0, own_tokens=0,
         own_head_weights=0, own_prob_mult_dtype=99, own_T=0, own_values=14 * ADDR + 2),
    # Injection: int64 indices, any stride (stride 0: one source item for all).
    dict(source=13 * ADDR + 8, source_dtype=4, source_stride=0),
    # Broadcast reads may use stride 0; a dim of size 1 may have any stride, even in outputs.
    dict(q_stride=(0, 0, 40, 1), B=1, out_stride=(0, 200, 40, 1)),
    # Arbitrary (unaligned-for-16-byte, non-unit) layouts take the element-wise path.
    dict(q=ADDR + 2, q_stride=(1200, 400, 80, 2), k_stride=(1, 2, 6, 42)),
])
@pytest.mark.skipif(not NO_GPU, reason="on a GPU machine valid arguments would launch on fake pointers")
def test_valid_arguments_without_a_gpu_raise_runtime_error_naming_the_cause(C, changes):
    with pytest.raises(RuntimeError, match=r"attnctl CUDA backend: no usable CUDA device \(.+\): no NVIDIA GPU"):
        C.attention_forward(**valid_arguments(**changes))


def test_pointers_must_be_non_negative_ints(C):
    with pytest.raises(TypeError):
        C.attention_forward(**valid_arguments(q=-16))


# ---- the Python launcher ----------------------------------------------------------------------

def _cpu_call(source):
    """A (B=3, H=2, M=5, N=7, D=40) call's tensors on the CPU, with a capture and bias."""
    q, k, v = (torch.randn(3, 2, n, 40, dtype=torch.float16) for n in (5, 7, 7))
    cap = Capture.zeros(q, k, token_mass=True, maps=True, tokens=[6, 0])
    return q, k, v, torch.empty_like(q), dict(scale=0.125, bias=torch.randn(1, 2, 5, 7), prob_mult=None,
                                             capture=cap, source=source)


@pytest.mark.parametrize("dtype,code", [(torch.int32, 3), (torch.int64, 4)])
def test_launcher_passes_source_pointer_stride_and_dtype_code(C, dtype, code):
    source = torch.tensor([2, 9, 0, 9, 1, 9], dtype=dtype)[::2]  # non-contiguous: stride 2
    q, k, v, out, kw = _cpu_call(source)
    args = launch_arguments(q, k, v, out, **kw)
    assert (args["source"], args["source_stride"], args["source_dtype"]) == (source.data_ptr(), 2, code)
    assert (args["q"], args["bias"], args["B"]) == (q.data_ptr(), kw["bias"].data_ptr(), 3)


def test_launcher_passes_a_null_source_without_injection(C):
    q, k, v, out, kw = _cpu_call(None)
    args = launch_arguments(q, k, v, out, **kw)
    assert (args["source"], args["source_stride"], args["source_dtype"]) == (0, 0, 0)


def _own_term(q, k, v):
    """Values in another layout than v (a (B, N, H, D) view), a bf16 per-(b, token) prob_mult
    (stride 0 on h and m) and a capture of every kind with int32 tokens and (B, H) weights."""
    values = torch.randn(3, 7, 2, 40, dtype=torch.float16).transpose(1, 2)
    prob_mult = torch.rand(3, 1, 1, 7, dtype=torch.bfloat16)
    cap = Capture.zeros(q, k, token_mass=True, maps=True, head_maps=True, lse=True,
                        tokens=torch.tensor([[1, 2, 3], [0, 0, 6], [5, 4, 3]], dtype=torch.int32),
                        head_weights=torch.rand(3, 2, dtype=torch.float16))
    return OwnTerm(values, prob_mult, cap)


def test_launcher_passes_the_own_term(C):
    q, k, v, out, kw = _cpu_call(torch.tensor([1, 1, 0]))
    own = _own_term(q, k, v)
    args = launch_arguments(q, k, v, out, **kw, own=own)
    cap, main = own.capture, kw["capture"]
    assert (args["own_values"], args["own_values_stride"]) == (own.values.data_ptr(), own.values.stride())
    assert (args["own_prob_mult"], args["own_prob_mult_stride"], args["own_prob_mult_dtype"]) == (
        own.prob_mult.data_ptr(), (7, 0, 0, 1), 1)
    assert [args["own_" + n] for n in ("token_mass", "maps", "head_maps", "lse", "tokens", "head_weights")] == [
        cap.token_mass.data_ptr(), cap.maps.data_ptr(), cap.head_maps.data_ptr(), cap.lse.data_ptr(),
        cap.tokens.data_ptr(), cap.head_weights.data_ptr()]
    assert (args["own_T"], args["own_tokens_dtype"], args["own_head_weights_dtype"]) == (3, 3, 0)
    assert (args["own_tokens_stride"], args["own_head_weights_stride"]) == ((3, 1), (2, 1))
    assert (args["own_head_maps_stride"], args["own_lse_stride"]) == (cap.head_maps.stride(), cap.lse.stride())
    # The first term's capture is unchanged by the own term's.
    assert (args["token_mass"], args["maps"], args["T"]) == (main.token_mass.data_ptr(), main.maps.data_ptr(), 2)


def test_launcher_passes_a_null_own_term_without_one(C):
    q, k, v, out, kw = _cpu_call(torch.tensor([1, 1, 0]))
    args = launch_arguments(q, k, v, out, **kw)
    assert {n: args[n] for n in args if n.startswith("own_")} == dict(
        own_values=0, own_prob_mult=0, own_token_mass=0, own_maps=0, own_head_maps=0, own_lse=0, own_tokens=0,
        own_head_weights=0, own_values_stride=(0,) * 4, own_prob_mult_stride=(0,) * 4,
        own_token_mass_stride=(0,) * 3, own_maps_stride=(0,) * 3, own_head_maps_stride=(0,) * 4,
        own_lse_stride=(0,) * 3, own_tokens_stride=(0, 0), own_head_weights_stride=(0, 0), own_T=0,
        own_prob_mult_dtype=0, own_tokens_dtype=0, own_head_weights_dtype=0)


@pytest.mark.parametrize("source,with_own", [(None, False), (torch.tensor([1, 1, 0], dtype=torch.int32), False),
                                             (torch.tensor([1, 1, 0]), True)])
@pytest.mark.skipif(not NO_GPU, reason="on a GPU machine valid arguments would launch on CPU pointers")
def test_launcher_arguments_pass_the_extension_checks(C, source, with_own):
    # The binding accepts every keyword the launcher builds; only the device is missing.
    q, k, v, out, kw = _cpu_call(source)
    own = _own_term(q, k, v) if with_own else None
    with pytest.raises(RuntimeError, match=r"attnctl CUDA backend: no usable CUDA device"):
        C.attention_forward(**launch_arguments(q, k, v, out, **kw, own=own), device=0, stream=0)


@pytest.mark.skipif(not NO_GPU, reason="needs a machine without a CUDA device")
def test_launcher_without_a_gpu_raises_runtime_error_with_the_reason():
    reason = cuda_unavailable_reason()
    assert reason and ("no CUDA device" in reason or "not built" in reason), reason
    q = torch.randn(1, 1, 4, 16, dtype=torch.float16)
    with pytest.raises(RuntimeError, match="attnctl CUDA backend unavailable: " + re.escape(reason)):
        attention_cuda(q, q, q, scale=0.25, bias=None, prob_mult=None, capture=None)


def test_reason_when_the_module_is_not_built(monkeypatch):
    monkeypatch.setattr(cuda_backend, "_C", None)
    monkeypatch.setattr(cuda_backend, "_import_error", ModuleNotFoundError(f"No module named '{MODULE}'", name=MODULE))
    assert cuda_unavailable_reason().startswith(f"the CUDA extension {MODULE} is not built")


def test_reason_when_the_module_fails_to_import(monkeypatch):
    monkeypatch.setattr(cuda_backend, "_C", None)
    monkeypatch.setattr(cuda_backend, "_import_error", ImportError("undefined symbol: cudaLaunchKernel"))
    assert cuda_unavailable_reason() == (
        f"the CUDA extension {MODULE} failed to import (ImportError: undefined symbol: cudaLaunchKernel)")


def test_reason_when_the_module_has_another_abi(monkeypatch):
    class Stale:
        ABI_VERSION = ABI_VERSION + 1
    monkeypatch.setattr(cuda_backend, "_C", Stale)
    assert f"ABI version {ABI_VERSION + 1}, this launcher expects {ABI_VERSION}" in cuda_unavailable_reason()
