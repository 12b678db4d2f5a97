"""PixArt-Σ and Wan 2.1 (a separate cross-attention layer per block): install / uninstall
against stock diffusers, the call descriptor, and word maps (per latent frame on Wan)
against a materialising reference, on tiny random-weight pipelines built offline
(attnctl.diffusers.offline_dit); published configs (PixArt-Σ, Sana, Wan 1.3B / 14B) on
the meta device.

The reference runs the stock processors with torch's SDPA replaced by an explicit
softmax(q·kᵀ/√D + mask)·v that also keeps P (B, H, M, N) per layer, summed over the steps
of the conditional calls (Wan runs CFG's halves as two transformer calls; the reference
tells them apart by their order, as the pipeline makes them). The expected word map is
the mean over cross-attention layers and heads of P's word columns, on the token grid
(Wan: frame by frame)."""
import math

import pytest
import torch
import torch.nn.functional as F

import attnctl
from attnctl.diffusers.offline_dit import tiny_pixart_pipeline, tiny_wan_pipeline
from diffusion_helpers import (assert_installed_equals_stock, meta_transformer, published_transformer_config,
                               prompt_words, reference_tolerance, shape_only_attention, stock_and_tolerance,
                               stock_with_tolerance, traced_unchanged)
from sdpa_replay import assert_matches_materialised, materialised, sdpa_replay

PROMPTS = ["a cat on a red car", "a dog"]
TEXT = 16                                   # max_sequence_length: T5 tokens, padded
EPS32 = torch.finfo(torch.float32).eps
PIXART_SIZE = (16, 24)                      # pixels; VAE factor 2, patch 2: 4x6 tokens
WAN_SIZE, WAN_FRAMES = (48, 64), 9          # VAE 8 in space, 4 in time, patch 1x2x2: 3 frames of 3x4
GRIDS = {"pixart": (1, 4, 6), "wan": (3, 3, 4)}   # (frames, h, w) after patchify

PIPES = {"pixart": tiny_pixart_pipeline, "wan": tiny_wan_pipeline}


@pytest.fixture(scope="module")
def pipes():
    return {name: make() for name, make in PIPES.items()}


def start_latents(name: str, images: int, dtype) -> torch.Tensor:
    """Fixed start noise (fp32 draws, whatever the pipeline's dtype)."""
    frames, h, w = GRIDS[name]
    shape = (images, 4, 2 * h, 2 * w) if name == "pixart" else (images, 16, frames, 2 * h, 2 * w)
    return torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(dtype)


def generate(pipe, prompts=PROMPTS, **kwargs):
    name = "wan" if type(pipe).__name__ == "WanPipeline" else "pixart"
    images = len(prompts) * kwargs.get("num_images_per_prompt", kwargs.get("num_videos_per_prompt", 1))
    options = dict(num_inference_steps=2, max_sequence_length=TEXT, output_type="latent",
                   latents=start_latents(name, images, pipe.dtype))
    if name == "wan":
        options.update(height=WAN_SIZE[0], width=WAN_SIZE[1], num_frames=WAN_FRAMES)
        return pipe(prompts, **{**options, **kwargs}).frames
    options.update(height=PIXART_SIZE[0], width=PIXART_SIZE[1], clean_caption=False, use_resolution_binning=False)
    return pipe(prompts, **{**options, **kwargs}).images


@pytest.fixture(scope="module")
def stock(pipes):
    return stock_with_tolerance(pipes, generate)


def materialised_conditional(pipe, cfg_calls: int):
    """``materialised`` (P kept per layer; the pipeline's mask added) over the conditional
    transformer calls: ``cfg_calls`` per step (2 for Wan with CFG, conditional first; 1
    otherwise)."""
    return materialised(pipe.transformer, keep=lambda call, key: call.forward % cfg_calls == 0, masked=True)


# ---- install / uninstall ---------------------------------------------------------------------

@pytest.mark.parametrize("name", list(PIPES))
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_outputs_equal_stock_and_uninstall_restores(pipes, stock, name, backend):
    assert_installed_equals_stock(pipes[name], generate, stock[name], backend)


class _Recorder(attnctl.Controller):
    def __init__(self):
        self.calls = []

    def plan(self, call):
        self.calls.append((call.layer, call.is_cross, call.grid, call.frames, call.step.index, call.layout,
                           call.queries, call.keys, call.context))


@pytest.mark.parametrize("name", list(PIPES))
def test_call_descriptor_tells_the_token_grid_frames_and_cfg_halves(pipes, name):
    pipe, recorder = pipes[name], _Recorder()
    with attnctl.install(pipe, recorder, backend="torch"):
        generate(pipe)
    frames, h, w = GRIDS[name]
    blocks = "transformer_blocks" if name == "pixart" else "blocks"
    layers = [f"{blocks}.{i}.attn{j}" for i in range(2) for j in (1, 2)]
    # PixArt: one call per step, CFG rows [uncond; cond]; Wan: a conditional call, then an unconditional one
    halves = [None] if name == "pixart" else ["cond", "uncond"]
    expected = [(layer, step, half) for step in range(2) for half in halves for layer in layers]
    assert [(c[0], c[4], c[5].half) for c in recorder.calls] == expected
    for layer, is_cross, grid, got_frames, _, layout, queries, keys, context in recorder.calls:
        assert is_cross == layer.endswith("attn2") and context == "text"
        assert grid == (h, w) and got_frames == frames and queries == frames * h * w
        assert keys == (TEXT if is_cross else queries)
        assert layout.rows == (4 if name == "pixart" else 2) and layout.cfg == (name == "pixart")
        if name == "wan":
            assert layout.cond_rows == (range(2) if layout.half == "cond" else range(0))


# ---- word maps ---------------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(PIPES))
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_word_maps_match_the_materialising_reference(pipes, stock, name, backend):
    pipe = pipes[name]
    with materialised_conditional(pipe, cfg_calls=2 if name == "wan" else 1) as store:
        generate(pipe)
    tc = traced_unchanged(pipe, generate, stock[name], backend)
    maps = tc.maps()
    layers = [l.name for l in maps.layers]
    assert layers == [n for n in store if isinstance(n, str) and n.endswith("attn2")]
    frames, h, w = grid = GRIDS[name]
    assert maps.frames == frames and maps.latent == (h, w)
    for b, word, columns in prompt_words(maps, PROMPTS, ("cat", "red", "car", "a dog")):
        row = maps.layout.row(b)
        if name == "wan":
            video = tc.maps().video_heat_map(b).word(word).value
            assert video.shape == grid
            assert_matches_materialised(video, store, row, columns, grid, layers)
            for f in range(frames):
                torch.testing.assert_close(tc.maps().heat_map(b, frame=f).word(word).value, video[f],
                                           rtol=0, atol=0)
            # the same means taken in another order (frames, then columns)
            torch.testing.assert_close(tc.word_heat_map(word, b).value, video.mean(0), rtol=0,
                                       atol=4 * EPS32 * video.abs().max().item())
        else:
            got = tc.word_heat_map(word, b).value
            assert got.shape == (h, w)
            assert_matches_materialised(got[None], store, row, columns, grid, layers)
    # Padding is not captured: the longest prompt's pieces and </s> only.
    assert maps.layers[0].maps[-1].shape == ((4 if name == "pixart" else 2), frames * h * w,
                                             max(len(t.tokens) for t in maps.prompts))


@pytest.mark.parametrize("name,prompt,encoded", [
    ("pixart", "  A Cat on a RED car ", "a cat on a red car"),   # PixArt lower-cases and strips
    ("wan", "a  cat\non a red   car", "a cat on a red car")])   # Wan collapses whitespace
def test_prompts_are_recorded_as_the_text_encoder_sees_them(pipes, name, prompt, encoded):
    pipe, seen = pipes[name], []
    hook = pipe.text_encoder.register_forward_pre_hook(lambda m, a, kw: seen.append((a[0] if a else
                                                                                      kw["input_ids"])[0]),
                                                         with_kwargs=True)
    try:
        with attnctl.trace(pipe, backend="torch") as tc:
            generate(pipe, [prompt], guidance_scale=1.0)
    finally:
        hook.remove()
    text = tc.maps().prompts[0]
    assert text.prompt == encoded
    ids = pipe.tokenizer.convert_tokens_to_ids(list(text.tokens))
    assert ids == seen[0][: len(ids)].tolist() and pipe.tokenizer.unk_token_id not in ids
    assert tc.word_heat_map("red car").value.shape == GRIDS[name][1:]


def test_video_outputs_and_saved_trace(pipes, tmp_path):
    """The frames × words strip (PNG) and the animation (GIF through imageio, or the error
    naming imageio); a saved Wan trace keeps its frames."""
    pipe = pipes["wan"]
    with attnctl.trace(pipe, backend="torch") as tc:
        generate(pipe, PROMPTS[:1], guidance_scale=1.0)   # without CFG: one call per step
    assert not tc.maps().layout.cfg and tc.maps().steps_run == 2
    video = tc.maps().video_heat_map()
    video.strip(["cat", "red car"], str(tmp_path / "strip.png"))
    assert (tmp_path / "strip.png").stat().st_size > 0
    frames = torch.rand(WAN_FRAMES, *WAN_SIZE, 3)      # decoded frames: 4·(3 − 1) + 1 = 9
    video.strip(["cat"], str(tmp_path / "over.png"), frames.numpy(), frames=[0, 2])
    word = video.word("cat")
    assert [word.latent_frame_of(t) for t in range(WAN_FRAMES)] == [0, 1, 1, 1, 1, 2, 2, 2, 2]
    iio = pytest.importorskip("imageio.v3", reason="the test extra installs imageio")
    word.animate(str(tmp_path / "cat.gif"), frames.numpy())
    assert iio.imread(str(tmp_path / "cat.gif")).shape[:3] == (WAN_FRAMES, *WAN_SIZE)
    tc.save(str(tmp_path / "t.safetensors"))
    loaded = attnctl.TraceMaps.load(str(tmp_path / "t.safetensors"))
    assert loaded.frames == 3 and loaded.family == "wan" and loaded.frame_scale == 4
    torch.testing.assert_close(loaded.video_heat_map().word("cat").value, word.value, rtol=0, atol=0)


def test_animation_without_imageio_names_it(monkeypatch):
    from attnctl.tools.video import WordVideo

    monkeypatch.setitem(__import__("sys").modules, "imageio", None)
    monkeypatch.setitem(__import__("sys").modules, "imageio.v3", None)
    with pytest.raises(ImportError, match="animate: writing a GIF or MP4 needs imageio"):
        WordVideo(torch.rand(2, 3, 4), "cat", 4).animate("never.gif")


def test_wan_i2v_image_context_is_a_second_call_and_equals_stock():
    """Wan I2V (image-context tokens before the 512 text tokens): the transformer's output
    equals stock's within its own fp32 error, and controllers see the text and the image
    context as two calls of each cross-attention layer."""
    from diffusers import WanTransformer3DModel

    from attnctl.diffusers.offline_dit import tiny_wan_transformer_config

    torch.manual_seed(0)
    model = WanTransformer3DModel(**tiny_wan_transformer_config(), image_dim=24, added_kv_proj_dim=32).eval()
    generator = torch.Generator().manual_seed(1)
    inputs = dict(hidden_states=torch.randn(2, 16, 2, 4, 6, generator=generator), timestep=torch.tensor([500, 500]),
                  encoder_hidden_states=torch.randn(2, 512, 32, generator=generator),
                  encoder_hidden_states_image=torch.randn(2, 5, 24, generator=generator))
    with torch.no_grad():
        expected, atol = stock_and_tolerance(model, lambda model: model(
            **{k: v.to(model.dtype) if v.is_floating_point() else v for k, v in inputs.items()}, return_dict=False)[0])
        recorder = _Recorder()
        with attnctl.install(model, recorder, backend="torch"):   # the kernels' coverage is elsewhere
            got = model(**inputs, return_dict=False)[0]
    torch.testing.assert_close(got, expected, rtol=0, atol=atol)
    cross = [(c[0], c[8], c[7]) for c in recorder.calls if c[1]]
    assert cross == [(f"blocks.{i}.attn2", context, keys) for i in range(2)
                     for context, keys in (("text", 512), ("image", 5))]
    assert all((c[2], c[3], c[6]) == ((2, 3), 2, 12) for c in recorder.calls)


def test_sana_equals_stock_with_its_linear_self_attention_left_alone():
    """Sana: only the softmax cross-attention is routed (the linear self-attention keeps
    diffusers' processor); outputs equal stock's within its own fp32 error; word maps
    match the materialising reference, with the pipeline's complex_human_instruction (the
    prompt's tokens among the last max_sequence_length − 1 of instruction + prompt) and
    without it."""
    from attnctl.diffusers.offline_dit import tiny_sana_pipeline

    pipe = tiny_sana_pipeline()
    options = dict(height=32, width=32, num_inference_steps=2, output_type="latent", max_sequence_length=TEXT,
                   clean_caption=False, use_resolution_binning=False)
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    expected, atol = stock_and_tolerance(pipe, lambda pipe: pipe(PROMPTS, latents=latents.to(pipe.dtype),
                                                                 **options).images)
    original = dict(pipe.transformer.attn_processors)
    recorder = _Recorder()
    for backend in ("torch", "triton"):
        with attnctl.install(pipe, recorder, backend=backend) as installation:
            assert installation.layers == installation.cross_layers == ["transformer_blocks.0.attn2"]
            assert pipe.transformer.attn_processors["transformer_blocks.0.attn1.processor"] is original[
                "transformer_blocks.0.attn1.processor"]
            out = pipe(PROMPTS, latents=latents, **options).images
        torch.testing.assert_close(out, expected, rtol=0, atol=atol)
        assert all(pipe.transformer.attn_processors[k] is v for k, v in original.items())
    assert {(c[0], c[2], c[3], c[6]) for c in recorder.calls} == {("transformer_blocks.0.attn2", (8, 8), 1, 64)}

    from attnctl.tools.words import record_prompt

    # the pipeline's default instruction, none, and one after which the prompt's columns
    # are not the prompt's own token positions
    for instruction in ({}, dict(complex_human_instruction=None), dict(complex_human_instruction=["Describe it",
                                                                                                "then:"])):
        seen = []
        hook = pipe.text_encoder.register_forward_pre_hook(lambda m, a: seen.append(a[0]))
        try:
            with materialised_conditional(pipe, cfg_calls=1) as store:
                pipe(PROMPTS, latents=latents, **options, **instruction)
        finally:
            hook.remove()
        with attnctl.trace(pipe, backend="triton") as tc:
            pipe(PROMPTS, latents=latents, **options, **instruction)
        selected = seen[0][:, [0] + list(range(-TEXT + 1, 0))]     # the pipeline's select_index
        maps = tc.maps()
        for b in range(2):
            for word in ("cat", "red car", "dog"):
                if word.split()[-1] not in PROMPTS[b].split():
                    continue
                pieces = [i for i in pipe.tokenizer(word).input_ids if i not in pipe.tokenizer.all_special_ids]
                ids = selected[b].tolist()
                starts = [c for c in range(len(ids)) if ids[c:c + len(pieces)] == pieces]
                assert len(starts) == 1
                columns = list(range(starts[0], starts[0] + len(pieces)))
                assert maps.prompts[b].positions(word, None, match="tokens") == columns
                if instruction.get("complex_human_instruction") == ["Describe it", "then:"]:
                    assert record_prompt(pipe.tokenizer, PROMPTS[b]).positions(word, None, match="tokens") != columns
                assert_matches_materialised(tc.word_heat_map(word, b).value[None], store, maps.layout.row(b), columns,
                                         (1, 8, 8), ["transformer_blocks.0.attn2"])


# ---- bad input ---------------------------------------------------------------------------------

def test_clear_errors(pipes):
    pipe = pipes["wan"]
    with attnctl.trace(pipe, backend="torch") as tc:
        generate(pipe, PROMPTS[:1])
    maps = tc.maps()
    with pytest.raises(ValueError, match="'horse' is not in the prompt"):
        tc.word_heat_map("horse")
    with pytest.raises(ValueError, match="'horse' is not in the prompt"):
        maps.video_heat_map().word("horse")
    for frame in (3, -1, 1.0):
        with pytest.raises(ValueError, match=r"frame: expected a latent frame index in \[0, 3\)"):
            maps.heat_map(frame=frame)
    with pytest.raises(ValueError, match=r"frame: expected a latent frame index in \[0, 3\), got 5"):
        maps.video_heat_map().frame(5)
    with pytest.raises(ValueError, match="video: expected 9 frames"):
        maps.video_heat_map().strip(["cat"], "never.png", torch.rand(8, 4, 4, 3).numpy())
    with pytest.raises(ValueError, match="uncond: WanPipeline runs CFG's unconditional half"):
        with attnctl.trace(pipe, uncond=True):
            pass
    with pytest.raises(ValueError, match="normalize: DAAM's normalisation"):
        maps.heat_map(normalize=True)
    with pytest.raises(ValueError, match="kinds: block kinds select MM-DiT"):
        with attnctl.trace(pipe, kinds="double"):
            pass
    assert attnctl.diffusers.installation_of(pipe) is None
    class Inject(attnctl.Controller):
        def plan(self, call):
            return attnctl.Plan(source=torch.zeros(call.batch, dtype=torch.long))

    with pytest.raises(NotImplementedError, match="source: not supported on Wan attention"):
        with attnctl.install(pipe, Inject(), backend="torch"):
            generate(pipe, PROMPTS[:1], num_inference_steps=1)
    with pytest.raises(NotImplementedError, match="attention_mask: attnctl's Wan processor"):
        with attnctl.install(pipe, backend="torch"):
            attn = pipe.transformer.blocks[0].attn1
            attn(torch.zeros(1, 4, 32), attention_mask=torch.zeros(1, 1, 4, 4))


# ---- published configs on the meta device ------------------------------------------------------

@pytest.mark.parametrize("name,routed,heads,head_dim,text,grid", [
    ("pixart_sigma", 56, 16, 72, 300, (1, 64, 64)),           # 1024²: 128² latent, patch 2
    ("sana_1600m_1024", 20, 20, 112, 300, (1, 32, 32)),        # 1024²: DC-AE f32, patch 1
    ("wan21_t2v_1_3b", 60, 12, 128, 512, (21, 30, 52)),        # 480x832x81: 21x60x104 latent, patch 1x2x2
    ("wan21_t2v_14b", 80, 40, 128, 512, (21, 30, 52))])
def test_published_configs_layers_and_map_shapes(monkeypatch, name, routed, heads, head_dim, text, grid):
    from attnctl.diffusers.offline_mmdit import t5_tokenizer

    for module in ("processor", "compose"):   # UNet-style processors; the Wan processor's planned_attention
        monkeypatch.setattr(f"attnctl.diffusers.{module}.attention", shape_only_attention)
    model = meta_transformer(name)
    recorder = _Recorder()
    frames, h, w = grid
    config = model.config
    with attnctl.trace(model, layers="*", backend="torch") as tc:
        installation = tc.installation
        installation.add(recorder)
        assert len(installation.layers) == routed and len(installation.cross_layers) == routed // (
            1 if name.startswith("sana") else 2)
        installation.start_generation(["a photo of a cat sitting on the car"], cfg=False, tokenizer=t5_tokenizer())
        with torch.device("meta"):
            if name.startswith("wan"):
                inputs = dict(hidden_states=torch.randn(1, config.in_channels, frames, 2 * h, 2 * w),
                              timestep=torch.ones(1), encoder_hidden_states=torch.randn(1, text, config.text_dim))
            else:
                p = config.patch_size
                inputs = dict(hidden_states=torch.randn(1, config.in_channels, p * h, p * w),
                              encoder_hidden_states=torch.randn(1, text, config.caption_channels),
                              timestep=torch.ones(1))
                if name.startswith("pixart"):
                    inputs["added_cond_kwargs"] = {"resolution": None, "aspect_ratio": None}
            model(**inputs, return_dict=False)
    assert [c[0] for c in recorder.calls] == installation.layers
    for layer, is_cross, got_grid, got_frames, _, layout, queries, keys, _ in recorder.calls:
        assert (got_frames, *got_grid) == grid and queries == frames * h * w
        assert keys == (text if is_cross else queries)
    maps = tc.maps()
    prompt_tokens = len(maps.prompts[0].tokens)       # the prompt's pieces and </s>
    assert len(maps.layers) == len(installation.cross_layers)
    for layer in maps.layers:
        assert layer.maps[-1].shape == (1, frames * h * w, prompt_tokens)   # heads summed, no padding
        assert layer.token_mass[-1].shape == (1, heads, text) and layer.frames == frames
    module = dict(model.named_modules())[maps.layers[0].name]
    assert module.heads == heads and module.to_q.out_features == heads * head_dim


def test_benchmark_rows_follow_the_published_configs():
    """The kernel benchmark's PixArt-Σ, Sana and Wan rows (attnctl.benchmarks.shapes) are
    the published configs' heads, head dims and token counts at their default sizes."""
    from attnctl.benchmarks.shapes import catalog

    pixart, sana = published_transformer_config("pixart_sigma"), published_transformer_config("sana_1600m_1024")
    wan = {size: published_transformer_config(f"wan21_t2v_{size}") for size in ("1_3b", "14b")}
    wan_tokens = 21 * (480 // 8 // 2) * (832 // 8 // 2)       # (81 − 1) / 4 + 1 frames, VAE 8, patch 1x2x2
    expected = {
        "pixart-1024": {("cross", (1024 // 8 // 2) ** 2, pixart["num_attention_heads"], pixart["attention_head_dim"],
                         300),
                        ("self", 4096, pixart["num_attention_heads"], pixart["attention_head_dim"], 4096)},
        "sana-1024": {("cross", (1024 // 32) ** 2, sana["num_cross_attention_heads"],
                       sana["cross_attention_head_dim"], 300)},
        "wan1.3b-480p": {(kind, wan_tokens, wan["1_3b"]["num_attention_heads"], wan["1_3b"]["attention_head_dim"],
                          512 if kind == "cross" else wan_tokens) for kind in ("cross", "self")},
        "wan14b-480p": {(kind, wan_tokens, wan["14b"]["num_attention_heads"], wan["14b"]["attention_head_dim"],
                         512 if kind == "cross" else wan_tokens) for kind in ("cross", "self")},
    }
    assert wan_tokens == 32760
    for model, rows in expected.items():
        assert {(s.kind, s.M, s.H, s.D, s.N) for s in catalog(batches=(2,), models=[model])} == rows


@pytest.mark.parametrize("arch", ["pixart", "wan"])
def test_demo_writes_the_pictures(tmp_path, arch):
    import json

    from attnctl.cli import main

    out = tmp_path / arch
    small = ["--height", "32", "--width", "48"] if arch == "wan" else ["--height", "16", "--width", "24"]
    assert main(["demo", "--offline-arch", arch, "--out", str(out), "--steps", "1", "--no-compare",
                 "--prompt", "a cat on a red car", "--words", "cat", "red car", *small]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["words"] == ["cat", "red car"]
    assert summary["frames"] == (5 if arch == "wan" else 1)
    pictures = ["frame", "strip"] if arch == "wan" else ["image", "grid"]
    for key in pictures:
        assert open(summary["files"][key], "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    maps = attnctl.TraceMaps.load(summary["files"]["trace"])
    assert maps.frames == summary["frames"] and list(maps.latent) == summary["token_grid"]
    if arch == "wan":
        import importlib.util

        has_imageio = importlib.util.find_spec("imageio") is not None
        assert len(summary["files"].get("animations", [])) == (2 if has_imageio else 0)
    with pytest.raises(SystemExit, match="--words: word: 'zebra' is not in the prompt"):
        main(["demo", "--offline-arch", arch, "--out", str(out), "--steps", "1", "--no-compare",
              "--words", "zebra", *small])


# ---- controls: HRV probes and ordered weakening --------------------------------------------------

CONCEPTS = {"cat": "cat", "car": "car", "red": "red"}


def _cond_rows(name, batch, forward):
    """The conditional rows of a transformer call (``forward`` from 0): PixArt's second CFG
    half; Wan's first call of a step (all rows), none in its second."""
    if name == "pixart":
        return range(batch // 2, batch)
    return range(batch) if forward % 2 == 0 else range(0)


def replayed(pipe, name, dtype=torch.float64, observe=None, mult=None, bias=None):
    """Stock processors with SDPA made explicit in ``dtype``: softmax(q·kᵀ/√D + mask +
    ``bias(layer, rows, q, k, step)``), times ``mult(layer, rows, shape)`` (a (B, H, 1, N)
    factor or None) on the numerator, times v. ``observe(layer, q, rows)`` sees every
    cross-attention call's queries."""
    def explicit(call, query, key, value, attn_mask):
        q, k, v = query.to(dtype), key.to(dtype), value.to(dtype)
        logits = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
        rows = _cond_rows(name, q.shape[0], call.forward)
        if call.is_cross and bias is not None:
            logits = logits + bias(call.layer, rows, q, k, call.forward)
        p = torch.softmax(logits + (0 if attn_mask is None else attn_mask.to(dtype)), dim=-1)
        if call.is_cross:
            if observe is not None:
                observe(call.layer, q, rows)
            f = mult(call.layer, rows, tuple(p.shape)) if mult is not None else None
            if f is not None:
                p = p * f.to(dtype)
        return (p @ v).to(query.dtype)

    return sdpa_replay(pipe.transformer, explicit)


def reference_votes(pipe, name, prompts):
    """HRV votes replayed on materialised probabilities, as head_relevance_calculation.py
    forms them, with every concept word probed at once and no start token (T5 has none):
    each word encoded alone by the text encoder (its pieces, not </s>), the layer's keys of
    them (Wan: norm_k over all heads first), softmax over the probe set for the
    conditional queries, mean over the queries, each concept's mean over its pieces,
    argmax per (image, head), summed over calls. {layer: (H, K)}."""
    modules = dict(pipe.transformer.named_modules())
    embeds, owner = [], []
    with torch.no_grad():
        for c, word in enumerate(CONCEPTS.values()):
            ids = pipe.tokenizer(word, return_tensors="pt").input_ids
            embeds.append(pipe.text_encoder(ids)[0][0, :-1].double())       # without </s>
            owner += [c] * (ids.shape[1] - 1)
    embeds = torch.cat(embeds)
    votes = {}

    def observe(layer, q, rows):
        if not rows:
            return
        attn = modules[layer]
        with torch.no_grad():
            key = attn.to_k.double()(embeds)
            if name == "wan":
                key = attn.norm_k.double()(key)
            attn.float()
        pk = key.view(len(owner), attn.heads, -1).transpose(0, 1)                 # (H, C, D)
        p = (q[rows.start:rows.stop].double() @ pk.transpose(-1, -2) * pk.shape[-1] ** -0.5).softmax(-1).mean(2)
        scores = torch.stack([p[..., [i for i, o in enumerate(owner) if o == c]].mean(-1)
                              for c in range(len(CONCEPTS))], -1)                   # (images, H, K)
        v = torch.nn.functional.one_hot(scores.argmax(-1), len(CONCEPTS)).sum(0).float()
        votes[layer] = votes.get(layer, 0) + v

    with replayed(pipe, name, observe=observe):
        generate(pipe, guidance_scale=5.0)
    return votes


@pytest.mark.parametrize("name", list(PIPES))
def test_hrv_votes_and_ordered_weakening_equal_their_replays(pipes, name):
    from attnctl.tools.hrv import OrderedWeakening, build_hrv
    from attnctl.tools.words import record_prompt

    pipe = pipes[name]
    frames, h, w = GRIDS[name]
    size = (dict(height=WAN_SIZE[0], width=WAN_SIZE[1], num_frames=WAN_FRAMES) if name == "wan" else
            dict(height=PIXART_SIZE[0], width=PIXART_SIZE[1], clean_caption=False, use_resolution_binning=False))
    hrv = build_hrv(pipe, CONCEPTS, PROMPTS, steps=2, guidance_scale=5.0, batch_size=2, backend="torch",
                    probe_words="all", probe_sot=False, max_sequence_length=TEXT,
                    latents=start_latents(name, 2, pipe.dtype), **{k: v for k, v in size.items()
                                                                   if k not in ("height", "width")},
                    height=size["height"], width=size["width"])
    expected = reference_votes(pipe, name, PROMPTS)
    assert [layer for layer, _ in hrv.layers] == list(expected)
    torch.testing.assert_close(hrv.counts, torch.cat(list(expected.values())), rtol=0, atol=0)

    # MoRHF: the prompt's word pieces × -2 in the 2 heads most relevant to "red", cond rows only
    ranked = hrv.ranked_heads("red", 2, "most")
    offsets = hrv.offsets()
    columns = [[p for _, pos in record_prompt(pipe.tokenizer, prompt, TEXT).words for p in pos]
               for prompt in PROMPTS]

    def mult(layer, rows, shape):
        B, H, _, N = shape
        f = torch.ones(B, H, 1, N)
        start, _ = offsets[layer]
        for i, row in enumerate(rows):
            for head in range(H):
                if start + head in ranked:
                    f[row, head, 0, columns[i]] = -2.0
        return f

    with replayed(pipe, name, mult=mult):
        exact = generate(pipe)
    with replayed(pipe, name, dtype=torch.float32, mult=mult):
        single = generate(pipe)
    plain = generate(pipe)
    with attnctl.install(pipe, OrderedWeakening(hrv, "red", 2, order="most"), backend="triton"):
        got = generate(pipe)
    atol = reference_tolerance(single, exact)
    torch.testing.assert_close(got, exact, rtol=0, atol=atol)
    assert (got - plain).abs().max() > 100 * atol          # the control acts


@pytest.mark.parametrize("name", list(PIPES))
def test_paint_with_words_equals_its_replay(pipes, name):
    """eDiff-I / paint-with-words on PixArt's and Wan's cross-attention: the bias
    w·log(1+σ)·max(q·kᵀ)·A (σ the scheduler's, max over the image's heads, tokens and
    queries — on Wan every latent frame's — A the mask resized bilinearly,
    align_corners=True, to the token grid at the phrase's pieces, on every frame) added to
    the scaled logits of the conditional rows, as the original adds it; a mask at the
    image size."""
    from attnctl.tools.paint import PaintWithWords
    from attnctl.tools.words import record_prompt

    pipe = pipes[name]
    frames, h, w = GRIDS[name]
    size = PIXART_SIZE if name == "pixart" else WAN_SIZE
    mask = torch.zeros(size)
    mask[:, : size[1] // 2] = 1.0                               # the left half, at the image size
    on_grid = F.interpolate(mask[None, None].double(), size=(h, w), mode="bilinear", align_corners=True)
    on_grid = on_grid.reshape(h * w).repeat(frames)             # queries: frame after frame
    prompts = ["a cat on a red car", "a red dog"]
    columns = [record_prompt(pipe.tokenizer, p, TEXT).positions("red") for p in prompts]
    sigmas = []

    def bias(layer, rows, q, k, call):
        step = call if name == "pixart" else call // 2          # Wan: a cond and an uncond call per step
        if step == len(sigmas):
            sigmas.append(float(pipe.scheduler.sigmas[step]))
        out = torch.zeros(q.shape[0], 1, q.shape[2], k.shape[2], dtype=q.dtype)
        for i, row in enumerate(rows):
            top = (q[row] @ k[row].transpose(-1, -2)).max()
            out[row, 0, :, columns[i]] = (0.1 * math.log1p(sigmas[step]) * top * q.shape[-1] ** -0.5
                                          * on_grid.to(q.dtype)[:, None])
        return out

    with replayed(pipe, name, bias=bias):
        exact = generate(pipe, prompts)
    sigmas.clear()
    with replayed(pipe, name, dtype=torch.float32, bias=bias):
        single = generate(pipe, prompts)
    plain = generate(pipe, prompts)
    with attnctl.install(pipe, PaintWithWords({"red": mask}), backend="triton"):
        got = generate(pipe, prompts)
    atol = reference_tolerance(single, exact)
    torch.testing.assert_close(got, exact, rtol=0, atol=atol)
    assert (got - plain).abs().max() > 100 * atol          # the control acts
    with pytest.raises(ValueError, match="phrase 'zebra'"):
        with attnctl.install(pipe, PaintWithWords({"zebra": mask}), backend="torch"):
            generate(pipe, prompts)
