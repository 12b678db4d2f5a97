"""The materialising baseline that attnctl.trace replaces, for comparisons (attnctl demo).

This is how DAAM and similar tools capture maps: on every cross-attention call compute
P = softmax(QKᵀ·scale) explicitly in the model's dtype (diffusers' get_attention_scores),
add it into per-layer, per-head buffers, then multiply by V. Its maps are returned as a
:class:`TraceMaps` (per head), so the two paths answer the same queries.
"""
from __future__ import annotations

from typing import Dict

import torch

from ..diffusers.controller import BatchLayout
from ..diffusers.install import find_unet, query_grid
from .daam import output_side
from .maps import ALL_STEPS, LayerMaps, TraceMaps
from .words import record_prompt


class _MaterialisingProcessor:
    def __init__(self, layer: str, baseline: "MaterialisedTrace"):
        self.layer = layer
        self.baseline = baseline

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None):
        if hidden_states.ndim != 3 or attn.group_norm is not None or attn.spatial_norm is not None:
            raise NotImplementedError("the materialising baseline covers UNet transformer attention only")
        is_cross = encoder_hidden_states is not None
        context = encoder_hidden_states if is_cross else hidden_states
        B, M, _ = hidden_states.shape
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, context.shape[1], B)
        q = attn.head_to_batch_dim(attn.to_q(hidden_states))
        k = attn.head_to_batch_dim(attn.to_k(context))
        v = attn.head_to_batch_dim(attn.to_v(context))
        probs = attn.get_attention_scores(q, k, attention_mask)  # (B*H, M, N): the materialised P
        if is_cross:
            self.baseline.add(self.layer, probs.view(B, attn.heads, M, -1))
        out = attn.batch_to_head_dim(torch.bmm(probs, v))
        out = attn.to_out[1](attn.to_out[0](out))
        if attn.residual_connection:
            out = out + hidden_states
        return out / attn.rescale_output_factor


class MaterialisedTrace:
    """Context manager: every attention layer of ``pipe`` computes P explicitly; the
    cross-attention P is summed over steps per layer and head (DAAM's storage)."""

    def __init__(self, pipe):
        self.unet, self.pipe = find_unet(pipe)
        self.sums: Dict[str, torch.Tensor] = {}
        self.latent = None
        self._original = None
        self._hook = None
        self._steps = 0

    def add(self, layer: str, probs: torch.Tensor) -> None:
        total = self.sums.get(layer)
        self.sums[layer] = probs.float() if total is None else total.add_(probs)

    def _before_unet(self, module, args, kwargs):
        sample = args[0] if args else kwargs["sample"]
        self.latent = tuple(sample.shape[-2:])
        self._steps += 1

    def __enter__(self) -> "MaterialisedTrace":
        self._original = self.unet.attn_processors
        self.unet.set_attn_processor({name: _MaterialisingProcessor(name.rsplit(".", 1)[0], self)
                                      for name in self._original})
        self._hook = self.unet.register_forward_pre_hook(self._before_unet, with_kwargs=True)
        return self

    def __exit__(self, *exc) -> None:
        self.unet.set_attn_processor(dict(self._original))
        self._hook.remove()

    def maps(self, prompts, images_per_prompt: int = 1, cfg: bool = True, per_head: bool = True) -> TraceMaps:
        """The captured sums as TraceMaps for a generation of ``prompts``; ``per_head=False``
        sums the heads first, as attnctl.trace does by default."""
        if not self.sums:
            raise RuntimeError("materialised trace: nothing captured; run the pipeline inside it")
        layers = []
        for name, total in self.sums.items():
            rows, heads, queries, _ = total.shape
            grid, factor = query_grid(self.latent, queries)
            kept = total if per_head else total.sum(1)
            layers.append(LayerMaps(name, grid, factor, heads, maps={ALL_STEPS: kept},
                                    token_mass={ALL_STEPS: total.sum(2)}))
        tokenizer = getattr(self.pipe, "tokenizer", None)
        if isinstance(prompts, str):
            prompts = [prompts]
        texts = [record_prompt(tokenizer, p) for p in prompts] if tokenizer is not None else None
        vae = getattr(self.pipe, "vae_scale_factor", None)
        layout = BatchLayout(rows=rows, cfg=cfg, images_per_prompt=images_per_prompt)
        return TraceMaps(layers, layout, self.latent, int(vae or 1), texts, per_head=per_head, per_step=False,
                         heads=None, steps_run=self._steps, tokenizer=tokenizer,
                         daam_side=output_side(self.unet.config.sample_size, vae))
