"""Regional prompting on Flux and SD3 (attnctl.tools.regional): the label mask equals the
original's dense (L, L) mask (instantX-research/Regional-Prompting-FLUX,
pipeline_flux_regional.py, transcribed in regional_replay.py), and a tiny offline Flux
generation equals stock diffusers given that dense mask through ``joint_attention_kwargs``
(its processor passes it to SDPA). SD3's stock processor ignores masks, so there the
reference is the same dense mask given as a -inf bias through attnctl's reference backend."""
import pytest
import torch
import torch.nn.functional as F

import attnctl
from attnctl.diffusers import installation_of
from attnctl.diffusers.joint import DOUBLE, JOINT, JointLayout
from attnctl.diffusers.offline_mmdit import tiny_flux_pipeline, tiny_sd3_pipeline
from attnctl.regions import Regions
from attnctl.tools.regional import RegionalPrompting, region_labels, regional_generate, regional_prompt_embeds

from diffusion_helpers import reference_tolerance, weights_in
from op_cases import interpreter_bf16_dot_fixed
from regional_replay import original_mask
from sdpa_replay import sdpa_replay, torch_sdpa

pytestmark = pytest.mark.filterwarnings("ignore:divide by zero:RuntimeWarning")

HEIGHT, WIDTH = 16, 24          # Flux: 4x6 image tokens; SD3: 4x6 patches
TEXT = 8                        # T5 tokens per regional prompt
PROMPTS = ["a cat", "a dog on a car"]
BASE = "a cat and a dog"


def image_masks():
    """Two overlapping regions and a background strip, at image size."""
    left = torch.zeros(HEIGHT, WIDTH)
    left[:, :14] = 1.0
    right = torch.zeros(HEIGHT, WIDTH)
    right[4:, 10:20] = 1.0
    return [left, right]


def on_grid(masks, grid):
    return torch.stack([F.interpolate(m[None, None], grid, mode="nearest-exact").flatten() for m in masks])


@pytest.mark.parametrize("text_first", [True, False])
@pytest.mark.parametrize("image_rule", ["region", "all"])
def test_labels_give_the_original_mask(text_first, image_rule):
    grid, segment = (4, 6), 5
    masks = on_grid(image_masks(), grid)
    assert (masks.sum(0) == 2).any() and (masks.sum(0) == 0).any()   # overlap and background exist
    enc, hidden = 2 * segment, grid[0] * grid[1]
    text = range(0, enc) if text_first else range(hidden, hidden + enc)
    image = range(enc, enc + hidden) if text_first else range(0, hidden)
    layout = JointLayout(text, image, grid, DOUBLE if text_first else JOINT, 0)
    segments = [range(text.start + i * segment, text.start + (i + 1) * segment) for i in range(2)]
    labels, allowed = region_labels(layout, segments, masks != 0, image_rule)
    got = Regions(labels[None], labels[None], allowed=allowed).keep(1, enc + hidden, enc + hidden)[0, 0]
    expected = original_mask(masks, segment)
    if image_rule == "all":
        expected[enc:, enc:] = True
    if not text_first:   # the same mask in SD3's [image; text] order
        order = torch.cat([torch.arange(enc, enc + hidden), torch.arange(enc)])
        expected = expected[order][:, order]
    assert torch.equal(got, expected)


@pytest.fixture(scope="module")
def flux():
    return tiny_flux_pipeline()


def flux_latents(pipe):
    h, w = HEIGHT // pipe.vae_scale_factor, WIDTH // pipe.vae_scale_factor
    shape = (1, h * w // 4, 4 * pipe.vae.config.latent_channels)
    return torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(pipe.dtype)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_flux_regional_generation_equals_stock_with_the_dense_mask(flux, backend):
    pipe = flux
    options = dict(height=HEIGHT, width=WIDTH, num_inference_steps=2, output_type="latent")
    embeds, segment = regional_prompt_embeds(pipe, PROMPTS, BASE, max_sequence_length=TEXT)
    assert segment == TEXT and embeds["prompt_embeds"].shape[1] == 2 * TEXT
    dense = original_mask(on_grid(image_masks(), (4, 6)), segment)

    def stock(dtype):
        with weights_in(pipe, dtype):
            kwargs = {k: v.to(dtype) for k, v in embeds.items()}
            return pipe(**kwargs, **options, latents=flux_latents(pipe),
                        joint_attention_kwargs={"attention_mask": dense}).images

    fp32, fp64 = stock(torch.float32), stock(torch.float64)
    tolerance = reference_tolerance(fp32, fp64)
    with attnctl.install(pipe, backend=backend), interpreter_bf16_dot_fixed():
        got = regional_generate(pipe, BASE, list(zip(image_masks(), PROMPTS)), max_sequence_length=TEXT,
                                **options, latents=flux_latents(pipe)).images
    assert attnctl.last_dispatch().backend == backend
    if backend == "torch":   # not installed: the tool installs for the call and uninstalls
        again = regional_generate(pipe, BASE, list(zip(image_masks(), PROMPTS)), max_sequence_length=TEXT,
                                  **options, latents=flux_latents(pipe)).images
        assert torch.equal(again, got) and installation_of(pipe) is None
    unmasked = pipe(**embeds, **options, latents=flux_latents(pipe)).images
    assert (unmasked.double() - fp64).abs().max() > 100 * tolerance   # the mask matters here
    assert (got.double() - fp64).abs().max() <= tolerance


def stock_sd3_with_mask(pipe, masks, segment):
    """Stock SD3 processors with the dense mask handed to their SDPA call (the stock
    processor takes no mask): [image; text] order, conditional rows only (CFG)."""
    def masked(call, query, key, value, attn_mask):
        assert attn_mask is None
        hidden = HEIGHT // pipe.vae_scale_factor // 2 * (WIDTH // pipe.vae_scale_factor // 2)
        enc = query.shape[2] - hidden
        keep = original_mask(on_grid(masks, (HEIGHT // 4, WIDTH // 4)), segment)
        order = torch.cat([torch.arange(enc, enc + hidden), torch.arange(enc)])
        full = torch.ones(query.shape[0], 1, enc + hidden, enc + hidden, dtype=torch.bool)
        full[query.shape[0] // 2:] = keep[order][:, order]
        return torch_sdpa(query, key, value, attn_mask=full)

    return sdpa_replay(pipe.transformer, masked)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_sd3_regional_generation_equals_stock_with_the_dense_mask(backend):
    pipe = tiny_sd3_pipeline()
    options = dict(height=HEIGHT, width=WIDTH, num_inference_steps=2, output_type="latent", guidance_scale=4.0)
    embeds, segment = regional_prompt_embeds(pipe, PROMPTS, BASE, max_sequence_length=TEXT)
    assert segment == 77 + TEXT and embeds["negative_prompt_embeds"].shape == embeds["prompt_embeds"].shape

    def latents():
        h, w = HEIGHT // pipe.vae_scale_factor, WIDTH // pipe.vae_scale_factor
        return torch.randn(1, pipe.vae.config.latent_channels, h, w, generator=torch.Generator().manual_seed(0))

    def stock(dtype):
        with weights_in(pipe, dtype), stock_sd3_with_mask(pipe, image_masks(), segment):
            return pipe(**{k: v.to(dtype) for k, v in embeds.items()}, **options, latents=latents().to(dtype)).images

    fp32, fp64 = stock(torch.float32), stock(torch.float64)
    tolerance = reference_tolerance(fp32, fp64)
    with attnctl.install(pipe, backend=backend), interpreter_bf16_dot_fixed():
        got = regional_generate(pipe, BASE, list(zip(image_masks(), PROMPTS)), max_sequence_length=TEXT,
                                **options, latents=latents()).images
    assert attnctl.last_dispatch().backend == backend
    unmasked = pipe(**embeds, **options, latents=latents()).images
    assert (unmasked.double() - fp64).abs().max() > 100 * tolerance   # the mask matters here
    assert (got.double() - fp64).abs().max() <= tolerance


def test_regional_errors(flux):
    with pytest.raises(ValueError, match="image_rule: expected one of"):
        RegionalPrompting(image_masks(), 8, image_rule="pixels")
    with pytest.raises(ValueError, match="masks: expected at least one region mask"):
        RegionalPrompting([], 8)
    with pytest.raises(ValueError, match=r"masks\[1\]: expected a 2-D"):
        RegionalPrompting([torch.ones(4, 4), torch.ones(4)], 8)
    with pytest.raises(ValueError, match=r"segment_length: 2 regions x 5 tokens = 10 text tokens expected "
                                         r"in the joint sequence, got 16"):
        with attnctl.install(flux, RegionalPrompting(image_masks(), 5)):
            flux(**regional_prompt_embeds(flux, PROMPTS, BASE, max_sequence_length=TEXT)[0], height=HEIGHT,
                 width=WIDTH, num_inference_steps=1, output_type="latent")
    pixel = torch.arange(HEIGHT * WIDTH) % 64
    masks = torch.stack([(pixel >> i) & 1 == 1 for i in range(6)])   # every one of the 64 overlaps
    layout = JointLayout(range(0, 6), range(6, 6 + HEIGHT * WIDTH), (HEIGHT, WIDTH), DOUBLE, 0)
    with pytest.raises(ValueError, match="masks: 6 regions overlap in 64 distinct ways, which needs 70 labels"):
        region_labels(layout, [range(i, i + 1) for i in range(6)], masks)


def test_regional_masks_and_regions_are_checked_before_any_work(flux, monkeypatch):
    """Each bad region is named (``regions[i]`` in regional_generate, ``masks[i]`` in the
    controller) before any prompt is encoded or attnctl installed."""
    encoded = []
    monkeypatch.setattr(flux, "encode_prompt", lambda *a, **k: encoded.append(1))
    left, right = image_masks()
    nan = right.clone()
    nan[5, 3] = float("nan")
    cases = [
        ([(left, PROMPTS[0]), (nan, PROMPTS[1])], ValueError,
         r"regions\[1\] mask: expected values in \[0, 1\], got NaN \(1 of 384 entries, first at index \(5, 3\)\)"),
        ([(left, PROMPTS[0]), (torch.zeros(HEIGHT, WIDTH), PROMPTS[1])], ValueError,
         r"regions\[1\] mask: expected a region \(some non-zero value\), got an all-zero mask of shape \(16, 24\)"),
        ([(left * 255, PROMPTS[0])], ValueError,
         r"regions\[0\] mask: expected values in \[0, 1\] \(or a uint8 mask in 0..255\), got range \[0, 255\] "
         r"\(dtype torch.float32\)"),
        ([(left, PROMPTS[0]), (right, PROMPTS[1], 2.0)], ValueError,
         r"regions\[1\]: expected a \(mask, prompt\) pair, got a tuple of 3"),
        ([(left, PROMPTS[0]), right], ValueError, r"regions\[1\]: expected a \(mask, prompt\) pair, got a Tensor"),
        ([(left, 3)], TypeError, r"regions\[0\] prompt: expected a str, got int"),
        ([], ValueError, r"regions: expected a non-empty list of \(mask, prompt\) pairs, got \[\]"),
    ]
    for regions, error, message in cases:
        with pytest.raises(error, match=message):
            regional_generate(flux, BASE, regions, max_sequence_length=TEXT, height=HEIGHT, width=WIDTH,
                              num_inference_steps=1, output_type="latent")
    assert not encoded and installation_of(flux) is None
    with pytest.raises(ValueError, match=r"masks\[0\]: expected values in \[0, 1\], got NaN"):
        RegionalPrompting([torch.full((3, 4, 6), float("nan"))], 8)          # per-frame masks too
    with pytest.raises(ValueError, match=r"masks\[1\]: expected a region"):
        RegionalPrompting([left, torch.zeros(2, 4, 6)], 8)
    # uint8 is the explicit 0..255 form; bool and float in [0, 1] are taken as they are
    as_uint8 = RegionalPrompting([(left * 255).to(torch.uint8), right.bool()], 8)
    assert all(torch.equal(m, e) for m, e in zip(as_uint8.masks, (left, right)))
