"""Gradients: the reference passes gradcheck in float64; the Triton backward (interpreter on
CPU) matches the reference's autograd through the output, through the maps of
attnctl.attention_with_maps, and through both, with every control it differentiates.

Oracle: the reference's autograd in float64 (a materialising replay: P explicit, maps read
from P). fp32 follows op_cases.compare's fp32 rule; fp16/bf16 may be at most twice as far
from the oracle as the reference's autograd run in the same low precision (plus one ulp).
"""
import pytest
import torch

import attnctl
from attnctl import Regions
from attnctl.reference import attention_reference, softmax_with_empty_rows, token_columns

from op_cases import (ON_GPU, DEVICE, compare, interpreter_bf16_dot_fixed, make_head_weights, make_operand,
                      make_qkv, make_tokens, mask_bias)

LOW = (torch.float16, torch.bfloat16)


def maps_replay(q, k, v, tokens, head_weights, *, scale, bias=None, prob_mult=None, regions=None,
                dtype=torch.float64):
    """(out, maps) computed in ``dtype`` by materialising P: the math the kernels must match."""
    out = attention_reference(q, k, v, scale=scale, bias=bias, prob_mult=prob_mult, regions=regions,
                              compute_dtype=dtype)
    scores = torch.matmul(q.to(dtype), k.to(dtype).transpose(-1, -2)) * scale
    if bias is not None:
        scores = scores + bias.to(dtype)
    probs, _ = softmax_with_empty_rows(scores)
    cols = token_columns(probs, tokens)
    B, H = q.shape[:2]
    w = torch.ones(B, H, dtype=dtype) if head_weights is None else head_weights.to(dtype).expand(B, H)
    return out.to(dtype), torch.einsum("bh,bhmt->bmt", w.to(cols.device), cols)


def _leaves(*tensors):
    return [t.detach().clone().requires_grad_(True) if t is not None else None for t in tensors]


def _grads(outputs, upstreams, inputs):
    pairs = [(o, g) for o, g in zip(outputs, upstreams) if g is not None]
    wanted = [t for t in inputs if t is not None]
    got = torch.autograd.grad([o for o, _ in pairs], wanted, [g.to(o.dtype) for o, g in pairs],
                              allow_unused=True, materialize_grads=True)  # maps alone do not use v
    return list(got)


def check_gradients(q, k, v, *, bias=None, prob_mult=None, regions=None, tokens=None, head_weights=None,
                    through=("out", "maps"), scale=None, api="maps"):
    """Triton gradients of q, k, v (and bias) against the float64 replay's, for upstreams on
    the output and/or the maps. ``api``: "maps" (attention_with_maps) or "op" (attnctl.attention,
    output only)."""
    dtype = q.dtype
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    B, H, M = q.shape[:3]
    gen = torch.Generator().manual_seed(1)
    d_out = torch.randn(B, H, M, v.shape[-1], generator=gen).to(q.device) if "out" in through else None
    d_maps = (torch.randn(B, M, tokens.shape[-1], generator=gen).to(q.device) if "maps" in through else None)
    bias_needs_grad = bias is not None

    def run_triton():
        qq, kk, vv, bb = _leaves(q, k, v, bias)
        with interpreter_bf16_dot_fixed():
            if api == "op":
                outs = (attnctl.attention(qq, kk, vv, scale=scale, bias=bb, prob_mult=prob_mult, regions=regions,
                                          backend="triton"),)
            else:
                outs = attnctl.attention_with_maps(qq, kk, vv, tokens, head_weights=head_weights, scale=scale,
                                                   bias=bb, prob_mult=prob_mult, regions=regions, backend="triton")
            assert "differentiable Triton path" in attnctl.last_dispatch().reason
            return _grads(outs, (d_out, d_maps), (qq, kk, vv, bb))

    def run_replay(compute):
        qq, kk, vv, bb = _leaves(*(t.to(compute) if t is not None and compute == torch.float64 else t
                                   for t in (q, k, v, bias)))
        tok = tokens if tokens is not None else torch.zeros(1, dtype=torch.long, device=q.device)
        outs = maps_replay(qq, kk, vv, tok, head_weights, scale=scale, bias=bb, prob_mult=prob_mult,
                           regions=regions, dtype=compute)
        return _grads(outs, (d_out, d_maps), (qq, kk, vv, bb))

    got = run_triton()
    oracle = run_replay(torch.float64)
    low = run_replay(dtype) if dtype in LOW else [None] * len(got)
    names = ["dq", "dk", "dv", "dbias"][:len(got)]
    assert bias_needs_grad == (len(got) == 4)
    for name, g, ref, ref_low in zip(names, got, oracle, low):
        assert g.dtype == (bias.dtype if name == "dbias" else dtype) and g.shape == ref.shape
        compare(f"{name} ({'+'.join(through)})", g, ref, ref_low, dtype)


# ---- the reference's own gradients ----------------------------------------------------

def test_reference_gradcheck_float64_output_and_maps():
    """The replay's autograd (the oracle) is the derivative of its math: gradcheck in float64
    with bias, signed prob_mult, regions and weighted maps."""
    B, H, M, N, D = 1, 2, 5, 7, 8
    q, k, v = (t.double().requires_grad_(True) for t in make_qkv(B, H, M, N, D, device="cpu"))
    bias = make_operand("1hmn", B, H, M, N, device="cpu").double().requires_grad_(True)
    pm = make_operand("b11n", B, H, M, N, kind="signed", device="cpu").double()
    regions = Regions(torch.tensor([[0, 1, 1, -1, 0]]), torch.tensor([[1, 0, -1, 1, 0, 0, 1]]), 0.7)
    tokens = torch.tensor([1, 6, 6])
    w = torch.tensor([0.5, -1.5], dtype=torch.float64)

    def f(q, k, v, bias):
        return maps_replay(q, k, v, tokens, w, scale=0.3, bias=bias, prob_mult=pm, regions=regions)

    assert torch.autograd.gradcheck(f, (q, k, v, bias))


def test_maps_replay_matches_the_capture_contract():
    """The replay's maps are what Capture(maps=...) accumulates (so the oracle reads the same
    P as the inference captures)."""
    B, H, M, N, D = 2, 2, 9, 11, 16
    q, k, v = make_qkv(B, H, M, N, D)
    tokens = make_tokens("2d", B, N, 3)
    w = make_head_weights("bh", B, H)
    cap = attnctl.Capture.zeros(q, k, maps=True, tokens=tokens, head_weights=w)
    attention_reference(q, k, v, scale=0.25, capture=cap)
    _, maps = maps_replay(q, k, v, tokens, w, scale=0.25)
    compare("maps", cap.maps, maps)


# ---- Triton backward against the oracle -------------------------------------------------

SHAPES = [  # B, H, M, N, D: M never a multiple of the query block; N = 1, 77, 300 (several key blocks)
    (2, 2, 37, 1, 16),
    (1, 2, 70, 77, 40),
    (1, 1, 67, 300, 16),
    (1, 1, 33, 20, 80),
]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("through", [("out",), ("maps",), ("out", "maps")], ids="+".join)
def test_plain_gradients(shape, through):
    B, H, M, N, D = shape
    q, k, v = make_qkv(B, H, M, N, D)
    tokens = make_tokens("1d", B, N, 3)
    check_gradients(q, k, v, tokens=tokens, through=through)


@pytest.mark.parametrize("form", ["bhmn", "1hmn", "bh1n", "bhm1", "1111", "n", "expanded", "transposed"])
def test_bias_gradient_reduced_over_broadcast_dims(form):
    B, H, M, N, D = 2, 2, 19, 24, 16
    q, k, v = make_qkv(B, H, M, N, D)
    bias = make_operand(form, B, H, M, N)
    check_gradients(q, k, v, bias=bias, tokens=make_tokens("2d", B, N, 2), head_weights=make_head_weights("h", B, H))


def test_masked_keys_and_a_fully_masked_row():
    """-inf bias entries get zero gradient paths; a fully masked row (P = 0, LSE -inf) adds nothing."""
    B, H, M, N, D = 1, 2, 21, 30, 16
    q, k, v = make_qkv(B, H, M, N, D)
    bias = mask_bias(make_operand("bhmn", B, H, M, N), rows=(4,))
    check_gradients(q, k, v, bias=bias, tokens=make_tokens("1d", B, N, 2))


@pytest.mark.parametrize("form", ["bhmn", "1h1n", "11m1"])
def test_prob_mult_gradients(form):
    B, H, M, N, D = 2, 2, 23, 77, 16
    q, k, v = make_qkv(B, H, M, N, D, layout="bmhd")
    pm = make_operand(form, B, H, M, N, kind="signed")
    check_gradients(q, k, v, prob_mult=pm, bias=make_operand("b11n", B, H, M, N), tokens=make_tokens("2d", B, N, 3),
                    head_weights=make_head_weights("bh", B, H))


def test_regions_gradients_over_several_key_blocks():
    B, H, M, N, D = 2, 1, 29, 150, 16
    q, k, v = make_qkv(B, H, M, N, D)
    gen = torch.Generator().manual_seed(3)
    regions = Regions(torch.randint(-1, 3, (B, M), generator=gen).to(DEVICE),
                      torch.randint(-1, 3, (1, N), generator=gen).to(DEVICE), 0.8)
    check_gradients(q, k, v, regions=regions, prob_mult=make_operand("1hmn", B, H, M, N, kind="mult"),
                    tokens=make_tokens("1d", B, N, 2))


def test_strided_inputs_and_value_dim_differs():
    B, H, M, N, D = 1, 2, 18, 40, 16
    q, k, v = make_qkv(B, H, M, N, D, 32, layout="strided")
    check_gradients(q, k, v, bias=make_operand("11mn", B, H, M, N), tokens=make_tokens("1d", B, N, 2))


def test_attention_op_gradients_output_only():
    """attnctl.attention itself is differentiable on the Triton backend."""
    B, H, M, N, D = 2, 2, 26, 77, 40
    q, k, v = make_qkv(B, H, M, N, D, layout="bmhd")
    check_gradients(q, k, v, bias=make_operand("b1mn", B, H, M, N), prob_mult=make_operand("1h1n", B, H, M, N),
                    through=("out",), api="op")


@pytest.mark.parametrize("seed", range(4))
def test_random_cases(seed):
    """Shapes, broadcast forms, controls and upstreams drawn at random (seeded)."""
    import random
    rng = random.Random(seed)
    B, H, M, N = rng.randint(1, 2), rng.randint(1, 3), rng.randint(1, 90), rng.choice([1, 7, 77, 130])
    D = rng.choice([16, 40, 80])
    q, k, v = make_qkv(B, H, M, N, D, layout=rng.choice(["contiguous", "bmhd", "strided"]))
    forms = ["bhmn", "1hmn", "b1mn", "bh1n", "11mn", "111n", "n", "expanded"]
    bias = make_operand(rng.choice(forms), B, H, M, N) if rng.random() < 0.7 else None
    pm = make_operand(rng.choice(forms), B, H, M, N, kind="signed") if rng.random() < 0.5 else None
    regions = None
    if rng.random() < 0.4:
        gen = torch.Generator().manual_seed(seed)
        regions = Regions(torch.randint(-1, 3, (1, M), generator=gen).to(DEVICE),
                          torch.randint(-1, 3, (B, N), generator=gen).to(DEVICE), rng.uniform(0, 1))
    through = rng.choice([("out",), ("maps",), ("out", "maps")])
    check_gradients(q, k, v, bias=bias, prob_mult=pm, regions=regions, through=through,
                    tokens=make_tokens(rng.choice(["1d", "2d"]), B, N, rng.randint(1, 4)),
                    head_weights=make_head_weights(rng.choice([None, "h", "bh"]), B, H))


@pytest.mark.parametrize("dtype", LOW, ids=str)
@pytest.mark.parametrize("shape", [(1, 2, 37, 77, 40), (1, 1, 33, 130, 16)], ids=lambda s: "x".join(map(str, s)))
def test_low_precision_gradients(dtype, shape):
    B, H, M, N, D = shape
    q, k, v = make_qkv(B, H, M, N, D, dtype=dtype)
    check_gradients(q, k, v, bias=make_operand("1hmn", B, H, M, N, dtype=dtype),
                    prob_mult=make_operand("b11n", B, H, M, N, kind="signed", dtype=dtype),
                    tokens=make_tokens("1d", B, N, 3), head_weights=make_head_weights("h", B, H))


# ---- attention_with_maps: values, dispatch, errors --------------------------------------

def test_attention_with_maps_values_on_both_backends():
    B, H, M, N, D = 2, 2, 15, 77, 16
    q, k, v = make_qkv(B, H, M, N, D, layout="bmhd")
    tokens = make_tokens("2d", B, N, 4)
    w = make_head_weights("bh", B, H)
    bias = make_operand("b1mn", B, H, M, N)
    ref_out, ref_maps = maps_replay(q, k, v, tokens, w, scale=0.25, bias=bias)
    for backend in ("torch", "triton"):
        out, maps = attnctl.attention_with_maps(q, k, v, tokens, head_weights=w, scale=0.25, bias=bias,
                                                backend=backend)
        assert attnctl.last_dispatch().backend == backend
        assert out.stride() == attnctl.attention(q, k, v, bias=bias, backend=backend).stride()
        assert maps.dtype == torch.float32 and maps.shape == (B, M, 4)
        compare(f"{backend} out", out, ref_out)
        compare(f"{backend} maps", maps, ref_maps)


def test_attention_with_maps_auto_on_cpu_runs_the_reference():
    q, k, v = make_qkv(1, 1, 8, 8, 16)
    attnctl.attention_with_maps(q, k, v, [1])
    assert attnctl.last_dispatch().backend == ("triton" if ON_GPU else "torch")


@pytest.mark.parametrize("kwargs, match", [
    (dict(tokens=[9]), r"attention_with_maps.tokens: expected indices in \[0, 8\)"),
    (dict(tokens=[1], head_weights=torch.ones(3, device=DEVICE)), r"attention_with_maps.head_weights: expected shape \(2,\)"),
    (dict(tokens=[1.5]), "tokens: expected integer indices"),
    (dict(tokens=[1], backend="cuda"), "the CUDA backend does not support the maps output"),
    (dict(tokens=[1], backend="sdpa"), "'sdpa' computes plain attention only; this call has a maps output, "
                                        "which need 'torch' or 'triton'"),
])
def test_attention_with_maps_rejects_bad_arguments(kwargs, match):
    q, k, v = make_qkv(1, 2, 8, 8, 16)
    with pytest.raises((ValueError, TypeError), match=match):
        attnctl.attention_with_maps(q, k, v, **kwargs)


# ---- torch.library registration and torch.compile ---------------------------------------

def test_differentiable_ops_pass_opcheck():
    B, H, M, N, D = 1, 2, 9, 12, 16
    q, k, v = (t.requires_grad_(True) for t in make_qkv(B, H, M, N, D))
    bias = make_operand("1hmn", B, H, M, N).requires_grad_(True)
    tokens = torch.tensor([2, 5], dtype=torch.int32, device=DEVICE)
    torch.library.opcheck(torch.ops.attnctl.attention_differentiable.default,
                          (q, k, v, 0.25, bias, None, None, None, 0.0, tokens),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))
    with torch.no_grad():
        out, lse, head_maps = torch.ops.attnctl.attention_differentiable(q, k, v, 0.25, bias, None, None, None, 0.0,
                                                                         tokens)
    torch.library.opcheck(torch.ops.attnctl.attention_differentiable_backward.default,
                          (torch.randn_like(out), torch.randn_like(head_maps), q.detach(), k.detach(), v.detach(),
                           out, lse, head_maps, 0.25, bias.detach(), None, None, None, 0.0, tokens, True),
                          test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_compiled_forward_and_backward_fullgraph(compiler):
    """torch.compile (fullgraph) through attention and attention_with_maps on the Triton
    backend, backward included, gives eager's gradients."""
    B, H, M, N, D = 1, 2, 17, 20, 16
    q, k, v = make_qkv(B, H, M, N, D, layout="bmhd")
    bias = make_operand("b1mn", B, H, M, N)
    tokens = torch.tensor([3, 7], dtype=torch.int32, device=DEVICE)

    def loss(q, k, v, bias):
        out = attnctl.attention(q, k, v, bias=bias, backend="triton")
        out2, maps = attnctl.attention_with_maps(out, k, v, tokens, bias=bias, backend="triton")
        return out2.square().sum() + maps.sin().sum()

    def grads(fn):
        leaves = _leaves(q, k, v, bias)
        return torch.autograd.grad(fn(*leaves), leaves)

    compiled = torch.compile(loss, backend=compiler, fullgraph=True)
    for name, got, ref in zip(("dq", "dk", "dv", "dbias"), grads(compiled), grads(loss)):
        compare(name, got, ref)


# ---- injection and the two-source form ----------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("two_source", [False, True], ids=["injection", "two-source"])
def test_injection_and_two_source_gradients(dtype, two_source):
    """O_b = (P_src[b]·f)·V_b (+ (P_b·f_own)·V_own_b): dq, dk and dbias of an item gather the
    injected term of every item that takes its P, each term differentiated with its own
    normaliser."""
    B, H, M, N, D = 3, 2, 21, 77, 16
    q, k, v = make_qkv(B, H, M, N, D, dtype=dtype)
    own_v = make_qkv(B, H, M, N, D, dtype=dtype)[2]
    source = torch.tensor([0, 0, 1], device=DEVICE)
    bias = make_operand("b1mn", B, H, M, N, dtype=dtype)
    pm = make_operand("1h1n", B, H, M, N, kind="signed", dtype=dtype)
    own_pm = make_operand("bh1n", B, H, M, N, kind="mult", dtype=dtype)
    regions = Regions(torch.randint(-1, 2, (1, M)).to(DEVICE), torch.randint(-1, 2, (B, N)).to(DEVICE), 0.6)
    d_out = torch.randn(B, H, M, D).to(DEVICE)

    def grads(compute):
        wide = compute == torch.float64
        leaves = _leaves(*(t.double() if wide else t for t in (q, k, v, own_v, bias)))
        qq, kk, vv, ov, bb = leaves
        own = attnctl.OwnTerm(ov, own_pm) if two_source else None
        if compute is None:
            out = attnctl.attention(qq, kk, vv, scale=0.3, bias=bb, prob_mult=pm, regions=regions, source=source,
                                    own=own, backend="triton")
            assert "differentiable Triton path" in attnctl.last_dispatch().reason
        else:
            out = attention_reference(qq, kk, vv, scale=0.3, bias=bb, prob_mult=pm, regions=regions, source=source,
                                      own=own, compute_dtype=compute)
        return _grads([out], [d_out], leaves if two_source else leaves[:3] + leaves[4:])

    got, oracle = grads(None), grads(torch.float64)
    low = grads(dtype) if dtype in LOW else [None] * len(got)
    names = ["dq", "dk", "dv"] + (["d own.values"] if two_source else []) + ["dbias"]
    for name, g, ref, ref_low in zip(names, got, oracle, low):
        compare(name, g, ref, ref_low, dtype)


# ---- benchmark contenders -----------------------------------------------------------------

def test_backward_contenders_agree():
    """The forward+backward contenders compute the same gradients (fp32, a small shape)."""
    from attnctl.benchmarks.contenders import CONTENDERS, Inputs
    from attnctl.benchmarks.shapes import AttnShape
    x = Inputs.make(AttnShape("tiny", "4x4", "cross", 1, 2, 16, 12, 16), torch.float32, DEVICE)
    torch.manual_seed(5)
    triton_grads = CONTENDERS["triton+maps+backward"].build(x)()
    torch.manual_seed(5)  # the same upstream gradients
    materialised_grads = CONTENDERS["materialised+maps+backward"].build(x)()
    for name, got, ref in zip(("dq", "dk", "dv"), triton_grads, materialised_grads):
        compare(name, got, ref)
    assert [g.shape for g in CONTENDERS["sdpa+backward"].build(x)()] == [x.q.shape, x.k.shape, x.v.shape]
