"""GPU: a traced tiny SD UNet under torch.compile(mode="reduce-overhead") (Inductor with
CUDA graphs) gives eager's images and captured maps, through the fused Triton kernel,
over two generations (the second replays the recorded graphs). Skipped without CUDA."""
import pytest
import torch

import attnctl
from attnctl.diffusers.offline import tiny_sd_pipeline

from diffusion_helpers import HEIGHT, WIDTH

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

STEPS = 4


def traced(pipe, unet):
    """(images, {(layer, step key): maps}) of one traced generation with ``unet`` in place."""
    original = pipe.unet
    with attnctl.trace(pipe, layers="*", backend="triton") as tc:
        pipe.unet = unet
        try:
            images = pipe("a cat", num_inference_steps=STEPS, height=HEIGHT, width=WIDTH, output_type="pt",
                          generator=torch.Generator().manual_seed(0)).images
        finally:
            pipe.unet = original
        # Cloned before the next generation: CUDA graph replays reuse their memory pool.
        maps = {(layer.name, key): m.clone() for layer in tc.maps().layers for key, m in layer.maps.items()}
    assert tc.controller.steps_run == STEPS
    return images, maps


def close(got, expected, what):
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item(),
                               msg=lambda text: f"{what}: {text}")


def test_reduce_overhead_matches_eager():
    pipe = tiny_sd_pipeline().to("cuda")
    expected_images, expected_maps = traced(pipe, pipe.unet)
    torch._dynamo.reset()
    try:
        compiled = torch.compile(pipe.unet, mode="reduce-overhead", fullgraph=True)
        for generation in range(2):
            images, maps = traced(pipe, compiled)
            close(images, expected_images, f"images (generation {generation})")
            assert maps.keys() == expected_maps.keys()
            for key, m in expected_maps.items():
                assert m.abs().max() > 0, key
                close(maps[key], m, f"{key} (generation {generation})")
    finally:
        torch._dynamo.reset()
