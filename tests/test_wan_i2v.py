"""Wan 2.1 image-to-video through diffusers' own WanImageToVideoPipeline, built offline with
random weights (attnctl.diffusers.offline_dit.tiny_wan_i2v_pipeline: the I2V transformer
with image_dim / added_kv_proj_dim, a tiny CLIP vision tower and image processor, the
tiny T5 and Wan VAE): outputs equal stock diffusers' within its own fp32 error, the call
descriptor names the image-context attention, uninstall restores the processor objects,
and the trace's per-frame word maps match a materialising reference (stock processors with
SDPA made explicit, P of the text attention kept).

diffusers 0.42.1's WanImageToVideoPipeline cleans prompts with ftfy without checking that
it is installed (WanPipeline checks), so these tests need ftfy (in the test extras)."""
import pytest
import torch
import torch.nn.functional as F

import attnctl
from attnctl.diffusers.offline_dit import I2V_IMAGE_SIZE, tiny_wan_i2v_pipeline
from diffusion_helpers import (assert_installed_equals_stock, prompt_words, reference_tolerance, stock_and_tolerance,
                               traced_unchanged)
from sdpa_replay import assert_matches_materialised, materialised

pytest.importorskip("ftfy", reason="diffusers' WanImageToVideoPipeline needs ftfy to clean its prompts")

PROMPTS = ["a cat on a red car", "a dog"]
SIZE, FRAMES = (48, 64), 9                  # VAE 8 in space, 4 in time, patch 1x2x2
GRID = (3, 3, 4)                            # (latent frames, h, w) of the tokens
TEXT = 512                                  # WanAttnProcessor's hard-coded text length in I2V layers
IMAGE_TOKENS = (I2V_IMAGE_SIZE // 2) ** 2 + 1   # CLIP patches and the class token


@pytest.fixture(scope="module")
def pipe():
    return tiny_wan_i2v_pipeline()


def first_frame():
    from PIL import Image

    pixels = torch.rand(*SIZE, 3, generator=torch.Generator().manual_seed(1))
    return Image.fromarray((pixels * 255).to(torch.uint8).numpy())


def options(videos):
    frames, h, w = GRID
    latents = torch.randn(videos, 16, frames, 2 * h, 2 * w, generator=torch.Generator().manual_seed(0))
    return dict(image=first_frame(), height=SIZE[0], width=SIZE[1], num_frames=FRAMES, num_inference_steps=2,
                guidance_scale=5.0, output_type="latent", latents=latents)


def generate(pipe, prompts=PROMPTS, **kwargs):
    return pipe(prompt=prompts, **{**options(len(prompts)), **kwargs}).frames


@pytest.fixture(scope="module")
def stock(pipe):
    return stock_and_tolerance(pipe, generate)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_outputs_equal_stock_and_uninstall_restores(pipe, stock, backend):
    assert_installed_equals_stock(pipe, generate, stock, backend)
    if backend == "torch":   # stock again, bit for bit
        torch.testing.assert_close(generate(pipe), stock[0], rtol=0, atol=0)


class _Recorder(attnctl.Controller):
    def __init__(self):
        self.calls = []

    def plan(self, call):
        self.calls.append((call.layer, call.is_cross, call.context, call.keys, call.queries, call.grid, call.frames,
                           call.step.index, call.layout.half, call.family))


def test_call_descriptor_names_the_image_context_call(pipe):
    recorder = _Recorder()
    with attnctl.install(pipe, recorder, backend="torch"):
        generate(pipe)
    frames, h, w = GRID
    per_block = [("attn1", False, "text", frames * h * w), ("attn2", True, "text", TEXT),
                 ("attn2", True, "image", IMAGE_TOKENS)]
    expected = [(f"blocks.{i}.{attn}", cross, context, keys, step, half)
                for step in range(2) for half in ("cond", "uncond") for i in range(2)
                for attn, cross, context, keys in per_block]
    assert [(c[0], c[1], c[2], c[3], c[7], c[8]) for c in recorder.calls] == expected
    assert {(c[4], c[5], c[6], c[9]) for c in recorder.calls} == {(frames * h * w, (h, w), frames, "wan")}


def text_probabilities(pipe):
    """``materialised``: {layer: Σ_steps P} of the text attention (keys: the 512 text
    tokens) of the conditional calls (the first of each step's two)."""
    return materialised(pipe.transformer, keep=lambda call, key: call.forward % 2 == 0
                        and call.layer.endswith("attn2") and key.shape[2] == TEXT)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_trace_gives_per_frame_word_maps_of_the_text_attention(pipe, stock, backend):
    with text_probabilities(pipe) as store:
        generate(pipe)
    maps = traced_unchanged(pipe, generate, stock, backend).maps()
    layers = [layer.name for layer in maps.layers]
    assert layers == ["blocks.0.attn2", "blocks.1.attn2"] == sorted(n for n in store if isinstance(n, str))
    assert maps.frames == GRID[0] and maps.latent == GRID[1:]
    for b, word, columns in prompt_words(maps, PROMPTS, ("cat", "red car", "dog")):
        video = maps.video_heat_map(b).word(word).value
        assert video.shape == GRID
        assert_matches_materialised(video, store, maps.layout.row(b), columns, GRID, layers)
        for f in range(GRID[0]):
            torch.testing.assert_close(maps.heat_map(b, frame=f).word(word).value, video[f], rtol=0, atol=0)


def test_regional_prompts_mask_the_text_call_and_leave_the_image_context(pipe):
    """Regional prompting (attnctl.tools.regional) on I2V: two prompts of 256 tokens fill the
    512 text tokens the I2V layers expect; the text attention takes the original's mask,
    the image-context attention none (replayed with the dense mask, reference backend)."""
    from attnctl.tools.regional import regional_generate, regional_prompt_embeds
    from regional_replay import masked_replay, original_mask

    prompts, segment = ["a cat", "a red car"], TEXT // 2
    left, right = torch.zeros(SIZE), torch.zeros(SIZE)
    left[:, :40] = 1.0
    right[16:, 24:56] = 1.0
    embeds, got_segment = regional_prompt_embeds(pipe, prompts, None, max_sequence_length=segment)
    assert got_segment == segment and embeds["prompt_embeds"].shape[1] == TEXT
    frames, h, w = GRID
    on_grid = torch.stack([F.interpolate(m[None, None], (h, w), mode="nearest-exact").reshape(-1).repeat(frames)
                           for m in (left, right)])
    dense = original_mask(on_grid, segment)
    run = options(1)

    def stock(dtype):
        with masked_replay(pipe, dense[TEXT:, :TEXT], dense[TEXT:, TEXT:], 2, dtype):
            return pipe(**embeds, **run).frames

    exact = stock(torch.float64).double()
    atol = reference_tolerance(stock(torch.float32), exact)
    plain = pipe(**embeds, **run).frames
    assert (plain.double() - exact).abs().max() > 100 * atol          # the mask matters here
    got = regional_generate(pipe, None, [(left, prompts[0]), (right, prompts[1])], max_sequence_length=segment,
                            **run).frames
    torch.testing.assert_close(got.double(), exact, rtol=0, atol=atol)
    with pytest.raises(ValueError, match=r"max_sequence_length: Wan I2V layers take the last 512 tokens of their "
                                         r"keys as the text, so 2 regional prompts need 512 / 2 tokens each, got 16"):
        regional_prompt_embeds(pipe, prompts, None, max_sequence_length=16)


def test_paint_with_words_paints_the_text_call_only(pipe):
    """The phrases are text tokens: paint-with-words biases the text cross-attention call
    of every I2V layer (its conditional call) and leaves the image-context call alone."""
    from attnctl.tools.paint import PaintWithWords

    paint = PaintWithWords({"red": torch.ones(SIZE)})
    plans = []
    planned = paint.plan
    paint.plan = lambda call: plans.append((call.context, planned(call))) or plans[-1][1]
    with attnctl.install(pipe, paint, backend="torch"):
        generate(pipe, ["a cat on a red car", "a red dog"], num_inference_steps=1)
    assert {context for context, _ in plans} == {"text", "image"}
    assert all(plan is None for context, plan in plans if context == "image")
    assert any(plan is not None and plan.bias is not None for context, plan in plans if context == "text")
