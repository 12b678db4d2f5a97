"""Inside-outside attention (Shape-Guided Diffusion, Park et al. 2022) as an attnctl
controller, through the op's region labels (:class:`attnctl.Regions`).

An object mask splits the pixels into inside (label 1) and outside (label 0). On the
conditional half:

* cross-attention: the inside words' tokens get label 1, the outside words' tokens label
  0, every other token (start, end, padding, other words) -1 (never scaled). The kernel's
  factor f[q, k] = 1 - s·[r(q) != r(k)] then scales the probabilities of inside pixels
  for outside tokens, and of outside pixels for inside tokens, by 1 - s (s = 1 removes
  them: object tokens attend only inside the object, background tokens only outside);
* self-attention: f[q, k] = 1 - s·[r(q) != r(k)] from the per-pixel labels on both sides
  (pixels attend only within their own region when s = 1).

The factor is computed in the kernel from the label vectors: no (M, M) or (M, N) mask is
ever in memory. Labels are cached per layer grid and generation; the unconditional rows
are labelled -1 and so untouched. Captures remain of P before the factor.
"""
from __future__ import annotations

import math
from typing import Dict, Optional, Sequence, Tuple, Union

import torch

from ..diffusers.controller import AttentionCall, Controller, Plan
from ..diffusers.install import Generation
from ..regions import Regions
from ._masks import as_mask, check_mask_size, mask_on_grid
from .words import record_prompt

Words = Union[str, Sequence[str]]


def _words(value: Words, name: str):
    words = [value] if isinstance(value, str) else list(value)
    if not all(isinstance(w, str) and w.strip() for w in words):
        raise ValueError(f"{name}: expected a word or a list of words, got {value!r}")
    return words


def _strength(value, name: str) -> Optional[float]:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name}: expected a finite number or None, got {value!r}")
    return float(value)


class InsideOutside(Controller):
    """``mask``: the object mask at image or latent size (> ``threshold`` is inside);
    ``inside`` / ``outside``: words of the prompt attending inside / outside the object;
    ``cross_strength`` / ``self_strength``: s of the two kinds of layers (None: leave that
    kind alone)."""

    def __init__(self, mask, inside: Words, outside: Words = (), *, cross_strength: Optional[float] = 1.0,
                 self_strength: Optional[float] = 1.0, threshold: float = 0.5):
        self.mask = as_mask(mask, "mask")
        self.inside = _words(inside, "inside")
        self.outside = _words(outside, "outside")
        if not self.inside and not self.outside:
            raise ValueError("inside, outside: expected at least one word, got none")
        self.cross_strength = _strength(cross_strength, "cross_strength")
        self.self_strength = _strength(self_strength, "self_strength")
        self.threshold = float(threshold)
        self._token_labels = None
        self._cache: Dict[Tuple, Regions] = {}
        self._checked = False

    def on_generation_start(self, generation: Generation) -> None:
        if generation.prompts is None or generation.tokenizer is None:
            raise ValueError("InsideOutside: needs the prompt text to find the words' tokens; "
                             "the pipeline got prompt_embeds without a prompt")
        labels = []
        for prompt in generation.prompts:
            text = record_prompt(generation.tokenizer, prompt)
            cols = {}
            for words, label in ((self.outside, 0), (self.inside, 1)):
                for word in words:
                    for c in text.positions(word):
                        cols[c] = label
            labels.append(cols)
        self._token_labels = labels
        self._image_scale = generation.image_scale
        self._cache = {}
        self._checked = False

    def plan(self, call: AttentionCall) -> Optional[Plan]:
        strength = self.cross_strength if call.is_cross else self.self_strength
        if strength is None:
            return None
        if self._token_labels is None:
            raise RuntimeError("InsideOutside: no generation has started (install it on a pipeline)")
        key = (call.is_cross, call.grid, call.batch, call.keys, call.device)
        regions = self._cache.get(key)
        if regions is None:
            regions = self._cache[key] = self._build(call, strength)
        return Plan(regions=regions)

    def _build(self, call: AttentionCall, strength: float) -> Regions:
        if call.grid is None:
            raise RuntimeError(f"InsideOutside: the query grid of {call.layer} is unknown")
        if not self._checked:
            check_mask_size(self.mask, "mask", call.latent, self._image_scale)
            self._checked = True
        layout = call.layout
        inside = (mask_on_grid(self.mask, call.grid) > self.threshold).to(torch.int32)   # (M,)
        rows = layout.cond_rows
        labels_q = torch.full((call.batch, call.queries), -1, dtype=torch.int32)
        labels_q[rows.start:rows.stop] = inside
        if call.is_cross:
            labels_k = torch.full((call.batch, call.keys), -1, dtype=torch.int32)
            for i, row in enumerate(rows):
                cols = self._token_labels[min(layout.prompt_of_image(i), len(self._token_labels) - 1)]
                for c, label in cols.items():
                    if c < call.keys:
                        labels_k[row, c] = label
        else:
            if call.keys != call.queries:
                raise RuntimeError(f"InsideOutside: self-attention {call.layer} has {call.keys} keys for "
                                   f"{call.queries} queries; expected the same pixels on both sides")
            labels_k = labels_q
        return Regions(labels_q.to(call.device), labels_k.to(call.device), strength)
