"""The oracle itself: attnctl.attention_reference against an independent direct formula
(explicit loops over (b, h, m), float64, torch.softmax on rows with a finite logit), and
the op's "torch" and "sdpa" backends against each other and the reference."""
import math

import pytest
import torch
import torch.nn.functional as F

import attnctl
from attnctl import Capture, attention_reference
from attnctl.reference import softmax_with_empty_rows

from op_cases import (ALL_CAPTURES, CAPTURE_KINDS, compare, independent_attention,
                      make_capture, make_head_weights, make_operand, make_qkv, make_tokens,
                      mask_bias)

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16


def _reference_with_captures(q, k, v, *, scale, bias=None, prob_mult=None, tokens=None,
                             head_weights=None, compute_dtype=F32):
    cap = make_capture(q, k, ALL_CAPTURES, tokens=tokens, head_weights=head_weights)
    out = attention_reference(q, k, v, scale=scale, bias=bias, prob_mult=prob_mult, capture=cap,
                              compute_dtype=compute_dtype)
    return out, cap


def _check_against_independent(q, k, v, *, scale, bias=None, prob_mult=None, tokens=None,
                               head_weights=None):
    out, cap = _reference_with_captures(q, k, v, scale=scale, bias=bias, prob_mult=prob_mult,
                                        tokens=tokens, head_weights=head_weights)
    exp = independent_attention(q, k, v, scale=scale, bias=bias, prob_mult=prob_mult,
                                tokens=tokens, head_weights=head_weights)
    for name, got, want in zip(("output",) + CAPTURE_KINDS, (out,) + tuple(
            getattr(cap, n) for n in CAPTURE_KINDS), exp):
        compare(f"reference {name} vs direct formula", got, want)
    return out, cap


@pytest.mark.parametrize("N", [1, 7, 77])
def test_reference_matches_direct_formula_plain(N):
    q, k, v = make_qkv(2, 2, 5, N, 16, 24)
    _check_against_independent(q, k, v, scale=0.3, tokens=make_tokens("1d", 2, N, 3))


def test_reference_matches_direct_formula_with_controls():
    B, H, M, N = 2, 3, 6, 9
    q, k, v = make_qkv(B, H, M, N, 16, 8)
    bias = make_operand("b1mn", B, H, M, N)
    pm = make_operand("bh1n", B, H, M, N, kind="signed")
    _check_against_independent(q, k, v, scale=0.25, bias=bias, prob_mult=pm,
                               tokens=make_tokens("2d", B, N, 4),
                               head_weights=make_head_weights("bh", B, H))


def test_reference_matches_direct_formula_with_masking():
    """Partial -inf masking and whole rows of -inf (P = 0, output 0, LSE -inf, no NaN)."""
    B, H, M, N = 2, 2, 6, 9
    q, k, v = make_qkv(B, H, M, N, 16)
    bias = mask_bias(make_operand("bhmn", B, H, M, N), frac=0.4, rows=[1, 4])
    out, cap = _check_against_independent(q, k, v, scale=0.4, bias=bias,
                                          prob_mult=make_operand("bhmn", B, H, M, N, kind="signed"),
                                          tokens=make_tokens("1d", B, N, 5),
                                          head_weights=make_head_weights("h", B, H))
    empty = torch.isneginf(bias).all(-1)
    assert (out[empty] == 0).all() and torch.isneginf(cap.lse[empty]).all()
    assert not any(torch.isnan(t).any() for t in [out, *cap.buffers().values()])


def test_reference_softmax_rows_are_torch_softmax():
    s = torch.randn(3, 4, 50) * 5
    s[0, 1, 3:] = float("-inf")
    s[2, 2] = float("-inf")
    p, lse = softmax_with_empty_rows(s)
    live = ~torch.isneginf(s).all(-1)
    torch.testing.assert_close(p[live], torch.softmax(s[live], -1))
    torch.testing.assert_close(lse[live], torch.logsumexp(s[live], -1))
    assert (p[~live] == 0).all() and torch.isneginf(lse[~live]).all()


def test_reference_low_precision_runs_in_that_precision():
    """compute_dtype=fp16/bf16 returns the input dtype, differs from fp32 (otherwise the
    2x rule would be vacuous), and stays within a few ulps of the output's magnitude."""
    q, k, v = make_qkv(2, 2, 33, 300, 64)
    ref = attention_reference(q, k, v, scale=0.125)
    for dtype, u in ((F16, 2.0 ** -11), (BF16, 2.0 ** -8)):
        ql, kl, vl = (t.to(dtype) for t in (q, k, v))
        ref32 = attention_reference(ql, kl, vl, scale=0.125)
        low = attention_reference(ql, kl, vl, scale=0.125, compute_dtype=dtype)
        assert low.dtype == dtype and ref32.dtype == dtype
        err = float((low.float() - ref32.float()).abs().max())
        assert 0 < err < 50 * u, (dtype, err)
        assert float((ref32.float() - ref).abs().max()) < 4 * u  # only input rounding differs


@pytest.mark.parametrize("dtype", [F32, F16, BF16], ids=["f32", "f16", "bf16"])
def test_op_torch_backend_is_the_reference(dtype):
    B, H, M, N = 2, 2, 33, 77
    q, k, v = make_qkv(B, H, M, N, 40, dtype=dtype)
    bias = make_operand("b1mn", B, H, M, N)
    pm = make_operand("1h1n", B, H, M, N, kind="signed")
    tokens = make_tokens("2d", B, N, 4)
    cap = make_capture(q, k, ALL_CAPTURES, tokens=tokens, head_weights=make_head_weights("h", B, H))
    out = attnctl.attention(q, k, v, bias=bias, prob_mult=pm, capture=cap, backend="torch")
    assert attnctl.last_dispatch().backend == "torch"
    assert out.dtype == dtype
    exp_out, exp_cap = _reference_with_captures(q, k, v, scale=1 / math.sqrt(40), bias=bias,
                                                prob_mult=pm, tokens=tokens,
                                                head_weights=cap.head_weights)
    assert torch.equal(out, exp_out)
    for n in CAPTURE_KINDS:
        assert torch.equal(getattr(cap, n), getattr(exp_cap, n)), n


@pytest.mark.parametrize("layout", ["contiguous", "bmhd", "strided"])
@pytest.mark.parametrize("dims", [(16, 16), (40, 40), (64, 24)])
def test_torch_and_sdpa_agree_on_plain_attention(layout, dims):
    D, Dv = dims
    q, k, v = make_qkv(2, 3, 33, 77, D, Dv, layout=layout)
    for scale in (None, 0.2):
        a = attnctl.attention(q, k, v, scale=scale, backend="torch")
        b = attnctl.attention(q, k, v, scale=scale, backend="sdpa")
        assert attnctl.last_dispatch().backend == "sdpa"
        compare("torch vs sdpa", a, b)
        # sdpa itself, called directly, as a third opinion
        compare("torch vs F.sdpa", a, F.scaled_dot_product_attention(q, k, v, scale=scale))


@pytest.mark.parametrize("dtype", [F16, BF16], ids=["f16", "bf16"])
def test_torch_and_sdpa_agree_in_low_precision(dtype):
    q, k, v = make_qkv(2, 2, 33, 300, 64, dtype=dtype)
    ref32 = attention_reference(q, k, v, scale=0.125)
    low = attention_reference(q, k, v, scale=0.125, compute_dtype=dtype)
    sdpa = attnctl.attention(q, k, v, scale=0.125, backend="sdpa")
    assert sdpa.dtype == dtype
    compare("sdpa vs fp32 reference", sdpa, ref32, low, dtype)


def test_captures_add_to_buffers():
    """Every capture is added: two calls = 2x one call, and a prefilled buffer keeps its
    content underneath."""
    q, k, v = make_qkv(2, 2, 9, 20, 16)
    tokens = make_tokens("1d", 2, 20, 3)
    once = make_capture(q, k, ALL_CAPTURES, tokens=tokens)
    twice = make_capture(q, k, ALL_CAPTURES, tokens=tokens)
    pre = make_capture(q, k, ALL_CAPTURES, tokens=tokens, prefill=True)
    start = {n: b.clone() for n, b in pre.buffers().items()}
    attention_reference(q, k, v, scale=0.3, capture=once)
    for _ in range(2):
        attention_reference(q, k, v, scale=0.3, capture=twice)
    attention_reference(q, k, v, scale=0.3, capture=pre)
    for n in CAPTURE_KINDS:
        compare(n, getattr(twice, n), 2 * getattr(once, n))
        compare(n, getattr(pre, n), start[n] + getattr(once, n))


def test_prob_mult_scales_numerator_only():
    """O(f) = Σ P f v with P normalised before f: f = c gives c·O (no renormalisation),
    and captures do not see f."""
    q, k, v = make_qkv(2, 2, 9, 20, 16)
    tokens = make_tokens("1d", 2, 20, 3)
    c0 = make_capture(q, k, ALL_CAPTURES, tokens=tokens)
    c1 = make_capture(q, k, ALL_CAPTURES, tokens=tokens)
    plain = attention_reference(q, k, v, scale=0.3, capture=c0)
    scaled = attention_reference(q, k, v, scale=0.3, prob_mult=torch.tensor(-3.0, device=q.device), capture=c1)
    compare("f=-3", scaled, -3 * plain)
    for n in CAPTURE_KINDS:
        assert torch.equal(getattr(c0, n), getattr(c1, n)), n


def test_broadcast_bias_equals_expanded_bias():
    B, H, M, N = 2, 3, 7, 11
    q, k, v = make_qkv(B, H, M, N, 16)
    for form in ("b1mn", "bh1n", "111n", "hmn", "m1", "scalar"):
        bias = make_operand(form, B, H, M, N)
        pm = make_operand(form, B, H, M, N, kind="signed")
        a = attention_reference(q, k, v, scale=0.3, bias=bias, prob_mult=pm)
        b = attention_reference(q, k, v, scale=0.3, bias=bias.expand(B, H, M, N).contiguous(),
                                prob_mult=pm.expand(B, H, M, N).contiguous())
        assert torch.equal(a, b), form


def test_capture_zeros_shapes():
    q, k, _ = make_qkv(2, 3, 5, 7, 16)
    cap = Capture.zeros(q, k, token_mass=True, tokens=[[1, 2], [3, 4]], maps=True,
                        head_maps=True, lse=True)
    assert cap.token_mass.shape == (2, 3, 7) and cap.lse.shape == (2, 3, 5)
    assert cap.maps.shape == (2, 5, 2) and cap.head_maps.shape == (2, 3, 5, 2)
    assert all(b.dtype == torch.float32 and (b == 0).all() for b in cap.buffers().values())
    assert cap.tokens.dtype == torch.int32 and cap.tokens.tolist() == [[1, 2], [3, 4]]
    assert Capture().empty and not cap.empty
    with pytest.raises(ValueError, match="tokens"):
        Capture.zeros(q, k, maps=True)
    with pytest.raises(TypeError, match="tokens: expected integer indices, got dtype torch.float32"):
        Capture.zeros(q, k, maps=True, tokens=torch.tensor([1.0]))
