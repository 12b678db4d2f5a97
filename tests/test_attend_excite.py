"""Attend-and-Excite and HRV-guided Attend-and-Excite against their originals on a tiny
random-weight Stable Diffusion pipeline: diffusers' StableDiffusionAttendAndExcitePipeline
(materialising) and a replay of HRV's attend_and_excite_hrv.py (tests/excite_replay.py).
Tolerances: the original run in fp32 and in fp64 from the same noise; attnctl's fp32 result
may be at most a few times as far from the fp64 run as the fp32 original is."""
from __future__ import annotations

import copy
import functools

import pytest
import torch

import attnctl

from attnctl.diffusers.offline import tiny_sd_pipeline, tiny_sdxl_pipeline
from attnctl.diffusers.install import installation_of
from attnctl.tools.attend_excite import (ATTEND_EXCITE_SMOOTHING, Smoothing, attend_and_excite,
                                         hrv_attend_and_excite, max_attention_per_token)
from attnctl.tools.excite_maps import HRVMaps, MeanMaps, gaussian_blur
from attnctl.tools.hrv import HeadRelevance
from attnctl.tools.hrv_official import cross_attention_layers

from control_reference import assert_within_reference_error, initial_noise
from excite_replay import (AttentionStoreHead, GaussianSmoothingHRV, hrv_pipeline, register_attention_control,
                           sdxl_port_replay, torchvision_gaussian_blur)

SIZE = 32   # images 32², latent 16²: cross-attention maps at 16² (and the mid block's 8²)
PROMPTS = ["a cat and a dog", "red car"]
TOKENS = [[4, 11], [3]]   # "t</w>", "g</w>" (the character tokenizer splits every word); "d</w>"


@functools.lru_cache(maxsize=None)
def pipes():
    pipe = tiny_sd_pipeline()
    return pipe, copy.deepcopy(pipe).to(torch.float64)


REFINEMENTS = 2  # the refinement's cap (20 in the original) kept small for CPU time


def diffusers_attend_excite(pipe, max_refinement_steps=REFINEMENTS):
    from diffusers import StableDiffusionAttendAndExcitePipeline

    components = {k: v for k, v in pipe.components.items() if k != "image_encoder"}
    original = StableDiffusionAttendAndExcitePipeline(**components, requires_safety_checker=False)
    original.set_progress_bar_config(disable=True)
    return with_refinement_cap(original, max_refinement_steps)


def with_refinement_cap(original, max_refinement_steps):
    """The original pipeline with its refinement's max_refinement_steps (a keyword of
    _perform_iterative_refinement_step that __call__ leaves at 20) set."""
    original._perform_iterative_refinement_step = functools.partial(
        original._perform_iterative_refinement_step, max_refinement_steps=max_refinement_steps)
    return original


def test_smoothing_kernels_are_the_originals():
    from diffusers.pipelines.deprecated.stable_diffusion_attend_and_excite.pipeline_stable_diffusion_attend_and_excite \
        import GaussianSmoothing

    assert torch.equal(ATTEND_EXCITE_SMOOTHING.kernel(), GaussianSmoothing().weight[0, 0])
    assert torch.equal(Smoothing(form="gaussian", kernel_size=5, sigma=1.1).kernel(),
                       GaussianSmoothingHRV(1, 5, 1.1).weight[0, 0])
    x = torch.rand(3, 7, 16, 16, dtype=torch.float64)
    torch.testing.assert_close(gaussian_blur(x, 9, 1.7), torchvision_gaussian_blur(x, (9, 9), (1.7, 1.7)),
                               rtol=1e-12, atol=1e-14)


def test_loss_inputs_are_checked():
    maps = torch.rand(1, 4, 4, 10)
    with pytest.raises(ValueError, match="token_indices: expected text positions in \\[1, 10\\]"):
        max_attention_per_token(maps, [0, 3])
    with pytest.raises(ValueError, match="maps: expected 1 or 2"):
        max_attention_per_token(torch.rand(3, 4, 4, 10), [1, 2])
    with pytest.raises(TypeError, match="token_indices: expected a list of ints"):
        attend_and_excite(pipes()[0], "a cat", "2")
    with pytest.raises(ValueError, match="token_indices: expected one list per prompt \\(2\\)"):
        attend_and_excite(pipes()[0], PROMPTS, [[2]])
    assert installation_of(pipes()[0]) is None


def test_matches_diffusers_pipeline_with_cfg_and_batch():
    """Two prompts, two images each, CFG, the original's defaults but the refinement's cap
    (step 0 refines with threshold 0.05); 2 steps."""
    pipe, pipe64 = pipes()
    kw = dict(height=SIZE, width=SIZE, num_inference_steps=2, num_images_per_prompt=2, output_type="latent")
    noise = initial_noise(pipe, 4, SIZE, SIZE)
    got = attend_and_excite(pipe, PROMPTS, TOKENS, latents=noise, max_refinement_steps=REFINEMENTS, **kw)
    single = diffusers_attend_excite(pipe)(PROMPTS, token_indices=TOKENS, latents=noise, **kw).images
    exact = diffusers_attend_excite(pipe64)(PROMPTS, token_indices=TOKENS, latents=noise.double(), **kw).images
    assert_within_reference_error(got.latents, single, exact)
    # The updates are real: without them the latents are far from these.
    plain = diffusers_attend_excite(pipe)(PROMPTS, token_indices=TOKENS, latents=noise, max_iter_to_alter=0,
                                          thresholds={}, **kw).images
    assert (plain - single).abs().max() > 100 * (single - exact.float()).abs().max()
    assert len(got.losses) == 2 and all(len(step) == 4 and all(0 < v < 1 for v in step) for step in got.losses)
    assert installation_of(pipe) is None


def test_loss_forwards_end_after_the_last_map_layer():
    """With the mid block's 8² maps the loss forwards stop there: the up blocks run only in
    the denoising forwards (one per step), and the result is still the original's, which
    runs the whole UNet and drops its output."""
    pipe, pipe64 = pipes()
    kw = dict(height=SIZE, width=SIZE, num_inference_steps=2, output_type="latent", attn_res=(8, 8))
    noise = initial_noise(pipe, 1, SIZE, SIZE)
    runs = {"mid": 0, "up": 0}
    blocks = {"mid": pipe.unet.mid_block.resnets[0], "up": pipe.unet.up_blocks[0]}   # before / after the map layer
    hooks = [blocks[name].register_forward_hook(lambda *a, name=name: runs.__setitem__(name, runs[name] + 1))
             for name in runs]
    try:
        got = attend_and_excite(pipe, PROMPTS[:1], TOKENS[0], latents=noise, max_refinement_steps=REFINEMENTS, **kw)
    finally:
        for hook in hooks:
            hook.remove()
    steps = 2
    assert runs["mid"] >= 2 * steps and runs["up"] == steps     # loss forwards reach the mid block, no further
    single = diffusers_attend_excite(pipe)(PROMPTS[:1], token_indices=TOKENS[0], latents=noise, **kw).images
    exact = diffusers_attend_excite(pipe64)(PROMPTS[:1], token_indices=TOKENS[0], latents=noise.double(), **kw).images
    assert_within_reference_error(got.latents, single, exact)


def test_triton_backend_matches_diffusers_pipeline():
    """The Triton path (interpreter on CPU: attention_with_maps' fused backward, the op's
    differentiable attention elsewhere); one prompt, 16² images (maps at the latent's 8²),
    two steps, the second refining once."""
    pipe, pipe64 = pipes()
    kw = dict(height=16, width=16, num_inference_steps=2, output_type="latent", thresholds={1: 0.5},
              attn_res=(8, 8))
    noise = initial_noise(pipe, 1, 16, 16, seed=3)
    got = attend_and_excite(pipe, PROMPTS[0], TOKENS[0], latents=noise, max_refinement_steps=1, backend="triton", **kw)

    def original(target, latents):
        return diffusers_attend_excite(target, 1)(PROMPTS[0], token_indices=TOKENS[0], latents=latents, **kw).images

    assert_within_reference_error(got.latents, original(pipe, noise), original(pipe64, noise.double()))


def _hrv(pipe, concepts=("Animals", "Colors", "Vehicles")):
    layers = cross_attention_layers(pipe.unet)
    total = sum(h for _, h in layers)
    vectors = torch.rand(len(concepts), total, generator=torch.Generator().manual_seed(1))
    return HeadRelevance(concepts=list(concepts), layers=layers, hrv=vectors * total / vectors.sum(1, keepdim=True),
                         counts=None)


def _replay_store(hrv, concepts, tmp_path, attention_res):
    """The original's store, reading the HRV from the official files as the original does."""
    import numpy as np

    hrv.save_official(str(tmp_path / "vectors.npy"), str(tmp_path / "heads.npy"))
    return AttentionStoreHead(concepts, hrv.concepts, np.load(tmp_path / "vectors.npy"),
                              np.load(tmp_path / "heads.npy"), attention_res)


@pytest.mark.parametrize("attention_res", [8, 32])
def test_hrv_maps_match_the_original_store(tmp_path, attention_res):
    """One forward with gradients: HRVMaps (per-head fused maps, weighted, resized) against
    the original's AttentionStoreHead in fp32 and fp64 (8²: blur + bicubic down from 16²;
    32²: bicubic up)."""
    from attnctl import install

    pipe, pipe64 = pipes()
    hrv, concepts = _hrv(pipe), ["Colors", "Animals"]
    latent, text, t = torch.randn(1, 4, 16, 16), torch.randn(1, 77, 32), torch.tensor(500)
    maps = HRVMaps(hrv, concepts, attention_res=attention_res, head_divisor=128)
    with install(pipe, maps):
        pipe.unet(latent.clone().requires_grad_(True), t, encoder_hidden_states=text)
        got = maps.maps()

    def original(target, dtype):
        store = _replay_store(hrv, concepts, tmp_path, attention_res)
        originals = register_attention_control(target.unet, store)
        try:
            with torch.no_grad():
                target.unet(latent.to(dtype), t, encoder_hidden_states=text.to(dtype))
        finally:
            for module, forward in originals.items():
                module.forward = forward
        return torch.stack(store.averaged_maps)[..., 1:]

    single = original(pipe, torch.float32)
    assert got.shape == single.shape == (2, attention_res, attention_res, 76)
    assert_within_reference_error(got, single, original(pipe64, torch.float64))


def test_mean_maps_match_the_original_store():
    """MeanMaps against diffusers' AttentionStore.aggregate_attention after one forward,
    fp32 and fp64."""
    from diffusers.pipelines.deprecated.stable_diffusion_attend_and_excite.pipeline_stable_diffusion_attend_and_excite \
        import AttentionStore

    from attnctl import install

    pipe, pipe64 = pipes()
    latent, text = torch.randn(1, 4, 16, 16), torch.randn(1, 77, 32)
    maps = MeanMaps((16, 16))
    with install(pipe, maps):
        pipe.unet(latent.clone().requires_grad_(True), 400, encoder_hidden_states=text)
        got = maps.maps()

    def original(target, dtype):
        run = diffusers_attend_excite(target)
        run.attention_store = AttentionStore((16, 16))
        saved = target.unet.attn_processors
        run.register_attention_control()
        try:
            with torch.enable_grad():
                target.unet(latent.to(dtype).requires_grad_(True), 400, encoder_hidden_states=text.to(dtype))
        finally:
            target.unet.set_attn_processor(saved)
        return run.attention_store.aggregate_attention(("up", "down", "mid"))[None, ..., 1:-1]

    assert_within_reference_error(got, original(pipe, torch.float32), original(pipe64, torch.float64))


def test_hrv_attend_excite_matches_the_original(tmp_path):
    """The whole HRV-guided loop (one prompt, CFG, 3 steps, step-0 refinement) against the
    original's replay, fp32 and fp64."""
    pipe, pipe64 = pipes()
    hrv, concepts = _hrv(pipe), ["Animals", "Animals"]
    kw = dict(height=SIZE, width=SIZE, num_inference_steps=3, output_type="latent")
    noise = initial_noise(pipe, 1, SIZE, SIZE, seed=5)
    got = hrv_attend_and_excite(pipe, PROMPTS[0], TOKENS[0], hrv, concepts, head_divisor=128, latents=noise,
                                max_refinement_steps=REFINEMENTS, **kw)

    def original(target, latents):
        store = _replay_store(hrv, concepts, tmp_path, 8)
        replay = with_refinement_cap(hrv_pipeline(target, store), REFINEMENTS)
        originals = register_attention_control(target.unet, store)
        try:
            return replay(PROMPTS[0], token_indices=TOKENS[0], latents=latents, **kw).images
        finally:
            for module, forward in originals.items():
                module.forward = forward

    single = original(pipe, noise)
    exact = original(pipe64, noise.double())
    assert_within_reference_error(got.latents, single, exact)
    assert all(v > 0 for step in got.losses for v in step)  # every step updated the latent
    plain = attend_and_excite(pipe, PROMPTS[0], TOKENS[0], latents=noise, max_iter_to_alter=0, thresholds={}, **kw)
    assert (plain.latents - single).abs().max() > 100 * (single - exact.float()).abs().max()


def test_compose_refuses_maps_with_captures_or_injection():
    from attnctl.diffusers.compose import compose
    from attnctl.diffusers.controller import MapsRequest, Plan

    request = MapsRequest(torch.arange(1, 4), lambda maps: None)
    with pytest.raises(ValueError, match="compose: maps: expected at most one"):
        compose([Plan(maps=request), Plan(maps=request)], (1, 2, 16, 8), torch.device("cpu"))
    with pytest.raises(ValueError, match="cannot be combined with \\['source'\\]"):
        compose([Plan(maps=request), Plan(source=torch.zeros(1, dtype=torch.long))], (1, 2, 16, 8),
                torch.device("cpu"))
    bias = torch.ones(1, 1, 1, 8)
    plan, route = compose([Plan(maps=request), Plan(bias=bias), Plan(prob_mult=bias)], (1, 2, 16, 8),
                          torch.device("cpu"))
    assert plan.maps is request and plan.bias is bias and plan.prob_mult is bias and route is None


def test_hrv_maps_refuse_mismatched_tokens():
    pipe, _ = pipes()
    with pytest.raises(ValueError, match="one index per concept"):
        hrv_attend_and_excite(pipe, PROMPTS[0], [4], _hrv(pipe), ["Animals", "Colors"], num_inference_steps=1)
    with pytest.raises(ValueError, match="concept: expected one of"):
        HRVMaps(_hrv(pipe), ["Furniture"])


def test_sdxl_matches_the_port_replay():
    """A tiny SDXL-architecture pipeline (two text encoders, pooled text and time ids):
    maps at the 8² level of a 16² latent (the port reads the 32² level of SDXL's 128²),
    one prompt, CFG, 2 steps with a step-0 refinement, against a replay of the A&E-SDXL
    port (materialising)."""
    pipe = tiny_sdxl_pipeline()
    pipe64 = copy.deepcopy(pipe).to(torch.float64)
    kw = dict(height=SIZE, width=SIZE, num_inference_steps=2)
    noise = initial_noise(pipe, 1, SIZE, SIZE, seed=7)
    got = attend_and_excite(pipe, PROMPTS[0], TOKENS[0], latents=noise, attn_res=(8, 8),
                            max_refinement_steps=REFINEMENTS, output_type="latent", **kw)
    single = sdxl_port_replay(pipe, PROMPTS[0], TOKENS[0], noise, attention_res=8,
                              max_refinement_steps=REFINEMENTS, **kw)
    exact = sdxl_port_replay(pipe64, PROMPTS[0], TOKENS[0], noise.double(), attention_res=8,
                             max_refinement_steps=REFINEMENTS, **kw)
    assert_within_reference_error(got.latents, single, exact)
    assert all(v > 0 for step in got.losses for v in step)  # every step updated the latent
    plain = attend_and_excite(pipe, PROMPTS[0], TOKENS[0], latents=noise, attn_res=(8, 8), max_iter_to_alter=0,
                              thresholds={}, output_type="latent", **kw)
    assert (plain.latents - single).abs().max() > 10 * (single - exact.float()).abs().max()


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_attention_with_maps_per_head(backend):
    """per_head=True: the unweighted (B, H, M, T) maps, P at the token columns, and their
    gradients into q and k, against materialised maps in fp32 and fp64."""
    B, H, M, N, D = 1, 2, 19, 77, 16
    q, k, v = (torch.randn(B, H, n, D, requires_grad=True) for n in (M, N, N))
    tokens = torch.tensor([1, 5, 76])
    upstream = torch.randn(B, H, M, 3)

    def materialised(dtype):
        qq, kk = q.to(dtype), k.to(dtype)
        probs = torch.softmax((qq @ kk.transpose(-1, -2)) * D ** -0.5, dim=-1)[..., tokens]
        return (probs, *torch.autograd.grad((probs * upstream.to(dtype)).sum(), [q, k]))

    out, maps = attnctl.attention_with_maps(q, k, v, tokens, per_head=True, backend=backend)
    assert maps.shape == (B, H, M, 3) and maps.dtype == torch.float32
    got = (maps, *torch.autograd.grad((maps * upstream).sum(), [q, k]))
    for g, single, exact in zip(got, materialised(torch.float32), materialised(torch.float64)):
        assert_within_reference_error(g, single, exact)
    with pytest.raises(ValueError, match="head_weights: expected None with per_head=True"):
        attnctl.attention_with_maps(q, k, v, tokens, per_head=True, head_weights=torch.ones(H))
