"""Shared by the diffusers/trace tests: cached tiny pipelines, a seeded generation, and an
independent materialising reference that follows DAAM (no attnctl code involved)."""
from __future__ import annotations

import contextlib
import functools
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import attnctl
from attnctl.diffusers.offline import tiny_sd_pipeline, tiny_sdxl_pipeline

HEIGHT, WIDTH = 32, 48   # images; the VAE halves them, so the latent is 16 x 24 (non-square)
LATENT = (HEIGHT // 2, WIDTH // 2)
EPS32 = torch.finfo(torch.float32).eps
PUBLISHED_CONFIGS = Path(__file__).resolve().parents[1] / ".." / "shared" / "configs"


@functools.lru_cache(maxsize=None)
def sd_pipe():
    return tiny_sd_pipeline()


@functools.lru_cache(maxsize=None)
def sdxl_pipe():
    return tiny_sdxl_pipeline()


def generate(pipe, prompt, *, steps=2, height=HEIGHT, width=WIDTH, seed=0, **kwargs):
    """Images as a (B, 3, H, W) tensor; the same seed gives the same latents."""
    generator = torch.Generator().manual_seed(seed)
    return pipe(prompt, num_inference_steps=steps, height=height, width=width, generator=generator,
                output_type="pt", **kwargs).images


class MaterialisingProcessor:
    """diffusers' classic attention (explicit softmax(QKᵀ) through attn.get_attention_scores),
    adding every cross-attention call's P (B, H, M, N) into ``store[layer]``."""

    def __init__(self, layer, store):
        self.layer = layer
        self.store = store

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None):
        assert hidden_states.ndim == 3 and attention_mask is None and attn.group_norm is None
        is_cross = encoder_hidden_states is not None
        context = encoder_hidden_states if is_cross else hidden_states
        B, M, _ = hidden_states.shape
        q = attn.head_to_batch_dim(attn.to_q(hidden_states))
        k = attn.head_to_batch_dim(attn.to_k(context))
        v = attn.head_to_batch_dim(attn.to_v(context))
        probs = attn.get_attention_scores(q, k, None)  # (B*H, M, N)
        if is_cross:
            p = probs.detach().float().view(B, attn.heads, M, -1)
            self.store[self.layer] = self.store.get(self.layer, 0) + p
        out = attn.batch_to_head_dim(torch.bmm(probs, v))
        out = attn.to_out[1](attn.to_out[0](out))
        if attn.residual_connection:
            out = out + hidden_states
        return out / attn.rescale_output_factor


def materialised_probs(pipe, prompt, **kwargs):
    """Run a generation with MaterialisingProcessor on every layer; {layer: Σ_steps P}."""
    unet = pipe.unet
    original = unet.attn_processors
    store = {}
    unet.set_attn_processor({name: MaterialisingProcessor(name.rsplit(".", 1)[0], store)
                             for name in original})
    try:
        images = generate(pipe, prompt, **kwargs)
    finally:
        unet.set_attn_processor(dict(original))
    return store, images


def grid_of(queries, latent=LATENT):
    """(h, w) of a layer with ``queries`` positions, for latents whose sides halve evenly."""
    for factor in (1, 2, 4, 8):
        h, w = latent[0] // factor, latent[1] // factor
        if h * w == queries:
            return h, w
    raise AssertionError(f"no grid for {queries} queries in latent {latent}")


def daam_heat_map(store, row, *, latent=LATENT, layers=None, heads=None, clamp_each_head=True):
    """DAAM's global heat map (N, h, w) of batch row ``row``: each layer/head map (summed
    over steps) upsampled bicubically to the latent grid, clamped at 0, then averaged.

    ``clamp_each_head=False`` sums the heads of a layer before upsampling and clamping,
    counting each layer as its number of heads (attnctl's default, heads summed in-kernel).
    """
    total, count = 0, 0
    for name, probs in store.items():
        if layers is not None and name not in layers:
            continue
        p = probs[row]                              # (H, M, N)
        if heads is not None:
            p = p[heads]
        H, M, N = p.shape
        h, w = grid_of(M, latent)
        maps = p.permute(0, 2, 1).reshape(H, N, h, w)
        if clamp_each_head:
            for head in range(H):
                total = total + F.interpolate(maps[head:head + 1], size=latent, mode="bicubic").clamp(min=0)[0]
        else:
            total = total + F.interpolate(maps.sum(0, keepdim=True), size=latent, mode="bicubic").clamp(min=0)[0]
        count += H
    return total / count


@contextlib.contextmanager
def weights_in(pipe, dtype):
    """``pipe`` cast to ``dtype`` for the block, back in fp32 after it."""
    pipe.to(dtype)
    try:
        yield pipe
    finally:
        pipe.to(torch.float32)


def reference_tolerance(single, exact) -> float:
    """The tolerance against ``exact``, a reference run in fp64: twice the distance of the
    same reference run in fp32 (``single``) from it, plus a few fp32 ulp of its largest
    value."""
    return 2 * (single.double() - exact).abs().max().item() + 8 * EPS32 * exact.abs().max().item()


def stock_and_tolerance(pipe, generate):
    """(stock fp32 output, the tolerance of an fp32 attention against it): twice stock's own
    fp32 error (``generate(pipe)`` against the same pipeline, or model, run in fp64) plus a
    few ulp of the output's scale."""
    fp32 = generate(pipe)
    with weights_in(pipe, torch.float64):
        fp64 = generate(pipe)
    own_error = (fp32.double() - fp64).abs().max().item()
    return fp32, 2 * own_error + 8 * EPS32 * fp32.abs().max().item()


def stock_with_tolerance(pipes: dict, generate) -> dict:
    """{name: stock_and_tolerance(pipe, generate)} for each of ``pipes``."""
    return {name: stock_and_tolerance(pipe, generate) for name, pipe in pipes.items()}


def assert_installed_equals_stock(pipe, generate, stock, backend):
    """attnctl installed on every attention layer of ``pipe.transformer`` (no controller,
    ``backend``) gives stock's output within its tolerance (``stock``: from
    stock_and_tolerance); uninstalling puts the very processor objects back and leaves no
    wrapper on the pipeline."""
    expected, atol = stock
    original = dict(pipe.transformer.attn_processors)
    with attnctl.install(pipe, backend=backend) as installation:
        assert set(installation.layers) == {n[: -len(".processor")] for n in original}
        got = generate(pipe)
    assert attnctl.last_dispatch().backend == backend
    torch.testing.assert_close(got, expected, rtol=0, atol=atol)
    restored = pipe.transformer.attn_processors
    assert restored.keys() == original.keys() and all(restored[k] is v for k, v in original.items())
    assert "encode_prompt" not in pipe.__dict__


def traced_unchanged(pipe, generate, stock, backend):
    """The trace (attnctl.trace on ``backend``) of ``generate(pipe)``, whose output is
    asserted to be stock's within its tolerance (``stock``: from stock_and_tolerance):
    tracing changes nothing."""
    with attnctl.trace(pipe, backend=backend) as tc:
        out = generate(pipe)
    expected, atol = stock
    torch.testing.assert_close(out, expected, rtol=0, atol=atol)
    return tc


def prompt_words(maps, prompts, words):
    """(prompt index, word, the word's token positions in the traced prompt) for each of
    ``words`` whose last word is one of the prompt's; every traced prompt ends with T5's
    </s> (asserted)."""
    for b, prompt in enumerate(prompts):
        text = maps.prompts[b]
        assert text.tokens[-1] == "</s>"
        for word in words:
            if word.split()[-1] in prompt.split():
                yield b, word, text.positions(word, None, match="tokens")


def published_transformer_config(name) -> dict:
    """The published transformer config ``name`` (../shared/configs/<name>_transformer.json);
    the test is skipped where it is not present."""
    path = PUBLISHED_CONFIGS / f"{name}_transformer.json"
    if not path.exists():
        pytest.skip(f"published config {path} not present")
    return json.loads(path.read_text())


def meta_transformer(name):
    """The published transformer config ``name`` built on the meta device (no weights)."""
    import diffusers

    config = published_transformer_config(name)
    with torch.device("meta"):
        return getattr(diffusers, config["_class_name"]).from_config(config)


def shape_only_attention(q, k, v, **kwargs):
    """The op's output shape and memory order without computing (meta tensors have no
    values for the op's token-range check); the trace allocates its buffers before this."""
    return torch.empty_like(q[..., :1].expand(*q.shape[:-1], v.shape[-1]))
