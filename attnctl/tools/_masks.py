"""Region masks given at image or latent size, resized to a layer's query grid."""
from __future__ import annotations

from typing import Tuple

import torch
import torch.nn.functional as F

# How a mask is resized to a layer's grid:
#   "bilinear"       bilinear with align_corners=True (paint-with-words' original,
#                    paint_with_words.py `_img_importance_flatten`);
#   "nearest-exact"  the pixel whose centre is nearest (PIL's Image.NEAREST, which
#                    Shape-Guided Diffusion's `preprocess_segm` uses);
#   "nearest"        torch's legacy nearest (floor of dst · scale).
RESIZE_MODES = ("bilinear", "nearest-exact", "nearest")


def as_mask(mask, name: str) -> torch.Tensor:
    """A 2-D float mask in [0, 1] from a tensor, array or PIL image: bool, uint8 (an 8-bit
    image: 0..255, divided by 255) or any other real dtype with values in [0, 1]; NaN and
    other values are errors naming ``name`` (a float mask is never rescaled)."""
    if not isinstance(mask, torch.Tensor):
        try:
            import numpy as np

            mask = torch.as_tensor(np.array(mask))
        except Exception:
            raise TypeError(f"{name}: expected a 2-D tensor, array or image, got {type(mask).__name__}") from None
    if mask.dim() == 3 and mask.shape[-1] in (1, 3, 4):  # (h, w, channels) image: first channel
        mask = mask[..., 0]
    if mask.dim() != 2 or 0 in mask.shape:
        raise ValueError(f"{name}: expected a 2-D (height, width) mask, got shape {tuple(mask.shape)}")
    return mask_values(mask, name)


def mask_values(mask: torch.Tensor, name: str) -> torch.Tensor:
    """``mask`` (any shape) as float values in [0, 1]: uint8 read as 0..255, every other
    dtype taken as it is and refused unless finite and in [0, 1]."""
    if mask.is_complex():
        raise TypeError(f"{name}: expected a real-valued mask (bool, integer or float), got dtype {mask.dtype}")
    if mask.dtype == torch.uint8:
        return mask.float() / 255.0
    dtype, mask = mask.dtype, mask.detach().float()
    nan = torch.isnan(mask)
    if bool(nan.any()):
        raise ValueError(f"{name}: expected values in [0, 1], got NaN ({int(nan.sum())} of {mask.numel()} "
                         f"entries, first at index {tuple(int(i) for i in nan.nonzero()[0])})")
    lo, hi = float(mask.min()), float(mask.max())
    if lo < 0.0 or hi > 1.0:
        raise ValueError(f"{name}: expected values in [0, 1] (or a uint8 mask in 0..255), got range [{lo:g}, {hi:g}] "
                         f"(dtype {dtype})")
    return mask


def check_resize(mode: str, name: str = "resize") -> str:
    if mode not in RESIZE_MODES:
        raise ValueError(f"{name}: expected one of {', '.join(map(repr, RESIZE_MODES))}, got {mode!r}")
    return mode


def check_mask_size(mask: torch.Tensor, name: str, latent: Tuple[int, int], image_scale: int) -> None:
    image = (latent[0] * image_scale, latent[1] * image_scale)
    if tuple(mask.shape) not in (tuple(latent), image):
        raise ValueError(f"{name}: expected the image size {image} or the latent size {tuple(latent)} "
                         f"(height, width), got {tuple(mask.shape)}")


def mask_on_grid(mask: torch.Tensor, grid: Tuple[int, int], mode: str) -> torch.Tensor:
    """The mask resized to ``grid`` (see ``RESIZE_MODES``) and flattened row-major to
    (h*w,), the order of a UNet layer's query positions."""
    align = dict(align_corners=True) if mode == "bilinear" else {}
    return F.interpolate(mask[None, None], size=tuple(grid), mode=mode, **align)[0, 0].reshape(-1)
