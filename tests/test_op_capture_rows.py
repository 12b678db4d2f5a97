"""Captured rows (``Capture.rows``): captures apply to a range of batch items only; the
other items' buffer rows stay exactly as they were and the output is unaffected. Checked
on the reference and the Triton kernel (interpreter on CPU) against captures of every row
restricted afterwards, and against the reference."""
import pytest
import torch

import attnctl
from attnctl import Capture, OwnTerm
from attnctl.op import op_arguments

from op_cases import (ALL_CAPTURES, CAPTURE_KINDS, DEVICE, compare, interpreter_bf16_dot_fixed, make_capture,
                      make_operand, make_qkv, make_tokens, randn, run_and_compare)


@pytest.fixture(scope="module", autouse=True)
def _bf16_dot():
    with interpreter_bf16_dot_fixed():
        yield


def prefilled(cap: Capture) -> Capture:
    for buf in cap.buffers().values():
        buf.copy_(torch.randn_like(buf))
    return cap


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("N,rows,D", [(77, range(2, 4), 16), (77, range(1, 2), 72), (300, range(0, 3), 40),
                                     (20, range(3, 4), 16)])
def test_rows_equal_full_capture_restricted(backend, N, rows, D):
    """Every capture with rows = the same capture of all rows, in those rows; the other
    rows keep their prefilled values bit for bit; probe mass too."""
    B, H, M = 4, 2, 33
    q, k, v = make_qkv(B, H, M, N, D)
    bias = make_operand("b1mn", B, H, M, N)
    tokens = make_tokens("2d", B, N, 6)
    probe_keys = randn(1, H, 5, D)
    full, part = (prefilled(make_capture(q, k, ALL_CAPTURES, tokens=tokens, head_weights=randn(B, H)))
                  for _ in range(2))
    part.head_weights = full.head_weights
    for name in CAPTURE_KINDS:
        getattr(part, name).copy_(getattr(full, name))
    before = {name: buf.clone() for name, buf in part.buffers().items()}
    for cap in (full, part):
        cap.probe_keys, cap.probe_mass = probe_keys, torch.zeros(B, H, 5, device=DEVICE)
    part.rows = rows
    out_full = attnctl.attention(q, k, v, bias=bias, capture=full, backend=backend)
    out_part = attnctl.attention(q, k, v, bias=bias, capture=part, backend=backend)
    assert torch.equal(out_full, out_part), "rows must not change the output"
    inside = torch.zeros(B, dtype=torch.bool, device=DEVICE)
    inside[rows.start:rows.stop] = True
    for name in CAPTURE_KINDS + ("probe_mass",):
        got, want = getattr(part, name), getattr(full, name)
        compare(f"{name} in rows", got[inside], want[inside])
        untouched = before[name][~inside] if name in before else torch.zeros_like(got[~inside])
        assert torch.equal(got[~inside], untouched), f"{name}: rows outside {rows} changed"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("N", [77, 150])
def test_rows_triton_matches_reference(dtype, N):
    """The reference defines rows; the kernel matches it by the usual precision rule."""
    B, H, M = 3, 2, 33
    q, k, v = make_qkv(B, H, M, N, 40, dtype=dtype)
    cap = make_capture(q, k, ALL_CAPTURES, tokens=make_tokens("1d", B, N, 5), head_weights=randn(H))
    prefilled(cap).rows = range(1, 3)
    run_and_compare(q, k, v, bias=make_operand("bh1n", B, H, M, N), capture=cap)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_own_term_rows(backend):
    """The two-source form: capture and own.capture each follow their own rows."""
    B, H, M, N, D = 4, 2, 24, 77, 16
    q, k, v = make_qkv(B, H, M, N, D)
    v_own = randn(B, H, N, D)
    source = torch.tensor([0, 0, 2, 2], device=DEVICE)
    tokens = [3, 9, 9]
    results = []
    for rows, own_rows in ((None, None), (range(1, 2), range(2, 4))):
        cap = Capture.zeros(q, k, token_mass=True, tokens=tokens, maps=True, lse=True, rows=rows)
        own_cap = Capture.zeros(q, k, token_mass=True, tokens=tokens, head_maps=True, rows=own_rows)
        out = attnctl.attention(q, k, v, source=source, own=OwnTerm(v_own, capture=own_cap), capture=cap,
                                backend=backend)
        results.append((out, cap, own_cap))
    (out_all, cap_all, own_all), (out_rows, cap_rows, own_rows) = results
    assert torch.equal(out_all, out_rows)
    for name in ("token_mass", "maps", "lse"):
        compare(name, getattr(cap_rows, name)[1:2], getattr(cap_all, name)[1:2])
        assert not getattr(cap_rows, name)[[0, 2, 3]].any()
    for name in ("token_mass", "head_maps"):
        compare(f"own {name}", getattr(own_rows, name)[2:], getattr(own_all, name)[2:])
        assert not getattr(own_rows, name)[:2].any()


@pytest.mark.parametrize("rows,error,pattern", [
    ([0, 1], TypeError, r"capture\.rows: expected a range of batch items .* got list"),
    (torch.tensor([1], device=DEVICE), TypeError, r"capture\.rows: expected a range .* got Tensor"),
    (range(0, 2, 2), ValueError, r"capture\.rows: expected a non-empty range with step 1 inside \[0, 2\)"),
    (range(1, 1), ValueError, r"capture\.rows: .*got range\(1, 1\)"),
    (range(1, 3), ValueError, r"capture\.rows: .*\(B = batch\), got range\(1, 3\)"),
    (range(-1, 1), ValueError, r"capture\.rows: .*got range\(-1, 1\)"),
])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_bad_rows(rows, error, pattern, backend):
    q, k, v = make_qkv(2, 2, 9, 12, 16)
    cap = Capture.zeros(q, k, token_mass=True)
    cap.rows = rows
    with pytest.raises(error, match=pattern):
        attnctl.attention(q, k, v, capture=cap, backend=backend)
    assert not cap.token_mass.any()


def test_own_capture_bad_rows_named():
    q, k, v = make_qkv(2, 2, 9, 12, 16)
    own = OwnTerm(v, capture=Capture.zeros(q, k, lse=True, rows=range(0, 5)))
    with pytest.raises(ValueError, match=r"own\.capture\.rows: .*got range\(0, 5\)"):
        attnctl.attention(q, k, v, source=torch.tensor([0, 0], device=DEVICE), own=own, backend="torch")


def test_cuda_backend_refuses_rows():
    q, k, v = make_qkv(2, 2, 9, 12, 16)
    with pytest.raises(ValueError, match=r"CUDA backend does not support capture\.rows.*expected backend"):
        attnctl.attention(q, k, v, capture=Capture.zeros(q, k, lse=True, rows=range(1, 2)), backend="cuda")


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_opcheck_with_rows(backend):
    q, k, v = make_qkv(2, 2, 9, 12, 16)
    capture = Capture(token_mass=torch.rand(2, 2, 12, device=DEVICE), lse=torch.rand(2, 2, 9, device=DEVICE),
                      rows=range(1, 2))
    torch.library.opcheck(torch.ops.attnctl.attention.default, op_arguments(q, k, v, 0.3, capture=capture, backend=backend))


def test_compiled_rows_match_eager():
    torch._dynamo.reset()
    q, k, v = make_qkv(2, 2, 17, 12, 16)

    def f(q, k, v, capture):
        return attnctl.attention(q, k, v, capture=capture)

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    eager, comp = (Capture.zeros(q, k, token_mass=True, tokens=[1, 4], maps=True, rows=range(1, 2))
                   for _ in range(2))
    compare("compiled output", compiled(q, k, v, comp), f(q, k, v, eager))
    for name in ("token_mass", "maps"):
        compare(f"compiled {name}", getattr(comp, name), getattr(eager, name))
        assert not getattr(comp, name)[0].any()
