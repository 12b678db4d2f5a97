"""attnctl.trace's options beyond DAAM's defaults (every layer and key column, maps at the
latent grid of any aspect ratio, heads summed in the kernel, steps, batches) against an
independent materialising reference. test_trace_daam.py holds the defaults against DAAM."""
import pytest
import torch

import attnctl
from attnctl import TraceMaps
from diffusion_helpers import LATENT, daam_heat_map, generate, materialised_probs, sd_pipe, sdxl_pipe

PROMPTS = ["a cat sitting on a car", "a red dog"]
TOL = dict(rtol=1e-4, atol=1e-6)
# Every cross-attention layer and key column, as the reference keeps them.
EVERY = dict(layers="*", tokens="all")
LATENT_GRID = dict(size="latent")


def trace_every(pipe, **options):
    return attnctl.trace(pipe, **{**EVERY, **options})


@pytest.fixture(scope="module")
def reference():
    """Σ_steps P per cross-attention layer (all rows) for PROMPTS, CFG, 2 images per prompt."""
    store, images = materialised_probs(sd_pipe(), PROMPTS, num_images_per_prompt=2)
    return store, images


@pytest.fixture(scope="module")
def traced():
    """One traced generation per mode, shared by the tests that read it."""
    pipe = sd_pipe()
    results = {}
    for name, options in {"summed": dict(per_head=False), "per_head": dict(uncond=True),
                          "per_step": dict(per_step=True, per_head=False)}.items():
        with trace_every(pipe, backend="torch", **options) as tc:
            images = generate(pipe, PROMPTS, num_images_per_prompt=2)
        results[name] = (tc, images)
    return results


def test_images_and_maps_match_the_materialising_reference(reference, traced):
    store, ref_images = reference
    tc, images = traced["per_head"]
    torch.testing.assert_close(images, ref_images, rtol=1e-5, atol=1e-5)  # tracing changes nothing
    maps = tc.maps()
    assert maps.layout.rows == 8 and maps.layout.cfg and maps.layout.images == 4
    for image in range(4):
        expected = daam_heat_map(store, row=4 + image)  # cond half: rows 4..7
        torch.testing.assert_close(tc.heat_map(image, **LATENT_GRID).value, expected, **TOL)
    # The unconditional half on request.
    torch.testing.assert_close(tc.heat_map(1, half="uncond", **LATENT_GRID).value, daam_heat_map(store, row=1),
                               **TOL)


def test_default_trace_captures_the_cond_half_only(traced):
    """Capture.rows = the cond half: the uncond rows are never written, and asking for
    them is an error naming the option that keeps them."""
    tc, _ = traced["summed"]
    for layer in tc.maps().layers:
        for buffers in (layer.maps, layer.token_mass):
            for buf in buffers.values():
                assert not buf[:4].any() and buf[4:].any()
    with pytest.raises(ValueError, match=r"'uncond' was not captured; trace with uncond=True"):
        tc.heat_map(0, half="uncond", **LATENT_GRID)


def test_summed_mode_sums_heads_in_kernel(reference, traced):
    store, _ = reference
    tc, _ = traced["summed"]
    for image in (0, 3):
        expected = daam_heat_map(store, row=4 + image, clamp_each_head=False)
        torch.testing.assert_close(tc.heat_map(image, **LATENT_GRID).value, expected, **TOL)


def test_word_maps_merge_sub_tokens_of_the_images_prompt(reference, traced):
    store, _ = reference
    tc, _ = traced["per_head"]
    # The offline tokenizer spells every character: "cat" is tokens 2..4 (after BOS, "a").
    cat = tc.word_heat_map("cat", image=1, **LATENT_GRID)
    expected = daam_heat_map(store, row=5)[[2, 3, 4]].mean(0)
    torch.testing.assert_close(cat.value, expected, **TOL)
    # Image 2 is the second prompt's first image: "a red dog" -> "dog" is tokens 5..7.
    dog = tc.heat_map(2, **LATENT_GRID).word("dog")
    torch.testing.assert_close(dog.value, daam_heat_map(store, row=6)[[5, 6, 7]].mean(0), **TOL)
    # Second occurrence of the whole word "a" and an explicit token index.
    a2 = tc.heat_map(0, **LATENT_GRID).word("a", occurrence=1, match="words")
    torch.testing.assert_close(a2.value, daam_heat_map(store, row=4)[14], **TOL)
    torch.testing.assert_close(tc.heat_map(0, **LATENT_GRID).token([2, 3]).value,
                               daam_heat_map(store, row=4)[[2, 3]].mean(0), **TOL)
    assert [w for w, _ in tc.heat_map(0, **LATENT_GRID).words()] == ["a", "cat", "sitting", "on", "car"]


def test_filters_by_layer_resolution_and_head(reference, traced):
    store, _ = reference
    tc, _ = traced["per_head"]
    up = [n for n in store if n.startswith("up_blocks")]
    torch.testing.assert_close(tc.heat_map(0, layers="up_blocks.*", **LATENT_GRID).value,
                               daam_heat_map(store, row=4, layers=up), **TOL)
    mid = [n for n in store if n.startswith("mid_block")]
    torch.testing.assert_close(tc.heat_map(0, resolutions=[2], **LATENT_GRID).value,
                               daam_heat_map(store, row=4, layers=mid), **TOL)
    torch.testing.assert_close(tc.heat_map(0, resolutions=[(8, 12)], **LATENT_GRID).value,
                               daam_heat_map(store, row=4, layers=mid), **TOL)
    torch.testing.assert_close(tc.heat_map(0, heads=[1], **LATENT_GRID).value,
                               daam_heat_map(store, row=4, heads=[1]), **TOL)


def test_capture_time_filters_restrict_what_is_captured(reference):
    store, _ = reference
    pipe = sd_pipe()
    with trace_every(pipe, backend="torch", layers="down_blocks", heads=[0], per_head=False) as tc:
        generate(pipe, PROMPTS, num_images_per_prompt=2)
    maps = tc.maps()
    assert [l.name for l in maps.layers] == ["down_blocks.0.attentions.0.transformer_blocks.0.attn2"]
    down = [l.name for l in maps.layers]
    torch.testing.assert_close(tc.heat_map(3, **LATENT_GRID).value,
                               daam_heat_map(store, row=7, layers=down, heads=[0], clamp_each_head=False), **TOL)


def test_per_step_maps_sum_to_the_whole_and_select_steps(traced):
    tc, _ = traced["per_step"]
    whole, _ = traced["summed"]
    maps = tc.maps()
    assert maps.steps == [0, 1] and maps.steps_run == 2
    for layer, full in zip(maps.layers, whole.maps().layers):
        torch.testing.assert_close(layer.maps[0] + layer.maps[1], full.maps[-1], **TOL)
    only_first = tc.heat_map(0, steps=[0], **LATENT_GRID).value
    assert not torch.allclose(only_first, tc.heat_map(0, steps=1, **LATENT_GRID).value)
    with trace_every(sd_pipe(), backend="torch", steps=[0], per_head=False) as first:
        generate(sd_pipe(), PROMPTS, num_images_per_prompt=2)
    torch.testing.assert_close(first.heat_map(0, **LATENT_GRID).value, only_first, **TOL)



def test_steps_beyond_the_run_are_refused_before_the_first_step():
    pipe = sd_pipe()
    unet_calls = []
    hook = pipe.unet.register_forward_hook(lambda *_: unet_calls.append(1))
    try:
        with trace_every(pipe, backend="torch", steps=[1, 10]) as tc:
            with pytest.raises(ValueError, match=r"steps: expected denoising step indices below 3 \(this call "
                                                 r"runs 3 steps: 0-2\), got \[10\]"):
                generate(pipe, "a cat", steps=3)
            assert unet_calls == []
            generate(pipe, "a cat", steps=11)   # the same trace, a run that reaches step 10
        assert tc.maps().steps_run == 11 and len(unet_calls) == 11
    finally:
        hook.remove()

def test_token_mass_per_head_per_layer(reference, traced):
    store, _ = reference
    tc, _ = traced["summed"]
    mass = tc.maps().token_mass(2)
    assert mass.keys() == store.keys()
    for name, probs in store.items():
        torch.testing.assert_close(mass[name], probs[6].sum(1), **TOL)


def test_save_load_round_trip_answers_the_same_queries(traced, tmp_path):
    for mode in ("per_head", "per_step"):
        tc, _ = traced[mode]
        path = tmp_path / f"{mode}.safetensors"
        tc.save(str(path))
        loaded = TraceMaps.load(str(path))
        assert loaded.layout == tc.maps().layout and loaded.latent == LATENT
        torch.testing.assert_close(loaded.heat_map(2, **LATENT_GRID).word("dog").value,
                                   tc.heat_map(2, **LATENT_GRID).word("dog").value)
        assert loaded.image_size == (32, 48) and loaded.steps == tc.maps().steps



def test_a_corrupt_or_truncated_trace_file_is_named_with_what_is_wrong(traced, tmp_path):
    tc, _ = traced["summed"]
    path = tmp_path / "trace.safetensors"
    tc.save(str(path))
    data = path.read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"path: .*cut.safetensors is not a complete attnctl trace: truncated or "
                                         r"damaged safetensors data"):
        TraceMaps.load(str(cut))
    empty = tmp_path / "empty.safetensors"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match=r"empty.safetensors is not a complete attnctl trace"):
        TraceMaps.load(str(empty))
    from safetensors.torch import save_file

    foreign = tmp_path / "foreign.safetensors"
    save_file({"weight": torch.zeros(2)}, str(foreign), metadata={"attnctl": '{"format": "attnctl-trace/1"'})
    with pytest.raises(ValueError, match=r"foreign.safetensors is not a complete attnctl trace: its attnctl header "
                                         r"is not JSON"):
        TraceMaps.load(str(foreign))
    with pytest.raises(ValueError, match=r"expected a trace file .* got '.*missing.safetensors' \(no such file\)"):
        TraceMaps.load(str(tmp_path / "missing.safetensors"))

def test_overlay_pngs_and_upsampling_to_image_size(traced, tmp_path):
    tc, images = traced["summed"]
    hm = tc.word_heat_map("cat", **LATENT_GRID)
    assert hm.upsample((32, 48)).value.shape == (32, 48) and hm.upsample((32, 48)).value.min() >= 0
    hm.plot(images[0], str(tmp_path / "cat.png"))
    from attnctl.tools.plot import overlay_grid
    overlay_grid([m for _, m in tc.heat_map(0, **LATENT_GRID).words()], images[0],
                 path=str(tmp_path / "all.png"))
    for name in ("cat.png", "all.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_no_cfg_non_square_batch_with_each_backend(backend):
    pipe = sd_pipe()
    # A 16 x 24 image (latent 8 x 12) keeps the interpreted Triton kernel quick.
    size = dict(height=16, width=24, guidance_scale=1.0)
    store, _ = materialised_probs(pipe, PROMPTS, **size)
    # Triton runs the default capture (maps summed over heads by atomics); the other
    # tests cover per-head maps with the reference backend.
    per_head = backend == "torch"
    with trace_every(pipe, backend=backend, per_head=per_head) as tc:
        generate(pipe, PROMPTS, **size)
    maps = tc.maps()
    assert not maps.layout.cfg and maps.layout.rows == 2 and maps.latent == (8, 12)
    for image in (0, 1):
        expected = daam_heat_map(store, row=image, latent=(8, 12), clamp_each_head=per_head)
        torch.testing.assert_close(tc.heat_map(image, **LATENT_GRID).value, expected, **TOL)
    with pytest.raises(ValueError, match="without classifier-free guidance"):
        tc.heat_map(0, half="uncond", **LATENT_GRID)


def test_sdxl_two_text_encoders_and_added_conditions():
    pipe = sdxl_pipe()
    store, _ = materialised_probs(pipe, "a blue bird", steps=1)
    with trace_every(pipe, backend="torch", per_head=False) as tc:
        generate(pipe, "a blue bird", steps=1)
    maps = tc.maps()
    assert len(maps.layers) == 8 and {l.heads for l in maps.layers} == {4}
    expected = daam_heat_map(store, row=1, clamp_each_head=False)
    torch.testing.assert_close(tc.heat_map(**LATENT_GRID).value, expected, **TOL)
    torch.testing.assert_close(tc.word_heat_map("bird", **LATENT_GRID).value, expected[[6, 7, 8, 9]].mean(0),
                               **TOL)


def test_any_text_length_and_prompt_embeds_without_text():
    pipe = sd_pipe()
    long = torch.randn(1, 154, 32)  # two 77-token chunks, as long-prompt helpers build
    store, _ = materialised_probs(pipe, None, prompt_embeds=long, negative_prompt_embeds=torch.zeros_like(long))
    with trace_every(pipe, backend="torch", per_head=False) as tc:
        generate(pipe, None, prompt_embeds=long, negative_prompt_embeds=torch.zeros_like(long))
    hm = tc.heat_map(**LATENT_GRID)
    assert hm.value.shape == (154, *LATENT)
    torch.testing.assert_close(hm.token(120).value, daam_heat_map(store, row=1, clamp_each_head=False)[120], **TOL)
    with pytest.raises(ValueError, match="prompt text is unknown"):
        hm.word("cat")
    assert tc.heat_map(prompt="a cat", **LATENT_GRID).word("cat").value.shape == LATENT


def test_bad_input_gets_clear_errors(traced):
    tc, _ = traced["summed"]
    with pytest.raises(ValueError, match=r"word: 'zebra' is not in the prompt 'a cat sitting on a car'"):
        tc.word_heat_map("zebra", **LATENT_GRID)
    with pytest.raises(ValueError, match="occurrence: 'cat' appears 1 time"):
        tc.word_heat_map("cat", occurrence=1, **LATENT_GRID)
    with pytest.raises(ValueError, match=r"layers: \['nothing'\] match none of the 4 cross-attention layers"):
        tc.heat_map(layers="nothing", **LATENT_GRID)
    with pytest.raises(ValueError, match="resolutions: \\[8\\] match no traced layer"):
        tc.heat_map(resolutions=[8], **LATENT_GRID)
    with pytest.raises(ValueError, match="heads: this trace summed its heads"):
        tc.heat_map(heads=[0], **LATENT_GRID)
    with pytest.raises(IndexError, match=r"image: expected an index in \[0, 4\), got 4"):
        tc.heat_map(4, **LATENT_GRID)
    with pytest.raises(ValueError, match=r"index: expected token indices in \[0, 77\)"):
        tc.heat_map(**LATENT_GRID).token(77)

    pipe = sd_pipe()
    with pytest.raises(ValueError, match=r"layers: \['up_blocks.9'\] match none"):
        with attnctl.trace(pipe, layers="up_blocks.9"):
            pass
    assert attnctl.diffusers.installation_of(pipe) is None  # a failed trace leaves nothing behind
    with attnctl.trace(pipe) as early:
        with pytest.raises(RuntimeError, match="no generation has run inside this trace yet"):
            early.heat_map(**LATENT_GRID)
    with pytest.raises(TypeError, match="UNet2DConditionModel"):
        attnctl.trace(object()).__enter__()


def test_trace_composes_with_another_capturing_controller(reference):
    store, _ = reference
    pipe = sd_pipe()
    name = "up_blocks.1.attentions.1.transformer_blocks.0.attn2"

    class TokenMass(attnctl.Controller):
        def __init__(self):
            self.capture = None

        def plan(self, call):
            if call.layer != name:
                return None
            if self.capture is None:
                self.capture = attnctl.Capture(token_mass=torch.zeros(call.batch, call.heads, call.keys))
            return attnctl.Plan(capture=self.capture)

    other = TokenMass()
    with attnctl.install(pipe, other, backend="torch"), trace_every(pipe) as tc:
        generate(pipe, PROMPTS, num_images_per_prompt=2)
    assert attnctl.diffusers.installation_of(pipe) is None
    torch.testing.assert_close(other.capture.token_mass, store[name].sum(2), **TOL)
    torch.testing.assert_close(tc.heat_map(0, **LATENT_GRID).value, daam_heat_map(store, row=4), **TOL)
