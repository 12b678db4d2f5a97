"""GPU: the Triton kernel against the fp32 reference at the real diffusion shapes.

SD1.5 512² (B=2 with CFG, 8 heads; M = 4096/1024/256/64 with D = 40/80/160/160) and SDXL
1024² (H=10 D=64 M=4096; H=20 D=64 M=1024), cross-attention (N = 77) and self-attention
(N = M), fp16 and bf16, with every capture (tokens 0..76) and with a bias + prob_mult.
Same comparison rule as the CPU suite (tests/op_cases.py): error at most twice that of the
reference run in the same low precision, plus 2u. The references are computed in chunks of
query rows so that self-attention at M = 4096 never holds more than a chunk of S and P.

Skipped without CUDA.
"""
import math

import pytest
import torch

import attnctl
from attnctl import Capture, attention_reference

from op_cases import (ALL_CAPTURES, CAPTURE_KINDS, clone_capture, compare, make_capture,
                      make_operand, make_qkv)

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

# (model, level, H, M, D)
LEVELS = [
    ("sd15", "64x64", 8, 4096, 40),
    ("sd15", "32x32", 8, 1024, 80),
    ("sd15", "16x16", 8, 256, 160),
    ("sd15", "8x8", 8, 64, 160),
    ("sdxl", "64x64", 10, 4096, 64),
    ("sdxl", "32x32", 20, 1024, 64),
]
B = 2
TEXT = 77
DTYPES = {"f16": torch.float16, "bf16": torch.bfloat16}
ROWS_PER_CHUNK = 1 << 24  # bound the reference's S/P chunk to ~2^24 * (B*H) elements


def _rows(t, m0, m1, M):
    """Rows m0:m1 of a tensor broadcast to (..., M, N) (size-1 M dims stay whole)."""
    if t is None or t.dim() < 2 or t.shape[-2] == 1:
        return t
    return t[..., m0:m1, :]


def chunked_reference(q, k, v, *, scale, bias, prob_mult, capture, compute_dtype):
    """attention_reference over chunks of query rows; capture buffers receive the same sums
    (token mass adds over chunks; per-row buffers are written through row views)."""
    Bq, H, M, _ = q.shape
    N = k.shape[2]
    chunk = max(1, min(M, ROWS_PER_CHUNK // max(1, Bq * H * N)))
    out = torch.empty(Bq, H, M, v.shape[3], dtype=q.dtype, device=q.device)
    for m0 in range(0, M, chunk):
        m1 = min(M, m0 + chunk)
        cap = None
        if capture is not None:
            cap = Capture(
                token_mass=capture.token_mass,
                maps=capture.maps[:, m0:m1] if capture.maps is not None else None,
                head_maps=capture.head_maps[:, :, m0:m1] if capture.head_maps is not None else None,
                lse=capture.lse[:, :, m0:m1] if capture.lse is not None else None,
                tokens=capture.tokens, head_weights=capture.head_weights)
        out[:, :, m0:m1] = attention_reference(
            q[:, :, m0:m1], k, v, scale=scale, bias=_rows(bias, m0, m1, M),
            prob_mult=_rows(prob_mult, m0, m1, M), capture=cap, compute_dtype=compute_dtype)
    return out


def check_real_shape(H, M, N, D, dtype, *, controls, captures, device="cuda", layout="bmhd"):
    gen = torch.Generator().manual_seed(H * M + N + D)
    q, k, v = make_qkv(B, H, M, N, D, dtype=dtype, layout=layout, gen=gen, device=device)
    scale = 1.0 / math.sqrt(D)
    bias = prob_mult = None
    if controls:
        bias = make_operand("b1mn", B, H, M, N, gen=gen, dtype=dtype, device=device)
        bias[..., ::7] = float("-inf")  # masked keys, as an attention mask would
        prob_mult = make_operand("1h1n", B, H, M, N, kind="signed", gen=gen, device=device)
    capture = None
    if captures:
        tokens = torch.arange(0, min(TEXT, N), device=device, dtype=torch.int32)
        capture = make_capture(q, k, ALL_CAPTURES, tokens=tokens,
                               head_weights=torch.rand(H, generator=gen).to(device))
    cap32, caplow = clone_capture(capture), clone_capture(capture)
    out = attnctl.attention(q, k, v, bias=bias, prob_mult=prob_mult, capture=capture, backend="triton")
    assert attnctl.last_dispatch().backend == "triton"
    assert out.dtype == dtype and out.shape == (B, H, M, D)
    if layout == "bmhd":
        assert out.transpose(1, 2).is_contiguous()
    if out.is_cuda:
        torch.cuda.synchronize()
    ref = chunked_reference(q, k, v, scale=scale, bias=bias, prob_mult=prob_mult, capture=cap32,
                            compute_dtype=torch.float32)
    low = chunked_reference(q, k, v, scale=scale, bias=bias, prob_mult=prob_mult, capture=caplow,
                            compute_dtype=dtype)
    compare("output", out, ref, low, dtype)
    if capture is not None:
        for name in CAPTURE_KINDS:
            compare(f"capture.{name}", getattr(capture, name), getattr(cap32, name),
                    getattr(caplow, name), dtype)


def _params():
    out = []
    for model, level, H, M, D in LEVELS:
        for kind, N in (("cross", TEXT), ("self", M)):
            for dt in DTYPES:
                out.append(pytest.param(H, M, N, D, DTYPES[dt], id=f"{model}-{level}-{kind}-H{H}M{M}N{N}D{D}-{dt}"))
    return out


@pytest.mark.parametrize("H,M,N,D,dtype", _params())
def test_real_shapes_all_captures(H, M, N, D, dtype):
    check_real_shape(H, M, N, D, dtype, controls=False, captures=True)


@pytest.mark.parametrize("H,M,N,D,dtype", _params())
def test_real_shapes_bias_prob_mult_and_captures(H, M, N, D, dtype):
    check_real_shape(H, M, N, D, dtype, controls=True, captures=True)


@pytest.mark.parametrize("H,M,N,D,dtype", _params())
def test_real_shapes_plain(H, M, N, D, dtype):
    check_real_shape(H, M, N, D, dtype, controls=False, captures=False, layout="contiguous")


def test_auto_picks_triton_on_cuda_with_controls():
    q, k, v = make_qkv(B, 8, 64, TEXT, 40, dtype=torch.float16, device="cuda")
    attnctl.attention(q, k, v, bias=torch.zeros(1, device="cuda"))
    assert attnctl.last_dispatch().backend == "triton"
    attnctl.attention(q, k, v)
    assert attnctl.last_dispatch().backend == "sdpa"


def test_fp32_real_shape():
    """fp32 on GPU (ieee dot): 1e-5 scale-aware, like the CPU suite."""
    check_real_shape(8, 1024, TEXT, 80, torch.float32, controls=True, captures=True)


# ---- prompt-to-prompt forms at real shapes -------------------------------------------------

P2P_SOURCES = {4: [0, 1, 2, 2], 8: [0, 0, 0, 0, 4, 4, 4, 4]}  # CFG 2 prompts; 4 rows fed by one


@pytest.mark.parametrize("rows", [4, 8])
@pytest.mark.parametrize("model,level,H,M,D", [lv for lv in LEVELS if lv[3] >= 1024])
def test_self_attention_injection_fans_out(rows, model, level, H, M, D):
    """P_tgt ← P_src at the self-attention levels: the fan-out path (each source's P once)
    against the reference, fp16."""
    from attnctl.backends.triton_backend import fanout_table

    dtype = torch.float16
    gen = torch.Generator().manual_seed(M + rows)
    q, k, v = make_qkv(rows, H, M, M, D, dtype=dtype, layout="bmhd", gen=gen, device="cuda")
    source = torch.tensor(P2P_SOURCES[rows], device="cuda")
    assert fanout_table(source, D) is not None
    out = attnctl.attention(q, k, v, source=source, backend="triton")
    ref = attention_reference(q, k, v, scale=D ** -0.5, source=source)
    low = attention_reference(q, k, v, scale=D ** -0.5, source=source, compute_dtype=dtype)
    compare("fan-out output", out, ref, low, dtype)


@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("model,level,H,M,D", LEVELS)
def test_cross_attention_two_source_form(model, level, H, M, D, dtype):
    """Refine's form at every cross-attention level: injected term on mapped values plus the
    target's own term, captures of both terms."""
    gen = torch.Generator().manual_seed(M + D)
    rows = 4
    q, k, v = make_qkv(rows, H, M, TEXT, D, dtype=dtype, layout="bmhd", gen=gen, device="cuda")
    source = torch.tensor(P2P_SOURCES[rows], device="cuda")
    own_values = torch.randn(rows, H, TEXT, D, generator=gen).to("cuda", dtype)
    own_pm = torch.rand(rows, 1, 1, TEXT, generator=gen).to("cuda")
    tokens = torch.arange(TEXT, device="cuda", dtype=torch.int32)
    caps = [make_capture(q, k, {"maps", "token_mass"}, tokens=tokens) for _ in range(6)]
    out = attnctl.attention(q, k, v, source=source, capture=caps[0], backend="triton",
                            own=attnctl.OwnTerm(own_values, own_pm, caps[1]))
    ref = attention_reference(q, k, v, scale=D ** -0.5, source=source, capture=caps[2],
                              own=attnctl.OwnTerm(own_values, own_pm, caps[3]))
    low = attention_reference(q, k, v, scale=D ** -0.5, source=source, capture=caps[4], compute_dtype=dtype,
                              own=attnctl.OwnTerm(own_values, own_pm, caps[5]))
    compare("two-source output", out, ref, low, dtype)
    for got, exp, lo in ((caps[0], caps[2], caps[4]), (caps[1], caps[3], caps[5])):
        for name in ("maps", "token_mass"):
            compare(f"capture.{name}", getattr(got, name), getattr(exp, name), getattr(lo, name), dtype)
