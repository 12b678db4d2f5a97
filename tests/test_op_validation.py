"""Every bad input raises before any kernel runs, with a message naming the argument, what
was expected and what was received. The 'meta' device stands in for a second device."""
import math

import pytest
import torch

import attnctl
from attnctl import Capture

from op_cases import make_qkv

B, H, M, N, D = 2, 3, 5, 7, 16


def qkv(**over):
    q, k, v = make_qkv(B, H, M, N, D, device="cpu")
    return {"q": q, "k": k, "v": v, **over}


def raises(exc, *fragments, **kwargs):
    """Call attnctl.attention(**kwargs) and check the error type and message fragments."""
    args = {k: kwargs.pop(k) for k in ("q", "k", "v")}
    with pytest.raises(exc) as info:
        attnctl.attention(args["q"], args["k"], args["v"], **kwargs)
    msg = str(info.value)
    for frag in fragments:
        assert frag in msg, f"{frag!r} not in {msg!r}"
    return msg


def cap(**buffers):
    c = Capture.zeros(torch.empty(B, H, M, D), torch.empty(B, H, N, D), token_mass=True,
                      tokens=[0, 3, 6], maps=True, head_maps=True, lse=True)
    for name, value in buffers.items():
        setattr(c, name, value)
    return c


# ---- q, k, v ------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["auto", "torch", "triton", "sdpa"])
def test_mismatched_batch(backend):
    a = qkv(k=torch.randn(B + 1, H, N, D))
    raises(ValueError, "batch", "q 2", "k 3", "v 2", backend=backend, **a)


def test_mismatched_heads():
    a = qkv(v=torch.randn(B, H + 2, N, D))
    raises(ValueError, "heads", "q 3", "k 3", "v 5", **a)


def test_mismatched_keys():
    a = qkv(v=torch.randn(B, H, N + 1, D))
    raises(ValueError, "v:", f"expected {N} keys", f"{(B, H, N + 1, D)}", **a)


def test_mismatched_head_dim():
    a = qkv(k=torch.randn(B, H, N, 24))
    raises(ValueError, "k:", f"expected head_dim {D}", f"{(B, H, N, 24)}", **a)


@pytest.mark.parametrize("bad", [12, 264, 4])
def test_unsupported_head_dim(bad):
    a = qkv(q=torch.randn(B, H, M, bad), k=torch.randn(B, H, N, bad))
    raises(ValueError, "q/k head_dim", "multiple of 8 up to 256", f"got {bad}", **a)


@pytest.mark.parametrize("bad", [20, 512])
def test_unsupported_value_dim(bad):
    a = qkv(v=torch.randn(B, H, N, bad))
    raises(ValueError, "v head_dim", "multiple of 8 up to 256", f"got {bad}", **a)


@pytest.mark.parametrize("name", ["q", "k", "v"])
@pytest.mark.parametrize("dtype", [torch.int32, torch.int64, torch.float64, torch.bool])
def test_bad_dtype(name, dtype):
    a = qkv()
    a[name] = a[name].to(dtype)
    raises(TypeError, f"{name}:", "float16, bfloat16 or float32", f"got {dtype}", **a)


def test_mixed_dtypes():
    a = qkv()
    a["k"] = a["k"].half()
    raises(TypeError, "q, k, v", "one dtype", "q torch.float32", "k torch.float16", **a)


@pytest.mark.parametrize("name", ["q", "k", "v"])
def test_different_devices(name):
    a = qkv()
    a[name] = a[name].to("meta")
    raises(ValueError, "q, k, v", "one device", f"{name} meta", "cpu", **a)


@pytest.mark.parametrize("name", ["q", "k", "v"])
def test_wrong_rank(name):
    a = qkv()
    a[name] = a[name][0]
    raises(ValueError, f"{name}:", "expected 4 dims", "got shape", **a)


def test_empty_dim():
    a = qkv(q=torch.randn(B, H, 0, D))
    raises(ValueError, "q:", ">= 1", f"{(B, H, 0, D)}", **a)


def test_not_a_tensor():
    a = qkv()
    a["v"] = a["v"].tolist()
    raises(TypeError, "v:", "torch.Tensor", "list", **a)


# ---- scale ---------------------------------------------------------------------------------

@pytest.mark.parametrize("scale", [math.inf, -math.inf, math.nan, torch.tensor(math.nan)])
def test_non_finite_scale(scale):
    shown = "nan" if isinstance(scale, torch.Tensor) else str(scale)
    raises(ValueError, "scale:", "finite", f"got {shown}", scale=scale, **qkv())


def test_scale_of_wrong_type():
    raises(TypeError, "scale:", "float", "str", scale="0.1", **qkv())
    raises(TypeError, "scale:", "float", "bool", scale=True, **qkv())
    raises(ValueError, "scale:", "a number", "(2,)", scale=torch.ones(2), **qkv())


# ---- bias / prob_mult -------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["bias", "prob_mult"])
@pytest.mark.parametrize("shape", [(B, H, M, N + 1), (2 * B, 1, 1, 1), (M + 1, 1), (H + 1, M, N),
                                   (1, B, H, M, N)])
def test_not_broadcastable(name, shape):
    msg = raises(ValueError, f"{name}:", f"broadcastable to (B, H, M, N) = {(B, H, M, N)}",
                 f"got {shape}", **{name: torch.randn(shape)}, **qkv())
    assert msg.startswith(name)


@pytest.mark.parametrize("name", ["bias", "prob_mult"])
def test_control_on_other_device(name):
    raises(ValueError, f"{name}:", "expected device cpu", "got meta",
           **{name: torch.zeros(1, device="meta")}, **qkv())


@pytest.mark.parametrize("name", ["bias", "prob_mult"])
def test_control_of_integer_dtype(name):
    raises(TypeError, f"{name}:", "float16, bfloat16 or float32", "torch.int64",
           **{name: torch.zeros(1, dtype=torch.int64)}, **qkv())


@pytest.mark.parametrize("name", ["bias", "prob_mult"])
def test_control_not_a_tensor(name):
    raises(TypeError, f"{name}:", "torch.Tensor or None", "float", **{name: 1.0}, **qkv())


@pytest.mark.parametrize("backend", ["auto", "torch", "triton", "cuda"])
@pytest.mark.parametrize("value, kind", [(float("inf"), "+inf"), (float("nan"), "NaN")])
def test_bias_with_pos_inf_or_nan(backend, value, kind):
    """+inf has no softmax (inf - inf): rejected before any launch, with where it is."""
    bias = torch.zeros(1, H, M, N)
    bias[0, 2, 4, 1] = value
    raises(ValueError, "bias:", "finite values or -inf", kind, "1 entries", f"(0, 2, 4, 1) of shape {(1, H, M, N)}",
           bias=bias, backend=backend, **qkv())


def test_bias_value_check_follows_in_place_writes():
    """The check is memoised per (tensor, version): a later in-place +inf is still caught."""
    bias = torch.zeros(B, H, M, N)
    a = qkv()
    attnctl.attention(a["q"], a["k"], a["v"], bias=bias, backend="torch")
    bias[1, 0, 0, 0] = float("inf")
    raises(ValueError, "bias:", "+inf", bias=bias, backend="torch", **qkv())


@pytest.mark.parametrize("backend", ["auto", "torch", "triton"])
@pytest.mark.parametrize("value, kind", [(float("nan"), "NaN"), (float("inf"), "inf"), (-float("inf"), "inf")])
def test_prob_mult_not_finite(backend, value, kind):
    """A NaN or infinite factor would make the rows it touches NaN or inf: rejected, with where."""
    prob_mult = torch.ones(1, H, M, N)
    prob_mult[0, 1, 3, 2] = value
    raises(ValueError, "prob_mult:", "expected finite values", kind, "1 entries",
           f"(0, 1, 3, 2) of shape {(1, H, M, N)}", prob_mult=prob_mult, backend=backend, **qkv())


def test_own_prob_mult_not_finite():
    a = qkv()
    factor = torch.ones(B, 1, 1, N)
    factor[1, 0, 0, 4] = float("nan")
    raises(ValueError, "own.prob_mult:", "expected finite values", "NaN", "(1, 0, 0, 4)",
           source=torch.zeros(B, dtype=torch.int64), own=attnctl.OwnTerm(a["v"], factor), backend="torch", **a)


def test_prob_mult_value_check_once_per_tensor_version(monkeypatch):
    """Memoised per (tensor, version), the tensor held weakly: reused factors are read once,
    a later in-place NaN is still caught, and no entry outlives its tensor."""
    from attnctl import validation

    reads = []
    isfinite = torch.isfinite
    monkeypatch.setattr(validation.torch, "isfinite", lambda t: reads.append(1) or isfinite(t))
    factors = [torch.full((1, H, 1, N), 0.5 + i) for i in range(40)]   # more than any bounded memo
    a = qkv()
    for _ in range(2):
        for f in factors:
            attnctl.attention(a["q"], a["k"], a["v"], prob_mult=f, backend="torch")
    assert len(reads) == len(factors)
    factors[0][0, 0, 0, 0] = float("nan")
    raises(ValueError, "prob_mult:", "NaN", prob_mult=factors[0], backend="torch", **qkv())
    checked = [validation._checked_factors[id(f)][0] for f in factors[1:]]
    del factors, f
    assert all(ref() is None for ref in checked)
    assert all(ref() is not None for ref, _ in validation._checked_factors.values())   # dead ones dropped


# ---- capture ---------------------------------------------------------------------------------

EXPECTED_SHAPES = {"token_mass": (B, H, N), "maps": (B, M, 3), "head_maps": (B, H, M, 3),
                   "lse": (B, H, M)}


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("name", list(EXPECTED_SHAPES))
def test_capture_buffer_wrong_shape(name, backend):
    good = EXPECTED_SHAPES[name]
    bad = good[:-1] + (good[-1] + 1,)
    raises(ValueError, f"capture.{name}:", f"expected shape {good}", f"got {bad}",
           capture=cap(**{name: torch.zeros(bad)}), backend=backend, **qkv())


@pytest.mark.parametrize("dtype", [torch.float16, torch.float64, torch.int32])
@pytest.mark.parametrize("name", list(EXPECTED_SHAPES))
def test_capture_buffer_wrong_dtype(name, dtype):
    raises(TypeError, f"capture.{name}:", "float32", f"got {dtype}",
           capture=cap(**{name: torch.zeros(EXPECTED_SHAPES[name], dtype=dtype)}), **qkv())


@pytest.mark.parametrize("name", list(EXPECTED_SHAPES))
def test_capture_buffer_wrong_device(name):
    raises(ValueError, f"capture.{name}:", "expected device cpu", "got meta",
           capture=cap(**{name: torch.zeros(EXPECTED_SHAPES[name], device="meta")}), **qkv())


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("tokens", [[0, N], [-1, 2], [[0, 1], [2, N + 5]]])
def test_token_index_out_of_range(tokens, backend):
    t = torch.tensor(tokens)
    c = Capture.zeros(torch.empty(B, H, M, D), torch.empty(B, H, N, D), maps=True, head_maps=True,
                      tokens=t)
    raises(ValueError, "capture.tokens:", f"[0, {N})", f"[{int(t.min())}, {int(t.max())}]",
           capture=c, backend=backend, **qkv())


def test_token_modified_in_place_is_rechecked():
    """The range check is memoised per tokens tensor; an in-place change must re-run it."""
    c = cap()
    attnctl.attention(**qkv(), capture=c)
    c.tokens[1] = N + 3
    raises(ValueError, "capture.tokens:", f"[0, {N})", f"[0, {N + 3}]", capture=c, **qkv())


def test_tokens_checked_for_each_key_length():
    c = Capture.zeros(torch.empty(B, H, M, D), torch.empty(B, H, N, D), maps=True, tokens=[N - 1])
    attnctl.attention(**qkv(), capture=c)
    shorter = qkv(k=torch.randn(B, H, N - 1, D), v=torch.randn(B, H, N - 1, D))
    c.token_mass = None
    raises(ValueError, "capture.tokens:", f"[0, {N - 1})", f"[{N - 1}, {N - 1}]", capture=c, **shorter)


def test_tokens_wrong_dtype_device_shape():
    raises(TypeError, "capture.tokens:", "int32 or int64", "torch.float32",
           capture=cap(tokens=torch.tensor([0.0, 1.0, 2.0])), **qkv())
    raises(ValueError, "capture.tokens:", "expected device cpu", "got meta",
           capture=cap(tokens=torch.zeros(3, dtype=torch.int32, device="meta")), **qkv())
    raises(ValueError, "capture.tokens:", f"({B}, T)", f"got {(B + 1, 3)}",
           capture=cap(tokens=torch.zeros(B + 1, 3, dtype=torch.int32)), **qkv())
    raises(ValueError, "capture.tokens:", "maps and head_maps need token indices", "got None",
           capture=cap(tokens=None), **qkv())
    raises(TypeError, "capture.tokens:", "expected a tensor", "list",
           capture=cap(tokens=[0, 1, 2]), **qkv())


def test_head_weights_errors():
    raises(ValueError, "capture.head_weights:", f"({H},) or ({B}, {H})", f"got {(H + 1,)}",
           capture=cap(head_weights=torch.ones(H + 1)), **qkv())
    raises(ValueError, "capture.head_weights:", f"({H},) or ({B}, {H})", f"got {(B + 1, H)}",
           capture=cap(head_weights=torch.ones(B + 1, H)), **qkv())
    raises(ValueError, "capture.head_weights:", "expected device cpu", "got meta",
           capture=cap(head_weights=torch.ones(H, device="meta")), **qkv())
    raises(TypeError, "capture.head_weights:", "float tensor", "torch.int64",
           capture=cap(head_weights=torch.ones(H, dtype=torch.int64)), **qkv())
    raises(ValueError, "capture.head_weights:", "without capture.maps",
           capture=cap(maps=None, head_weights=torch.ones(H)), **qkv())


def test_capture_not_a_capture():
    raises(TypeError, "capture:", "attnctl.Capture", "dict", capture={"lse": None}, **qkv())


def test_errors_leave_buffers_untouched():
    """Validation runs before any work: a failing call adds nothing."""
    c = cap()
    bad = qkv(v=torch.randn(B, H, N, 20))
    with pytest.raises(ValueError):
        attnctl.attention(**bad, capture=c, backend="triton")
    assert all((b == 0).all() for b in c.buffers().values())


def test_token_check_not_fooled_by_a_reused_tensor_id():
    """The range-check memo is keyed on id(tokens): after a checked tokens tensor is freed,
    a new out-of-range tensor that CPython places at the same address (same id, _version
    0) must still be checked, not waved through to the backend."""
    import gc

    q, k, v = make_qkv(1, 1, 4, 8, 16, device="cpu")
    c = Capture.zeros(q, k, head_maps=True, tokens=[0, 1])
    attnctl.attention(q, k, v, capture=c, backend="torch")  # checks and memoises
    checked_id = id(c.tokens)
    c.tokens = None
    gc.collect()
    keep = []  # hold every candidate so that each new one lands at a fresh address
    for _ in range(20000):
        t = torch.tensor([0, 100], dtype=torch.int32)
        if id(t) == checked_id:
            break
        keep.append(t)
    else:
        pytest.skip("CPython never reused the freed tensor's address in this run")
    c.tokens = t
    with pytest.raises(ValueError) as info:
        attnctl.attention(q, k, v, capture=c, backend="torch")
    assert "capture.tokens" in str(info.value) and "[0, 8)" in str(info.value)
