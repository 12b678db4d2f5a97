"""Property-based tests (hypothesis) over shapes and options.

* The Triton kernel against the reference on drawn shapes (B, H, M, N, D, Dv), dtypes,
  layouts, every broadcast form of bias / prob_mult (with -inf masking), capture subsets,
  token and head-weight forms, scales, accumulation.
* Metamorphic properties of the kernel that need no oracle: permuting the keys permutes
  token mass and leaves the output unchanged; a per-row constant added to the bias leaves
  output and P unchanged and shifts the LSE by that constant; the output is linear in v.

Deterministic in CI: derandomize=True (examples derived from the test's source), no
example database, no deadline. ATTNCTL_HYPOTHESIS_EXAMPLES raises the example count for
a longer local run.
"""
import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import attnctl

from op_cases import (ALL_CAPTURES, BROADCAST_FORMS, CAPTURE_KINDS, DEVICE, Case,
                      check_case, compare, interpreter_bf16_dot_fixed, make_capture,
                      make_operand, make_qkv, make_tokens)

pytestmark = pytest.mark.filterwarnings("ignore:divide by zero:RuntimeWarning")

EXAMPLES = int(os.environ.get("ATTNCTL_HYPOTHESIS_EXAMPLES", "0")) or None


def ci_settings(max_examples):
    return settings(max_examples=EXAMPLES or max_examples, deadline=None, derandomize=True,
                    database=None, print_blob=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                           HealthCheck.data_too_large])


@pytest.fixture(scope="module", autouse=True)
def _bf16_dot():
    with interpreter_bf16_dot_fixed():
        yield


HEAD_DIMS = [8, 16, 24, 40, 64, 72, 80, 112, 128]
KEY_COUNTS = [1, 2, 16, 63, 64, 65, 77, 127, 128, 129, 200, 300]


@st.composite
def cases(draw):
    B = draw(st.integers(1, 2))
    H = draw(st.integers(1, 3))
    M = draw(st.one_of(st.sampled_from([1, 63, 64, 65, 127, 128, 129]), st.integers(1, 140)))
    N = draw(st.one_of(st.sampled_from(KEY_COUNTS), st.integers(1, 300)))
    D = draw(st.sampled_from(HEAD_DIMS))
    Dv = draw(st.sampled_from([None] + HEAD_DIMS))
    dtype = draw(st.sampled_from([torch.float32, torch.float16, torch.bfloat16]))
    layout = draw(st.sampled_from(["contiguous", "bmhd", "strided"]))
    bias = draw(st.sampled_from((None, "masked") + BROADCAST_FORMS))
    pm = draw(st.one_of(st.none(), st.sampled_from(BROADCAST_FORMS),
                        st.sampled_from(BROADCAST_FORMS).map(lambda f: "signed:" + f)))
    captures = frozenset(draw(st.sets(st.sampled_from(CAPTURE_KINDS))))
    T = draw(st.integers(1, 12))
    tokens = draw(st.sampled_from(["1d", "2d"]))
    hw = draw(st.sampled_from([None, "h", "bh"]))
    scale = draw(st.one_of(st.none(), st.floats(-1.0, 1.0, allow_nan=False)))
    calls = draw(st.integers(1, 2))
    prefill = draw(st.booleans())
    seed = draw(st.integers(0, 2 ** 16))
    return Case(B=B, H=H, M=M, N=N, D=D, Dv=Dv, dtype=dtype, layout=layout, bias=bias,
                prob_mult=pm, captures=captures, tokens=tokens, T=T, head_weights=hw,
                calls=calls, prefill=prefill, scale=scale, seed=seed)


@ci_settings(60)
@given(case=cases())
def test_kernel_matches_reference(case):
    check_case(case)


# ---- metamorphic properties (kernel only) --------------------------------------------------

@st.composite
def small_shapes(draw):
    return dict(B=draw(st.integers(1, 2)), H=draw(st.integers(1, 2)),
                M=draw(st.integers(1, 70)), N=draw(st.sampled_from([5, 77, 128, 129, 300])),
                D=draw(st.sampled_from([16, 40, 64, 72])), seed=draw(st.integers(0, 2 ** 16)))


@ci_settings(8)
@given(shape=small_shapes(), bias_form=st.sampled_from(["bhmn", "b1mn", "111n"]))
def test_key_permutation(shape, bias_form):
    """Permuting keys (k, v rows, bias / prob_mult columns, and the token indices) leaves
    the output, LSE and maps unchanged and permutes token mass."""
    B, H, M, N, D = (shape[x] for x in "BHMND")
    gen = torch.Generator().manual_seed(shape["seed"])
    q, k, v = make_qkv(B, H, M, N, D, gen=gen)
    bias = make_operand(bias_form, B, H, M, N, gen=gen)
    pm = make_operand("bh1n", B, H, M, N, kind="signed", gen=gen)
    tokens = make_tokens("2d", B, N, 4, gen=gen)
    perm = torch.randperm(N, generator=gen).to(DEVICE)
    inv = torch.argsort(perm)
    cap = make_capture(q, k, ALL_CAPTURES, tokens=tokens)
    cap_p = make_capture(q, k, ALL_CAPTURES, tokens=inv[tokens.long()].to(torch.int32))
    out = attnctl.attention(q, k, v, bias=bias, prob_mult=pm, capture=cap, backend="triton")
    out_p = attnctl.attention(q, k[:, :, perm], v[:, :, perm], bias=bias[..., perm],
                              prob_mult=pm[..., perm], capture=cap_p, backend="triton")
    compare("output", out_p, out)
    compare("token_mass", cap_p.token_mass, cap.token_mass[..., perm])
    for name in ("maps", "head_maps", "lse"):
        compare(name, getattr(cap_p, name), getattr(cap, name))


@ci_settings(8)
@given(shape=small_shapes(), shift=st.floats(-30, 30, allow_nan=False))
def test_row_constant_bias_shift(shape, shift):
    """softmax is invariant to a per-row constant: bias + c[m] gives the same output and P
    captures, and an LSE larger by c[m]."""
    B, H, M, N, D = (shape[x] for x in "BHMND")
    gen = torch.Generator().manual_seed(shape["seed"])
    q, k, v = make_qkv(B, H, M, N, D, gen=gen)
    bias = make_operand("b1mn", B, H, M, N, gen=gen)
    c = shift * torch.rand(1, H, M, 1, generator=gen).to(DEVICE)
    tokens = make_tokens("1d", B, N, 3, gen=gen)
    cap = make_capture(q, k, ALL_CAPTURES, tokens=tokens)
    cap_s = make_capture(q, k, ALL_CAPTURES, tokens=tokens)
    out = attnctl.attention(q, k, v, bias=bias, capture=cap, backend="triton")
    out_s = attnctl.attention(q, k, v, bias=bias + c, capture=cap_s, backend="triton")
    compare("output", out_s, out)
    for name in ("token_mass", "maps", "head_maps"):
        compare(name, getattr(cap_s, name), getattr(cap, name))
    compare("lse", cap_s.lse, cap.lse + c[..., 0])


@ci_settings(6)
@given(shape=small_shapes(), a=st.floats(-3, 3, allow_nan=False))
def test_linear_in_v(shape, a):
    B, H, M, N, D = (shape[x] for x in "BHMND")
    gen = torch.Generator().manual_seed(shape["seed"])
    q, k, v = make_qkv(B, H, M, N, D, gen=gen)
    v2 = torch.randn(v.shape, generator=gen).to(DEVICE)
    pm = make_operand("bhmn", B, H, M, N, kind="signed", gen=gen)
    run = lambda vv: attnctl.attention(q, k, vv, prob_mult=pm, backend="triton")  # noqa: E731
    compare("O(v + a v2)", run(v + a * v2), run(v) + a * run(v2))
