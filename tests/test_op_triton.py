"""The Triton kernel (under TRITON_INTERPRET=1 on CPU) against the fp32 reference.

Every test builds fresh random inputs, runs ``attnctl.attention(..., backend="triton")``
and the reference on copies of the same capture buffers, and compares output and every
buffer by the rules in tests/op_cases.py (fp32: 1e-5 scale-aware; fp16/bf16: at most twice
the error of the reference run in the same precision, plus 2u).

Coverage is by feature rather than the full Cartesian product (the interpreter costs
~0.3 s a call): sizes (N = 1, 77, 300, 1000; D = 16, 40, 64, 80, 160; M not a multiple of
the block) with everything on; each broadcast form of bias and of prob_mult; -inf masking;
each capture alone; accumulation; layouts; Dv != D; tokens / head weights forms; fp16 and
bf16; and a pairwise covering array over all options.
"""
import math

import pytest
import torch

import attnctl
from attnctl import Capture, attention_reference

from op_cases import (ALL_CAPTURES, BROADCAST_FORMS, CAPTURE_KINDS, DEVICE, Case, build,
                      check_case, compare, interpreter_bf16_dot_fixed, make_capture,
                      make_operand, make_qkv, make_tokens, mask_bias, pairwise,
                      run_and_compare)

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16

# The interpreter evaluates both sides of tl.where: 1/l for empty rows warns, harmlessly.
pytestmark = pytest.mark.filterwarnings("ignore:divide by zero:RuntimeWarning")


@pytest.fixture(scope="module", autouse=True)
def _bf16_dot():
    with interpreter_bf16_dot_fixed():
        yield


def _params(cases):
    return [pytest.param(c, id=c.id()) for c in cases]


# ---- head-dim tiles: a power-of-two main tile plus a tail, no wider than needed ----------

def test_head_tiles_are_the_narrowest_two_power_of_two_tiles():
    """head_tiles(D) = (main, tail): main a power of two >= 16, tail 0 or a power of two
    >= 16 starting inside D, and no pair of such tiles (or single tile) covers D with
    fewer columns; ties go to the single tile."""
    from attnctl.backends.triton_backend import head_tiles

    widths = [16, 32, 64, 128, 256]
    for D in range(1, 257):
        main, tail = head_tiles(D)
        assert main in widths and (tail == 0 or (tail in widths and main < D)), (D, main, tail)
        assert main + tail >= D, (D, main, tail)
        narrowest = min(a + b for a in widths for b in [0] + widths if a + b >= D and (b == 0 or a < D))
        assert main + tail == narrowest, (D, main, tail, narrowest)
        if tail:  # a split only where it is strictly narrower than one tile
            assert main + tail < min(w for w in widths if w >= D), (D, main, tail)
    assert [head_tiles(D) for D in (40, 64, 72, 80, 112, 128, 160)] == [
        (32, 16), (64, 0), (64, 16), (64, 16), (128, 0), (128, 0), (128, 32)]


# ---- sizes: every listed N, D, and M off the block grid, with every control and capture ----

SIZE_CASES = [
    # B, H, M, N, D (BLOCK_M is 128 for D <= 64, 64 above; BLOCK_N = N up to 128, else 64)
    Case(B=2, H=2, M=33, N=1, D=16),
    Case(B=2, H=2, M=130, N=77, D=40),
    Case(B=1, H=2, M=33, N=300, D=64),
    Case(B=1, H=1, M=17, N=1000, D=80),
    Case(B=1, H=2, M=130, N=77, D=160),
    Case(B=2, H=1, M=1, N=300, D=40),
    Case(B=1, H=1, M=1, N=1000, D=160),
    Case(B=1, H=2, M=65, N=129, D=80),     # one row past a 64-row block, one key past 128
    Case(B=2, H=1, M=129, N=128, D=64),    # one row past a 128-row block, N = 128 exactly
    # head dims that are no power of two: 72 = 64 + 16-column tail (8 masked), 112 = one
    # 128-column tile (triton_backend.head_tiles)
    Case(B=1, H=2, M=65, N=300, D=72),
    Case(B=2, H=1, M=33, N=77, D=112),
]


@pytest.mark.parametrize("case", _params(
    [Case(**{**c.__dict__, "bias": "bhmn", "prob_mult": "bhmn", "captures": ALL_CAPTURES,
             "tokens": "2d" if c.B > 1 else "1d", "T": min(7, c.N) if c.N > 1 else 3,
             "head_weights": "bh", "prefill": True}) for c in SIZE_CASES]))
def test_sizes_with_all_controls_and_captures(case):
    check_case(case)


@pytest.mark.parametrize("N", [1, 77, 300, 1000])
@pytest.mark.parametrize("D", [16, 40, 64, 72, 80, 160])
def test_plain_attention_sizes(D, N):
    check_case(Case(B=1, H=2, M=33 if N < 1000 else 9, N=N, D=D))


# ---- controls: every broadcast form ---------------------------------------------------------

@pytest.mark.parametrize("form", BROADCAST_FORMS)
def test_bias_broadcast_forms(form):
    # Alternate single- and multi-key-block N so both kernel paths see every form.
    N = 77 if BROADCAST_FORMS.index(form) % 2 == 0 else 300
    check_case(Case(B=2, H=3, M=33, N=N, D=16, bias=form, captures=ALL_CAPTURES, T=6,
                    head_weights="h"))


@pytest.mark.parametrize("form", BROADCAST_FORMS)
def test_prob_mult_broadcast_forms(form):
    N = 300 if BROADCAST_FORMS.index(form) % 2 == 0 else 77
    check_case(Case(B=2, H=3, M=33, N=N, D=16, prob_mult=form, captures=ALL_CAPTURES, T=6))


@pytest.mark.parametrize("N", [77, 300])
def test_negative_prob_mult(N):
    # Signed factors (about half negative), with a bias: no renormalisation, no abs().
    check_case(Case(B=2, H=2, M=33, N=N, D=32, bias="bhmn", prob_mult="signed:bhmn",
                    captures=ALL_CAPTURES))


def test_prob_mult_does_not_renormalise_or_touch_captures():
    """O with f = 2 is exactly twice O without f (a renormalising kernel would give O), and
    the captures (of P before f) are unchanged by f."""
    q, k, v = make_qkv(2, 2, 33, 77, 32)
    tokens = torch.tensor([0, 10, 76], dtype=torch.int32, device=DEVICE)
    caps = [make_capture(q, k, ALL_CAPTURES, tokens=tokens) for _ in range(2)]
    plain = attnctl.attention(q, k, v, capture=caps[0], backend="triton")
    doubled = attnctl.attention(q, k, v, prob_mult=torch.full((1,), 2.0, device=DEVICE),
                                capture=caps[1], backend="triton")
    compare("2*O", doubled, 2 * plain)
    for name in CAPTURE_KINDS:
        compare(f"capture.{name}", getattr(caps[1], name), getattr(caps[0], name))


def test_bias_and_prob_mult_in_half_precision_with_fp32_inputs():
    """Control tensors may be of another float dtype than q."""
    case = Case(B=2, H=2, M=33, N=300, D=32)
    a = build(case)
    bias = make_operand("b1mn", 2, 2, 33, 300, dtype=F16)
    pm = make_operand("1h1n", 2, 2, 33, 300, kind="signed", dtype=BF16)
    cap = make_capture(a["q"], a["k"], ALL_CAPTURES,
                       tokens=make_tokens("1d", 2, 300, 9), head_weights=torch.rand(2).half().to(DEVICE))
    run_and_compare(a["q"], a["k"], a["v"], bias=bias, prob_mult=pm, capture=cap)


def test_post_softmax_per_token_scaling_equals_scaling_v_rows():
    """Design: a (head, token) factor f (B,H,1,N) equals scaling the rows of v by f."""
    q, k, v = make_qkv(2, 2, 33, 77, 32)
    f = make_operand("bh1n", 2, 2, 33, 77, kind="signed")
    scaled = attnctl.attention(q, k, v, prob_mult=f, backend="triton")
    folded = attnctl.attention(q, k, v * f.transpose(-1, -2), bias=torch.zeros(1, device=DEVICE), backend="triton")
    compare("O(f) vs O(v*f)", scaled, folded)


# ---- -inf masking -----------------------------------------------------------------------

@pytest.mark.parametrize("N", [1, 77, 300])
def test_masked_keys_and_rows(N):
    """-inf at random entries (partial masking) and at whole query rows: masked rows give
    output 0, P captures 0, LSE -inf, never NaN; everything else matches the reference."""
    B, H, M = 2, 2, 33
    gen = torch.Generator().manual_seed(N)
    q, k, v = make_qkv(B, H, M, N, 32, gen=gen)
    rows = [0, 16, 32]
    bias = mask_bias(make_operand("bhmn", B, H, M, N, gen=gen), gen=gen, frac=0.3, rows=rows)
    tokens = make_tokens("2d", B, N, 4, gen=gen)
    cap = make_capture(q, k, ALL_CAPTURES, tokens=tokens, head_weights=torch.rand(H).to(DEVICE))
    pm = make_operand("bhmn", B, H, M, N, kind="signed", gen=gen)
    out = run_and_compare(q, k, v, bias=bias, prob_mult=pm, capture=cap)
    empty = torch.isneginf(bias).all(dim=-1)  # (B, H, M): every row that ends up masked
    assert empty[:, :, rows].all()
    assert not torch.isnan(out).any()
    assert (out[empty] == 0).all()
    assert torch.isneginf(cap.lse[empty]).all() and torch.isfinite(cap.lse[~empty]).all()
    assert (cap.head_maps[empty] == 0).all()
    for name in ("token_mass", "maps"):
        assert not torch.isnan(getattr(cap, name)).any()


def test_all_rows_masked():
    B, H, M, N = 1, 2, 33, 300
    q, k, v = make_qkv(B, H, M, N, 16)
    cap = make_capture(q, k, ALL_CAPTURES, tokens=make_tokens("1d", B, N, 5))
    out = attnctl.attention(q, k, v, bias=torch.full((1,), float("-inf"), device=DEVICE),
                            capture=cap, backend="triton")
    assert (out == 0).all()
    assert (cap.token_mass == 0).all() and (cap.maps == 0).all() and (cap.head_maps == 0).all()
    assert torch.isneginf(cap.lse).all()


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_lse_of_a_masked_row_stays_neg_inf_when_accumulated(backend):
    """The documented rule (attnctl.capture): the lse buffer is a sum of logs, so a row fully
    masked in one call keeps -inf after later calls; other rows add up normally."""
    B, H, M, N = 1, 2, 17, 77
    q, k, v = make_qkv(B, H, M, N, 16)
    cap = make_capture(q, k, frozenset({"lse"}))
    bias = torch.zeros(1, 1, M, N, device=DEVICE)
    bias[..., 3, :] = float("-inf")
    attnctl.attention(q, k, v, bias=bias, capture=cap, backend=backend)
    attnctl.attention(q, k, v, capture=cap, backend=backend)
    assert torch.isneginf(cap.lse[:, :, 3]).all()
    live = torch.ones(M, dtype=torch.bool)
    live[3] = False
    expected = 2 * torch.logsumexp(q.float() @ k.float().transpose(-1, -2) / 4.0, dim=-1)
    torch.testing.assert_close(cap.lse[:, :, live], expected[:, :, live], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("pattern", ["first_key_block", "last_key_block", "key_columns"])
def test_masked_key_blocks(pattern):
    """Whole key blocks masked for every row: the online softmax starts (or ends) on a
    block of only -inf (BLOCK_N = 64 at N = 300)."""
    B, H, M, N = 1, 2, 33, 300
    q, k, v = make_qkv(B, H, M, N, 32)
    bias = make_operand("b1mn", B, H, M, N)
    if pattern == "first_key_block":
        bias[..., :64] = float("-inf")
        bias[..., 5, :200] = float("-inf")  # one row finite only after three blocks
    elif pattern == "last_key_block":
        bias[..., 256:] = float("-inf")
    else:
        bias[..., ::3] = float("-inf")
    cap = make_capture(q, k, ALL_CAPTURES, tokens=torch.tensor([0, 63, 64, 200, 299], device=DEVICE))
    run_and_compare(q, k, v, bias=bias, capture=cap)


# ---- captures ------------------------------------------------------------------------------

@pytest.mark.parametrize("N", [77, 300])
@pytest.mark.parametrize("kind", CAPTURE_KINDS)
def test_each_capture_alone(kind, N):
    """Each capture flag on its own (with a bias so P is not plain softmax); the absent
    buffers stay absent."""
    case = Case(B=2, H=2, M=33, N=N, D=16, bias="b1mn", prob_mult="1h1n",
                captures=frozenset([kind]), tokens="2d", T=5,
                head_weights="bh" if kind == "maps" else None, prefill=True)
    a = build(case)
    check_case(case)
    assert set(a["capture"].buffers()) == {kind}


@pytest.mark.parametrize("N", [77, 300])
def test_accumulates_across_two_calls(N):
    """Buffers prefilled with random values, then two calls on different inputs: each
    buffer must equal prefill + call 1 + call 2 (as the reference computes them)."""
    check_case(Case(B=2, H=2, M=33, N=N, D=40, bias="bh1n", prob_mult="b1mn",
                    captures=ALL_CAPTURES, tokens="2d", T=6, head_weights="h",
                    prefill=True, calls=2))


def test_accumulation_is_a_sum_of_single_calls():
    """Independent of the reference: two calls into one capture equal the sum of the two
    calls' captures taken separately (from zero)."""
    q, k, v = make_qkv(2, 2, 33, 300, 16)
    q2, k2, v2 = make_qkv(2, 2, 33, 300, 16)
    tokens = make_tokens("2d", 2, 300, 5)
    both, first, second = (make_capture(q, k, ALL_CAPTURES, tokens=tokens) for _ in range(3))
    for cap, calls in ((both, [(q, k, v), (q2, k2, v2)]), (first, [(q, k, v)]), (second, [(q2, k2, v2)])):
        for args in calls:
            attnctl.attention(*args, capture=cap, backend="triton")
    for name in CAPTURE_KINDS:
        compare(f"capture.{name}", getattr(both, name), getattr(first, name) + getattr(second, name))


@pytest.mark.parametrize("N", [77, 300])
def test_tokens_2d_and_head_weights_2d(N):
    check_case(Case(B=2, H=3, M=33, N=N, D=16, bias="bhmn", captures=ALL_CAPTURES,
                    tokens="2d", T=9, head_weights="bh"))


@pytest.mark.parametrize("tokens_dtype", [torch.int32, torch.int64])
def test_many_repeated_tokens(tokens_dtype):
    """T > BLOCK_T (64): all 77 keys permuted plus repeats, int32 and int64 indices."""
    N = 77
    q, k, v = make_qkv(2, 2, 33, N, 16)
    tokens = torch.cat([torch.randperm(N), torch.tensor([5, 5, 76])]).to(DEVICE, tokens_dtype)
    cap = make_capture(q, k, ALL_CAPTURES, tokens=tokens, head_weights=torch.randn(2).to(DEVICE))
    run_and_compare(q, k, v, bias=make_operand("b1mn", 2, 2, 33, N), capture=cap)
    assert cap.tokens.dtype == tokens_dtype
    # maps over all keys (with weights) sum to Σ_h w_h per non-empty row: independent check
    w = cap.head_weights
    total = cap.maps[..., :N].sum(-1)
    compare("Σ_t maps over a permutation of all keys", total, w.sum().expand_as(total))


def test_head_weights_absent_means_one():
    q, k, v = make_qkv(2, 3, 33, 300, 16)
    tokens = make_tokens("1d", 2, 300, 7)
    bias = make_operand("bhmn", 2, 3, 33, 300)
    unweighted = make_capture(q, k, {"maps", "head_maps"}, tokens=tokens)
    ones = make_capture(q, k, {"maps"}, tokens=tokens, head_weights=torch.ones(3, device=DEVICE))
    attnctl.attention(q, k, v, bias=bias, capture=unweighted, backend="triton")
    attnctl.attention(q, k, v, bias=bias, capture=ones, backend="triton")
    compare("maps without weights vs weights 1", unweighted.maps, ones.maps)
    # ... and maps is the sum over heads of the kernel's own head maps
    compare("maps vs Σ_h head_maps", unweighted.maps, unweighted.head_maps.sum(1))


def test_maps_equal_weighted_sum_of_head_maps():
    q, k, v = make_qkv(2, 3, 33, 77, 16)
    w = torch.randn(2, 3, device=DEVICE)
    cap = make_capture(q, k, {"maps", "head_maps"}, tokens=make_tokens("2d", 2, 77, 6), head_weights=w)
    attnctl.attention(q, k, v, bias=make_operand("b1mn", 2, 3, 33, 77), capture=cap, backend="triton")
    compare("maps vs Σ_h w_h head_maps", cap.maps, torch.einsum("bh,bhmt->bmt", w, cap.head_maps))


def test_token_mass_sums_to_row_count():
    """Σ_n token_mass = number of query rows with a finite logit (each P row sums to 1)."""
    B, H, M, N = 2, 2, 33, 300
    q, k, v = make_qkv(B, H, M, N, 16)
    bias = mask_bias(make_operand("bhmn", B, H, M, N), frac=0.5, rows=[3, 4])
    cap = make_capture(q, k, {"token_mass"})
    attnctl.attention(q, k, v, bias=bias, capture=cap, backend="triton")
    live_rows = (~torch.isneginf(bias).all(-1)).sum(-1).float()
    compare("Σ_n token_mass", cap.token_mass.sum(-1), live_rows)


def test_non_contiguous_capture_buffers():
    """Buffers are caller-owned and may be views: written through their strides."""
    B, H, M, N, T = 2, 2, 33, 300, 5
    q, k, v = make_qkv(B, H, M, N, 16)
    tokens = make_tokens("1d", B, N, T)
    cap = Capture(token_mass=torch.rand(B, N, H, device=DEVICE).transpose(1, 2),
                  maps=torch.rand(B, T, M, device=DEVICE).transpose(1, 2),
                  head_maps=torch.rand(B, M, H, T, device=DEVICE).transpose(1, 2),
                  lse=torch.rand(M, B, H, device=DEVICE).permute(1, 2, 0),
                  tokens=tokens)
    assert not any(b.is_contiguous() for b in cap.buffers().values())
    run_and_compare(q, k, v, bias=make_operand("1h1n", B, H, M, N), capture=cap)


# ---- layouts, head dims, precision, scale ------------------------------------------------------

@pytest.mark.parametrize("layout", ["bmhd", "strided"])
def test_non_contiguous_inputs(layout):
    check_case(Case(B=2, H=2, M=33, N=300, D=40, layout=layout, bias="b1mn", prob_mult="bh1n",
                    captures=ALL_CAPTURES, tokens="2d"))



def test_16_byte_alignment_is_claimed_only_where_every_stride_has_it():
    """The launcher tells the kernel that batch, head and row strides are 16-byte multiples
    (ALIGN) only when they are: diffusers' (B, M, H, 40) fp16 views are, a view sliced out of
    a 41-wide last dim is not (its strides would be misread as multiples of 8)."""
    from attnctl.backends.triton_backend import stride_alignment
    bmhd = torch.zeros(2, 77, 8, 40, dtype=torch.float16).transpose(1, 2)
    sliced = torch.zeros(2, 77, 8, 41, dtype=torch.float16)[..., :40].transpose(1, 2)
    assert stride_alignment(2, bmhd, None) == 8
    assert stride_alignment(4, bmhd.float()) == 4
    assert stride_alignment(2, bmhd, sliced) == 1
    assert stride_alignment(2, torch.zeros(1, 1, 5, 40, dtype=torch.float16)) == 8  # a row stride of 40
    # Triton's own specialisation already marks strides divisible by 16: no hint needed
    assert stride_alignment(2, torch.zeros(2, 77, 8, 64, dtype=torch.float16).transpose(1, 2)) == 1


@pytest.mark.parametrize("D", [40, 80])
def test_views_with_strides_that_are_not_16_byte_multiples(D):
    B, H, M, N = 2, 2, 33, 77
    q, k, v = (torch.randn(B, n, H, D + 1, device=DEVICE)[..., :D].transpose(1, 2) for n in (M, N, N))
    run_and_compare(q, k, v)

def test_bmhd_views_give_bmhd_output():
    """diffusers' (B,M,H,D).transpose(1,2) views: the output is a (B,M,H,Dv)-memory view,
    so merging heads afterwards is free; contiguous q gives contiguous output."""
    B, H, M, N, D, Dv = 2, 3, 33, 77, 16, 32
    q, k, v = make_qkv(B, H, M, N, D, Dv, layout="bmhd")
    out = run_and_compare(q, k, v, bias=torch.zeros(1, device=DEVICE))
    assert out.transpose(1, 2).is_contiguous(), out.stride()
    q, k, v = make_qkv(B, H, M, N, D, Dv)
    out = run_and_compare(q, k, v, bias=torch.zeros(1, device=DEVICE))
    assert out.is_contiguous(), out.stride()


@pytest.mark.parametrize("D,Dv", [(64, 40), (40, 160), (16, 80), (160, 16), (8, 24), (256, 8), (72, 40),
                                  (112, 72), (48, 96)])
def test_value_dim_differs(D, Dv):
    check_case(Case(B=1, H=2, M=33, N=300 if D <= 64 else 77, D=D, Dv=Dv, bias="11mn",
                    prob_mult="bhmn", captures=ALL_CAPTURES))


@pytest.mark.parametrize("D,Dv,N", [(72, 40, 77), (40, 72, 300), (160, 80, 300), (112, 72, 77), (80, 160, 1000)])
def test_value_columns_split(D, Dv, N):
    """Plain attention (no control, capture or second accumulator): the kernel splits the
    value columns as well, accumulators and the output store in a main and a tail part."""
    from attnctl.backends.triton_backend import launch_config

    assert launch_config(D, Dv, N, 0, False, 4)["BLOCK_DV_TAIL"] > 0
    check_case(Case(B=2, H=2, M=33, N=N, D=D, Dv=Dv, layout="bmhd"))


LOWPREC_CASES = [
    Case(B=2, H=2, M=33, N=77, D=40),
    Case(B=1, H=2, M=130, N=300, D=64),
    Case(B=1, H=1, M=9, N=1000, D=80),
    Case(B=2, H=1, M=33, N=1, D=160),
    Case(B=1, H=2, M=65, N=129, D=160, layout="bmhd"),
    Case(B=1, H=2, M=33, N=77, D=72),
]


@pytest.mark.parametrize("case", _params(
    [Case(**{**c.__dict__, "dtype": dtype, "bias": "b1mn", "prob_mult": "signed:bhmn",
             "captures": ALL_CAPTURES, "tokens": "2d" if c.B > 1 else "1d",
             "T": min(6, c.N) if c.N > 1 else 2, "head_weights": "h", "prefill": True})
     for dtype in (F16, BF16) for c in LOWPREC_CASES]))
def test_low_precision(case):
    """fp16 / bf16 with every control and capture: error at most 2x the same-precision
    reference's (+2u); output dtype = input dtype (checked in run_and_compare)."""
    check_case(case)


@pytest.mark.parametrize("dtype", [F16, BF16], ids=["f16", "bf16"])
def test_low_precision_plain_and_masked(dtype):
    check_case(Case(B=2, H=2, M=33, N=300, D=64, dtype=dtype))
    check_case(Case(B=2, H=2, M=33, N=77, D=64, dtype=dtype, bias="masked",
                    captures=ALL_CAPTURES, calls=2))


@pytest.mark.parametrize("scale", [None, 0.05, 1.0, -0.3])
def test_scale(scale):
    check_case(Case(B=1, H=2, M=33, N=300, D=64, scale=scale, bias="bh1n", captures=ALL_CAPTURES))


def test_default_scale_is_inverse_sqrt_d():
    q, k, v = make_qkv(1, 2, 33, 77, 64)
    default = attnctl.attention(q, k, v, bias=torch.zeros(1, device=DEVICE), backend="triton")
    explicit = attnctl.attention(q, k, v, scale=1 / math.sqrt(64), bias=torch.zeros(1, device=DEVICE), backend="triton")
    compare("scale=None vs 1/sqrt(D)", default, explicit)


@pytest.mark.parametrize("N", [77, 300])
def test_large_logits_are_stable(N):
    """Logits of magnitude ~500 (exp overflows fp32 beyond 88): the online softmax must
    subtract its running max. fp32 P has relative error ~u·|S|, so the tolerance here is
    1e-5 relative to max|S| (documented exception to the 1e-5 rule)."""
    q, k, v = make_qkv(1, 2, 33, N, 32)
    scale = 20.0
    cap = make_capture(q, k, ALL_CAPTURES, tokens=make_tokens("1d", 1, N, 4))
    ref_cap = make_capture(q, k, ALL_CAPTURES, tokens=cap.tokens)
    out = attnctl.attention(q, k, v, scale=scale, capture=cap, backend="triton")
    ref = attention_reference(q, k, v, scale=scale, capture=ref_cap)
    smax = float((scale * q @ k.transpose(-1, -2)).abs().max())
    assert smax > 100
    for name, got, exp in [("output", out, ref)] + [
            (n, getattr(cap, n), getattr(ref_cap, n)) for n in CAPTURE_KINDS]:
        assert torch.isfinite(got).all(), name
        err = float((got - exp).abs().max())
        assert err <= 1e-5 * smax + 1e-5 * float(exp.abs().max()), (name, err)


# ---- pairwise combinations of every option -------------------------------------------------

PAIRWISE_FACTORS = {
    "dtype": [F32, F16, BF16],
    "N": [1, 77, 300],
    "dims": [(16, 16), (40, 40), (64, 40), (80, 80), (160, 160)],
    "M": [1, 33, 130],
    "layout": ["contiguous", "bmhd", "strided"],
    "bias": [None, "bhmn", "broadcast", "masked"],
    "prob_mult": [None, "bhmn", "broadcast", "signed"],
    "captures": [frozenset(), frozenset({"token_mass"}), frozenset({"maps", "head_maps"}),
                 frozenset({"lse"}), ALL_CAPTURES],
    "tokens": ["1d", "2d"],
    "head_weights": [None, "h", "bh"],
    "calls": [1, 2],
}


def _pairwise_cases():
    cases = []
    for i, row in enumerate(pairwise(PAIRWISE_FACTORS, seed=1)):
        D, Dv = row.pop("dims")
        form = BROADCAST_FORMS[1 + i % (len(BROADCAST_FORMS) - 1)]
        bias = form if row["bias"] == "broadcast" else row["bias"]
        pm = {None: None, "bhmn": "bhmn", "broadcast": form, "signed": "signed:" + form}[row["prob_mult"]]
        cases.append(Case(B=2, H=2, M=row["M"], N=row["N"], D=D, Dv=Dv, dtype=row["dtype"],
                          layout=row["layout"], bias=bias, prob_mult=pm, captures=row["captures"],
                          tokens=row["tokens"], T=min(5, row["N"]) if row["N"] > 1 else 2,
                          head_weights=row["head_weights"], calls=row["calls"],
                          prefill=row["calls"] == 2, seed=i))
    return cases


@pytest.mark.parametrize("case", _params(_pairwise_cases()))
def test_pairwise_combinations(case):
    check_case(case)
