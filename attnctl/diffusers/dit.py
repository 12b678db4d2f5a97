"""Diffusion transformers with a separate cross-attention layer: PixArt-α / Σ, Sana and
Wan 2.1. What install needs to know about them is data: the family, which layers attnctl
replaces, the token grid of a forward's input and, for Wan, which CFG half a call is.

* PixArt (PixArtTransformer2DModel): 28 self (``attn1``) + 28 cross (``attn2``) layers,
  all AttnProcessor2_0, so :class:`attnctl.diffusers.processor.AttnctlProcessor` replays
  them; T5 text with a mask the transformer turns into a -10000 bias.
* Sana (SanaTransformer2DModel): linear self-attention (no softmax, left to diffusers) +
  softmax cross-attention (SanaAttnProcessor2_0: AttnProcessor2_0's math with its q/k
  norms over the whole inner dim, before the head split), replayed by AttnctlProcessor.
* Wan (WanTransformer3DModel): ``attn1`` self-attention with RoPE, ``attn2`` cross-
  attention to umT5 (and, in I2V models, to CLIP image-context tokens that come first in
  ``encoder_hidden_states``); WanAttnProcessor, replayed by :class:`WanProcessor`.

Token order: PixArt and Sana patchify an image row by row, Wan a video frame by frame
(``(B, C, F, H, W)`` flattened), so a query index is ``(f·h + y)·w + x``.
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch

from .compose import planned_attention

PIXART, SANA, WAN = "pixart", "sana", "wan"
FAMILIES = (PIXART, SANA, WAN)
# WanAttnProcessor takes the last 512 tokens of an I2V layer's encoder_hidden_states as the
# text and the ones before as image context (diffusers 0.42.1 hard-codes the 512).
WAN_TEXT_TOKENS = 512
TEXT, IMAGE_CONTEXT = "text", "image"   # what the keys of a cross-attention call are


def dit_family(model) -> Optional[str]:
    """"pixart", "sana" or "wan" for the transformers attnctl supports here, else None."""
    from diffusers import PixArtTransformer2DModel, SanaTransformer2DModel, WanTransformer3DModel

    if isinstance(model, PixArtTransformer2DModel):
        return PIXART
    if isinstance(model, SanaTransformer2DModel):
        return SANA
    if isinstance(model, WanTransformer3DModel):
        return WAN
    return None


def softmax_layers(model, family: str) -> Dict[str, str]:
    """{processor name: layer name} of the layers attnctl replaces: every attention layer
    of PixArt and Wan; Sana's cross-attention only (its self-attention is linear)."""
    from diffusers.models.transformers.sana_transformer import SanaAttnProcessor2_0

    modules = dict(model.named_modules())
    chosen = {}
    for name, processor in model.attn_processors.items():
        layer = name[: -len(".processor")]
        if family == SANA and not isinstance(processor, SanaAttnProcessor2_0):
            continue
        if family == SANA and modules[layer].norm_q is not None:
            raise NotImplementedError(f"install: {layer} has q/k norms (qk_norm); SanaAttnProcessor2_0 applies "
                                      "them before the head split and attnctl's processor after it")
        if getattr(modules[layer], "fused_projections", False):
            raise NotImplementedError(f"install: {layer} has fused projections (fuse_qkv_projections()); "
                                      "attnctl replays the unfused processor: call unfuse_qkv_projections() first")
        chosen[name] = layer
    return chosen


def encoder_texts(family: str, pipe, prompts, arguments) -> list:
    """The prompts as the pipeline hands them to its tokenizer, so word lookups find the
    tokens the text encoder saw: PixArt and Sana pass them through their
    ``_text_preprocessing`` (lower case and stripped, or cleaned with ``clean_caption``),
    Wan through ``prompt_clean`` (ftfy and HTML unescaping when available, whitespace
    collapsed)."""
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if family == WAN:
        from diffusers.pipelines.wan.pipeline_wan import prompt_clean

        return [prompt_clean(p) for p in prompts]
    return list(pipe._text_preprocessing(prompts, clean_caption=bool(arguments.get("clean_caption", False))))


class DiTReader:
    """Reads a transformer forward's input: batch rows, latent frames after patchify (1 for
    images), the token grid (h, w) of a frame after patchify, and the timestep."""

    def __init__(self, model, family: str):
        patch = model.config.patch_size
        self.patch = tuple(patch) if family == WAN else (1, patch, patch)
        self.family = family

    def __call__(self, args, kwargs) -> Tuple[int, int, Tuple[int, int], object]:
        hidden = args[0] if args else kwargs["hidden_states"]
        position = 1 if self.family == WAN else 2   # forward(hidden_states, timestep | encoder_hidden_states, ...)
        timestep = args[position] if len(args) > position else kwargs.get("timestep")
        pt, ph, pw = self.patch
        if self.family == WAN:
            frames, height, width = hidden.shape[-3:]
            return hidden.shape[0], frames // pt, (height // ph, width // pw), timestep
        return hidden.shape[0], 1, (hidden.shape[-2] // ph, hidden.shape[-1] // pw), timestep


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Wan's RoPE on (B, S, H, D): channel pairs (2i, 2i+1) rotated by the pair's angle
    (cos/sin hold each angle twice, as WanRotaryPosEmbed returns them)."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = cos[..., 0::2], sin[..., 1::2]
    return torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2).type_as(x)


class WanProcessor:
    """Replaces WanAttnProcessor (diffusers 0.42.1) on one Wan attention layer, self or cross.

    The original's math, step for step: ``to_q/k/v``; ``norm_q`` / ``norm_k`` (RMS over all
    heads, before the head split); heads; RoPE on q and k when the block passes
    ``rotary_emb`` (self-attention); attention at the default scale 1/sqrt(D); in I2V
    layers (``add_k_proj``) a second attention of the same q to the image-context tokens
    (``add_k_proj`` → ``norm_added_k``, ``add_v_proj``) added to the text attention's
    output; ``to_out``. Controllers see each attention call, told by
    ``call.context`` whether its keys are the text or the image context.
    """

    def __init__(self, layer: str, installation):
        self.layer = layer
        self.installation = installation

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: Optional[torch.Tensor] = None,
                 attention_mask: Optional[torch.Tensor] = None, rotary_emb=None, **kwargs) -> torch.Tensor:
        if attention_mask is not None:
            raise NotImplementedError(f"attention_mask: attnctl's Wan processor ({self.layer}) takes no mask "
                                      "(WanTransformer3DModel passes none), got a tensor of shape "
                                      f"{tuple(attention_mask.shape)}")
        image_context = None
        if attn.add_k_proj is not None:
            split = encoder_hidden_states.shape[1] - WAN_TEXT_TOKENS
            image_context, encoder_hidden_states = (encoder_hidden_states[:, :split],
                                                    encoder_hidden_states[:, split:])
        is_cross = encoder_hidden_states is not None
        context = encoder_hidden_states if is_cross else hidden_states
        query = attn.norm_q(attn.to_q(hidden_states)).unflatten(2, (attn.heads, -1))
        key = attn.norm_k(attn.to_k(context)).unflatten(2, (attn.heads, -1))
        value = attn.to_v(context).unflatten(2, (attn.heads, -1))
        if rotary_emb is not None:
            query, key = _rotate(query, *rotary_emb), _rotate(key, *rotary_emb)

        out = self._attend(query, key, value, is_cross, TEXT)
        if image_context is not None:
            key_img = attn.norm_added_k(attn.add_k_proj(image_context)).unflatten(2, (attn.heads, -1))
            value_img = attn.add_v_proj(image_context).unflatten(2, (attn.heads, -1))
            out = out + self._attend(query, key_img, value_img, True, IMAGE_CONTEXT)
        return attn.to_out[1](attn.to_out[0](out))

    def _attend(self, query, key, value, is_cross: bool, context: str) -> torch.Tensor:
        """One attention call on (B, S, H, D) tensors, controllers consulted; (B, S, H·D)."""
        # (B, H, S, D) views: the op reads any strides and returns its output in q's memory
        # order, so merging the heads afterwards is free.
        q, k, v = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)
        installation = self.installation
        out, _ = planned_attention(installation,
                                   lambda: installation.describe_tokens(self.layer, is_cross, q, k, context),
                                   q, k, v, f"Wan attention ({self.layer})")
        return out.transpose(1, 2).flatten(2, 3).type_as(query)

    def __repr__(self) -> str:
        return f"WanProcessor({self.layer!r})"
