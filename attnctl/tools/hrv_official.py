"""The official HRV release format (SNU-DRL/HRV, extract_head_relevance_vectors.ipynb).

Two numpy files per model: ``category_vectors_*.npy`` (K concepts × H heads, float32, each
row summing to H) and ``head_index_*.npy`` (H strings ``"<place>, layer: <l>, head: <h>"``)
giving each column's head. The official order is the places down, mid, up, in that order;
within a place the cross-attention layers in the UNet's forward order (``l`` counts the
place's cross-attention layers from 0), and the heads of a layer in order. Concept names
come from the description CSV: its non-empty lines without a digit (the numbered lines
are the concept words), a leading byte-order mark dropped.

attnctl's own flat head order (``HeadRelevance.layers`` of a built HRV) is this order too,
so a built HRV and an official one index heads alike; files keep their layer names, so
one of any order loads by name.
"""
from __future__ import annotations

import csv
from typing import Dict, List, Sequence, Tuple, Union

import numpy as np
import torch

PLACES = ("down", "mid", "up")
_PREFIX = {"down_blocks.": "down", "mid_block.": "mid", "up_blocks.": "up"}


def place_of(layer: str) -> str:
    """"down", "mid" or "up" for a diffusers UNet layer name."""
    for prefix, place in _PREFIX.items():
        if layer.startswith(prefix):
            return place
    raise ValueError(f"layer: expected a UNet layer under down_blocks, mid_block or up_blocks, got {layer!r}")


def official_order(layers: Sequence[Tuple[str, int]]) -> List[Tuple[str, int]]:
    """(name, heads) of cross-attention layers, given in forward order within each place,
    reordered down, mid, up (stable)."""
    return sorted(layers, key=lambda item: PLACES.index(place_of(item[0])))


def head_names(layers: Sequence[Tuple[str, int]]) -> List[str]:
    """The official name of every head of ``layers`` (in official order)."""
    counter: Dict[str, int] = {}
    names = []
    for name, heads in layers:
        place = place_of(name)
        index = counter.get(place, 0)
        counter[place] = index + 1
        names += [f"{place}, layer: {index}, head: {h}" for h in range(heads)]
    return names


def cross_attention_layers(unet) -> List[Tuple[str, int]]:
    """(name, heads) of a UNet's (or pipeline's) cross-attention layers, official order."""
    from diffusers.models.attention_processor import Attention

    unet = getattr(unet, "unet", unet)
    layers = [(name, m.heads) for name, m in unet.named_modules()
              if isinstance(m, Attention) and m.is_cross_attention]
    return official_order(layers)


def published_layers(total_heads: int) -> List[Tuple[str, int]]:
    """Cross-attention layers of the published UNet with ``total_heads`` heads (SD 1.x:
    128, SDXL: 1300), from attnctl's shipped configs, built on the meta device."""
    from diffusers import UNet2DConditionModel

    from ..configs import UNET_CONFIGS, load_unet_config

    for name in UNET_CONFIGS:
        with torch.device("meta"):
            unet = UNet2DConditionModel.from_config(load_unet_config(name))
        layers = cross_attention_layers(unet)
        if sum(h for _, h in layers) == total_heads:
            return layers
    raise ValueError(f"head_index: expected the heads of SD 1.x (128) or SDXL (1300), got {total_heads} heads; "
                     "pass unet= (the model the vectors were made for)")


def concept_names(concepts: Union[str, Sequence[str]]) -> List[str]:
    """Concept names: a list, or the path of the official description CSV."""
    if isinstance(concepts, str):
        with open(concepts, newline="", encoding="utf-8") as f:
            rows = [row for row in csv.reader(f) if row]
        names = [row[0].replace("\ufeff", "") for row in rows if not any(c.isdigit() for c in row[0])]
    else:
        names = [str(c) for c in concepts]
    return names


def read(vectors: str, head_index: str, concepts, layers: Sequence[Tuple[str, int]]):
    """(concept names, hrv (K, H) in the order of ``layers``) from the official files."""
    values = np.load(vectors)
    index = np.load(head_index)
    names = concept_names(concepts)
    if values.ndim != 2 or index.ndim != 1 or values.shape[1] != index.shape[0]:
        raise ValueError(f"vectors, head_index: expected (K, H) vectors and H head names, got "
                         f"{values.shape} and {index.shape}")
    if values.shape[0] != len(names):
        raise ValueError(f"concepts: expected {values.shape[0]} names (the rows of {vectors}), got {len(names)}")
    expected = head_names(layers)
    position = {head: i for i, head in enumerate(expected)}
    given = [str(h) for h in index.tolist()]
    unknown = [h for h in given if h not in position]
    if unknown or len(set(given)) != len(expected):
        raise ValueError(f"head_index: expected the {len(expected)} heads of the model "
                         f"({expected[0]!r} ... {expected[-1]!r}), got {len(given)} names"
                         + (f", e.g. unknown {unknown[0]!r}" if unknown else ""))
    hrv = torch.zeros(values.shape, dtype=torch.float32)
    hrv[:, [position[h] for h in given]] = torch.from_numpy(values.astype(np.float32))
    return names, hrv


def write(vectors: str, head_index: str, hrv: torch.Tensor, layers: Sequence[Tuple[str, int]]) -> None:
    """Write (K, H) ``hrv`` over ``layers`` (any order) in the official format and order."""
    ordered = official_order(layers)
    start, offset = 0, {}
    for name, heads in layers:
        offset[name] = start
        start += heads
    columns = [offset[name] + h for name, heads in ordered for h in range(heads)]
    np.save(vectors, hrv.detach().float().cpu()[:, columns].numpy())
    np.save(head_index, np.array(head_names(ordered)))
