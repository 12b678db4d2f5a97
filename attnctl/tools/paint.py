"""Paint-with-words (eDiff-I, Balaji et al. 2022) as an attnctl controller, with the
defaults of the reference implementation cloneofsimo/paint-with-words-sd.

For the conditional half of every cross-attention call, a pre-softmax term is added to
the logits. The original writes the attention as softmax((QKᵀ + W) · scale) with

    W[q, k] = w · log(1 + σ_t) · max(QKᵀ) · A[q, k],
    A[q, k] = Σ_regions strength_r · mask_r(q) · [k is a token of an occurrence of phrase_r],

where max(QKᵀ) is over the whole layer's unscaled logits of that image (all heads, pixels
and tokens), σ_t is the scheduler's noise level at the step and w = 0.1 (the original's
default ``weight_function``). The op adds its bias to the scaled logits, so the
controller passes ``bias = scale · W``. The max comes from :func:`attnctl.logit_max` (a
reduction kernel that never stores QKᵀ), reduced over heads. The unconditional half gets
no term (the original's unconditional weight function is 0).

As in the original: a phrase is matched as its token ids (the phrase tokenised alone,
without start/end tokens) anywhere in the prompt's ids, and every occurrence is painted;
masks are resized to each layer's grid bilinearly with ``align_corners=True``; regions of
the same tokens add up. ``from_color_map`` takes the original's interface (an RGB image
whose colours name phrases).

A is cached per layer and generation; per call the controller writes coef · A into a
per-layer (B, 1, M, N) bias buffer (the unconditional rows stay 0): no allocation after
the first step, no device sync (σ_t is read once per step).
"""
from __future__ import annotations

import math
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import torch

from ..diffusers.controller import AttentionCall, Controller, Plan
from ..diffusers.install import Generation
from ..op import logit_max
from ._args import finite
from ._masks import as_mask, check_mask_size, check_resize, mask_on_grid

DEFAULT_WEIGHT = 0.1   # paint_with_words.py: weight_function = 0.1 · w · log(1 + σ) · max(QKᵀ)

Color = Tuple[int, int, int]


def _phrase(value, name: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{name}: expected a non-empty phrase, got {value!r}")
    return value


class PaintWithWords(Controller):
    """``regions``: {phrase: mask} or {phrase: (mask, strength)} (strength 1 by default),
    or a sequence of (phrase, mask, strength) (a phrase may then have several regions).
    Masks are 2-D, at the image or latent size.

    ``weight``: the original's w (0.1). ``resize``: "bilinear" (the original's,
    align_corners=True), "nearest-exact" or "nearest". ``occurrence``: None paints every
    occurrence of each phrase (the original); an int paints only that one (0 = first).
    """

    def __init__(self, regions, *, weight: float = DEFAULT_WEIGHT, resize: str = "bilinear",
                 occurrence: Optional[int] = None):
        self.regions = _regions(regions)
        self.weight = finite(weight, "weight")
        self.resize = check_resize(resize)
        if occurrence is not None and (isinstance(occurrence, bool) or not isinstance(occurrence, int)
                                       or occurrence < 0):
            raise ValueError(f"occurrence: expected None (every occurrence) or an index >= 0, got {occurrence!r}")
        self.occurrence = occurrence
        self._spans: Optional[List[List[List[Tuple[int, int]]]]] = None
        self._checked = False
        self._layers: Dict[Tuple, Tuple[torch.Tensor, torch.Tensor]] = {}

    @classmethod
    def from_color_map(cls, color_map, colors: Mapping, **kwargs) -> "PaintWithWords":
        """The original's interface: ``color_map`` an RGB image (PIL image or (H, W, 3)
        array/tensor) and ``colors`` {colour: phrase, (phrase, strength) or the original's
        "phrase,strength" string}, a colour being (r, g, b) or "#rrggbb". The region of a
        phrase is the set of pixels of exactly that colour; other keywords as ``__init__``."""
        pixels = _rgb(color_map)
        if not isinstance(colors, Mapping) or not colors:
            raise ValueError(f"colors: expected a non-empty dict {{colour: phrase}}, got {colors!r}")
        regions = []
        for color, spec in colors.items():
            rgb = _color(color)
            phrase, strength = _phrase_spec(spec, f"colors[{color!r}]")
            region = (pixels == torch.tensor(rgb, dtype=pixels.dtype)).all(dim=-1)
            if not bool(region.any()):
                raise ValueError(f"colors[{color!r}]: the colour {rgb} is not in color_map "
                                 f"({pixels.shape[0]}x{pixels.shape[1]} pixels)")
            regions.append((phrase, region.float(), strength))
        return cls(regions, **kwargs)

    def on_generation_start(self, generation: Generation) -> None:
        if generation.prompts is None or generation.tokenizer is None:
            raise ValueError("PaintWithWords: needs the prompt text to find the phrases' tokens; "
                             "the pipeline got prompt_embeds without a prompt")
        tokenizer = generation.tokenizer
        # the phrase's own tokens: without CLIP's start and end tokens, T5's </s>
        special = set(tokenizer.all_special_ids)
        phrase_ids = {phrase: [i for i in tokenizer(phrase, truncation=True,
                                                    max_length=tokenizer.model_max_length).input_ids
                               if i not in special]
                      for phrase, _, _ in self.regions}
        self._spans = []
        for prompt in generation.prompts:
            ids = tokenizer(prompt, padding="max_length", truncation=True,
                            max_length=tokenizer.model_max_length).input_ids
            self._spans.append([self._occurrences(ids, phrase, phrase_ids[phrase], prompt)
                                for phrase, _, _ in self.regions])
        self._image_scale = generation.image_scale
        self._layers = {}
        self._checked = False

    def _occurrences(self, ids: Sequence[int], phrase: str, tokens: Sequence[int], prompt: str):
        n = len(tokens)
        starts = [i for i in range(len(ids) - n + 1) if n and list(ids[i:i + n]) == list(tokens)]
        if not starts:
            raise ValueError(f"regions: phrase {phrase!r} (tokens {list(tokens)}) is not in the prompt {prompt!r}")
        if self.occurrence is not None:
            if self.occurrence >= len(starts):
                raise ValueError(f"occurrence: {phrase!r} appears {len(starts)} time(s) in the prompt "
                                 f"{prompt!r}, got occurrence={self.occurrence}")
            starts = [starts[self.occurrence]]
        return [(s, s + n) for s in starts]

    def plan(self, call: AttentionCall) -> Optional[Plan]:
        if not call.is_cross:
            return None
        if self._spans is None:
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
            for i, (phrase, mask, _) in enumerate(self.regions):
                check_mask_size(mask, f"regions[{i}] ({phrase!r}) mask", call.latent, self._image_scale)
            self._checked = True
        layout = call.layout
        images = len(layout.cond_rows)
        on_grid = [strength * mask_on_grid(mask, call.grid, self.resize)[:, None] for _, mask, strength in self.regions]
        area = torch.zeros(images, 1, call.queries, call.keys)
        for i in range(images):
            spans = self._spans[min(layout.prompt_of_image(i), len(self._spans) - 1)]
            for painted, occurrences in zip(on_grid, spans):
                for start, stop in occurrences:
                    if start < call.keys:
                        area[i, 0, :, start:min(stop, call.keys)] += painted
        area = area.to(call.device)
        bias = torch.zeros(call.batch, 1, call.queries, call.keys, device=call.device)
        return area, bias


def _regions(regions) -> List[Tuple[str, torch.Tensor, float]]:
    if isinstance(regions, Mapping):
        entries = []
        for phrase, spec in regions.items():
            mask, strength = spec if isinstance(spec, tuple) else (spec, 1.0)
            entries.append((phrase, mask, strength))
    elif isinstance(regions, (list, tuple)) and all(isinstance(e, tuple) and len(e) == 3 for e in regions):
        entries = list(regions)
    else:
        raise ValueError(f"regions: expected a non-empty dict {{phrase: (mask, strength)}} or a list of "
                         f"(phrase, mask, strength), got {regions!r}")
    if not entries:
        raise ValueError("regions: expected at least one region, got none")
    return [(_phrase(phrase, f"regions phrase {phrase!r}"), as_mask(mask, f"regions[{phrase!r}] mask"),
             finite(strength, f"regions[{phrase!r}] strength")) for phrase, mask, strength in entries]


def _rgb(color_map) -> torch.Tensor:
    if isinstance(color_map, torch.Tensor):
        pixels = color_map.detach().cpu()
    else:
        try:
            import numpy as np

            pixels = torch.as_tensor(np.array(color_map))
        except Exception:
            raise TypeError(f"color_map: expected an RGB image (PIL image or (H, W, 3) array), "
                            f"got {type(color_map).__name__}") from None
    if pixels.dim() != 3 or pixels.shape[-1] != 3 or 0 in pixels.shape:
        raise ValueError(f"color_map: expected an RGB image of shape (height, width, 3), got shape "
                         f"{tuple(pixels.shape)} (convert RGBA or palette images to RGB)")
    return pixels.to(torch.int64) if not pixels.is_floating_point() else pixels


def _color(color) -> Color:
    if isinstance(color, str) and len(color) == 7 and color[0] == "#":
        try:
            return int(color[1:3], 16), int(color[3:5], 16), int(color[5:7], 16)
        except ValueError:
            pass
    elif (isinstance(color, tuple) and len(color) == 3
          and all(isinstance(c, int) and not isinstance(c, bool) and 0 <= c <= 255 for c in color)):
        return color
    raise ValueError(f"colors: expected a colour (r, g, b) of ints in [0, 255] or '#rrggbb', got {color!r}")


def _phrase_spec(spec, name: str) -> Tuple[str, float]:
    """(phrase, strength) from a phrase, a (phrase, strength) pair or the original's
    "phrase,strength" string (the part after the last comma is the strength when it is a
    number; otherwise the whole string is the phrase, strength 1)."""
    if isinstance(spec, tuple) and len(spec) == 2:
        return _phrase(spec[0], name), finite(spec[1], f"{name} strength")
    if isinstance(spec, str) and "," in spec:
        head, tail = spec.rsplit(",", 1)
        try:
            strength = float(tail)
        except ValueError:
            strength = None
        if strength is not None:
            return _phrase(head, name), finite(strength, f"{name} strength")
    return _phrase(spec, name), 1.0
