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
    """A 2-D float mask from a tensor, array or PIL image (values in [0, 1])."""
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
    if mask.is_complex():
        raise TypeError(f"{name}: expected a real-valued mask (bool, integer or float), got dtype {mask.dtype}")
    mask = mask.float()
    if mask.max() > 1.0:  # 8-bit image
        mask = mask / 255.0
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
