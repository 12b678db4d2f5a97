"""The published SD1.5 and SDXL UNet architectures (random weights, no download) run one
denoising step through attnctl under a trace; every captured map has the right shape."""
import gc

import pytest
import torch

import attnctl
from attnctl.diffusers.offline import published_unet

# name: (latent, text width, cross-attention layers, {grid: heads}, extra UNet inputs).
# SDXL runs at a 16 x 16 latent: its 2.6B weights make each spatial position costly on a CPU.
ARCHITECTURES = {
    "sd15_unet": ((32, 32), 768, 16, {(32, 32): 8, (16, 16): 8, (8, 8): 8, (4, 4): 8}, {}),
    "sdxl_unet": ((16, 16), 2048, 70, {(8, 8): 10, (4, 4): 20}, {
        "added_cond_kwargs": {"text_embeds": torch.zeros(2, 1280), "time_ids": torch.zeros(2, 6)}}),
}


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_published_architecture_traces_every_cross_attention_layer(name):
    latent, width, n_cross, heads_by_grid, extra = ARCHITECTURES[name]
    unet = published_unet(name)
    torch.manual_seed(0)
    sample = torch.randn(2, 4, *latent)
    text = torch.randn(2, 77, width)
    # A bare UNet has no VAE factor for DAAM's rules: every layer, heads summed, both CFG halves.
    with torch.no_grad(), attnctl.trace(unet, backend="torch", layers="*", per_head=False, uncond=True) as tc:
        tc.installation.start_generation(["a photo of a cat"], cfg=True)
        out = unet(sample, 999, encoder_hidden_states=text, **extra).sample
    assert out.shape == sample.shape and torch.isfinite(out).all()
    maps = tc.maps()
    assert len(maps.layers) == n_cross == len(tc.installation.cross_layers)
    assert maps.layout.cfg and maps.layout.rows == 2 and maps.steps_run == 1
    for layer in maps.layers:
        h, w = layer.grid
        assert layer.heads == heads_by_grid[layer.grid], layer.name
        assert layer.factor == latent[0] // h
        assert layer.maps[-1].shape == (2, h * w, 77)
        assert layer.token_mass[-1].shape == (2, layer.heads, 77)
        # Each query's probabilities sum to 1 over the 77 keys, each step.
        torch.testing.assert_close(layer.maps[-1].sum(-1), torch.full((2, h * w), float(layer.heads)))
    assert {l.grid for l in maps.layers} == set(heads_by_grid)
    heat = tc.heat_map(size="latent")
    assert heat.value.shape == (77, *latent) and (heat.value >= 0).all()
    del unet, tc, maps
    gc.collect()
