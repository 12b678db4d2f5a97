"""Inside-outside attention (Shape-Guided Diffusion, Park et al. 2022) as an attnctl
controller, with the defaults of shape-guided-diffusion/shape-guided-diffusion
(utils.py ``init_attention_func``).

An object mask splits the pixels into inside (label 1) and outside (label 0). On both
halves of classifier-free guidance (the original masks its conditional and its
unconditional UNet pass alike):

* cross-attention: the inside tokens get label 1, the outside tokens label 0, every other
  token -1 (never scaled). The kernel's factor 1 - s·[r(q) != r(k)] removes (s = 1) the
  inside tokens from outside pixels and the outside tokens from inside pixels. A
  per-token factor multiplies it: ``cross_boost`` (the original's 2.5) on the inside and
  outside tokens except the ``fixed`` ones, 0 on the ``zeroed`` tokens (the start token in
  the original);
* self-attention: f[q, k] = 1 - s_t·[r(q) != r(k)] from the per-pixel labels on both
  sides, s_t a constant (the original's 1.0) or a schedule of the denoising progress
  p = step / steps: "linear" 1 - p, "exponential" 0.95^(50 p), "cosine" (1 + cos πp) / 2.

The mask is resized to each layer's grid as PIL's nearest resize does (the original's)
and thresholded (the original uses the mask's grey values as they are: the same for a
black-and-white mask). The region factor is computed in the kernel from label vectors:
no (M, M) or (M, N) mask is ever in memory. Labels are cached per layer grid and
generation. Captures remain of P before the factors.
"""
from __future__ import annotations

import math
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch

from ..diffusers.controller import AttentionCall, Controller, Plan
from ..diffusers.install import Generation
from ..regions import Regions
from ._args import finite
from ._masks import as_mask, check_mask_size, check_resize, mask_on_grid
from .words import record_prompt

Tokens = Union[str, int, Sequence[Union[str, int]]]

CROSS_BOOST = 2.5   # shape_guided_diffusion.py: cross_attn_schedule=2.5
# utils.py: the self-attention schedules, of the progress p in [0, 1].
SCHEDULES: Dict[str, Callable[[float], float]] = {
    "linear": lambda p: 1.0 - p,
    "exponential": lambda p: 0.95 ** (p * 50),
    "cosine": lambda p: (1.0 + math.cos(p * math.pi)) / 2.0,
}


def _tokens(value: Tokens, name: str) -> List[Union[str, int]]:
    items = [value] if isinstance(value, (str, int)) else list(value)
    for item in items:
        is_word = isinstance(item, str) and item.strip()
        is_column = isinstance(item, int) and not isinstance(item, bool) and item >= 0
        if not (is_word or is_column):
            raise ValueError(f"{name}: expected words of the prompt or key columns >= 0 (a word, a column or "
                             f"a list of them), got {value!r}")
    return items


def _schedule(value, name: str):
    if isinstance(value, str):
        if value not in SCHEDULES:
            raise ValueError(f"{name}: expected a number, None or one of {', '.join(map(repr, SCHEDULES))}, "
                             f"got {value!r}")
        return value
    return finite(value, name, allow_none=True)


class InsideOutside(Controller):
    """``mask``: the object mask at image or latent size (> ``threshold`` is inside).
    ``inside`` / ``outside``: tokens attending inside / outside the object, as words of the
    prompt (first occurrence) or key columns. ``fixed``: tokens among those that keep
    factor 1 instead of ``cross_boost`` (the original's tokens shared with the inversion
    prompt). ``zeroed``: key columns whose probabilities are zeroed (the start token).
    ``cross_strength`` / ``self_strength``: s of the two kinds of layers (None leaves that
    kind alone); ``self_strength`` may be a schedule name (see the module). ``halves``:
    "both" (the original) or "cond" (the conditional half only). ``progress``: the
    schedule's p; None takes step index / the scheduler's number of steps.

    The defaults are the original's. attnctl's earlier behaviour is ``cross_boost=1.0,
    zeroed=(), halves="cond", resize="nearest"``.
    """

    def __init__(self, mask, inside: Tokens, outside: Tokens = (), *, fixed: Tokens = (),
                 cross_boost: float = CROSS_BOOST, cross_strength: Optional[float] = 1.0,
                 self_strength: Union[float, str, None] = 1.0, zeroed: Sequence[int] = (0,),
                 halves: str = "both", threshold: float = 0.5, resize: str = "nearest-exact"):
        self.mask = as_mask(mask, "mask")
        self.inside = _tokens(inside, "inside")
        self.outside = _tokens(outside, "outside")
        if not self.inside and not self.outside:
            raise ValueError("inside, outside: expected at least one token, got none")
        self.fixed = _tokens(fixed, "fixed")
        self.zeroed = _tokens(zeroed, "zeroed")
        if any(isinstance(c, str) for c in self.zeroed):
            raise ValueError(f"zeroed: expected key columns (ints >= 0), got {zeroed!r}")
        self.cross_boost = finite(cross_boost, "cross_boost")
        self.cross_strength = finite(cross_strength, "cross_strength", allow_none=True)
        self.self_strength = _schedule(self_strength, "self_strength")
        if halves not in ("both", "cond"):
            raise ValueError(f"halves: expected 'both' or 'cond', got {halves!r}")
        self.halves = halves
        self.threshold = finite(threshold, "threshold")
        self.resize = check_resize(resize)
        self.progress: Optional[float] = None
        self._columns = None
        self._cache: Dict[Tuple, Tuple] = {}
        self._checked = False

    def on_generation_start(self, generation: Generation) -> None:
        words = any(isinstance(t, str) for t in self.inside + self.outside + self.fixed)
        if words and (generation.prompts is None or generation.tokenizer is None):
            raise ValueError("InsideOutside: needs the prompt text to find the words' tokens; "
                             "the pipeline got prompt_embeds without a prompt (give key columns instead)")
        prompts = generation.prompts if words else (None,)
        self._columns = []
        for prompt in prompts:
            text = record_prompt(generation.tokenizer, prompt, generation.text_length) if words else None
            self._columns.append(tuple(_columns(items, text) for items in (self.inside, self.outside, self.fixed)))
        self._image_scale = generation.image_scale
        self._cache = {}
        self._checked = False

    def self_scale(self, step) -> float:
        """s_t of the self-attention layers at ``step`` (a :class:`DenoiseStep`)."""
        if not isinstance(self.self_strength, str):
            return self.self_strength
        progress = self.progress
        if progress is None:
            if not step.num_steps:
                raise RuntimeError(f"InsideOutside: self_strength={self.self_strength!r} needs the number of "
                                   "denoising steps; the scheduler does not tell it (set .progress)")
            progress = step.index / step.num_steps
        return SCHEDULES[self.self_strength](progress)

    def plan(self, call: AttentionCall) -> Optional[Plan]:
        if (self.cross_strength if call.is_cross else self.self_strength) is None:
            return None
        if self._columns is None:
            raise RuntimeError("InsideOutside: no generation has started (install it on a pipeline)")
        key = (call.is_cross, call.grid, call.batch, call.keys, call.device)
        cached = self._cache.get(key)
        if cached is None:
            cached = self._cache[key] = self._build(call)
        labels_q, labels_k, prob_mult = cached
        strength = self.cross_strength if call.is_cross else self.self_scale(call.step)
        return Plan(regions=Regions(labels_q, labels_k, strength), prob_mult=prob_mult)

    def _rows(self, layout) -> range:
        return range(0, layout.rows) if self.halves == "both" else layout.cond_rows

    def _build(self, call: AttentionCall):
        if call.grid is None:
            raise RuntimeError(f"InsideOutside: the query grid of {call.layer} is unknown")
        if not self._checked:
            check_mask_size(self.mask, "mask", call.latent, self._image_scale)
            self._checked = True
        layout = call.layout
        rows = self._rows(layout)
        inside = (mask_on_grid(self.mask, call.grid, self.resize) > self.threshold).to(torch.int32)   # (M,)
        labels_q = torch.full((call.batch, call.queries), -1, dtype=torch.int32)
        labels_q[rows.start:rows.stop] = inside
        prob_mult = None
        if call.is_cross:
            labels_k = torch.full((call.batch, call.keys), -1, dtype=torch.int32)
            factor = torch.ones(call.batch, 1, 1, call.keys)
            for row in rows:
                prompt = layout.prompt_of_image(row % layout.images)   # the row's image, either half
                inside_cols, outside_cols, fixed_cols = self._columns[min(prompt, len(self._columns) - 1)]
                for name, cols in (("inside", inside_cols), ("outside", outside_cols), ("fixed", fixed_cols),
                                   ("zeroed", self.zeroed)):
                    if cols and max(cols) >= call.keys:
                        raise ValueError(f"{name}: key column {max(cols)} is beyond the {call.keys} text tokens "
                                         f"of {call.layer}")
                labels_k[row, list(outside_cols)] = 0
                labels_k[row, list(inside_cols)] = 1
                boosted = sorted(set(inside_cols + outside_cols) - set(fixed_cols))
                factor[row, 0, 0, boosted] = self.cross_boost
                factor[row, 0, 0, list(self.zeroed)] = 0.0
            if not bool((factor == 1).all()):
                prob_mult = factor.to(call.device, non_blocking=True)
        else:
            if call.keys != call.queries:
                raise RuntimeError(f"InsideOutside: self-attention {call.layer} has {call.keys} keys for "
                                   f"{call.queries} queries; expected the same pixels on both sides")
            labels_k = labels_q
        return labels_q.to(call.device, non_blocking=True), labels_k.to(call.device, non_blocking=True), prob_mult


def _columns(items, text) -> Tuple[int, ...]:
    cols: List[int] = []
    for item in items:
        cols.extend(text.positions(item) if isinstance(item, str) else [item])
    return tuple(cols)
