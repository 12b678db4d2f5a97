"""Paint-with-words (eDiff-I, Balaji et al. 2022) as an attnctl controller.

For the conditional half of every cross-attention call, a pre-softmax term is added to
the logits. eDiff-I writes the attention as softmax((QKᵀ + W) / √d) with

    W[q, k] = w · log(1 + σ_t) · max(QKᵀ) · A[q, k],
    A[q, k] = Σ_phrases strength_p · mask_p(q) · [k is a token of phrase p],

where max(QKᵀ) is over the whole layer's unscaled logits of that image (all heads, pixels
and tokens) and σ_t is the scheduler's noise level at the step. The op adds its bias to
the scaled logits, so the controller passes ``bias = scale · W`` (scale = 1/√d), which is
eDiff-I's formula exactly. The max comes from :func:`attnctl.logit_max` (a reduction
kernel that never stores QKᵀ), reduced over heads.

Masks are given at the image or latent size, resized (nearest) to each layer's query
grid. A is cached per layer and generation; per call the controller writes coef · A into
a per-layer (B, 1, M, N) bias buffer (the unconditional rows stay 0): no allocation after
the first step, no device sync (σ_t is read once per step).
"""
from __future__ import annotations

import math
from typing import Dict, Mapping, Optional, Tuple

import torch

from ..diffusers.controller import AttentionCall, Controller, Plan
from ..diffusers.install import Generation
from ..op import logit_max
from ._masks import as_mask, check_mask_size, mask_on_grid
from .words import record_prompt


class PaintWithWords(Controller):
    """``regions``: {phrase: (mask, strength)} (or {phrase: mask}, strength 1). Phrases are
    words of the prompt (every one of its sub-tokens is painted; first occurrence).
    ``weight``: eDiff-I's w."""

    def __init__(self, regions: Mapping[str, object], *, weight: float = 1.0):
        if not isinstance(regions, Mapping) or not regions:
            raise ValueError(f"regions: expected a non-empty dict {{phrase: (mask, strength)}}, got {regions!r}")
        self.phrases: Dict[str, Tuple[torch.Tensor, float]] = {}
        for phrase, spec in regions.items():
            mask, strength = spec if isinstance(spec, tuple) else (spec, 1.0)
            if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not math.isfinite(strength):
                raise ValueError(f"regions[{phrase!r}] strength: expected a finite number, got {strength!r}")
            self.phrases[phrase] = (as_mask(mask, f"regions[{phrase!r}] mask"), float(strength))
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
            raise ValueError(f"weight: expected a finite number, got {weight!r}")
        self.weight = float(weight)
        self._columns = None
        self._checked = False
        self._layers: Dict[Tuple, Tuple[torch.Tensor, torch.Tensor]] = {}
        self._coef_step = None

    def on_generation_start(self, generation: Generation) -> None:
        if generation.prompts is None or generation.tokenizer is None:
            raise ValueError("PaintWithWords: needs the prompt text to find the phrases' tokens; "
                             "the pipeline got prompt_embeds without a prompt")
        texts = [record_prompt(generation.tokenizer, p) for p in generation.prompts]
        self._columns = [{phrase: text.positions(phrase) for phrase in self.phrases} for text in texts]
        self._image_scale = generation.image_scale
        self._layers = {}
        self._checked = False

    def plan(self, call: AttentionCall) -> Optional[Plan]:
        if not call.is_cross:
            return None
        if self._columns is None:
            raise RuntimeError("PaintWithWords: no generation has started (install it on a pipeline)")
        if call.grid is None:
            raise RuntimeError(f"PaintWithWords: the query grid of {call.layer} is unknown")
        key = (call.layer, call.batch, call.keys, call.device)
        cached = self._layers.get(key)
        if cached is None:
            cached = self._layers[key] = self._build(call)
        area, bias = cached
        rows = call.layout.cond_rows
        q = call.query[rows.start:rows.stop]
        k = call.key[rows.start:rows.stop]
        backend = call.backend if call.backend in ("torch", "triton") else "auto"
        layer_max = logit_max(q, k, backend=backend).amax(dim=1)            # (images,)
        sigma = call.step.sigma
        coef = layer_max * (self.weight * math.log1p(sigma) * call.scale)
        torch.mul(area, coef.view(-1, 1, 1, 1).to(area.dtype), out=bias[rows.start:rows.stop])
        return Plan(bias=bias)

    def _build(self, call: AttentionCall) -> Tuple[torch.Tensor, torch.Tensor]:
        if not self._checked:
            for phrase, (mask, _) in self.phrases.items():
                check_mask_size(mask, f"regions[{phrase!r}] mask", call.latent, self._image_scale)
            self._checked = True
        layout = call.layout
        images = len(layout.cond_rows)
        area = torch.zeros(images, 1, call.queries, call.keys)
        for i in range(images):
            columns = self._columns[min(layout.prompt_of_image(i), len(self._columns) - 1)]
            for phrase, (mask, strength) in self.phrases.items():
                cols = [c for c in columns[phrase] if c < call.keys]
                area[i, 0, :, cols] += strength * mask_on_grid(mask, call.grid)[:, None]
        area = area.to(call.device)
        bias = torch.zeros(call.batch, 1, call.queries, call.keys, device=call.device)
        return area, bias
