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

Flux and SD3 (MM-DiT joint attention; no original exists) get the same term on the
block of the joint logits that plays cross-attention's part: the image query rows × the
phrase's text key columns (text token t is column ``layout.text.start + t``), with
max(QKᵀ) over that block's unscaled logits of the image, all heads (a :func:`logit_max`
on views of q and k). Text query rows and image key columns get no term. Every block
with text keys is painted (Flux double and single, SD3 joint and context_pre_only; SD3.5's
image-only ``attn2`` has none); ``blocks`` chooses among them. Phrases are tokenised by
each text encoder's own tokenizer (Flux: T5's pieces; SD3: the 77 CLIP columns, shared by
CLIP-L's and CLIP-G's prompts, then T5's), and by default every occurrence in every
segment is painted, as the original paints every occurrence; ``text="t5"`` or
``text="clip"`` (SD3) restricts the painting to one segment. σ_t there is the flow-matching
σ in [0, 1], so log(1 + σ_t) ≤ log 2 and the term is weaker than on SD's σ up to ≈ 15:
raise ``weight`` (or the strengths) to compensate. Masks are at the image size or at the
image token grid (Flux 1024²: 64×64).

A and the bias buffer are cached per layer shape, not per layer: the layers of one grid
(every joint block of an MM-DiT) share one A and one (B, 1, M, N) bias buffer, which the
op consumes before the next call on the same stream rewrites it. Per call the controller
writes coef · A into the painted block of the buffer (the rest stays 0): no allocation
after the first call of a shape, no device sync (σ_t is read once per step). A joint A
covers only the image rows × text columns (Flux 1024²: 4096 × 512 per image).
"""
from __future__ import annotations

import math
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Set, Tuple

import torch

from ..diffusers.controller import AttentionCall, Controller, Plan
from ..diffusers.install import Generation
from ..diffusers.joint import JointLayout
from ..diffusers.mmdit import TEXT_SEGMENTS, TextSegment
from ..op import logit_max
from ._args import finite
from ._masks import as_mask, check_mask_size, check_resize, mask_on_grid
from .words import tokenizer_limit

DEFAULT_WEIGHT = 0.1   # paint_with_words.py: weight_function = 0.1 · w · log(1 + σ) · max(QKᵀ)

Color = Tuple[int, int, int]
Span = Tuple[int, int]   # [start, stop) text columns of one occurrence of a phrase


def _phrase(value, name: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{name}: expected a non-empty phrase, got {value!r}")
    return value


class PaintWithWords(Controller):
    """``regions``: {phrase: mask} or {phrase: (mask, strength)} (strength 1 by default),
    or a sequence of (phrase, mask, strength) (a phrase may then have several regions).
    Masks are 2-D, at the image or latent size (MM-DiT: image token grid).

    ``weight``: the original's w (0.1). ``resize``: "bilinear" (the original's,
    align_corners=True), "nearest-exact" or "nearest". ``occurrence``: None paints every
    occurrence of each phrase (the original); an int paints only that one (0 = first; on
    an MM-DiT counted in each text segment).

    Flux / SD3 only: ``text``: None paints the phrases in every text segment (the
    default), "t5" or "clip" (SD3) in that one only. ``blocks``: a predicate on the
    call's :class:`~attnctl.diffusers.joint.JointLayout` choosing the blocks painted.
    """

    def __init__(self, regions, *, weight: float = DEFAULT_WEIGHT, resize: str = "bilinear",
                 occurrence: Optional[int] = None, text: Optional[str] = None,
                 blocks: Optional[Callable[[JointLayout], bool]] = None):
        self.regions = _regions(regions)
        self.weight = finite(weight, "weight")
        self.resize = check_resize(resize)
        if occurrence is not None and (isinstance(occurrence, bool) or not isinstance(occurrence, int)
                                       or occurrence < 0):
            raise ValueError(f"occurrence: expected None (every occurrence) or an index >= 0, got {occurrence!r}")
        if text is not None and text not in TEXT_SEGMENTS:
            raise ValueError(f"text: expected None (every text segment) or one of {TEXT_SEGMENTS}, got {text!r}")
        if blocks is not None and not callable(blocks):
            raise TypeError(f"blocks: expected a predicate on a JointLayout, got {type(blocks).__name__}")
        self.occurrence = occurrence
        self.text = text
        self.blocks = blocks
        self._spans: Optional[List[List[List[Span]]]] = None   # [prompt][region] -> spans in text columns
        self._joint = False   # the generation's text is in MM-DiT segments
        self._checked = False
        self._shapes: Dict[Tuple, Tuple[torch.Tensor, torch.Tensor]] = {}

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
        self._joint = bool(generation.segments)
        if self._joint:
            self._spans = self._segment_spans(generation.segments)
        else:
            if self.text is not None:
                raise ValueError(f"text: selects a text segment of a Flux / SD3 pipeline's prompt; this "
                                 f"generation has one text sequence, got text={self.text!r}")
            tokenizer = generation.tokenizer
            # PixArt / Sana / Wan: the call's max_sequence_length (their tokenizers often have no limit)
            length = generation.text_length if generation.text_length is not None else tokenizer_limit(tokenizer)
            self._spans = [[self._pick(spans, phrase, prompt, tokens) for phrase, (tokens, spans) in
                            zip(self._phrases(), self._find(tokenizer, prompt, length))]
                           for prompt in generation.prompts]
        self._image_scale = generation.image_scale
        self._shapes = {}
        self._checked = False

    def _phrases(self) -> List[str]:
        return [phrase for phrase, _, _ in self.regions]

    def _find(self, tokenizer, prompt: str, length: Optional[int]) -> List[Tuple[List[int], List[Span]]]:
        """Per region, the phrase's own ids (without CLIP's start and end tokens, T5's
        </s>) and the spans of every run of them in the ids of ``prompt`` as ``tokenizer``
        gives it to its text encoder (cut to ``length`` tokens; None: not cut)."""
        special = set(tokenizer.all_special_ids)
        cut = dict(truncation=length is not None, max_length=length)
        ids = list(tokenizer(prompt, **cut).input_ids)
        found = []
        for phrase in self._phrases():
            tokens = [i for i in tokenizer(phrase, **cut).input_ids if i not in special]
            n = len(tokens)
            found.append((tokens, [(s, s + n) for s in range(len(ids) - n + 1) if n and ids[s:s + n] == tokens]))
        return found

    def _pick(self, spans: List[Span], phrase: str, prompt: str, tokens: List[int]) -> List[Span]:
        """The spans painted: every occurrence, or the ``occurrence``-th."""
        if not spans:
            raise ValueError(f"regions: phrase {phrase!r} (tokens {tokens}) is not in the prompt {prompt!r}")
        if self.occurrence is None:
            return spans
        if self.occurrence >= len(spans):
            raise ValueError(f"occurrence: {phrase!r} appears {len(spans)} time(s) in the prompt "
                             f"{prompt!r}, got occurrence={self.occurrence}")
        return [spans[self.occurrence]]

    def _segment_spans(self, segments: Sequence[TextSegment]) -> List[List[List[Span]]]:
        """[prompt][region] -> spans in the text columns of the selected segments. A phrase
        must be in at least one; SD3's CLIP-L and CLIP-G tokens share columns, so a span
        both give is painted once."""
        selected = [s for s in segments if self.text is None or s.name == self.text]
        if not selected:
            raise ValueError(f"text: this pipeline's text columns hold {sorted({s.name for s in segments})} "
                             f"tokens, got text={self.text!r}")
        prompts = len(selected[0].prompts)
        spans: List[List[List[Span]]] = []
        for p in range(prompts):
            painted: List[Set[Span]] = [set() for _ in self.regions]
            for segment in selected:
                prompt = segment.prompts[p]
                for r, (tokens, found) in enumerate(self._find(segment.tokenizer, prompt, segment.length)):
                    if found:
                        painted[r].update((segment.start + a, segment.start + b)
                                          for a, b in self._pick(found, self._phrases()[r], prompt, tokens))
            for r, phrase in enumerate(self._phrases()):
                if not painted[r]:
                    where = ", ".join(f"{s.name} {s.prompts[p]!r}" for s in selected)
                    raise ValueError(f"regions: phrase {phrase!r} is not in the prompt's tokens of any "
                                     f"selected text segment ({where})")
            spans.append([sorted(s) for s in painted])
        return spans

    def plan(self, call: AttentionCall) -> Optional[Plan]:
        joint = call.joint
        if joint is None and (not call.is_cross or call.context != "text"):
            return None  # phrases are text tokens: Wan I2V's image-context call is left alone
        if joint is not None and (len(joint.text) == 0 or (self.blocks is not None and not self.blocks(joint))):
            return None
        if self._spans is None:
            raise RuntimeError("PaintWithWords: no generation has started (install it on a pipeline)")
        if joint is None and self.blocks is not None:
            raise ValueError(f"blocks: selects MM-DiT (Flux, SD3) blocks; {call.layer} is cross-attention")
        if joint is not None and not self._joint:
            raise ValueError(f"PaintWithWords: {call.layer} is MM-DiT joint attention, but the generation did "
                             "not say which text encoder's tokens are which columns; install attnctl on the "
                             "Flux / SD3 pipeline, not its transformer, and pass it the prompt")
        if call.grid is None:
            raise RuntimeError(f"PaintWithWords: the query grid of {call.layer} is unknown")
        rows = call.layout.cond_rows
        if len(rows) == 0:
            return None
        image = joint.image if joint is not None else range(call.queries)
        text = joint.text if joint is not None else range(call.keys)
        key = (call.grid, call.batch, rows, call.keys, image, text, call.device)
        cached = self._shapes.get(key)
        if cached is None:
            cached = self._shapes[key] = self._build(call, image, text)
        area, bias = cached
        q = call.query[rows.start:rows.stop, :, image.start:image.stop]
        k = call.key[rows.start:rows.stop, :, text.start:text.stop]
        backend = call.backend if call.backend in ("torch", "triton") else "auto"
        layer_max = logit_max(q, k, backend=backend).amax(dim=1)            # (images,)
        coef = layer_max * (self.weight * math.log1p(call.step.sigma) * call.scale)
        painted = bias[rows.start:rows.stop, :, image.start:image.stop, text.start:text.stop]
        torch.mul(area, coef.view(-1, 1, 1, 1).to(area.dtype), out=painted)
        return Plan(bias=bias)

    def _build(self, call: AttentionCall, image: range, text: range) -> Tuple[torch.Tensor, torch.Tensor]:
        """A on the (image rows, text columns) block of the conditional rows, and the zeroed
        bias buffer of the call's shape."""
        if not self._checked:
            for i, (phrase, mask, _) in enumerate(self.regions):
                check_mask_size(mask, f"regions[{i}] ({phrase!r}) mask", call.latent, self._image_scale)
            self._checked = True
        layout = call.layout
        images = len(layout.cond_rows)
        # Video queries are the latent frames one after another on the grid: the mask paints every frame.
        on_grid = [strength * mask_on_grid(mask, call.grid, self.resize).repeat(call.frames)[:, None]
                   for _, mask, strength in self.regions]
        area = torch.zeros(images, 1, len(image), len(text))
        for i in range(images):
            spans = self._spans[min(layout.prompt_of_image(i), len(self._spans) - 1)]
            for painted, occurrences in zip(on_grid, spans):
                for start, stop in occurrences:
                    if start < len(text):
                        area[i, 0, :, start:min(stop, len(text))] += painted
        area = area.to(call.device, non_blocking=True)
        bias = torch.zeros(call.batch, 1, call.queries, call.keys, device=call.device)
        return area, bias


def _regions(regions) -> List[Tuple[str, torch.Tensor, float]]:
    """(phrase, mask, strength) of every region, each checked; errors name the region as
    ``regions['phrase']`` (dict form) or ``regions[i]`` (list form)."""
    entries = []
    if isinstance(regions, Mapping):
        for phrase, spec in regions.items():
            name = f"regions[{phrase!r}]"
            if isinstance(spec, tuple) and len(spec) != 2:
                raise ValueError(f"{name}: expected a mask or a (mask, strength) pair, got a tuple of {len(spec)}")
            mask, strength = spec if isinstance(spec, tuple) else (spec, 1.0)
            entries.append((name, phrase, mask, strength))
    elif isinstance(regions, (list, tuple)):
        for i, entry in enumerate(regions):
            if not isinstance(entry, tuple) or len(entry) != 3:
                what = f"a tuple of {len(entry)}" if isinstance(entry, tuple) else f"a {type(entry).__name__}"
                raise ValueError(f"regions[{i}]: expected a (phrase, mask, strength) tuple, got {what}")
            entries.append((f"regions[{i}]", *entry))
    else:
        raise ValueError(f"regions: expected a non-empty dict {{phrase: (mask, strength)}} or a list of "
                         f"(phrase, mask, strength), got {type(regions).__name__}")
    if not entries:
        raise ValueError("regions: expected at least one region, got none")
    return [(_phrase(phrase, f"{name} phrase"), as_mask(mask, f"{name} mask"), finite(strength, f"{name} strength"))
            for name, phrase, mask, strength in entries]


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
