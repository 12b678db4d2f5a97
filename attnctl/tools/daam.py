"""DAAM 0.2.0's conventions (castorini/daam, tag v0.2.0), which attnctl.trace follows by default.

DAAM hooks the cross-attention of the UNet's down and up blocks, not the mid block. It
names each call by a "factor", int(sqrt(latent_hw // M)) for a call with M queries,
where latent_hw is 64² when ``unet.config.sample_size × vae_scale_factor`` is 512 or
1024 and 96² otherwise (SD 2.x at 768). Its hooks skip factor 8, and its global heat map
takes by default the factors {0, 1, 2, 4, 8, 16, 32, 64}: so a call counts when its
factor is 0, 1, 2, 4, 16, 32 or 64. At SD 1.x's 512² (and SDXL's 1024²) that is every
down- and up-block layer; at other sizes some levels drop out (SD 1.5 at 256²: the 8²
level, factor 8; at 384²: the 12² level, factor 5). Its heat maps come out at the fixed
side (64 or 96), whatever the image size.
"""
from __future__ import annotations

import math
from typing import Optional

DAAM_BLOCKS = ("down_blocks.", "up_blocks.")
DAAM_FACTORS = frozenset({0, 1, 2, 4, 16, 32, 64})  # the global map's default, less the hooks' 8
_SIDES_OF_64 = (512, 1024)


def output_side(sample_size, vae_scale_factor) -> Optional[int]:
    """DAAM's heat-map side for a pipeline (64 or 96); None when the UNet's sample size is
    not a single int (DAAM does not handle such models)."""
    if not isinstance(sample_size, int) or not vae_scale_factor:
        return None
    return 64 if sample_size * int(vae_scale_factor) in _SIDES_OF_64 else 96


def daam_factor(side: int, queries: int) -> int:
    """DAAM's factor of a call with ``queries`` positions, for output side ``side``."""
    return int(math.sqrt(side * side // queries))


def is_daam_layer(name: str) -> bool:
    """A cross-attention layer DAAM hooks: in the down or up blocks (not the mid block)."""
    return name.startswith(DAAM_BLOCKS)


def counts_in_daam(side: int, queries: int) -> bool:
    """Whether DAAM's default global heat map includes a call with ``queries`` positions."""
    return daam_factor(side, queries) in DAAM_FACTORS


def _daam_cross(unet, latent) -> list:
    """The cross-attention layers DAAM hooks, with their shapes for a (h, w) ``latent``
    (from the UNet's architecture, no forward)."""
    from ..diffusers.unet_layers import attention_layers

    return [layer for layer in attention_layers(unet, tuple(latent), 1) if layer.is_cross and is_daam_layer(layer.name)]


def daam_kept_layers(unet, side: int, latent) -> list:
    """The names of the cross-attention layers DAAM's rule keeps for a (h, w) ``latent``."""
    return [layer.name for layer in _daam_cross(unet, latent) if counts_in_daam(side, layer.queries)]


def _ranges(sizes, step: int, last: int) -> str:
    """"40-48, 68-96, 136 and above" for sizes at multiples of ``step`` up to ``last``."""
    runs = []
    for size in sizes:
        if runs and size == runs[-1][1] + step:
            runs[-1][1] = size
        else:
            runs.append([size, size])
    parts = [f"{a}" if a == b else f"{a}-{b}" for a, b in runs]
    if runs and runs[-1][1] == last:
        parts[-1] = f"{runs[-1][0]} and above"
    return ", ".join(parts)


def daam_layer_problem(unet, vae_scale_factor: int, latent) -> Optional[str]:
    """None when DAAM's rule keeps a cross-attention layer of ``unet`` at the (h, w)
    ``latent``; else why not, with the square image sizes (pixels) at which it keeps one."""
    side = output_side(unet.config.sample_size, vae_scale_factor)
    if side is None or daam_kept_layers(unet, side, latent):
        return None
    levels = len(unet.config.block_out_channels)
    step = int(vae_scale_factor) * 2 ** (levels - 1)        # image sides every level divides
    # Above DAAM's side at the lowest level every factor is 0: every layer counts from there on.
    last = side * int(vae_scale_factor) * 2 ** (levels - 1) + step
    sizes = [px for px in range(step, last + 1, step) if daam_kept_layers(unet, side, (px // vae_scale_factor,) * 2)]
    h, w = latent
    factors = sorted({daam_factor(side, layer.queries) for layer in _daam_cross(unet, latent)})
    return (f"DAAM's layer rule keeps no cross-attention layer at {h * vae_scale_factor}x{w * vae_scale_factor} "
            f"pixels (its factors of the down/up-block layers there are {factors}, none among "
            f"{sorted(DAAM_FACTORS)}); square sizes that keep one: {_ranges(sizes, step, last)} "
            f"(multiples of {step} px)")

