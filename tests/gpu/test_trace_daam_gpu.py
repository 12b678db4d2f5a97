"""GPU: attnctl.trace's defaults give DAAM 0.2.0's heat maps (tests/daam_replay.py) on the
published SD 1.5 (512²) and SDXL (1024²) architectures with random weights, through the
fused Triton kernel in fp16: within twice the error of DAAM run in fp16, both measured
against DAAM run in fp64 on the same weights and initial latents.

Skipped without CUDA.
"""
import pytest
import torch

import attnctl
from attnctl.diffusers.offline import published_sd15_pipeline, published_sdxl_pipeline
from daam_replay import DaamReplay

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

PROMPT = "a cat sitting on a red car"
# (pipeline builder, image side, DAAM's layers: every down- and up-block cross-attention)
ARCHITECTURES = {"sd15": (published_sd15_pipeline, 512, 15), "sdxl": (published_sdxl_pipeline, 1024, 60)}


def rel_diff(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


def check_daam(build, size, daam_layers, *, dtype, device, backend, steps):
    """Trace and DAAM replay of one generation; returns (attnctl error, DAAM's own error)."""
    pipes = [build(dtype=d).to(device) for d in (dtype, torch.float64)]
    side = size // pipes[0].vae_scale_factor
    latents = torch.randn(1, 4, side, side, generator=torch.Generator().manual_seed(0))

    def generate(pipe):
        with torch.no_grad():
            pipe(PROMPT, num_inference_steps=steps, height=size, width=size,
                 latents=latents.to(device, pipe.dtype), output_type="latent")

    replays = []
    for pipe in pipes:
        with DaamReplay(pipe) as replay:
            generate(pipe)
        replays.append(replay)
    with attnctl.trace(pipes[0], backend=backend) as tc:
        generate(pipes[0])
    assert len(tc.maps().layers) == daam_layers
    low, ref = (r.global_heat_map(PROMPT) for r in replays)
    words = [r.word_heat_map(m, PROMPT, "car") for r, m in zip(replays, (low, ref))]
    heat = tc.heat_map()
    return (rel_diff(heat.value, ref), rel_diff(low, ref),
            rel_diff(heat.word("car").value, words[1]), rel_diff(words[0], words[1]))


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_default_trace_is_daam_on_published_architectures(arch):
    build, size, layers = ARCHITECTURES[arch]
    err, own, word_err, word_own = check_daam(build, size, layers, dtype=torch.float16, device="cuda",
                                              backend="triton", steps=2)
    assert err <= 2 * own, f"global map: relative error {err:.2e}, DAAM's own in fp16 {own:.2e}"
    assert word_err <= 2 * word_own, f"'car': relative error {word_err:.2e}, DAAM's own {word_own:.2e}"
