"""Head-wise and token-wise scaling on Flux and SD3 joint attention
(attnctl.tools.joint_scaling.TextScaling) against the stock pipelines with their SDPA
call made explicit and the factor applied to P's text columns (numerator only), on tiny
offline pipelines; tolerance: twice that reference's own fp32 error (fp64 run)."""
import pytest
import torch

import attnctl
from attnctl.diffusers.joint import SINGLE
from attnctl.diffusers.offline_mmdit import tiny_flux_pipeline, tiny_sd3_pipeline
from attnctl.tools.joint_scaling import TextScaling

from diffusion_helpers import reference_tolerance, weights_in
from op_cases import interpreter_bf16_dot_fixed
from sdpa_replay import sdpa_replay

pytestmark = pytest.mark.filterwarnings("ignore:divide by zero:RuntimeWarning")
HEIGHT, WIDTH, TEXT = 16, 24, 8


def explicit_scaled(pipe, factors, text_first, text_len, cond_only, only_single=False):
    """Stock processors; their SDPA call becomes softmax(q·kᵀ/√D) with P[..., text] · factors
    on the conditional rows (the second half with CFG), then ·v."""
    def explicit(call, query, key, value, attn_mask):
        p = torch.softmax(query @ key.transpose(-1, -2) * query.shape[-1] ** -0.5, dim=-1)
        L = key.shape[2]
        text = slice(0, text_len) if text_first else slice(L - text_len, L)
        if not only_single or "single" in call.layer:
            f = torch.ones(query.shape[0], query.shape[1], 1, L, dtype=p.dtype)
            rows = slice(query.shape[0] // 2, None) if cond_only else slice(None)
            f[rows, :, 0, text] = factors.to(p.dtype).expand(query.shape[1], text_len)
            p = p * f
        return p @ value

    return sdpa_replay(pipe.transformer, explicit)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("model", ["flux", "sd3"])
def test_text_scaling_matches_the_explicit_reference(model, backend):
    flux = model == "flux"
    pipe = tiny_flux_pipeline() if flux else tiny_sd3_pipeline()
    text_len = TEXT if flux else 77 + TEXT
    gen = torch.Generator().manual_seed(1)
    factors = 3 * torch.rand(2, text_len, generator=gen) - 1      # per head and token, some negative
    options = dict(height=HEIGHT, width=WIDTH, num_inference_steps=2, output_type="latent",
                   max_sequence_length=TEXT)
    h, w = HEIGHT // pipe.vae_scale_factor, WIDTH // pipe.vae_scale_factor
    if flux:
        latents = torch.randn(1, h * w // 4, 4 * pipe.vae.config.latent_channels, generator=gen)
        # only the single-stream blocks, to exercise the block filter
        controller = TextScaling(factors, blocks=lambda layout: layout.block == SINGLE)
    else:
        options["guidance_scale"] = 4.0
        latents = torch.randn(1, pipe.vae.config.latent_channels, h, w, generator=gen)
        controller = TextScaling(factors)
    prompt = "a cat on a car"

    def reference(dtype):
        with weights_in(pipe, dtype), explicit_scaled(pipe, factors, flux, text_len, cond_only=not flux,
                                                      only_single=flux):
            return pipe(prompt, **options, latents=latents.to(dtype)).images

    fp32, fp64 = reference(torch.float32), reference(torch.float64)
    tolerance = reference_tolerance(fp32, fp64)
    with attnctl.install(pipe, controller, backend=backend), interpreter_bf16_dot_fixed():
        got = pipe(prompt, **options, latents=latents).images
    assert attnctl.last_dispatch().backend == backend
    plain = pipe(prompt, **options, latents=latents).images
    assert (plain.double() - fp64).abs().max() > 100 * tolerance   # the scaling matters
    assert (got.double() - fp64).abs().max() <= tolerance


def test_text_scaling_errors():
    with pytest.raises(ValueError, match=r"factors: expected a shape broadcastable to \(heads, text tokens\)"):
        TextScaling(torch.ones(2, 3, 4))
    with pytest.raises(ValueError, match="rows: expected 'cond' or 'all'"):
        TextScaling(torch.ones(2, 1), rows="uncond")
    pipe = tiny_flux_pipeline()
    with pytest.raises(ValueError, match=r"factors: expected a shape broadcastable to \(heads, text tokens\) = "
                                         r"\(2, 8\) of transformer_blocks.0.attn, got \(3, 1\)"):
        with attnctl.install(pipe, TextScaling(torch.ones(3, 1))):
            pipe("a cat", height=HEIGHT, width=WIDTH, num_inference_steps=1, output_type="latent",
                 max_sequence_length=TEXT)
