"""torch.compile(pipe.unet) with attnctl.trace installed: no graph break, the compiled UNet
gives eager's images and captured maps, and it compiles a bounded number of graphs (the
first step, which allocates the trace's buffers, and the steady state), not one per
denoising step. CPU: the op reaches the graph as the custom op attnctl::attention (the
Triton interpreter's kernels cannot be wrapped for Inductor, see README)."""
import contextlib

import pytest
import torch
from torch._dynamo.utils import counters

import attnctl

from diffusion_helpers import LATENT, generate, sd_pipe

STEPS = 4


def traced(pipe, unet=None, **options):
    """(images, {(layer, step key): maps}, steps run) of one traced generation, the UNet
    replaced by ``unet`` (a compiled one) for its duration."""
    original = pipe.unet
    with attnctl.trace(pipe, layers="*", **options) as tc:
        pipe.unet = unet if unet is not None else original
        try:
            images = generate(pipe, "a cat", steps=STEPS)
        finally:
            pipe.unet = original
        maps = {(layer.name, key): m.clone() for layer in tc.maps().layers for key, m in layer.maps.items()}
        return images, maps, tc.controller.steps_run


def close(got, expected, what):
    """Within fp32 tolerance relative to the tensor's scale (Inductor reorders sums)."""
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item(),
                               msg=lambda text: f"{what}: {text}")


def assert_same(got, expected):
    images, maps, steps = got
    close(images, expected[0], "images")
    assert maps.keys() == expected[1].keys()
    for key, m in expected[1].items():
        assert m.abs().max() > 0, key
        close(maps[key], m, key)
    assert steps == expected[2] == STEPS


@contextlib.contextmanager
def fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    try:
        yield
    finally:
        torch._dynamo.reset()


def test_explain_reports_no_graph_break():
    pipe = sd_pipe()
    sample = torch.randn(2, 4, *LATENT)
    context = torch.randn(2, 77, pipe.unet.config.cross_attention_dim)
    with fresh_dynamo(), attnctl.trace(pipe, layers="*") as tc:
        tc.installation.start_generation(["a cat"], cfg=True)
        explained = torch._dynamo.explain(pipe.unet)(sample, torch.tensor(999), encoder_hidden_states=context)
        assert explained.graph_break_count == 0, [b.reason for b in explained.break_reasons]
        assert explained.graph_count == 1
        assert any(m.abs().max() > 0 for layer in tc.maps().layers for m in layer.maps.values())


# Graphs for a 4-step generation: the first captured step allocates the trace's buffers
# (one graph), later steps reuse them (a second); a ``steps`` filter adds the uncaptured
# steps' graph. Per-step recompiles would give one graph per step.
@pytest.mark.parametrize("options, graphs", [({}, 2), (dict(per_step=True), 2),
                                             (dict(steps=[0, 2], per_step=True), 3)],
                         ids=["default", "per_step", "steps"])
def test_compiled_unet_does_not_recompile_per_step(options, graphs):
    pipe = sd_pipe()
    expected = traced(pipe, **options)
    with fresh_dynamo():
        compiled = torch.compile(pipe.unet, backend="eager", fullgraph=True)
        assert_same(traced(pipe, compiled, **options), expected)
        assert counters["stats"]["unique_graphs"] == graphs
        # A second generation (a new trace, new buffers) runs the graphs already compiled.
        assert_same(traced(pipe, compiled, **options), expected)
        assert counters["stats"]["unique_graphs"] == graphs


def test_inductor_compiled_unet_matches_eager():
    pipe = sd_pipe()
    expected = traced(pipe)
    with fresh_dynamo():
        compiled = torch.compile(pipe.unet, backend="inductor", fullgraph=True)
        assert_same(traced(pipe, compiled), expected)
        assert counters["stats"]["unique_graphs"] == 2
