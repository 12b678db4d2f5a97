"""ConceptAttention on a GPU (skipped without CUDA; written without a GPU, not yet run on one):
the tiny 3-block offline Flux in bf16 with the fused Triton kernel, its maps against the
replay of the original (tests/test_concept_attention.py) run in fp64, within twice the
error of the same replay run in bf16 (the original's own precision)."""
import pytest
import torch

import attnctl

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.mark.parametrize("softmax", [True, False])
def test_tiny_flux_bf16_maps_within_twice_the_originals_error(softmax):
    from test_concept_attention import CONCEPTS, flux_pipeline, generate, original_heatmaps, recorded_inputs

    pipe = flux_pipeline(3).to("cuda", torch.bfloat16)
    calls, hook = recorded_inputs(pipe)
    try:
        with attnctl.concept_attention(pipe, CONCEPTS, layers=[1, 2], softmax=softmax, backend="triton") as ca:
            generate(pipe)
    finally:
        hook.remove()
    assert attnctl.last_dispatch().backend == "triton"
    got = ca.maps().maps.flatten(2).double()
    reference = dict(concepts=CONCEPTS, layers=[1, 2], timesteps=[0, 1], softmax=softmax)
    original = original_heatmaps(pipe, calls, dtype=torch.bfloat16, **reference).double()
    exact = original_heatmaps(pipe, calls, dtype=torch.float64, **reference)
    own_error = (original - exact).abs().max().item()
    error = (got - exact).abs().max().item()
    assert error <= 2 * own_error + torch.finfo(torch.bfloat16).eps * exact.abs().max().item()
