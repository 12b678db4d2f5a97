"""The attention layers of a diffusers UNet (UNet2DConditionModel: SD 1.x / 2.x, SDXL) and
the shape each sees for a latent size, from the architecture alone (no forward).

Down block i runs at the latent side halved i times, the mid block at the lowest level,
up block i at the level of down block ``levels - 1 - i``. A halving is the downsampler's
stride-2 convolution with padding 1: ⌈side / 2⌉, so odd sides round up (as
attnctl.diffusers.install.query_grid reads a layer's grid back from its query count).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Tuple


@dataclass(frozen=True)
class AttentionLayer:
    """One attention layer of a UNet at a latent size."""
    name: str
    heads: int
    queries: int     # M: positions of the layer's feature map
    keys: int        # N: M for self-attention, the text length for cross-attention
    is_cross: bool


def level_side(side: int, level: int) -> int:
    """The feature map's side at ``level`` (0: the latent's)."""
    for _ in range(level):
        side = (side + 1) // 2
    return side


def attention_layers(unet, latent: Tuple[int, int], text_tokens: int) -> List[AttentionLayer]:
    """Every diffusers Attention module of ``unet`` (module order, not forward order) with
    its shape for a (h, w) ``latent`` and ``text_tokens`` text states."""
    from diffusers.models.attention_processor import Attention

    levels = len(unet.config.block_out_channels)
    layers = []
    for name, module in unet.named_modules():
        if not isinstance(module, Attention):
            continue
        part, index = name.split(".")[:2]
        level = {"down_blocks": lambda: int(index), "up_blocks": lambda: levels - 1 - int(index),
                 "mid_block": lambda: levels - 1}[part]()
        queries = level_side(latent[0], level) * level_side(latent[1], level)
        layers.append(AttentionLayer(name, module.heads, queries,
                                     text_tokens if module.is_cross_attention else queries, module.is_cross_attention))
    return layers
