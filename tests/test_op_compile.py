"""torch.compile traces attnctl.attention through the torch.library op attnctl::attention
without graph breaks (fullgraph=True) and gives eager's output and capture buffers; the op
passes torch.library.opcheck. Compiles are slow: two full compiles (aot_eager, inductor)
plus one aot_eager compile on the Triton backend."""
import pytest
import torch

import attnctl
from attnctl import Capture
from attnctl.op import op_arguments

from op_cases import (ALL_CAPTURES, CAPTURE_KINDS, DEVICE, compare, make_head_weights,
                      make_operand, make_qkv, make_tokens)

B, H, M, N, DH = 2, 2, 33, 20, 16


class CrossAttention(torch.nn.Module):
    """A diffusers-like block: project, split heads as (B,M,H,D) views, attend with
    controls and captures, merge heads."""

    def __init__(self, backend="auto"):
        super().__init__()
        self.to_q = torch.nn.Linear(H * DH, H * DH)
        self.to_out = torch.nn.Linear(H * DH, H * DH)
        self.backend = backend

    def forward(self, x, ctx, bias, prob_mult, capture):
        b, m, _ = x.shape
        q = self.to_q(x).view(b, m, H, DH).transpose(1, 2)
        k = ctx.view(b, -1, H, DH).transpose(1, 2)
        v = (2 * ctx).view(b, -1, H, DH).transpose(1, 2)
        o = attnctl.attention(q, k, v, bias=bias, prob_mult=prob_mult, capture=capture,
                              backend=self.backend)
        return self.to_out(o.transpose(1, 2).reshape(b, m, H * DH))


def _inputs():
    x = torch.randn(B, M, H * DH, device=DEVICE)
    ctx = torch.randn(B, N, H * DH, device=DEVICE)
    bias = make_operand("b1mn", B, H, M, N)
    bias[:, :, 3, :] = float("-inf")  # one fully masked row
    pm = make_operand("1h1n", B, H, M, N, kind="signed")
    return x, ctx, bias, pm


def _capture(kinds):
    q = torch.empty(B, H, M, DH, device=DEVICE)
    k = torch.empty(B, H, N, DH, device=DEVICE)
    tokens = make_tokens("2d", B, N, 4) if kinds & {"maps", "head_maps"} else None
    hw = torch.tensor([0.25, 0.75], device=DEVICE) if "maps" in kinds else None
    cap = Capture.zeros(q, k, token_mass="token_mass" in kinds, maps="maps" in kinds,
                        head_maps="head_maps" in kinds, lse="lse" in kinds, tokens=tokens,
                        head_weights=hw)
    for buf in cap.buffers().values():  # prefilled: compiled calls must add, not overwrite
        buf.copy_(torch.rand(buf.shape))
    return cap


def _copy(cap):
    return Capture(**{n: (getattr(cap, n).clone() if getattr(cap, n) is not None else None)
                      for n in CAPTURE_KINDS}, tokens=cap.tokens, head_weights=cap.head_weights)


def _compile_and_compare(compiler, kinds, backend="auto"):
    torch._dynamo.reset()
    model = CrossAttention(backend).to(DEVICE).eval()
    x, ctx, bias, pm = _inputs()
    cap_eager = _capture(kinds)
    cap_compiled = _copy(cap_eager)
    compiled = torch.compile(model, fullgraph=True, backend=compiler)
    with torch.no_grad():
        for call in range(2):  # the second call runs the cached graph and accumulates again
            expected = model(x, ctx, bias, pm, cap_eager)
            got = compiled(x, ctx, bias, pm, cap_compiled)
            compare(f"{compiler} output (call {call + 1})", got, expected)
            for name in CAPTURE_KINDS:
                e, g = getattr(cap_eager, name), getattr(cap_compiled, name)
                assert (e is None) == (g is None), name
                if e is not None:
                    compare(f"{compiler} capture.{name} (call {call + 1})", g, e)


def test_compile_aot_eager_all_captures():
    _compile_and_compare("aot_eager", set(ALL_CAPTURES))


def test_compile_inductor_partial_captures():
    """Inductor, with some buffers absent (they travel to the op as empty tensors)."""
    _compile_and_compare("inductor", {"maps", "lse"})


@pytest.mark.filterwarnings("ignore:divide by zero:RuntimeWarning")
def test_compile_aot_eager_triton_backend():
    _compile_and_compare("aot_eager", {"token_mass", "head_maps"}, backend="triton")


def test_compiled_output_layout_and_token_check():
    """Under compile the output keeps q's memory order, and out-of-range tokens (checked by
    the op at run time, not at trace time) still raise the validation error."""
    torch._dynamo.reset()

    def f(q, k, v, capture):
        return attnctl.attention(q, k, v, capture=capture)

    q, k, v = make_qkv(B, H, M, N, DH, layout="bmhd")
    cf = torch.compile(f, fullgraph=True, backend="aot_eager")
    good = Capture.zeros(q, k, head_maps=True, tokens=[0, N - 1])
    out = cf(q, k, v, good)
    assert out.transpose(1, 2).is_contiguous(), out.stride()
    bad = Capture.zeros(q, k, head_maps=True, tokens=[0, N])
    with pytest.raises(ValueError, match=rf"capture.tokens: expected indices in \[0, {N}\)"):
        cf(q, k, v, bad)


# ---- opcheck ------------------------------------------------------------------------------------

def _op_args(present, backend, tokens_form="1d", hw_form="h", controls=True):
    """The op's arguments exactly as attnctl.attention passes them under torch.compile."""
    q, k, v = make_qkv(B, H, M, N, DH, 24)
    T = 3
    shapes = {"token_mass": (B, H, N), "maps": (B, M, T), "head_maps": (B, H, M, T), "lse": (B, H, M)}
    wants_cols = bool(present & {"maps", "head_maps"})
    capture = Capture(**{n: torch.rand(shapes[n], device=DEVICE) for n in present},
                      tokens=make_tokens(tokens_form, B, N, T) if wants_cols else None,
                      head_weights=make_head_weights(hw_form, B, H) if "maps" in present else None)
    bias = make_operand("b1mn", B, H, M, N) if controls else None
    pm = make_operand("bh1n", B, H, M, N, kind="signed") if controls else None
    return op_arguments(q, k, v, 0.3, bias, pm, capture, backend)


@pytest.mark.parametrize("present,backend,tokens_form,hw_form,controls", [
    (set(ALL_CAPTURES), "torch", "1d", "h", True),
    (set(ALL_CAPTURES), "auto", "2d", "bh", True),
    ({"lse"}, "torch", "1d", None, False),
    (set(), "auto", "1d", None, False),          # plain: all buffers empty, sdpa
    ({"token_mass", "maps"}, "triton", "2d", None, True),
], ids=["all-torch", "all-auto-2d", "lse-only", "plain", "triton"])
def test_opcheck(present, backend, tokens_form, hw_form, controls):
    args = _op_args(present, backend, tokens_form, hw_form, controls)
    torch.library.opcheck(torch.ops.attnctl.attention.default, args)


def test_compiled_graph_calls_the_custom_op():
    """Dynamo records one attnctl::attention node (not an inlined reference, not a break)."""
    torch._dynamo.reset()
    graphs = []

    def record(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    def f(q, k, v, capture):
        return attnctl.attention(q, k, v, bias=torch.zeros(1, device=q.device), capture=capture)

    q, k, v = make_qkv(B, H, M, N, DH)
    cap = Capture.zeros(q, k, lse=True)
    torch.compile(f, fullgraph=True, backend=record)(q, k, v, cap)
    assert len(graphs) == 1
    targets = [str(n.target) for n in graphs[0].graph.nodes if n.op == "call_function"]
    assert sum("attnctl.attention" in t for t in targets) == 1, targets
    assert not any("matmul" in t or "softmax" in t for t in targets), targets


def test_compile_two_source_form():
    """Injection with the own term (prompt-to-prompt Refine) traces as one op call, its own
    capture buffers mutated in place like the main ones."""
    torch._dynamo.reset()
    q, k, v = make_qkv(B, H, M, N, DH)
    own_values = torch.randn(B, H, N, DH, device=DEVICE)
    source = torch.tensor([1, 1], device=DEVICE)
    own_pm = make_operand("b11n", B, H, M, N, kind="signed")

    def edit(q, k, v, own_values, own_pm, cap, own_cap):
        own = attnctl.OwnTerm(own_values, own_pm, own_cap)
        return attnctl.attention(q, k, v, source=source, capture=cap, own=own)

    caps = [_capture({"maps", "lse"}) for _ in range(2)]
    caps[1] = _copy(caps[0])
    own_caps = [_capture({"token_mass", "head_maps"}) for _ in range(2)]
    own_caps[1] = _copy(own_caps[0])
    compiled = torch.compile(edit, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        expected = edit(q, k, v, own_values, own_pm, caps[0], own_caps[0])
        got = compiled(q, k, v, own_values, own_pm, caps[1], own_caps[1])
    compare("two-source output", got, expected)
    for eager, traced in ((caps[0], caps[1]), (own_caps[0], own_caps[1])):
        for name, buf in eager.buffers().items():
            compare(f"two-source capture.{name}", getattr(traced, name), buf)
