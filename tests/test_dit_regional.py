"""Regional prompting on the cross-attention transformers (attnctl.tools.regional on PixArt,
Sana and Wan): a generation equals the stock pipeline given the regional prompts'
embeddings, with every attention call replayed as an explicit softmax under a dense
mask written below like the original's (instantX-research/Regional-Prompting-FLUX,
pipeline_flux_regional.py: the (L, L) mask of [text segments; image tokens]), cut into
the blocks these models have: image→text on cross-attention, image→image on
self-attention. A row with no allowed key gives P = 0 (the op contract). Wan's queries
are the latent frames one after another; a (frames, h, w) mask gives each frame its own
region."""
import pytest
import torch
import torch.nn.functional as F

import attnctl
from attnctl.diffusers import installation_of
from attnctl.diffusers.offline_dit import tiny_pixart_pipeline, tiny_sana_pipeline, tiny_wan_pipeline
from attnctl.tools.regional import RegionalPrompting, regional_generate, regional_prompt_embeds

from diffusion_helpers import reference_tolerance
from op_cases import interpreter_bf16_dot_fixed
from regional_replay import masked_replay, original_mask

pytestmark = pytest.mark.filterwarnings("ignore:divide by zero:RuntimeWarning")

TEXT = 8                                         # T5 tokens per regional prompt
PROMPTS = ["a cat", "a red car"]
# (image height, width, frames, (latent frames, token grid h, w)), per family
SIZES = {"pixart": (16, 24, None, (1, 4, 6)),    # VAE 2, patch 2
         "sana": (32, 32, None, (1, 8, 8)),      # DC-AE 4, patch 1
         "wan": (48, 64, 9, (3, 3, 4))}          # VAE 8 / 4 in time, patch 1x2x2
PIPES = {"pixart": tiny_pixart_pipeline, "sana": tiny_sana_pipeline, "wan": tiny_wan_pipeline}


def region_masks(name):
    """Two overlapping regions and uncovered tokens, at the image size; on Wan the second
    region is per frame, given on the token grid (a column that moves right each frame)."""
    height, width, _, (frames, h, w) = SIZES[name]
    left = torch.zeros(height, width)
    left[:, : width * 7 // 12] = 1.0
    if name == "wan":
        moving = torch.zeros(frames, h, w)
        for f in range(frames):
            moving[f, 1:, f + 1] = 1.0
        return [left, moving]
    right = torch.zeros(height, width)
    right[height // 4:, width * 5 // 12: width * 5 // 6] = 1.0
    return [left, right]


def on_token_grid(name, masks):
    """(R, frames·h·w) masks on the token grid, frame after frame (nearest-exact, as the
    original resizes)."""
    _, _, _, (frames, h, w) = SIZES[name]
    out = []
    for m in masks:
        m = m if m.dim() == 3 else m[None].expand(frames, -1, -1)
        out.append(F.interpolate(m[:, None], (h, w), mode="nearest-exact").reshape(-1))
    return torch.stack(out)


def options_of(name, images):
    height, width, frames, (latent_frames, h, w) = SIZES[name]
    generator = torch.Generator().manual_seed(0)
    if name == "wan":
        latents = torch.randn(images, 16, latent_frames, 2 * h, 2 * w, generator=generator)
        return dict(height=height, width=width, num_frames=frames, num_inference_steps=2, output_type="latent",
                    latents=latents)
    patch = 2 if name == "pixart" else 1
    latents = torch.randn(images, 4, patch * h, patch * w, generator=generator)
    return dict(height=height, width=width, num_inference_steps=2, output_type="latent", latents=latents,
                clean_caption=False, use_resolution_binning=False)


def output(result):
    return result.frames if hasattr(result, "frames") else result.images


@pytest.mark.parametrize("name,image_rule", [("pixart", "region"), ("wan", "region"), ("sana", "all")])
def test_regional_generation_equals_the_stock_pipeline_under_the_original_mask(name, image_rule):
    pipe = PIPES[name]()
    masks = region_masks(name)
    embeds, segment = regional_prompt_embeds(pipe, PROMPTS, None, max_sequence_length=TEXT,
                                             **({} if name == "wan" else dict(clean_caption=False)))
    assert segment == TEXT and embeds["prompt_embeds"].shape[1] == 2 * TEXT
    assert embeds["negative_prompt_embeds"].shape == embeds["prompt_embeds"].shape
    grid = on_token_grid(name, masks)
    covered = grid.sum(0)
    assert (covered == 2).any() and (covered == 0).any()         # overlap and uncovered tokens exist
    dense = original_mask(grid, segment)
    enc = 2 * segment
    keep_cross, keep_self = dense[enc:, :enc], (dense[enc:, enc:] if image_rule == "region" else None)
    cfg_calls = 2 if name == "wan" else 1
    options = options_of(name, 1)

    def stock(dtype):
        with masked_replay(pipe, keep_cross, keep_self, cfg_calls, dtype):
            return output(pipe(**embeds, **options))

    exact = stock(torch.float64).double()
    atol = reference_tolerance(stock(torch.float32), exact)
    plain = output(pipe(**embeds, **options))
    assert (plain.double() - exact).abs().max() > 100 * atol          # the mask matters here
    for backend in ("torch", "triton"):
        with attnctl.install(pipe, backend=backend), interpreter_bf16_dot_fixed():
            got = output(regional_generate(pipe, None, list(zip(masks, PROMPTS)), max_sequence_length=TEXT,
                                           image_rule=image_rule, **options))
        assert attnctl.last_dispatch().backend == backend
        torch.testing.assert_close(got.double(), exact, rtol=0, atol=atol)
    assert installation_of(pipe) is None
    if name == "pixart":   # not installed: the tool installs for the call and uninstalls
        again = output(regional_generate(pipe, None, list(zip(masks, PROMPTS)), max_sequence_length=TEXT,
                                         **options))
        torch.testing.assert_close(again.double(), exact, rtol=0, atol=atol)
        assert installation_of(pipe) is None


class _Calls(attnctl.Controller):
    def __init__(self, inner):
        self.inner, self.planned = inner, []

    def on_generation_start(self, generation):
        self.inner.on_generation_start(generation)

    def plan(self, call):
        plan = self.inner.plan(call)
        self.planned.append((call.layer, call.layout.half, plan is not None))
        return plan


def test_wan_masks_the_conditional_call_only_and_the_chosen_blocks():
    pipe = tiny_wan_pipeline()
    embeds, segment = regional_prompt_embeds(pipe, PROMPTS, None, max_sequence_length=TEXT)
    controller = _Calls(RegionalPrompting(region_masks("wan"), segment, blocks=lambda index: index == 1))
    with attnctl.install(pipe, controller, backend="torch"):
        pipe(**embeds, **{**options_of("wan", 1), "num_inference_steps": 1})
    assert [(layer, half) for layer, half, masked in controller.planned if masked] == [
        ("blocks.1.attn1", "cond"), ("blocks.1.attn2", "cond")]
    assert len(controller.planned) == 8


def test_bad_input_is_refused_by_name():
    pipe = tiny_wan_pipeline()
    embeds, segment = regional_prompt_embeds(pipe, PROMPTS, None, max_sequence_length=TEXT)
    step = {**options_of("wan", 1), "num_inference_steps": 1}
    left, moving = region_masks("wan")

    def run(controller, kwargs=embeds):
        with attnctl.install(pipe, controller, backend="torch"):
            pipe(**kwargs, **step)

    with pytest.raises(ValueError, match=r"masks\[1\]: expected 1 or 3 frames \(the video's latent frames after "
                                         r"patchify\), got 2 \(mask shape \(2, 3, 4\)\)"):
        run(RegionalPrompting([left, moving[:2]], segment))
    with pytest.raises(ValueError, match=r"masks\[0\]: expected the image size \(48, 64\) or the latent size "
                                         r"\(3, 4\) \(height, width\), got \(24, 32\)"):
        run(RegionalPrompting([left[::2, ::2], moving], segment))
    with pytest.raises(ValueError, match=r"segment_length: 2 regions x 5 tokens = 10 text tokens expected in "
                                         r"blocks.0.attn2's keys, got 16"):
        run(RegionalPrompting([left, moving], 5))
    with pytest.raises(ValueError, match="base_prompt: WanPipeline has no pooled text vector"):
        regional_prompt_embeds(pipe, PROMPTS, "a cat and a car")
    with pytest.raises(ValueError, match=r"masks\[1\]: expected a real \(frames, height, width\) mask"):
        RegionalPrompting([left, torch.zeros(0, 3, 4)], segment)
    assert installation_of(pipe) is None

    from attnctl.diffusers.controller import AttentionCall, BatchLayout, DenoiseStep

    q = torch.zeros(1, 2, 16, 16)
    unet_call = AttentionCall("down_blocks.0.attentions.0.transformer_blocks.0.attn2", True, (4, 4), 1, (4, 4),
                              DenoiseStep(0, None), BatchLayout(rows=1, cfg=False), q, q[:, :, :8])
    unet_call.family = "unet"
    with pytest.raises(ValueError, match="RegionalPrompting: down_blocks.0.attentions.0.transformer_blocks.0.attn2 "
                                         "is unet attention; the tool is for Flux and SD3"):
        RegionalPrompting([left], segment).plan(unet_call)

    from attnctl.diffusers.joint import DOUBLE, JointLayout

    flux_layout = JointLayout(range(0, 10), range(10, 34), (4, 6), DOUBLE, 0)
    with pytest.raises(ValueError, match=r"masks\[1\]: per-frame \(frames, height, width\) masks are for Wan; "
                                         r"joint attention takes a 2-D mask, got shape \(3, 3, 4\)"):
        RegionalPrompting([left, moving], 5).regions_for(flux_layout, range(0), 1, "cpu")

    sana = tiny_sana_pipeline()
    with pytest.raises(ValueError, match="image_rule: 'region' masks image-to-image attention, and Sana's "
                                         "self-attention is linear"):
        regional_generate(sana, None, list(zip(region_masks("sana"), PROMPTS)), max_sequence_length=TEXT,
                          **{**options_of("sana", 1), "num_inference_steps": 1})
    assert installation_of(sana) is None
    pixart = tiny_pixart_pipeline()
    with pytest.raises(ValueError, match=r"masks\[0\]: expected 1 frame \(the model makes images\), got 3"):
        regional_generate(pixart, None, [(torch.ones(3, 4, 6), PROMPTS[0])], max_sequence_length=TEXT,
                          **{**options_of("pixart", 1), "num_inference_steps": 1})
