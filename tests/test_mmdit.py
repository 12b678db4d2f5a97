"""Flux, SD3 and SD3.5 (MM-DiT joint attention): install / uninstall against stock diffusers
and word maps against a materialising reference, on tiny random-weight pipelines built
offline (attnctl.diffusers.offline_mmdit).

The reference runs the stock processors with torch's SDPA replaced by an explicit
softmax(q·kᵀ/√D)·v that also keeps P (B, H, S, S) per layer, summed over the steps; the
expected word map is then the mean over layers and heads of P's image-row × word-column
block, which is what a trace defines (no upsampling: maps on the image token grid)."""
import pytest
import torch

import attnctl
from attnctl.diffusers.joint import CONTEXT_PRE_ONLY, DOUBLE, IMAGE_SELF, JOINT, SINGLE
from attnctl.diffusers.offline_mmdit import tiny_flux_pipeline, tiny_sd3_pipeline
from diffusion_helpers import (assert_installed_equals_stock, meta_transformer, prompt_words, shape_only_attention,
                               stock_with_tolerance, traced_unchanged)
from sdpa_replay import assert_matches_materialised, materialised
from op_cases import interpreter_bf16_dot_fixed

PROMPTS = ["a cat on a red car", "a dog"]
HEIGHT, WIDTH = 16, 24       # non-square: Flux 4x6 image tokens, SD3 4x6 patches
TEXT = 16                    # max_sequence_length: T5 tokens, padded

PIPES = {"flux": tiny_flux_pipeline, "sd3": tiny_sd3_pipeline, "sd35": lambda: tiny_sd3_pipeline(sd35=True)}


@pytest.fixture(scope="module")
def pipes():
    return {name: make() for name, make in PIPES.items()}


def start_latents(pipe, images: int) -> torch.Tensor:
    """Fixed start noise (fp32 draws, whatever the pipeline's dtype): Flux's packed
    (B, h/2·w/2, 4·C) tokens, SD3's (B, C, h, w) latent."""
    h, w = HEIGHT // pipe.vae_scale_factor, WIDTH // pipe.vae_scale_factor
    channels = pipe.vae.config.latent_channels
    shape = ((images, h * w // 4, 4 * channels) if type(pipe).__name__ == "FluxPipeline"
             else (images, channels, h, w))
    return torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(pipe.dtype)


def generate(pipe, prompts=PROMPTS, cfg=True, **kwargs):
    images = len(prompts) * kwargs.get("num_images_per_prompt", 1)
    options = dict(height=HEIGHT, width=WIDTH, num_inference_steps=2, max_sequence_length=TEXT,
                   output_type="latent", latents=start_latents(pipe, images))
    if type(pipe).__name__.startswith("StableDiffusion3"):
        options["guidance_scale"] = 4.0 if cfg else 1.0
    return pipe(prompts, **{**options, **kwargs}).images


@pytest.fixture(scope="module")
def stock(pipes):
    return stock_with_tolerance(pipes, generate)


# ---- install / uninstall ---------------------------------------------------------------------

@pytest.mark.parametrize("name", list(PIPES))
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_outputs_equal_stock_and_uninstall_restores(pipes, stock, name, backend):
    assert_installed_equals_stock(pipes[name], generate, stock[name], backend)


def test_uninstall_keeps_the_attention_backend(pipes):
    pipe = pipes["flux"]
    pipe.transformer.set_attention_backend("native")
    backends = {k: p._attention_backend for k, p in pipe.transformer.attn_processors.items()}
    attnctl.install(pipe).uninstall()
    assert {k: p._attention_backend for k, p in pipe.transformer.attn_processors.items()} == backends


class _Recorder(attnctl.Controller):
    def __init__(self):
        self.calls = []

    def plan(self, call):
        self.calls.append((call.layer, call.joint, call.step.index, call.layout, call.keys, call.query.shape))


class _Injecting(attnctl.Controller):
    """A controller asking for a control joint attention does not apply (injection)."""

    def plan(self, call):
        from attnctl.diffusers.controller import Plan
        return Plan(source=torch.zeros(call.batch, dtype=torch.int64, device=call.device))


def test_a_control_joint_attention_does_not_apply_is_refused_by_name(pipes):
    with attnctl.install(pipes["flux"], _Injecting(), backend="torch"):
        with pytest.raises(NotImplementedError, match=r"source: not supported on MM-DiT joint attention "
                                                      r"\(transformer_blocks.0.attn\); it takes bias, prob_mult"):
            generate(pipes["flux"], ["a cat"])


@pytest.mark.parametrize("name,kinds,text_first", [
    ("flux", {"transformer_blocks.0.attn": DOUBLE, "single_transformer_blocks.0.attn": SINGLE}, True),
    ("sd35", {"transformer_blocks.0.attn": JOINT, "transformer_blocks.0.attn2": IMAGE_SELF,
              "transformer_blocks.1.attn": CONTEXT_PRE_ONLY}, False)])
def test_call_descriptor_tells_the_joint_layout(pipes, name, kinds, text_first):
    pipe, recorder = pipes[name], _Recorder()
    with attnctl.install(pipe, recorder, backend="torch"):
        generate(pipe, ["a cat"], num_images_per_prompt=2)
    rows = 2 if name == "flux" else 4          # SD3: CFG doubles the batch, Flux has no CFG
    image = (HEIGHT // 4) * (WIDTH // 4)
    assert [c[0] for c in recorder.calls] == list(kinds) * 2
    for layer, joint, step, layout, keys, q_shape in recorder.calls:
        assert joint.block == kinds[layer] and joint.grid == (HEIGHT // 4, WIDTH // 4)
        assert layout.rows == rows and layout.cfg == (name != "flux") and q_shape[0] == rows
        text = 0 if joint.block == IMAGE_SELF else (TEXT if name == "flux" else 77 + TEXT)
        assert len(joint.text) == text and len(joint.image) == image and keys == text + image
        assert joint.text_first == (text_first and text > 0)
        assert joint.image == (range(text, text + image) if text_first else range(0, image))
    assert [c[2] for c in recorder.calls] == [0] * len(kinds) + [1] * len(kinds)


# ---- word maps ---------------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(PIPES))
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_word_maps_match_the_materialising_reference(pipes, stock, name, backend):
    pipe = pipes[name]
    with materialised(pipe.transformer) as store:
        generate(pipe)
    tc = traced_unchanged(pipe, generate, stock[name], backend)
    maps = tc.maps()
    flux = name == "flux"
    layers = [l.name for l in maps.layers]
    assert layers == [n for n in store if isinstance(n, str) and not n.endswith("attn2")]
    image = (HEIGHT // 4) * (WIDTH // 4)
    first = 0 if flux else image + 77          # T5 segment's first key column
    image_rows = slice(TEXT, TEXT + image) if flux else slice(0, image)
    for b, word, positions in prompt_words(maps, PROMPTS, ("cat", "red", "car", "a dog")):
        got = tc.word_heat_map(word, b).value
        assert got.shape == (HEIGHT // 4, WIDTH // 4)
        assert_matches_materialised(got, store, maps.layout.row(b), [first + c for c in positions],
                                    (HEIGHT // 4, WIDTH // 4), layers, image_rows=image_rows)
    # Padding is not captured: the longest prompt's pieces and </s> only.
    assert maps.layers[0].maps[-1].shape[-1] == max(len(t.tokens) for t in maps.prompts) < TEXT


def test_flux_words_come_from_prompt_2_which_t5_encodes(pipes):
    """FluxPipeline gives T5 ``prompt_2`` (CLIP only pools ``prompt``): the traced columns
    are T5's pieces of prompt_2, and a word of prompt_2 alone has its maps."""
    pipe = pipes["flux"]
    prompts, prompts_2 = ["a cat"], ["a red car on a road"]
    with materialised(pipe.transformer) as store:
        generate(pipe, prompts, prompt_2=prompts_2)
    with attnctl.trace(pipe, backend="torch") as tc:
        generate(pipe, prompts, prompt_2=prompts_2)
    maps = tc.maps()
    assert maps.prompts[0].prompt == prompts_2[0]
    layers = [l.name for l in maps.layers]
    columns = maps.prompts[0].positions("road", None, match="tokens")
    grid = (HEIGHT // 4, WIDTH // 4)
    assert_matches_materialised(tc.word_heat_map("road").value, store, maps.layout.row(0), columns, grid, layers,
                                image_rows=slice(TEXT, TEXT + grid[0] * grid[1]))
    with pytest.raises(ValueError, match="cat"):
        tc.word_heat_map("cat")


def test_per_head_kinds_clip_segment_and_all_tokens(pipes, tmp_path):
    pipe = pipes["sd3"]
    with materialised(pipe.transformer) as store:
        generate(pipe, PROMPTS[:1], cfg=False)
    image = (HEIGHT // 4) * (WIDTH // 4)
    with attnctl.trace(pipe, backend="torch", per_head=True, kinds="context_pre_only", text="clip",
                       tokens="all") as tc:
        generate(pipe, PROMPTS[:1], cfg=False)
    maps = tc.maps()
    assert [l.name for l in maps.layers] == ["transformer_blocks.1.attn"]
    assert maps.layers[0].maps[-1].shape == (1, 2, image + 77 + TEXT, 77)   # every CLIP column, each head
    columns = [image + c for c in maps.prompts[0].positions("cat", None, match="tokens")]
    where = (0, columns, (HEIGHT // 4, WIDTH // 4), ["transformer_blocks.1.attn"])
    assert_matches_materialised(tc.word_heat_map("cat").value, store, *where, image_rows=slice(0, image))
    # one head on request, afterwards
    assert_matches_materialised(tc.word_heat_map("cat", heads=[1]).value, store, *where, image_rows=slice(0, image),
                                heads=[1])
    # saved and loaded: the image rows and the image-grid default come back
    tc.save(str(tmp_path / "t.safetensors"))
    loaded = attnctl.TraceMaps.load(str(tmp_path / "t.safetensors"), tokenizer=pipe.tokenizer)
    assert loaded.joint and loaded.layers[0].image_rows == (0, image)
    torch.testing.assert_close(loaded.word_heat_map("cat").value, tc.word_heat_map("cat").value, rtol=0, atol=0)


def test_block_index_and_step_filters(pipes):
    """Block index by layer name, kind, and steps: per-step maps add up to the summed trace."""
    pipe = pipes["flux"]
    with attnctl.trace(pipe, backend="torch") as every:
        generate(pipe)
    with attnctl.trace(pipe, backend="torch", layers="single_transformer_blocks.0.*", per_step=True) as one:
        generate(pipe)
    with attnctl.trace(pipe, backend="torch", kinds="single", steps=[1]) as last:
        generate(pipe)
    assert [l.name for l in one.maps().layers] == [l.name for l in last.maps().layers] == [
        "single_transformer_blocks.0.attn"]
    assert one.maps().steps == [0, 1]
    single = dict(layers="single_transformer_blocks.0.attn")
    torch.testing.assert_close(one.word_heat_map("cat", steps=[0, 1]).value,
                               every.word_heat_map("cat", **single).value, rtol=0, atol=0)
    torch.testing.assert_close(last.word_heat_map("cat").value, one.word_heat_map("cat", steps=[1]).value,
                               rtol=0, atol=0)


# ---- Flux true CFG: the prompt's transformer call, then the negative prompt's, each step ---------

NEGATIVE = ["a dog on the car", "a cat"]
TRUE_CFG = dict(negative_prompt=NEGATIVE, true_cfg_scale=4.0)


@pytest.fixture(scope="module")
def true_cfg_stock(pipes):
    return stock_with_tolerance({"flux": pipes["flux"]}, lambda pipe: generate(pipe, **TRUE_CFG))["flux"]


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_flux_true_cfg_equals_stock_and_tells_the_halves(pipes, true_cfg_stock, backend):
    pipe, recorder = pipes["flux"], _Recorder()
    assert_installed_equals_stock(pipe, lambda pipe: generate(pipe, **TRUE_CFG), true_cfg_stock, backend)
    with attnctl.install(pipe, recorder, backend=backend) as installation:
        got = generate(pipe, **TRUE_CFG)
        generation = installation.generation
    torch.testing.assert_close(got, true_cfg_stock[0], rtol=0, atol=true_cfg_stock[1])
    # the negative prompt's encode_prompt call started no generation of its own
    assert generation.index == 1 and generation.prompts == tuple(PROMPTS)
    assert [segment.prompts for segment in generation.segments] == [tuple(PROMPTS)]
    layers = ["transformer_blocks.0.attn", "single_transformer_blocks.0.attn"]
    assert [(c[0], c[2], c[3].half) for c in recorder.calls] == [
        (layer, step, half) for step in range(2) for half in ("cond", "uncond") for layer in layers]
    for *_, layout, _, shape in recorder.calls:
        assert layout.rows == 2 == shape[0] and not layout.cfg
        assert layout.cond_rows == (range(2) if layout.half == "cond" else range(0))
    recorder.calls.clear()
    with attnctl.install(pipe, recorder, backend="torch"):   # the next generation, without true CFG
        generate(pipe)
    assert [(c[2], c[3].half) for c in recorder.calls] == [(step, None) for step in range(2) for _ in layers]


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_flux_true_cfg_word_maps_match_the_materialising_reference(pipes, true_cfg_stock, backend):
    """The trace records the prompt's call (its words, not the negative prompt's); with
    uncond=True, half="uncond" is the negative prompt's call at the same columns."""
    pipe = pipes["flux"]
    store = {}
    for half, forward in (("cond", 0), ("uncond", 1)):   # the pipeline's order within a step
        with materialised(pipe.transformer, keep=lambda call, key, f=forward: call.forward % 2 == f) as kept:
            generate(pipe, **TRUE_CFG)
        store[half] = kept
    with attnctl.trace(pipe, backend=backend, uncond=True) as tc:
        got = generate(pipe, **TRUE_CFG)
    torch.testing.assert_close(got, true_cfg_stock[0], rtol=0, atol=true_cfg_stock[1])
    with attnctl.trace(pipe, backend=backend) as cond_only:
        generate(pipe, **TRUE_CFG)
    maps = tc.maps()
    assert [t.prompt for t in maps.prompts] == PROMPTS
    layers = [l.name for l in maps.layers]
    grid = (HEIGHT // 4, WIDTH // 4)
    image_rows = slice(TEXT, TEXT + grid[0] * grid[1])
    for b, word, columns in prompt_words(maps, PROMPTS, ("cat", "red", "car", "a dog")):
        for half in ("cond", "uncond"):
            assert_matches_materialised(maps.heat_map(b, half=half).word(word).value, store[half], b,
                                        columns, grid, layers, image_rows=image_rows)
        torch.testing.assert_close(cond_only.word_heat_map(word, b).value, tc.word_heat_map(word, b).value,
                                   rtol=0, atol=0)
    with pytest.raises(ValueError, match="half: 'uncond' was not captured"):
        cond_only.maps().heat_map(0, half="uncond")


# ---- bad input ---------------------------------------------------------------------------------

def test_clear_errors(pipes, stock):
    pipe = pipes["flux"]
    with attnctl.trace(pipe, backend="torch") as tc:
        generate(pipe, PROMPTS[:1])
    with pytest.raises(ValueError, match="'horse' is not in the prompt"):
        tc.word_heat_map("horse")
    with pytest.raises(ValueError, match="token_mass: an MM-DiT trace does not capture"):
        tc.maps().token_mass()
    with pytest.raises(ValueError, match="text: Flux attends to T5 tokens only"):
        with attnctl.trace(pipe, text="clip"):
            pass
    with pytest.raises(ValueError, match="kinds: expected block kinds"):
        attnctl.trace(pipe, kinds=["image_self"])
    from attnctl.diffusers.offline import tiny_sd_pipeline

    unet_pipe = tiny_sd_pipeline()
    for option, message in ((dict(kinds="double"), "kinds: block kinds select MM-DiT"),
                            (dict(text="clip"), "text: selects the text segment")):
        with pytest.raises(ValueError, match=message):
            with attnctl.trace(unet_pipe, **option):
                pass
        assert attnctl.diffusers.installation_of(unet_pipe) is None
    with pytest.raises(TypeError, match="install: expected a diffusers pipeline.*got Linear"):
        attnctl.install(torch.nn.Linear(2, 2))


# ---- published configs on the meta device ------------------------------------------------------

def _meta_inputs(name, model, side=1024, text=512):
    """Transformer inputs at ``side``² on the meta device (batch 1; SD3: CFG's 2 rows)."""
    config = model.config
    with torch.device("meta"):
        if name.startswith("flux"):
            tokens = (side // 16) ** 2
            return dict(hidden_states=torch.randn(1, tokens, config.in_channels),
                        encoder_hidden_states=torch.randn(1, text, config.joint_attention_dim),
                        pooled_projections=torch.randn(1, config.pooled_projection_dim), timestep=torch.ones(1),
                        img_ids=torch.zeros(tokens, 3), txt_ids=torch.zeros(text, 3), guidance=torch.ones(1))
        return dict(hidden_states=torch.randn(2, config.in_channels, side // 8, side // 8),
                    encoder_hidden_states=torch.randn(2, 77 + text, config.joint_attention_dim),
                    pooled_projections=torch.randn(2, config.pooled_projection_dim), timestep=torch.ones(2))


@pytest.mark.parametrize("name,blocks,heads,text", [
    ("flux1_dev", [DOUBLE] * 19 + [SINGLE] * 38, 24, 512),
    ("sd3_medium", [JOINT] * 23 + [CONTEXT_PRE_ONLY], 24, 256),
    ("sd35_medium", [JOINT, IMAGE_SELF] * 13 + [JOINT] * 10 + [CONTEXT_PRE_ONLY], 24, 256),
    ("sd35_large", [JOINT] * 37 + [CONTEXT_PRE_ONLY], 38, 256)])
def test_published_configs_layers_and_map_shapes(monkeypatch, name, blocks, heads, text):
    from attnctl.diffusers.offline_mmdit import t5_tokenizer

    monkeypatch.setattr("attnctl.diffusers.compose.attention", shape_only_attention)
    model = meta_transformer(name)
    recorder = _Recorder()
    flux = name.startswith("flux")
    with attnctl.trace(model, layers="*", backend="torch") as tc:
        installation = tc.installation
        installation.add(recorder)
        assert [installation.joint[layer].block for layer in installation.layers] == blocks
        if flux:
            installation.image_grid = (64, 64)
        prompt = "a photo of a cat sitting on the car"
        installation.start_generation([prompt], cfg=not flux, tokenizer=t5_tokenizer())
        for _ in range(2):
            model(**_meta_inputs(name, model, text=text), return_dict=False)
    rows, image = (1 if flux else 2), 64 * 64
    text_len = text if flux else 77 + text
    assert [c[0] for c in recorder.calls] == installation.layers * 2
    for layer, joint, step, layout, keys, q_shape in recorder.calls:
        assert joint.grid == (64, 64) and len(joint.image) == image and q_shape[:2] == (rows, heads)
        assert len(joint.text) == keys - image == (0 if joint.block == IMAGE_SELF else text_len)
    maps = tc.maps()
    prompt_tokens = len(maps.prompts[0].tokens)       # the prompt's pieces and </s>
    assert len(maps.layers) == len([b for b in blocks if b != IMAGE_SELF])
    for layer in maps.layers:
        assert layer.maps[-1].shape == (rows, image + text_len, prompt_tokens)   # heads summed, no padding
        assert not layer.token_mass
        assert layer.image_rows == ((text_len, text_len + image) if flux else (0, image))
    if flux:  # a full trace of every block at 1024² (steps are summed: 28 steps cost what 2 do)
        captured = sum(t.numel() * t.element_size() for l in maps.layers for t in l.maps.values())
        assert captured == 57 * (image + text_len) * prompt_tokens * 4 < 100e6


@pytest.mark.skipif(torch.cuda.is_available(), reason="the pipeline here is on the CPU (Triton's interpreter); "
                    "on a GPU machine tests/gpu/test_mmdit_gpu.py runs this check on the device")
@pytest.mark.parametrize("name", ["flux", "sd35"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_within_twice_stock_error(name, dtype):
    """In bf16 / fp16 attnctl (Triton) is at most twice as far from the fp64 run as stock
    diffusers in the same precision (plus one ulp of the output's scale). The CPU
    interpreter's bf16 tl.dot is patched as test_op_extensions does (op_cases)."""
    pipe = PIPES[name]()  # its own: a round trip through low precision rounds the weights
    pipe.to(torch.float64)
    exact = generate(pipe)
    pipe.to(dtype)
    stock_error = (generate(pipe).double() - exact).abs().max().item()
    with attnctl.install(pipe, backend="triton"), interpreter_bf16_dot_fixed():
        error = (generate(pipe).double() - exact).abs().max().item()
    assert error <= 2 * stock_error + torch.finfo(dtype).eps * exact.abs().max().item()
