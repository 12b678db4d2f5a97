"""The CUDA C++ backend against the fp32 reference, on a GPU (skipped without CUDA).

Comparison rule (FlashAttention's, as for the Triton kernel): the reference run in the
inputs' own precision measures what that precision costs; the kernel may be at most twice
as far from the fp32 oracle, plus 2u at magnitude 1 (u the unit roundoff):

    err_kernel <= 2 * err_ref_lowprec + LOWPREC_ATOL[dtype] * max(1, max|ref_fp32|)

for the output and for every capture buffer (prefilled with random values, so the kernel
must add). -inf positions (the LSE of an all -inf row) must agree exactly; NaN never appears.

Shapes: the real SD1.5 / SDXL attention calls (cross-attention with every capture, and
self-attention), then odd ones: N = 1, 77, 300; every head-dim tile and the generic one;
M off the block grid; every broadcast form of bias and prob_mult; all -inf rows; strided
and (B, M, H, D) layouts; Dv != D; int32 / int64 tokens; fp16 and bf16; injection (source)
with per-item and broadcast bias, prob_mult and every capture; the two-source form (own)
with both prob_mults and the captures of both terms. Plus compute-sanitizer memcheck and
racecheck on small cases, when the tool exists.
"""
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

from attnctl import Capture, OwnTerm, attention_reference
from attnctl.backends._layout import empty_output
from attnctl.backends.cuda_backend import attention_cuda, cuda_unavailable_reason
from attnctl.validation import validate

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

F16, BF16 = torch.float16, torch.bfloat16
LOWPREC_ATOL = {F16: 2 * 2.0 ** -11, BF16: 2 * 2.0 ** -8}
KINDS = ("token_mass", "maps", "head_maps", "lse")


@pytest.fixture(autouse=True)
def _backend_available(request):
    if request.node.name != "test_cuda_backend_is_available":
        reason = cuda_unavailable_reason()
        if reason:
            pytest.skip(reason)
    torch.manual_seed(0)


def test_cuda_backend_is_available():
    # On a GPU machine the extension must have been built (pip install -e . with nvcc).
    assert cuda_unavailable_reason() is None


# ---- inputs ---------------------------------------------------------------------------------

def make_qkv(B, H, M, N, D, Dv=None, *, dtype=F16, layout="bmhd"):
    """bmhd: (B, H, seq, D) views of (B, seq, H, D) memory, as diffusers passes them.
    contiguous: (B, H, seq, D). strided: q with d stride 2, k column-major, v a head slice
    (these take the kernel's element-wise load path)."""
    Dv = D if Dv is None else Dv
    mk = lambda *s: torch.randn(*s, device="cuda").to(dtype)  # noqa: E731
    if layout == "bmhd":
        return mk(B, M, H, D).transpose(1, 2), mk(B, N, H, D).transpose(1, 2), mk(B, N, H, Dv).transpose(1, 2)
    if layout == "contiguous":
        return mk(B, H, M, D), mk(B, H, N, D), mk(B, H, N, Dv)
    if layout == "strided":
        return mk(B, H, M, 2 * D)[..., ::2], mk(B, H, D, N).transpose(-1, -2), mk(B, H + 1, N, Dv)[:, 1:]
    raise ValueError(layout)


FORMS = {"bhmn": "BHMN", "1hmn": "1HMN", "b1mn": "B1MN", "bh1n": "BH1N", "bhm1": "BHM1", "11mn": "11MN",
         "111n": "111N", "hmn": "HMN", "mn": "MN", "n": "N", "m1": "M1", "scalar": ""}


def make_operand(form, B, H, M, N, *, kind="bias", dtype=torch.float32):
    if form == "expanded":
        return make_operand("111n", B, H, M, N, kind=kind, dtype=dtype).expand(B, H, M, N)
    if form == "transposed":
        return make_operand("bhmn", B, H, N, M, kind=kind, dtype=dtype).transpose(-1, -2)
    sizes = {"B": B, "H": H, "M": M, "N": N, "1": 1}
    shape = tuple(sizes[c] for c in FORMS[form])
    t = torch.randn(shape, device="cuda") if kind == "bias" else 2 * torch.rand(shape, device="cuda") - 0.5
    return t.to(dtype)


def mask_rows(bias, rows, frac=0.2):
    """-inf at a random fraction of entries and at every key of the given query rows."""
    bias = bias.clone()
    bias[torch.rand(bias.shape, device=bias.device) < frac] = float("-inf")
    for r in rows:
        bias[..., r, :] = float("-inf")
    return bias


def make_capture(q, k, kinds, *, T=5, tokens_form="2d", token_dtype=torch.int64, head_weights=None):
    B, N = q.shape[0], k.shape[2]
    tokens = None
    if {"maps", "head_maps"} & set(kinds):
        shape = (B, T) if tokens_form == "2d" else (T,)
        tokens = torch.randint(0, N, shape, device="cuda")
        tokens[..., 0] = N - 1
        tokens = tokens.to(token_dtype)
    cap = Capture.zeros(q, k, token_mass="token_mass" in kinds, maps="maps" in kinds,
                        head_maps="head_maps" in kinds, lse="lse" in kinds, tokens=tokens,
                        head_weights=head_weights if "maps" in kinds else None)
    if tokens is not None:
        cap.tokens = tokens  # keep int64 when asked: the kernel reads both index widths
    for buf in cap.buffers().values():
        buf.copy_(torch.rand(buf.shape, device="cuda"))  # the kernel must add, not overwrite
    return cap


def clone_capture(cap):
    if cap is None:
        return None
    return Capture(**{n: b.clone() for n, b in cap.buffers().items()}, tokens=cap.tokens,
                   head_weights=cap.head_weights)


# ---- comparison -----------------------------------------------------------------------------

def clone_own(own):
    return None if own is None else OwnTerm(own.values, own.prob_mult, clone_capture(own.capture))


def run_cuda(q, k, v, *, bias=None, prob_mult=None, capture=None, scale=None, source=None, own=None):
    scale = validate(q, k, v, scale, bias, prob_mult, capture, source=source, own=own)
    return attention_cuda(q, k, v, scale=scale, bias=bias, prob_mult=prob_mult, capture=capture, source=source,
                          own=own)


def assert_close(name, got, ref32, reflow, dtype):
    got, ref32, reflow = got.float(), ref32.float(), reflow.float()
    assert not torch.isnan(got).any(), f"{name}: NaN in the kernel's result"
    inf_got, inf_ref = torch.isinf(got), torch.isinf(ref32)
    assert torch.equal(inf_got, inf_ref) and torch.equal(got[inf_got], ref32[inf_ref]), \
        f"{name}: infinities differ ({int(inf_got.sum())} in the kernel, {int(inf_ref.sum())} in the reference)"
    finite = ~inf_ref
    if not finite.any():
        return
    err = (got[finite] - ref32[finite]).abs().max().item()
    low_finite = finite & torch.isfinite(reflow)
    err_low = (reflow[low_finite] - ref32[low_finite]).abs().max().item() if low_finite.any() else 0.0
    bound = 2 * err_low + LOWPREC_ATOL[dtype] * max(1.0, ref32[finite].abs().max().item())
    assert err <= bound, f"{name}: max error {err:.3g} > {bound:.3g} (reference in {dtype}: {err_low:.3g})"


def check(q, k, v, *, bias=None, prob_mult=None, capture=None, source=None, own=None):
    scale = q.shape[-1] ** -0.5
    cap_ref, cap_low = clone_capture(capture), clone_capture(capture)
    own_ref, own_low = clone_own(own), clone_own(own)
    out = run_cuda(q, k, v, bias=bias, prob_mult=prob_mult, capture=capture, scale=scale, source=source, own=own)
    ref = attention_reference(q, k, v, scale=scale, bias=bias, prob_mult=prob_mult, capture=cap_ref,
                              source=source, own=own_ref)
    low = attention_reference(q, k, v, scale=scale, bias=bias, prob_mult=prob_mult, capture=cap_low,
                              compute_dtype=q.dtype, source=source, own=own_low)
    torch.cuda.synchronize()
    assert out.shape == ref.shape and out.dtype == q.dtype
    assert out.stride() == empty_output(q, v.shape[-1]).stride()
    assert_close("out", out, ref, low, q.dtype)
    if capture is not None:
        for name, buf in capture.buffers().items():
            assert_close(name, buf, cap_ref.buffers()[name], cap_low.buffers()[name], q.dtype)
    if own is not None and own.capture is not None:
        for name, buf in own.capture.buffers().items():
            assert_close("own." + name, buf, own_ref.capture.buffers()[name], own_low.capture.buffers()[name],
                         q.dtype)


# ---- the real shapes ------------------------------------------------------------------------

REAL_SHAPES = [  # B (CFG doubled), H, M, N, D
    pytest.param(2, 8, 4096, 77, 40, id="sd15-64x64-cross"),
    pytest.param(2, 8, 1024, 77, 80, id="sd15-32x32-cross"),
    pytest.param(2, 8, 256, 77, 160, id="sd15-16x16-cross"),
    pytest.param(2, 8, 64, 77, 160, id="sd15-8x8-cross"),
    pytest.param(2, 10, 4096, 77, 64, id="sdxl-64x64-cross"),
    pytest.param(2, 20, 1024, 77, 64, id="sdxl-32x32-cross"),
    pytest.param(2, 8, 4096, 4096, 40, id="sd15-64x64-self"),
    pytest.param(2, 8, 1024, 1024, 80, id="sd15-32x32-self"),
    pytest.param(2, 10, 4096, 4096, 64, id="sdxl-64x64-self"),
    pytest.param(2, 20, 1024, 1024, 64, id="sdxl-32x32-self"),
]


@pytest.mark.parametrize("dtype", [F16, BF16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("B,H,M,N,D", REAL_SHAPES)
def test_real_shapes_with_every_capture(B, H, M, N, D, dtype):
    q, k, v = make_qkv(B, H, M, N, D, dtype=dtype)
    cross = N == 77
    cap = make_capture(q, k, KINDS, T=N if cross else 16, tokens_form="1d",
                       head_weights=torch.rand(H, device="cuda"))
    check(q, k, v, capture=cap)


@pytest.mark.parametrize("B,H,M,N,D", REAL_SHAPES[:6])
def test_real_cross_attention_plain(B, H, M, N, D):
    check(*make_qkv(B, H, M, N, D))


# ---- odd shapes -----------------------------------------------------------------------------

ODD_SHAPES = [  # B, H, M, N, D, Dv
    (2, 2, 33, 1, 40, 40),
    (2, 2, 130, 77, 40, 40),
    (1, 3, 1, 300, 64, 64),
    (1, 2, 129, 300, 80, 80),
    (2, 1, 65, 77, 160, 160),
    (1, 2, 97, 300, 160, 160),
    (1, 2, 70, 81, 128, 128),     # one key past a block of 80
    (1, 2, 70, 80, 128, 128),     # exactly one block
    (1, 2, 33, 77, 256, 256),     # generic tile
    (1, 2, 65, 300, 168, 168),    # generic tile, D not a tile
    (1, 2, 40, 77, 16, 16),       # small D in the 48 tile
    (1, 2, 40, 77, 24, 24),
    (2, 2, 50, 90, 40, 80),       # Dv != D
    (1, 2, 50, 77, 160, 64),
]


@pytest.mark.parametrize("dtype", [F16, BF16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("B,H,M,N,D,Dv", ODD_SHAPES, ids=[f"B{c[0]}H{c[1]}M{c[2]}N{c[3]}D{c[4]}Dv{c[5]}"
                                                          for c in ODD_SHAPES])
def test_odd_shapes_with_every_control_and_capture(B, H, M, N, D, Dv, dtype):
    q, k, v = make_qkv(B, H, M, N, D, Dv, dtype=dtype)
    bias = mask_rows(make_operand("bhmn", B, H, M, N), rows=[0, M - 1] if M > 1 else [])
    prob_mult = make_operand("bhmn", B, H, M, N, kind="mult", dtype=dtype)
    cap = make_capture(q, k, KINDS, T=min(7, N) if N > 1 else 3, head_weights=torch.randn(B, H, device="cuda"))
    check(q, k, v, bias=bias, prob_mult=prob_mult, capture=cap)


@pytest.mark.parametrize("D", [40, 64, 80, 128, 160, 256, 8, 232])
@pytest.mark.parametrize("N", [1, 77, 300])
def test_plain_attention_every_tile(D, N):
    check(*make_qkv(1, 2, 77, N, D, layout="contiguous"))


BROADCAST = list(FORMS) + ["expanded", "transposed"]


@pytest.mark.parametrize("form", BROADCAST)
@pytest.mark.parametrize("N", [77, 300])
def test_bias_broadcast_forms(form, N):
    B, H, M = 2, 3, 70
    q, k, v = make_qkv(B, H, M, N, 40)
    bias = make_operand(form, B, H, M, N, dtype=torch.float16)
    check(q, k, v, bias=bias, capture=make_capture(q, k, KINDS, head_weights=torch.rand(H, device="cuda")))


@pytest.mark.parametrize("form", BROADCAST)
@pytest.mark.parametrize("N", [77, 300])
def test_prob_mult_broadcast_forms(form, N):
    B, H, M = 2, 3, 70
    q, k, v = make_qkv(B, H, M, N, 64, dtype=BF16)
    f = make_operand(form, B, H, M, N, kind="mult", dtype=torch.bfloat16)
    check(q, k, v, prob_mult=f, capture=make_capture(q, k, KINDS))


@pytest.mark.parametrize("N", [77, 300])
def test_all_inf_rows_give_zero_output_and_minus_inf_lse(N):
    B, H, M = 2, 2, 50
    q, k, v = make_qkv(B, H, M, N, 80)
    bias = mask_rows(torch.randn(B, H, M, N, device="cuda"), rows=[0, 7, M - 1], frac=0.5)
    cap = make_capture(q, k, KINDS)
    check(q, k, v, bias=bias, capture=cap)
    out = run_cuda(q, k, v, bias=bias)
    assert (out[:, :, [0, 7, M - 1]] == 0).all()
    assert torch.isneginf(cap.lse[:, :, [0, 7, M - 1]]).all()


@pytest.mark.parametrize("layout", ["bmhd", "contiguous", "strided"])
@pytest.mark.parametrize("N", [77, 300])
def test_layouts(layout, N):
    q, k, v = make_qkv(2, 3, 70, N, 40, dtype=BF16, layout=layout)
    check(q, k, v, bias=make_operand("b1mn", 2, 3, 70, N), capture=make_capture(q, k, KINDS))


def test_strided_output_view_of_a_bmhd_query():
    # q a (B, M, H, D) view: the output comes back in the same memory order.
    q, k, v = make_qkv(2, 4, 33, 77, 64)
    out = run_cuda(q, k, v)
    assert out.transpose(1, 2).is_contiguous()


@pytest.mark.parametrize("token_dtype,form", [(torch.int32, "1d"), (torch.int64, "2d"), (torch.int32, "2d")])
@pytest.mark.parametrize("weights", [None, "h", "bh"])
def test_tokens_and_head_weights(token_dtype, form, weights):
    B, H = 2, 3
    q, k, v = make_qkv(B, H, 70, 300, 40)
    w = None if weights is None else torch.randn((H,) if weights == "h" else (B, H), device="cuda").half()
    cap = make_capture(q, k, ("maps", "head_maps"), T=90, tokens_form=form, token_dtype=token_dtype,
                       head_weights=w)  # T > 80: two token blocks
    check(q, k, v, capture=cap)


@pytest.mark.parametrize("kind", KINDS)
def test_each_capture_alone(kind):
    q, k, v = make_qkv(2, 2, 100, 300, 80)
    check(q, k, v, capture=make_capture(q, k, (kind,)))


def test_runs_on_the_current_stream():
    q, k, v = make_qkv(2, 2, 300, 77, 64)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        out = run_cuda(q, k, v)
        expected = attention_reference(q, k, v, scale=64 ** -0.5)
    stream.synchronize()
    assert (out.float() - expected.float()).abs().max().item() < 1e-2


def test_float32_inputs_are_refused():
    q, k, v = make_qkv(1, 1, 16, 16, 64, dtype=torch.float32)
    with pytest.raises(ValueError, match="float16 or bfloat16"):
        run_cuda(q, k, v)


def test_cpu_tensors_are_refused():
    q = torch.randn(1, 1, 16, 64, dtype=F16)
    with pytest.raises(ValueError, match="expected CUDA tensors"):
        attention_cuda(q, q, q, scale=0.125, bias=None, prob_mult=None, capture=None)


# ---- injection (source) -----------------------------------------------------------------------

SOURCES = [[0, 0, 1], [2, 0, 1], [1, 2, 2]]


@pytest.mark.parametrize("dtype", [F16, BF16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("bias_form", [None, "1hmn", "bhmn", "b1mn", "mn"])
@pytest.mark.parametrize("N", [77, 300])
@pytest.mark.parametrize("src", SOURCES, ids=["-".join(map(str, s)) for s in SOURCES])
def test_injection_with_bias_prob_mult_and_every_capture(src, N, bias_form, dtype):
    B, H, M = 3, 2, 70
    q, k, v = make_qkv(B, H, M, N, 40, dtype=dtype)
    bias = None
    if bias_form is not None:
        bias = mask_rows(make_operand(bias_form, B, H, M, N), rows=[M - 1])
        if bias.dim() == 4 and bias.shape[0] == B:
            bias[0, :, 3] = float("-inf")  # an all -inf row of item 0 only: follows it to where it is injected
    prob_mult = make_operand("bhmn", B, H, M, N, kind="mult", dtype=dtype)
    cap = make_capture(q, k, KINDS, head_weights=torch.randn(B, H, device="cuda"))
    check(q, k, v, bias=bias, prob_mult=prob_mult, capture=cap, source=torch.tensor(src, device="cuda"))


@pytest.mark.parametrize("source_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("layout", ["bmhd", "strided"])
@pytest.mark.parametrize("D,Dv", [(64, 64), (80, 80), (160, 64), (232, 232)])
def test_injection_layouts_tiles_and_index_dtypes(source_dtype, layout, D, Dv):
    B, H, M, N = 3, 2, 65, 90
    q, k, v = make_qkv(B, H, M, N, D, Dv, dtype=BF16, layout=layout)
    # A strided source: the kernel reads source[b] through its stride.
    source = torch.tensor([1, 7, 2, 7, 1, 7], device="cuda", dtype=source_dtype)[::2]
    cap = make_capture(q, k, KINDS, T=9, tokens_form="1d", token_dtype=torch.int32)
    check(q, k, v, bias=make_operand("b1mn", B, H, M, N), capture=cap, source=source)


@pytest.mark.parametrize("N", [77, 300])
def test_injection_reproduces_the_source_items_output(N):
    # Same CTA work on the same data: bit-identical outputs, no reference needed.
    q, k, v = make_qkv(2, 3, 70, N, 64, layout="contiguous")
    bias = make_operand("bhmn", 2, 3, 70, N)
    v[1] = v[0]
    out = run_cuda(q, k, v, bias=bias, source=torch.tensor([0, 0], device="cuda"))
    assert torch.equal(out[1], out[0])
    plain = run_cuda(q, k, v, bias=bias)
    assert torch.equal(out[0], plain[0]) and not torch.equal(out[1], plain[1])
    identity = run_cuda(q, k, v, bias=bias, source=torch.tensor([0, 1], device="cuda", dtype=torch.int32))
    assert torch.equal(identity, plain)


# ---- the two-source form (own) ----------------------------------------------------------------

TWO_SOURCES = [[0, 0, 1], [1, 2, 2]]


def make_own(q, k, v, *, mult_form="bhmn", kinds=KINDS, mult_dtype=torch.float32):
    """values laid out unlike v (a (B, N, H, Dv) view), own.prob_mult in ``mult_form``, an own
    capture of ``kinds`` (int32 tokens, (H,) weights)."""
    B, H, N, Dv = v.shape
    values = torch.randn(B, N, H, Dv, device="cuda").to(v.dtype).transpose(1, 2)
    mult = None if mult_form is None else make_operand(mult_form, B, H, q.shape[2], N, kind="mult", dtype=mult_dtype)
    cap = make_capture(q, k, kinds, T=4, token_dtype=torch.int32, head_weights=torch.rand(H, device="cuda")) \
        if kinds else None
    return OwnTerm(values, mult, cap)


@pytest.mark.parametrize("dtype", [F16, BF16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("bias_form", [None, "1hmn", "bhmn", "mn"])
@pytest.mark.parametrize("N", [77, 300])
@pytest.mark.parametrize("src", TWO_SOURCES, ids=["-".join(map(str, s)) for s in TWO_SOURCES])
def test_two_source_with_bias_prob_mults_and_both_captures(src, N, bias_form, dtype):
    B, H, M = 3, 2, 70
    q, k, v = make_qkv(B, H, M, N, 40, dtype=dtype)
    bias = None
    if bias_form is not None:
        bias = mask_rows(make_operand(bias_form, B, H, M, N), rows=[M - 1])
        if bias.dim() == 4 and bias.shape[0] == B:
            bias[0, :, 3] = float("-inf")  # an all -inf row of item 0: in one term or both
    prob_mult = make_operand("bhmn", B, H, M, N, kind="mult", dtype=dtype)
    cap = make_capture(q, k, KINDS, head_weights=torch.randn(B, H, device="cuda"))
    own = make_own(q, k, v, mult_form="b1mn", mult_dtype=torch.float16)
    check(q, k, v, bias=bias, prob_mult=prob_mult, capture=cap, source=torch.tensor(src, device="cuda"), own=own)


@pytest.mark.parametrize("mult_form", [None, "n", "bh1n", "scalar"])
@pytest.mark.parametrize("kinds", [(), ("token_mass",), ("maps", "lse")], ids=["none", "mass", "maps-lse"])
@pytest.mark.parametrize("N", [77, 300])
def test_two_source_prob_mult_forms_and_partial_captures(mult_form, kinds, N):
    B, H, M = 3, 2, 50
    q, k, v = make_qkv(B, H, M, N, 64, dtype=BF16)
    own = make_own(q, k, v, mult_form=mult_form, kinds=kinds, mult_dtype=torch.bfloat16)
    check(q, k, v, capture=make_capture(q, k, ("head_maps",)), source=torch.tensor([2, 2, 0], device="cuda"),
          own=own)


@pytest.mark.parametrize("layout", ["bmhd", "strided"])
@pytest.mark.parametrize("D,Dv", [(48, 48), (80, 80), (128, 128), (160, 160), (160, 64), (232, 232)])
@pytest.mark.parametrize("N", [77, 300])
def test_two_source_every_tile_and_layout(layout, D, Dv, N):
    B, H, M = 3, 2, 65
    q, k, v = make_qkv(B, H, M, N, D, Dv, dtype=F16, layout=layout)
    own = make_own(q, k, v)
    cap = make_capture(q, k, KINDS, T=9, tokens_form="1d")
    check(q, k, v, bias=make_operand("bhmn", B, H, M, N), capture=cap,
          source=torch.tensor([1, 2, 2], device="cuda", dtype=torch.int32), own=own)


@pytest.mark.parametrize("N", [77, 300])
def test_two_source_exact_identities(N):
    # No reference: own.prob_mult = 0 adds exactly nothing (equals zero own values), and an
    # item whose inputs equal another's gets a bit-identical output and captures.
    B, H, M = 3, 2, 70
    q, k, v = make_qkv(B, H, M, N, 64, layout="contiguous")
    bias = make_operand("bhmn", B, H, M, N)
    for t in (q, k, v, bias):
        t[1] = t[0]
    source = torch.tensor([0, 0, 1], device="cuda")
    values = torch.randn_like(v)
    values[1] = values[0]
    zero_mult = torch.zeros(B, 1, 1, N, device="cuda")
    cap = make_capture(q, k, ("head_maps", "lse"), tokens_form="1d")  # the same tokens for every item
    for buf in cap.buffers().values():
        buf.zero_()
    own_cap = clone_capture(cap)
    muted = run_cuda(q, k, v, bias=bias, source=source, capture=cap, own=OwnTerm(values, zero_mult, own_cap))
    zeros = run_cuda(q, k, v, bias=bias, source=source, own=OwnTerm(torch.zeros_like(v)))
    assert torch.equal(muted, zeros)
    assert torch.equal(muted[1], muted[0])
    for c in (cap, own_cap):
        for buf in c.buffers().values():
            assert torch.equal(buf[1], buf[0])
    # Items 0 and 1 take item 0's logits in both terms: the two captures agree exactly.
    assert torch.equal(cap.lse[:2], own_cap.lse[:2]) and torch.equal(cap.head_maps[:2], own_cap.head_maps[:2])
    # The source-only injection kernel normalises after P·V instead of before: equal up to rounding.
    injected = run_cuda(q, k, v, bias=bias, source=source)
    bound = 2 * LOWPREC_ATOL[F16] * max(1.0, injected.float().abs().max().item())
    assert (muted.float() - injected.float()).abs().max().item() <= bound


# ---- compute-sanitizer ------------------------------------------------------------------------

SANITIZER_SCRIPT = textwrap.dedent("""
    import torch
    from attnctl import Capture, OwnTerm
    from attnctl.backends.cuda_backend import attention_cuda

    torch.manual_seed(0)
    def run(B, H, M, N, D, layout, source=None, own=False):
        if layout == "strided":
            q = torch.randn(B, H, M, 2 * D, device="cuda").half()[..., ::2]
            k = torch.randn(B, H, D, N, device="cuda").half().transpose(-1, -2)
        else:
            q = torch.randn(B, M, H, D, device="cuda").half().transpose(1, 2)
            k = torch.randn(B, N, H, D, device="cuda").half().transpose(1, 2)
        v = torch.randn(B, H, N, D, device="cuda").half()
        bias = torch.randn(B, H, M, N, device="cuda")
        mult = torch.rand(B, 1, 1, N, device="cuda").half()
        cap = Capture.zeros(q, k, token_mass=True, maps=True, head_maps=True, lse=True,
                            tokens=[N - 1, 0, 3], head_weights=torch.rand(H, device="cuda"))
        if source is not None:
            source = torch.tensor(source, device="cuda")
        if own:
            own_cap = Capture.zeros(q, k, token_mass=True, maps=True, head_maps=True, lse=True,
                                    tokens=[0, N - 1], head_weights=torch.rand(H, device="cuda"))
            own = OwnTerm(torch.randn(B, N, H, D, device="cuda").half().transpose(1, 2), mult, own_cap)
        attention_cuda(q, k, v, scale=D ** -0.5, bias=bias, prob_mult=mult, capture=cap, source=source,
                       own=own or None)
    run(1, 2, 70, 90, 40, "bmhd")       # two key blocks: token mass in the second pass
    run(1, 2, 33, 77, 160, "strided")   # one key block, element-wise loads
    run(1, 1, 20, 40, 256, "bmhd")      # generic tile
    run(3, 2, 70, 90, 40, "bmhd", source=[2, 0, 0])      # injection: q, k, bias read at source[b]
    run(3, 2, 33, 77, 160, "strided", source=[1, 2, 1])  # injection, element-wise loads
    run(3, 2, 70, 90, 40, "bmhd", source=[1, 0, 0], own=True)     # two-source, statistics pass
    run(3, 2, 33, 77, 160, "strided", source=[2, 2, 0], own=True)  # two-source, one key block
    run(3, 1, 20, 40, 256, "bmhd", source=[0, 0, 1], own=True)     # two-source, generic tile
    torch.cuda.synchronize()
""")


def _sanitizer():
    for root in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if root and os.path.isfile(os.path.join(root, "bin", "compute-sanitizer")):
            return os.path.join(root, "bin", "compute-sanitizer")
    return shutil.which("compute-sanitizer")


@pytest.mark.parametrize("tool", ["memcheck", "racecheck"])
def test_compute_sanitizer(tool):
    sanitizer = _sanitizer()
    if sanitizer is None:
        pytest.skip("compute-sanitizer not found")
    cmd = [sanitizer, "--tool", tool, "--error-exitcode", "1", "--kernel-name", "kns=attention_fwd_kernel",
           sys.executable, "-c", SANITIZER_SCRIPT]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    report = result.stdout + result.stderr
    assert result.returncode == 0, report[-4000:]
    assert "ERROR SUMMARY: 0 errors" in report or "RACECHECK SUMMARY: 0 hazards" in report, report[-4000:]
