"""Prompt-to-prompt's ``AttentionStore`` view (Hertz et al. 2022, prompt-to-prompt_stable.ipynb):
the cross- and self-attention maps of a generation, averaged over its steps, per place
in the UNet ("down", "mid", "up"), read back as the original's ``aggregate_attention``,
``show_cross_attention`` and ``show_self_attention_comp``.

What the original stores, and so what is captured here: per layer whose query count is at
most 32² (``attn.shape[1] <= 32 ** 2``), the conditional half's attention probabilities,
summed over steps (``between_steps``) and divided by the number of steps when read
(``get_average_attention``). Cross-attention keeps every text column, self-attention
every key column (M ≤ 32² of them). The kernel sums the heads and the steps into one fp32
buffer per layer, so nothing per head or per step is kept; the aggregate divides by the
layers' total head count, which is the original's mean over the concatenated
layers·heads.

Installed with a prompt-to-prompt edit, the store holds the edited maps, as the
original's (whose edits are written in place into the stored tensor): cross-attention
maps arrive edited through the composition of captures with the edit's token map
(:class:`attnctl.diffusers.compose.EditedCapture`); on self-attention injection the
op captures the injected P (the source's), i.e. the map the target applies.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from ..capture import Capture
from ..diffusers.controller import AttentionCall, BatchLayout, Controller, DenoiseStep, Plan

PLACES = ("down", "mid", "up")
_PLACE_OF_BLOCK = {"down_blocks": "down", "mid_block": "mid", "up_blocks": "up"}
DEFAULT_MAX_QUERIES = 32 ** 2      # the original's `attn.shape[1] <= 32 ** 2`
PANEL = 256                        # the original resizes every map to 256²


class _Layer:
    """One stored layer: its place, kind, grid, heads and the capture summing its maps."""

    __slots__ = ("place", "is_cross", "grid", "heads", "plan")

    def __init__(self, place: str, call: AttentionCall, capture: Capture):
        self.place, self.is_cross, self.grid, self.heads = place, call.is_cross, call.grid, call.heads
        self.plan = Plan(capture=capture)

    @property
    def maps(self) -> torch.Tensor:
        return self.plan.capture.maps


def place_of(layer: str) -> str:
    """"down", "mid" or "up" for a UNet attention layer name (the original's place_in_unet)."""
    block = layer.split(".", 1)[0]
    if block not in _PLACE_OF_BLOCK:
        raise ValueError(f"AttentionStore: layer {layer!r} is in none of the UNet's down_blocks, mid_block or "
                         "up_blocks, so it has no place (down / mid / up)")
    return _PLACE_OF_BLOCK[block]


class AttentionStore(Controller):
    """The original's AttentionStore as a controller: install it on a pipeline (alone or
    with an edit), generate, then read ``aggregate``, ``show_cross_attention`` or
    ``show_self_attention_comp``. Every generation starts a new store.

    ``max_queries``: layers with more query positions are not stored (the original's 32²).
    """

    def __init__(self, *, max_queries: int = DEFAULT_MAX_QUERIES):
        if isinstance(max_queries, bool) or not isinstance(max_queries, int) or max_queries < 1:
            raise ValueError(f"max_queries: expected a positive int, got {max_queries!r}")
        self.max_queries = max_queries
        self._layers: Dict[str, _Layer] = {}
        self._columns: Dict[Tuple[int, str], torch.Tensor] = {}
        self._steps = 0
        self._layout: Optional[BatchLayout] = None

    # ---- controller hooks ---------------------------------------------------------------
    def on_generation_start(self, generation) -> None:
        self._layers, self._columns, self._steps, self._layout = {}, {}, 0, None

    def on_step(self, step: DenoiseStep, layout: BatchLayout) -> None:
        self._steps += 1
        self._layout = layout

    def plan(self, call: AttentionCall) -> Optional[Plan]:
        if call.joint is not None:
            raise NotImplementedError(f"AttentionStore: layer {call.layer!r} is MM-DiT joint attention; the "
                                      "store follows the original's UNet places (down / mid / up) only")
        if call.queries > self.max_queries:
            return None
        layer = self._layers.get(call.layer)
        if layer is None:
            if call.grid is None:
                raise ValueError(f"AttentionStore: the query grid of layer {call.layer!r} is unknown (a UNet called "
                                 "outside a pipeline with 3-D input); install attnctl on the pipeline")
            layer = self._layers[call.layer] = _Layer(place_of(call.layer), call, self._capture(call))
        expected = (call.batch, call.queries, call.keys)
        if tuple(layer.maps.shape) != expected:
            raise ValueError(f"AttentionStore: layer {call.layer!r} was stored with (B, M, N) = "
                             f"{tuple(layer.maps.shape)} in this generation, now called with {expected}")
        return layer.plan

    def _capture(self, call: AttentionCall) -> Capture:
        """Head-summed maps of every key column of the conditional rows (the original
        stores ``attn[h // 2:]``)."""
        key = (call.keys, str(call.device))
        if key not in self._columns:
            self._columns[key] = torch.arange(call.keys, device=call.device)
        return Capture(maps=torch.zeros(call.batch, call.queries, call.keys, device=call.device),
                       tokens=self._columns[key], rows=call.layout.cond_rows)

    # ---- reading ------------------------------------------------------------------------
    @property
    def num_steps(self) -> int:
        """Steps stored so far (the original's ``cur_step``)."""
        return self._steps

    def aggregate(self, res: Union[int, Tuple[int, int]], from_where: Sequence[str], is_cross: bool,
                  select: int) -> torch.Tensor:
        """The original's ``aggregate_attention``: the step-averaged maps of image
        ``select`` at the layers of ``from_where`` (places, in order; a place given twice
        counts twice, as there) whose grid is ``res``² (or ``res = (h, w)``), averaged over
        those layers' heads: (h, w, N) on the CPU, N = 77 text columns (cross) or h·w
        (self)."""
        grid = _grid(res)
        places = [from_where] if isinstance(from_where, str) else list(from_where)
        unknown = [p for p in places if p not in PLACES]
        if unknown or not places:
            raise ValueError(f"from_where: expected places among {PLACES}, got {from_where!r}")
        if not self._layers or not self._steps:
            raise RuntimeError("AttentionStore: nothing stored yet (install it and run a generation)")
        images = self._layout.images
        if isinstance(select, bool) or not isinstance(select, int) or not 0 <= select < images:
            raise IndexError(f"select: expected an image index in [0, {images}), got {select!r}")
        row = self._layout.row(select, "cond")
        kind = "cross" if is_cross else "self"
        total, heads = None, 0
        for place in places:
            for layer in self._layers.values():
                if layer.place == place and layer.is_cross == bool(is_cross) and layer.grid == grid:
                    maps = layer.maps[row].reshape(*grid, -1)
                    total = maps if total is None else total + maps
                    heads += layer.heads
        if total is None:
            present = sorted({layer.grid for layer in self._layers.values()
                              if layer.place in places and layer.is_cross == bool(is_cross)})
            raise ValueError(f"res: no stored {kind}-attention layer of {', '.join(places)} has grid {grid}; "
                             f"stored grids there: {present or 'none'}")
        return (total / (self._steps * heads)).cpu()

    def show_cross_attention(self, tokenizer, prompts: Sequence[str], res: Union[int, Tuple[int, int]],
                             from_where: Sequence[str], select: int = 0, path: Optional[str] = None) -> np.ndarray:
        """The original's ``show_cross_attention``: one panel per token of
        ``prompts[select]`` (start and end tokens included): its averaged map scaled to
        255 by its maximum, resized to 256² (PIL bicubic, Pillow's default), with the
        decoded token under it; panels in one row, as ``view_images`` lays them out.
        Written to ``path`` (PNG) when given; returns the (H, W, 3) uint8 image."""
        if isinstance(prompts, str) or len(prompts) != self._images():
            raise ValueError(f"prompts: expected one prompt per stored image ({self._images()}), got {prompts!r}")
        maps = self.aggregate(res, from_where, True, select)
        tokens = tokenizer.encode(prompts[select])
        panels = []
        for i, token in enumerate(tokens):
            image = maps[:, :, i]
            image = 255 * image / image.max()
            image = image.unsqueeze(-1).expand(*image.shape, 3).numpy().astype(np.uint8)
            panels.append(_text_under_image(_resize(image), tokenizer.decode(int(token))))
        return _save(_view_images(panels), path)

    def show_self_attention_comp(self, res: Union[int, Tuple[int, int]], from_where: Sequence[str],
                                 max_com: int = 10, select: int = 0, path: Optional[str] = None) -> np.ndarray:
        """The original's ``show_self_attention_comp``: the top ``max_com`` right singular
        vectors of the averaged self-attention map (rows centred), each shifted to 0,
        scaled to 255 by its maximum and resized to 256², side by side. Written to
        ``path`` (PNG) when given; returns the (256, 256·max_com, 3) uint8 image."""
        grid = _grid(res)
        pixels = grid[0] * grid[1]
        if isinstance(max_com, bool) or not isinstance(max_com, int) or not 1 <= max_com <= pixels:
            raise ValueError(f"max_com: expected an int in [1, {pixels}] (the components of a {grid} map), "
                             f"got {max_com!r}")
        maps = self.aggregate(grid, from_where, False, select).numpy().reshape(pixels, pixels)
        _, _, vh = np.linalg.svd(maps - np.mean(maps, axis=1, keepdims=True))
        panels = []
        for i in range(max_com):
            image = vh[i].reshape(grid)
            image = image - image.min()
            image = 255 * image / image.max()
            panels.append(_resize(np.repeat(image[:, :, None], 3, axis=2).astype(np.uint8)))
        return _save(np.concatenate(panels, axis=1), path)

    def _images(self) -> int:
        if self._layout is None:
            raise RuntimeError("AttentionStore: nothing stored yet (install it and run a generation)")
        return self._layout.images


def _grid(res) -> Tuple[int, int]:
    if isinstance(res, int) and not isinstance(res, bool) and res > 0:
        return res, res
    if (isinstance(res, (tuple, list)) and len(res) == 2
            and all(isinstance(x, int) and not isinstance(x, bool) and x > 0 for x in res)):
        return int(res[0]), int(res[1])
    raise ValueError(f"res: expected a positive int (a res x res grid) or a pair (h, w), got {res!r}")


def _resize(image: np.ndarray) -> np.ndarray:
    from PIL import Image

    return np.array(Image.fromarray(image).resize((PANEL, PANEL), Image.BICUBIC))


def _text_under_image(image: np.ndarray, text: str) -> np.ndarray:
    """The original's ``text_under_image``: a white band of 20 % of the height under the
    image with the text centred (drawn with PIL's default font instead of OpenCV's)."""
    from PIL import Image, ImageDraw

    h, w, c = image.shape
    offset = int(h * .2)
    out = Image.fromarray(np.full((h + offset, w, c), 255, dtype=np.uint8))
    out.paste(Image.fromarray(image), (0, 0))
    draw = ImageDraw.Draw(out)
    left, top, right, bottom = draw.textbbox((0, 0), text)
    draw.text(((w - (right - left)) // 2, h + (offset - (bottom - top)) // 2), text, fill=(0, 0, 0))
    return np.array(out)


def _view_images(images: List[np.ndarray], offset_ratio: float = 0.02) -> np.ndarray:
    """The original's ``view_images`` with one row: white gaps of 2 % of the height."""
    h, w, _ = images[0].shape
    offset = int(h * offset_ratio)
    out = np.full((h, w * len(images) + offset * (len(images) - 1), 3), 255, dtype=np.uint8)
    for j, image in enumerate(images):
        out[:, j * (w + offset): j * (w + offset) + w] = image
    return out


def _save(image: np.ndarray, path: Optional[str]) -> np.ndarray:
    if path is not None:
        from PIL import Image

        Image.fromarray(image).save(path)
    return image
