"""Shape-Guided Diffusion on attnctl's controls against a replay of the original's loop
(tests/original_replay.py: its own DDIM inversion and sampling, explicit attention with
the original's inside-outside edits, separate conditional and unconditional passes), on
the tiny offline pipeline in fp32."""
import functools

import numpy as np
import PIL.Image
import pytest
import torch

import attnctl
from attnctl.diffusers.install import installation_of
from attnctl.diffusers.offline import tiny_sd_pipeline
from attnctl.tools.shape_guided import shape_guided_inpaint
from diffusion_helpers import sd_pipe, sdxl_pipe
from original_replay import sgd_original

STEPS = 3
PROMPTS = dict(prompt_inside="a red cat", prompt_outside="a garden", prompt_inversion_inside="a cat",
               prompt_inversion_outside="a garden")


@functools.lru_cache(maxsize=None)
def _fp64_pipe():
    """The tiny pipeline's weights in fp64 (for the replay's exact result)."""
    return tiny_sd_pipeline(dtype=torch.float64)


def _inputs():
    """A 16 x 16 image (latent 8 x 8) and a black-and-white object mask off the layer grids."""
    image = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1
    mask = np.zeros((16, 16), dtype=np.uint8)
    mask[3:11, 5:14] = 255
    return image, PIL.Image.fromarray(mask)


@pytest.mark.parametrize("options", [
    {},
    dict(invert_mask=True, run_inversion=False, noise_mixing=0.3, self_attn_schedule="linear",
         run_cross_attention_mask=False, guidance_scale=2.0, num_inside=20, num_outside=30),
    dict(guidance_scale=-1, self_attn_schedule="exponential", init_image_strength=0.7),
], ids=["defaults", "options", "cond-only-partial-strength"])
def test_shape_guided_equals_the_original(options):
    """attnctl's fp32 result is within twice the fp32 replay's own error of the fp64 replay."""
    image, mask = _inputs()

    def original(pipe, dtype):
        return sgd_original(pipe, image.to(dtype), mask, steps=STEPS, generator=torch.Generator().manual_seed(0),
                            **PROMPTS, **options).double()

    exact, rounded = original(_fp64_pipe(), torch.float64), original(sd_pipe(), torch.float32)
    got = shape_guided_inpaint(sd_pipe(), image, mask, steps=STEPS, generator=torch.Generator().manual_seed(0),
                               output_type="latent", backend="torch", **PROMPTS, **options)
    reference_error = float((rounded - exact).abs().max())
    assert 0 < reference_error < 1e-4 * float(exact.abs().max())
    assert float((got.double() - exact).abs().max()) <= 2 * reference_error


def test_the_controls_act():
    pipe = sd_pipe()
    image, mask = _inputs()
    run = dict(steps=STEPS, output_type="latent", backend="torch", **PROMPTS)
    got = shape_guided_inpaint(pipe, image, mask, generator=torch.Generator().manual_seed(0), **run)
    plain = shape_guided_inpaint(pipe, image, mask, generator=torch.Generator().manual_seed(0),
                                 run_cross_attention_mask=False, cross_attn_schedule=1.0,
                                 run_self_attention_mask=False, **run)
    assert not torch.allclose(got, plain, atol=1e-4)


def test_output_image_and_bad_input():
    pipe = sd_pipe()
    image, mask = _inputs()
    run = dict(steps=1, backend="torch", **PROMPTS)
    out = shape_guided_inpaint(pipe, image, mask, output_type="pt", **run)
    assert out.shape == (1, 3, 16, 16)
    with attnctl.install(pipe, backend="torch") as installation:   # the caller's installation stays
        shape_guided_inpaint(pipe, image, mask, output_type="latent", **run)
        assert installation.active and installation.controllers == []
    assert installation_of(pipe) is None
    with pytest.raises(ValueError, match=r"mask: expected the image size \(16, 16\) or the latent size \(8, 8\) "
                                         r"\(height, width\), got \(10, 16\)"):
        shape_guided_inpaint(pipe, image, torch.ones(10, 16), **run)
    with pytest.raises(TypeError, match="mask: expected a real-valued mask .* got dtype torch.complex64"):
        shape_guided_inpaint(pipe, image, torch.ones(16, 16, dtype=torch.complex64), **run)
    with pytest.raises(ValueError, match=r"image: expected sides divisible by 4 .* got 18x16"):
        shape_guided_inpaint(pipe, torch.zeros(1, 3, 18, 16), mask, **run)
    with pytest.raises(ValueError, match=r"image: expected an RGB\(A\) image of uint8 \(H, W, 3\|4\), got float64"):
        shape_guided_inpaint(pipe, np.zeros((16, 16, 3)), mask, **run)
    with pytest.raises(ValueError, match=r"image: expected a float tensor \(1, 3, H, W\)"):
        shape_guided_inpaint(pipe, torch.zeros(2, 3, 16, 16), mask, **run)
    with pytest.raises(ValueError, match="num_inside, num_outside: expected .* got 40, 40"):
        shape_guided_inpaint(pipe, image, mask, num_inside=40, num_outside=40, **run)
    with pytest.raises(ValueError, match="self_attn_schedule: expected a number or one of linear"):
        shape_guided_inpaint(pipe, image, mask, self_attn_schedule="cos", **run)
    with pytest.raises(ValueError, match="init_image_strength: expected a number in"):
        shape_guided_inpaint(pipe, image, mask, init_image_strength=0.5, **run)
    with pytest.raises(ValueError, match="pipe: expected a Stable Diffusion 1.x/2.x pipeline"):
        shape_guided_inpaint(sdxl_pipe(), image, mask, **run)
    with pytest.raises(ValueError, match=r"noise: expected shape \(1, 4, 8, 8\), got \(1, 4, 16, 16\)"):
        shape_guided_inpaint(pipe, image, mask, noise=torch.zeros(1, 4, 16, 16), **run)
