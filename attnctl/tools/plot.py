"""Heat-map overlays written as PNG with matplotlib (Agg: no display needed)."""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch


def image_array(image) -> np.ndarray:
    """An (H, W, 3) float array in [0, 1] from a PIL image, an array or a (3, H, W) tensor."""
    if isinstance(image, torch.Tensor):
        t = image.detach().float().cpu()
        if t.dim() == 4:
            t = t[0]
        arr = t.permute(1, 2, 0).numpy() if t.shape[0] in (1, 3) else t.numpy()
    else:
        arr = np.asarray(image).astype(np.float32)
        if arr.max() > 1.0:
            arr = arr / 255.0
    if arr.ndim == 2 or arr.shape[-1] == 1:
        arr = np.repeat(arr.reshape(arr.shape[0], arr.shape[1], 1), 3, axis=-1)
    return np.clip(arr[..., :3], 0.0, 1.0)


def _figure(ax):
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    if ax is not None:
        return ax.figure, ax, plt
    fig, ax = plt.subplots(figsize=(4, 4))
    return fig, ax, plt


def overlay(heat_map, image=None, *, path: Optional[str] = None, ax=None, alpha: float = 0.5,
            cmap: str = "jet", normalize: bool = True):
    """Draw ``heat_map`` (an attnctl HeatMap) over ``image``; write a PNG to ``path``.

    The map is upsampled bicubically to the image size and, with ``normalize``, scaled to
    [0, 1] (DAAM's colour normalisation). Returns the matplotlib Axes.
    """
    fig, ax, plt = _figure(ax)
    if image is not None:
        arr = image_array(image)
        heat = heat_map.upsample(arr.shape[:2]).value
        ax.imshow(arr)
    else:
        heat = heat_map.value
    heat = heat.detach().float().cpu()
    if normalize:
        heat = (heat - heat.min()) / (heat.max() - heat.min() + 1e-8)
    ax.imshow(heat.numpy(), cmap=cmap, alpha=alpha if image is not None else 1.0)
    ax.set_title(heat_map.label)
    ax.axis("off")
    if path is not None:
        fig.savefig(path, bbox_inches="tight", dpi=100)
        plt.close(fig)
    return ax


def overlay_grid(heat_maps: Sequence, image=None, *, path: str, columns: int = 4, **kwargs) -> None:
    """All ``heat_maps`` side by side over ``image``, written to ``path``."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    n = len(heat_maps)
    if n == 0:
        raise ValueError("heat_maps: expected at least one heat map, got none")
    cols = min(columns, n)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3 * cols, 3 * rows), squeeze=False)
    for ax in axes.flat[n:]:
        ax.axis("off")
    for hm, ax in zip(heat_maps, axes.flat):
        overlay(hm, image, ax=ax, **kwargs)
    fig.savefig(path, bbox_inches="tight", dpi=100)
    plt.close(fig)
