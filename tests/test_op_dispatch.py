"""Backend choice: "auto" policy, the ATTNCTL_BACKEND override, errors for impossible
requests, last_dispatch() reporting, and the output contract (dtype, layout) per backend."""
import pytest
import torch

import attnctl
from attnctl import Capture
from attnctl import op as op_module

from op_cases import DEVICE, ON_GPU, compare, make_qkv

ENV = "ATTNCTL_BACKEND"


@pytest.fixture(autouse=True)
def _no_backend_env(monkeypatch):
    monkeypatch.delenv(ENV, raising=False)


def small(layout="contiguous", dtype=torch.float32):
    return make_qkv(1, 2, 9, 12, 16, dtype=dtype, layout=layout)


def lse_capture(q, k):
    return Capture.zeros(q, k, lse=True)


def test_auto_plain_call_runs_sdpa():
    q, k, v = small()
    out = attnctl.attention(q, k, v)
    d = attnctl.last_dispatch()
    assert d.backend == "sdpa" and "no bias, prob_mult or capture" in d.reason
    compare("auto plain vs reference", out, attnctl.attention_reference(q, k, v, scale=0.25))


def test_auto_empty_capture_counts_as_plain():
    q, k, v = small()
    attnctl.attention(q, k, v, capture=Capture())
    assert attnctl.last_dispatch().backend == "sdpa"


@pytest.mark.skipif(ON_GPU, reason="CPU policy")
@pytest.mark.parametrize("what", ["bias", "prob_mult", "capture"])
def test_auto_with_controls_on_cpu_runs_torch(what):
    q, k, v = small()
    kwargs = {"bias": torch.zeros(1, device=q.device), "prob_mult": torch.ones(1, device=q.device),
              "capture": lse_capture(q, k)}
    attnctl.attention(q, k, v, **{what: kwargs[what]})
    d = attnctl.last_dispatch()
    assert d.backend == "torch"
    assert d.reason.startswith("auto") and "cpu" in d.reason


@pytest.mark.skipif(not ON_GPU, reason="needs CUDA")
def test_auto_with_controls_on_cuda_runs_triton():
    q, k, v = small()
    attnctl.attention(q, k, v, bias=torch.zeros(1))
    assert attnctl.last_dispatch().backend == "triton"


@pytest.mark.parametrize("backend", ["torch", "triton", "sdpa"])
def test_explicit_backend_is_used_and_reported(backend):
    q, k, v = small()
    attnctl.attention(q, k, v, backend=backend)
    d = attnctl.last_dispatch()
    assert d == attnctl.Dispatch(backend, "requested by backend argument")


@pytest.mark.parametrize("env", ["torch", "triton", "sdpa"])
def test_env_var_overrides_auto(monkeypatch, env):
    monkeypatch.setenv(ENV, env)
    q, k, v = small()
    attnctl.attention(q, k, v)
    d = attnctl.last_dispatch()
    assert d.backend == env and f"{ENV}={env}" in d.reason


def test_env_var_auto_means_policy(monkeypatch):
    monkeypatch.setenv(ENV, "auto")
    q, k, v = small()
    attnctl.attention(q, k, v)
    assert attnctl.last_dispatch().backend == "sdpa"


def test_env_var_does_not_override_explicit_backend(monkeypatch):
    monkeypatch.setenv(ENV, "sdpa")
    q, k, v = small()
    attnctl.attention(q, k, v, capture=lse_capture(q, k), backend="torch")
    assert attnctl.last_dispatch().backend == "torch"


def test_env_var_sdpa_with_capture_raises(monkeypatch):
    monkeypatch.setenv(ENV, "sdpa")
    q, k, v = small()
    with pytest.raises(ValueError, match=f"{ENV}=sdpa: 'sdpa' computes plain attention only"):
        attnctl.attention(q, k, v, capture=lse_capture(q, k))


def test_invalid_env_value(monkeypatch):
    monkeypatch.setenv(ENV, "cudnn")
    q, k, v = small()
    with pytest.raises(ValueError) as info:
        attnctl.attention(q, k, v)
    msg = str(info.value)
    assert ENV in msg and "'cudnn'" in msg and "auto, torch, triton, cuda, sdpa" in msg


@pytest.mark.parametrize("name", ["Triton", "CUDA", "", None])
def test_invalid_backend_name(name):
    q, k, v = small()
    with pytest.raises(ValueError) as info:
        attnctl.attention(q, k, v, backend=name)
    msg = str(info.value)
    assert msg.startswith("backend:") and repr(name) in msg and "auto, torch, triton, cuda, sdpa" in msg


@pytest.mark.skipif(ON_GPU, reason="on a GPU the CUDA backend can run")
def test_cuda_backend_without_a_gpu_names_the_cause():
    q, k, v = small()
    with pytest.raises(RuntimeError, match=r"backend argument: the CUDA backend cannot run \(.+\)"):
        attnctl.attention(q, k, v, bias=torch.zeros(1), backend="cuda")


@pytest.mark.parametrize("what", ["bias", "prob_mult", "capture"])
def test_sdpa_with_work_raises(what):
    q, k, v = small()
    kwargs = {"bias": torch.zeros(1, device=q.device), "prob_mult": torch.ones(1, device=q.device),
              "capture": lse_capture(q, k)}
    with pytest.raises(ValueError) as info:
        attnctl.attention(q, k, v, backend="sdpa", **{what: kwargs[what]})
    msg = str(info.value)
    assert "backend argument" in msg and "'sdpa'" in msg and "'torch', 'triton' or 'cuda'" in msg


def test_sdpa_error_leaves_capture_untouched():
    q, k, v = small()
    cap = lse_capture(q, k)
    with pytest.raises(ValueError):
        attnctl.attention(q, k, v, backend="sdpa", capture=cap)
    assert (cap.lse == 0).all()


@pytest.mark.skipif(ON_GPU, reason="CPU tensors only")
def test_triton_on_cpu_without_interpreter_raises(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    q, k, v = small()
    with pytest.raises(ValueError) as info:
        attnctl.attention(q, k, v, backend="triton", bias=torch.zeros(1))
    msg = str(info.value)
    assert "'triton' needs CUDA tensors" in msg and "TRITON_INTERPRET=1" in msg and "cpu" in msg
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="needs CUDA"):
        attnctl.attention(q, k, v, backend="triton")
    monkeypatch.setenv(ENV, "triton")
    with pytest.raises(ValueError, match=f"{ENV}=triton: 'triton' needs CUDA"):
        attnctl.attention(q, k, v, bias=torch.zeros(1))


def test_triton_unavailable(monkeypatch):
    """When the Triton backend cannot be imported, an explicit backend="triton" raises
    naming the import error, and the auto policy for CUDA tensors falls back to torch with
    that reason (a stand-in object with is_cuda=True emulates a CUDA q on CPU)."""
    monkeypatch.setattr(op_module, "_triton_import_error", "ImportError: no triton")
    q, k, v = small()
    with pytest.raises(RuntimeError, match=r"backend argument: the Triton backend cannot be imported \(ImportError: no triton\)"):
        attnctl.attention(q, k, v, backend="triton")

    class FakeCudaTensor:
        is_cuda = True
        device = "cuda:0"
    d = op_module.choose_backend("auto", FakeCudaTensor(), has_work=True)
    assert d.backend == "torch" and "Triton unavailable (ImportError: no triton)" in d.reason
    assert op_module.choose_backend("auto", FakeCudaTensor(), has_work=False).backend == "sdpa"


def test_last_dispatch_tracks_latest_call():
    q, k, v = small()
    attnctl.attention(q, k, v, backend="torch")
    assert attnctl.last_dispatch().backend == "torch"
    attnctl.attention(q, k, v)
    assert attnctl.last_dispatch().backend == "sdpa"


def test_debug_log_names_backend(caplog):
    q, k, v = small()
    with caplog.at_level("DEBUG", logger="attnctl"):
        attnctl.attention(q, k, v, backend="torch")
    assert any("attnctl.attention -> torch" in r.getMessage() for r in caplog.records)


# ---- the output contract, per backend ---------------------------------------------------------

def _call(backend, q, k, v):
    # sdpa only takes plain calls; the others get a no-op bias so "auto" would not pick sdpa
    extra = {} if backend == "sdpa" else {"bias": torch.zeros(1, device=q.device)}
    return attnctl.attention(q, k, v, backend=backend, **extra)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["f32", "f16", "bf16"])
@pytest.mark.parametrize("backend", ["torch", "triton", "sdpa", "auto"])
def test_output_dtype_is_input_dtype(backend, dtype):
    q, k, v = make_qkv(1, 2, 9, 12, 16, 24, dtype=dtype)
    out = _call(backend, q, k, v)
    assert out.dtype == dtype and out.shape == (1, 2, 9, 24)


@pytest.mark.parametrize("backend", ["torch", "triton", "sdpa"])
def test_output_layout_follows_q(backend):
    """attention() returns "(B, H, M, Dv) in q's dtype, laid out in q's memory order": a
    (B,M,H,D)-view q (diffusers) gives a (B,M,H,Dv)-memory output, whatever the backend
    (the compiled custom op enforces the same layout)."""
    B, H, M, N, D, Dv = 2, 3, 9, 12, 16, 24
    q, k, v = make_qkv(B, H, M, N, D, Dv, layout="bmhd")
    out = _call(backend, q, k, v)
    assert out.shape == (B, H, M, Dv)
    assert out.transpose(1, 2).is_contiguous(), (
        f"{backend}: output strides {out.stride()}; a (B,M,H,Dv) buffer has "
        f"{torch.empty(B, M, H, Dv, device=DEVICE).transpose(1, 2).stride()}")
    q, k, v = make_qkv(B, H, M, N, D, Dv)
    out = _call(backend, q, k, v)
    assert out.is_contiguous(), f"{backend}: contiguous q gave strides {out.stride()}"


def test_triton_with_inputs_requiring_grad_runs_the_differentiable_path_or_names_what_it_lacks():
    q, k, v = make_qkv(1, 2, 8, 8, 16, layout="bmhd")
    q.requires_grad_(True)
    attnctl.attention(q, k, v, bias=torch.zeros(1, device=DEVICE), backend="triton")
    assert "differentiable Triton path" in attnctl.last_dispatch().reason
    with pytest.raises(NotImplementedError, match="Triton backward does not support capture"):
        attnctl.attention(q, k, v, capture=lse_capture(q, k), backend="triton")
    with pytest.raises(NotImplementedError, match="prob_mult requiring grad"):
        attnctl.attention(q.detach(), k, v, prob_mult=torch.ones(1, requires_grad=True, device=DEVICE), backend="triton")
    with torch.no_grad():
        attnctl.attention(q, k, v, capture=lse_capture(q, k), backend="triton")


def test_auto_with_grad_on_cuda_runs_triton_or_falls_back_to_the_reference_and_says_so(monkeypatch, caplog):
    """A CUDA call whose inputs require grad runs the differentiable Triton path; with
    something its backward does not cover (a capture), auto runs the reference, marks the
    dispatch as a slow fallback, and logs a warning once."""
    monkeypatch.setattr(op_module, "_triton_import_error", "")

    class FakeCudaTensor:
        is_cuda = True
        device = "cuda:0"
    d = op_module.choose_backend("auto", FakeCudaTensor(), has_work=True, needs_grad=True)
    assert d.backend == "triton" and not d.slow_fallback and "differentiable" in d.reason
    d = op_module.choose_backend("auto", FakeCudaTensor(), has_work=True, needs_grad=True,
                                 grad_unsupported=("capture",))
    assert d.backend == "torch" and d.slow_fallback and "require grad" in d.reason and "capture" in d.reason
    assert op_module.choose_backend("auto", FakeCudaTensor(), has_work=True).backend == "triton"
    monkeypatch.setattr(op_module, "_warned", set())
    with caplog.at_level("WARNING", logger="attnctl"):
        op_module._note(d)
        op_module._note(d)
    assert [r.getMessage() for r in caplog.records].count(
        f"attnctl: falling back to the slow reference path: {d.reason}") == 1
