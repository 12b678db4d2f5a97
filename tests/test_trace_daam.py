"""attnctl.trace with its defaults gives DAAM 0.2.0's result: held against a replay of
DAAM's own math (tests/daam_replay.py) on the same weights and initial latents.

Tolerance: the replay runs in fp32 and in fp64; attnctl (fp32) must be as close to the
fp64 replay as twice the fp32 replay's own distance to it, plus a few fp32 units for a
replay that happens to round luckily. A semantic difference (a layer, the clamp, a token
column) is orders of magnitude larger.
"""
import functools

import pytest
import torch

import attnctl
from attnctl import TraceMaps
from attnctl.diffusers.offline import tiny_sd_pipeline, tiny_sdxl_pipeline, tiny_unet_config
from daam_replay import DaamReplay
from op_cases import interpreter_bf16_dot_fixed

PROMPT = "a cat and a red cat"   # the offline tokenizer spells words by character
COLUMNS = len(PROMPT.replace(" ", "")) + 2  # BOS, a token per character, EOS
FP32_UNIT = torch.finfo(torch.float32).eps
# The 16² latent level at a 32² image (DAAM's factor 4: kept); the 8² level is factor 8
# (skipped, as SD 1.5's mid block at 512²), and so is the mid block.
DAAM_LAYERS_AT_32 = ["down_blocks.0.attentions.0.transformer_blocks.0.attn2",
                     "up_blocks.1.attentions.0.transformer_blocks.0.attn2",
                     "up_blocks.1.attentions.1.transformer_blocks.0.attn2"]


@functools.lru_cache(maxsize=None)
def daam_pipe(dtype=torch.float32, sharpen=1.0):
    """The tiny SD pipeline with cross-attention at both UNet levels and sample_size 256,
    so that, as for SD 1.5 (64 × 8 = 512), sample_size × VAE factor (2) is 512: DAAM's
    output side is 64 and its factor rule acts as for SD 1.5. ``sharpen`` scales the
    cross-attention queries: peaked maps, whose bicubic upsampling undershoots below 0."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    base = tiny_sd_pipeline()
    torch.manual_seed(1)
    config = dict(tiny_unet_config(), sample_size=256, down_block_types=("CrossAttnDownBlock2D",) * 2,
                  up_block_types=("CrossAttnUpBlock2D",) * 2)
    unet = UNet2DConditionModel(**config).eval()
    with torch.no_grad():
        for name, module in unet.named_modules():
            if name.endswith("attn2"):
                module.to_q.weight.mul_(sharpen)
    pipe = StableDiffusionPipeline(**dict(base.components, unet=unet), requires_safety_checker=False)
    pipe.to(dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run(pipe, size, *, steps=2, images=1, prompt=PROMPT):
    latents = torch.randn(images, 4, size // 2, size // 2, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        pipe(prompt, num_inference_steps=steps, height=size, width=size, num_images_per_prompt=images,
             latents=latents.to(pipe.dtype), output_type="latent")


def replays(pipes, size, **kwargs):
    """DAAM replayed on the fp32 and the fp64 pipeline."""
    out = []
    for pipe in pipes:
        with DaamReplay(pipe) as replay:
            run(pipe, size, **kwargs)
        out.append(replay)
    return out


def assert_daam(actual, ref32, ref64):
    """``actual`` equals DAAM's result to float precision (see the module docstring)."""
    assert actual.shape == ref64.shape
    ref = ref64.double()
    scale = ref.norm()
    own = float((ref32.double() - ref).norm() / scale)
    err = float((actual.double() - ref).norm() / scale)
    assert err <= 2 * own + 4 * FP32_UNIT, f"relative error {err:.2e}, the fp32 replay's own {own:.2e}"


def rel_diff(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.fixture(scope="module")
def square32():
    pipes = daam_pipe(torch.float32), daam_pipe(torch.float64)
    r32, r64 = replays(pipes, 32)
    with attnctl.trace(pipes[0], backend="torch") as tc:
        run(pipes[0], 32)
    return tc, r32, r64


def test_default_heat_map_equals_daam(square32):
    tc, r32, r64 = square32
    maps = tc.maps()
    assert [l.name for l in maps.layers] == DAAM_LAYERS_AT_32
    heat = tc.heat_map()
    assert_daam(heat.value, r32.global_heat_map(PROMPT), r64.global_heat_map(PROMPT))
    assert heat.value.shape == (COLUMNS, 64, 64)
    assert_daam(tc.heat_map(normalize=True).value, r32.global_heat_map(PROMPT, normalize=True),
                r64.global_heat_map(PROMPT, normalize=True))
    # Memory: each head apart, only the prompt's key columns (not the 77).
    assert maps.layers[0].maps[-1].shape == (2, 2, 256, COLUMNS)


@pytest.mark.parametrize("word", ["cat", "a", "red cat", "RED"])
def test_word_maps_average_every_occurrence_of_its_tokens(square32, word):
    # "cat" twice, three tokens each; "a" also inside "cat" and "and" (DAAM searches tokens,
    # not words); "red cat" two words; upper case as DAAM lower-cases.
    tc, r32, r64 = square32
    expected = [r.word_heat_map(r.global_heat_map(PROMPT), PROMPT, word) for r in (r32, r64)]
    assert_daam(tc.word_heat_map(word).value, *expected)
    assert_daam(tc.heat_map().word(word).value, *expected)


def test_word_options_pick_one_occurrence_or_whole_words(square32):
    tc, r32, r64 = square32
    heat = tc.heat_map()
    maps = [r.global_heat_map(PROMPT) for r in (r32, r64)]
    assert_daam(heat.word("cat", occurrence=1).value, *(m[[12, 13, 14]].mean(0) for m in maps))
    assert_daam(heat.word("a", match="words").value, *(m[[1, 8]].mean(0) for m in maps))
    assert_daam(heat.word("a", occurrence=1, match="words").value, *(m[8] for m in maps))
    assert [w for w, _ in heat.words()] == ["a", "cat", "and", "red"]
    torch.testing.assert_close(dict(heat.words())["a"].value, heat.word("a").value)


def test_daam_filters_map_to_heads_and_layers(square32):
    tc, r32, r64 = square32
    # DAAM's head_idx and layer_idx (its hook order: up blocks first, then down blocks, so
    # up_blocks.0.attentions.0/1, up_blocks.1.attentions.0/1, down_blocks.0, down_blocks.1).
    assert_daam(tc.heat_map(heads=[1]).value, r32.global_heat_map(PROMPT, head_idx=1),
                r64.global_heat_map(PROMPT, head_idx=1))
    assert_daam(tc.heat_map(layers="up_blocks.1.attentions.0.").value,
                r32.global_heat_map(PROMPT, layer_idx=2), r64.global_heat_map(PROMPT, layer_idx=2))
    assert_daam(tc.heat_map(layers="down_blocks.0.").value,
                r32.global_heat_map(PROMPT, layer_idx=4), r64.global_heat_map(PROMPT, layer_idx=4))


def test_saved_trace_answers_daam_queries(square32, tmp_path):
    tc, r32, r64 = square32
    tc.save(str(tmp_path / "t.safetensors"))
    loaded = TraceMaps.load(str(tmp_path / "t.safetensors"))
    assert loaded.daam_side == 64
    expected = [r.word_heat_map(r.global_heat_map(PROMPT), PROMPT, "cat") for r in (r32, r64)]
    assert_daam(loaded.word_heat_map("cat").value, *expected)
    # "ca" is no word of the prompt: finding its tokens inside "cat" needs the tokenizer.
    with pytest.raises(ValueError, match=r"\['ca'\] are not whole words .* tokenizer=pipe.tokenizer"):
        loaded.word_heat_map("ca")
    with_tokenizer = TraceMaps.load(str(tmp_path / "t.safetensors"), tokenizer=daam_pipe().tokenizer)
    expected = [r.word_heat_map(r.global_heat_map(PROMPT), PROMPT, "ca") for r in (r32, r64)]
    assert_daam(with_tokenizer.word_heat_map("ca").value, *expected)


def test_clamp_acts_on_each_head_as_in_daam():
    pipes = daam_pipe(torch.float32, sharpen=10.0), daam_pipe(torch.float64, sharpen=10.0)
    r32, r64 = replays(pipes, 32)
    undershoot = [torch.nn.functional.interpolate(m.unsqueeze(1), size=(64, 64), mode="bicubic").min()
                  for m in r64.sums.values()]
    assert min(undershoot) < 0  # the clamp acts
    with attnctl.trace(pipes[0], backend="torch") as exact, \
            attnctl.trace(pipes[0], backend="torch", per_head=False) as summed:
        run(pipes[0], 32)
    ref32, ref64 = r32.global_heat_map(PROMPT), r64.global_heat_map(PROMPT)
    assert_daam(exact.heat_map().value, ref32, ref64)
    # Heads summed in the kernel: the clamp acts on their sum, a visible deviation.
    assert rel_diff(summed.heat_map().value, ref64) > 1e-3


def test_triton_kernel_gives_daam():
    # A 16² image: the 8² latent level is DAAM's factor 8 (skipped), the 4² level factor 16.
    pipes = daam_pipe(torch.float32), daam_pipe(torch.float64)
    r32, r64 = replays(pipes, 16, prompt="a cat")
    with attnctl.trace(pipes[0], backend="triton") as tc:
        run(pipes[0], 16, prompt="a cat")
    assert [l.name for l in tc.maps().layers] == ["down_blocks.1.attentions.0.transformer_blocks.0.attn2",
                                                  "up_blocks.0.attentions.0.transformer_blocks.0.attn2",
                                                  "up_blocks.0.attentions.1.transformer_blocks.0.attn2"]
    assert_daam(tc.heat_map().value, r32.global_heat_map("a cat"), r64.global_heat_map("a cat"))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
def test_low_precision_at_most_twice_daams_own_error(dtype):
    # DAAM run in the same precision (its maps added in that dtype) sets the yardstick;
    # attnctl accumulates in fp32, so it is not bit-equal, only as close or closer.
    pipes = daam_pipe(dtype), daam_pipe(torch.float64)
    low, r64 = replays(pipes, 16, steps=1, prompt="a cat")
    ref = r64.global_heat_map("a cat")
    own = rel_diff(low.global_heat_map("a cat"), ref)
    for backend in ("torch", "triton"):
        with interpreter_bf16_dot_fixed(), attnctl.trace(pipes[0], backend=backend) as tc:
            run(pipes[0], 16, steps=1, prompt="a cat")
        err = rel_diff(tc.heat_map().value, ref)
        assert err <= 2 * own, f"{backend}: relative error {err:.2e}, DAAM's own in {dtype}: {own:.2e}"


def test_daam_factor_rule_and_images_per_prompt():
    # A 48² image: the 12² level is DAAM's factor 5, not among its default factors.
    # DAAM keeps the cond rows of all images as if they were more heads, so its map is the
    # mean of attnctl's per-image maps.
    pipes = daam_pipe(torch.float32), daam_pipe(torch.float64)
    r32, r64 = replays(pipes, 48, steps=1, images=2)
    with attnctl.trace(pipes[0], backend="torch") as tc:
        run(pipes[0], 48, steps=1, images=2)
    assert [l.name for l in tc.maps().layers] == DAAM_LAYERS_AT_32
    mean = (tc.heat_map(0).value + tc.heat_map(1).value) / 2
    assert_daam(mean, r32.global_heat_map(PROMPT), r64.global_heat_map(PROMPT))


def test_sdxl_default_equals_daam():
    # SDXL tiny: sample_size 16 × VAE factor 2 is neither 512 nor 1024, so DAAM's side is 96;
    # at an 80² image the 20² level (cross-attention's only level) is factor 4.
    pipes = tiny_sdxl_pipeline(), tiny_sdxl_pipeline(dtype=torch.float64)
    for pipe in pipes:
        pipe.set_progress_bar_config(disable=True)
    r32, r64 = replays(pipes, 80, steps=1, prompt="a blue bird")
    with attnctl.trace(pipes[0], backend="torch") as tc:
        run(pipes[0], 80, steps=1, prompt="a blue bird")
    assert {l.name.split(".")[0] for l in tc.maps().layers} == {"down_blocks", "up_blocks"}
    assert tc.heat_map().value.shape[-2:] == (96, 96)
    assert_daam(tc.heat_map().value, r32.global_heat_map("a blue bird"), r64.global_heat_map("a blue bird"))
    expected = [r.word_heat_map(r.global_heat_map("a blue bird"), "a blue bird", "bird") for r in (r32, r64)]
    assert_daam(tc.word_heat_map("bird").value, *expected)


def test_options_give_every_layer_column_and_the_latent_grid(square32):
    tc, _, _ = square32
    pipe = daam_pipe()
    with attnctl.trace(pipe, backend="torch", layers="*", tokens="all") as every:
        run(pipe, 32)
    names = [l.name for l in every.maps().layers]
    assert "mid_block.attentions.0.transformer_blocks.0.attn2" in names and len(names) == 7
    assert every.heat_map().value.shape == (77, 64, 64)
    only_daam = every.heat_map(layers=DAAM_LAYERS_AT_32)
    torch.testing.assert_close(only_daam.value[:COLUMNS], tc.heat_map().value)
    assert tc.heat_map(size="latent").value.shape == (COLUMNS, 16, 16)
    assert tc.heat_map(size=(20, 30)).value.shape == (COLUMNS, 20, 30)


def test_daam_rules_give_clear_errors(square32):
    tc, _, _ = square32
    pipe = daam_pipe()
    with pytest.raises(ValueError, match="size: expected 'daam', 'latent' or"):
        tc.heat_map(size=64)
    # 24² image: the 12² level is factor 5 and the 6² level factor 10; DAAM finds no map.
    # Said when the call starts, before its first denoising step, with the sizes that work.
    unet_calls = []
    hook = pipe.unet.register_forward_hook(lambda *_: unet_calls.append(1))
    try:
        with attnctl.trace(pipe, backend="torch"):
            with pytest.raises(ValueError, match=r"layers: DAAM's layer rule keeps no cross-attention layer at "
                                                 r"24x24 pixels \(its factors .* are \[5, 10\].*; square sizes "
                                                 r"that keep one: .*32.* and above .*or pass layers='\*'"):
                run(pipe, 24)
    finally:
        hook.remove()
    assert unet_calls == []
    # Non-square images: DAAM reads M queries as a sqrt(M) square. (12 x 16: factor 4, kept.)
    with attnctl.trace(pipe, backend="torch") as wide:
        with torch.no_grad():
            pipe("a cat", num_inference_steps=1, height=24, width=32, output_type="latent")
    with pytest.raises(ValueError, match="size: DAAM 0.2.0 handles square images only .* 12x16"):
        wide.heat_map()
    assert wide.heat_map(size="latent").value.shape[-2:] == (12, 16)
    # A bare UNet: no VAE factor, so no DAAM factor rule.
    with pytest.raises(ValueError, match="layers: DAAM's layer selection .* got a bare UNet; pass layers='\\*'"):
        attnctl.trace(pipe.unet).__enter__()
    assert attnctl.diffusers.installation_of(pipe) is None
    with pytest.raises(ValueError, match="tokens: expected one of"):
        attnctl.trace(pipe, tokens="some")
    with pytest.raises(ValueError, match="match: expected one of"):
        tc.heat_map().word("cat", match="whole")
    # Only the prompt's columns were captured: a longer prompt's words and sums are not there.
    longer = tc.heat_map(prompt=PROMPT + " and a dog")
    with pytest.raises(ValueError, match=r"dog: needs key columns up to 21, but the trace captured "
                                         r"columns \[0, 16\); trace with tokens='all'"):
        longer.word("dog")
    with pytest.raises(ValueError, match="normalize: the prompt has 23 key columns, the trace captured 16"):
        tc.heat_map(prompt=PROMPT + " and a dog", normalize=True)
