"""Per-frame heat maps of a video trace (Wan): one map per latent frame and word, an
animated overlay (GIF or MP4 through imageio) and a frames × words strip (PNG through
matplotlib).

Wan's VAE is causal in time: latent frame 0 encodes video frame 0 and latent frame i ≥ 1
the ``frame_scale`` (4) video frames 4i−3 … 4i, so video frame t shows the map of latent
frame ceil(t / frame_scale).
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch

from .maps import GlobalHeatMap, HeatMap
from .plot import image_array


class WordVideo:
    """The (frames, h, w) maps of one word (or token set) over the latent frames."""

    def __init__(self, value: torch.Tensor, label: str, frame_scale: int = 1):
        self.value = value
        self.label = label
        self.frame_scale = frame_scale

    @property
    def frames(self) -> int:
        return self.value.shape[0]

    def frame(self, frame: int) -> HeatMap:
        """The map of one latent frame."""
        _check_frame(frame, self.frames)
        return HeatMap(self.value[frame], f"{self.label} (frame {frame})")

    def latent_frame_of(self, video_frame: int) -> int:
        """The latent frame whose map video frame ``video_frame`` shows (see the module doc)."""
        return -(-video_frame // self.frame_scale)

    def animate(self, path: str, video=None, *, fps: float = 8.0, alpha: float = 0.5, cmap: str = "jet") -> None:
        """Write the maps as an animation to ``path`` (``.gif``, or ``.mp4`` with imageio's
        ffmpeg plugin): over the decoded ``video`` frames (a (frames, H, W, 3) array or a
        list of images, ``frame_scale``·(latent frames − 1) + 1 of them), or alone, one
        frame per latent frame. Colours are normalised over the whole clip so frames compare."""
        try:
            import imageio.v3 as iio
        except ImportError:
            raise ImportError("animate: writing a GIF or MP4 needs imageio (pip install imageio; add "
                              "imageio-ffmpeg for MP4), which is not installed") from None
        heat = self.value.detach().float().cpu()
        heat = (heat - heat.min()) / (heat.max() - heat.min() + 1e-8)
        if video is None:
            pictures = [_colour(HeatMap(h, self.label), None, alpha, cmap) for h in heat]
        else:
            frames = [image_array(f) for f in video]
            expected = self.frame_scale * (self.frames - 1) + 1
            if len(frames) != expected:
                raise ValueError(f"video: expected {expected} frames ({self.frames} latent frames × "
                                 f"{self.frame_scale} − {self.frame_scale - 1}), got {len(frames)}")
            pictures = [_colour(HeatMap(heat[self.latent_frame_of(t)], self.label), f, alpha, cmap)
                        for t, f in enumerate(frames)]
        clip = np.stack([(p * 255).round().astype(np.uint8) for p in pictures])
        if str(path).lower().endswith(".gif"):
            iio.imwrite(path, clip, duration=1000.0 / fps, loop=0)
        else:
            iio.imwrite(path, clip, fps=fps)

    def __repr__(self) -> str:
        return f"WordVideo({self.label!r}, {tuple(self.value.shape)})"


def _colour(heat_map: HeatMap, image: Optional[np.ndarray], alpha: float, cmap: str) -> np.ndarray:
    """(H, W, 3) in [0, 1]: the map (values already in [0, 1]) through ``cmap``, blended over ``image``."""
    import matplotlib

    if image is not None:
        heat_map = heat_map.upsample(image.shape[:2])
    rgb = matplotlib.colormaps[cmap](heat_map.value.clamp(0, 1).numpy())[..., :3]
    return rgb if image is None else (1 - alpha) * image + alpha * rgb


def _check_frame(frame, frames: int) -> None:
    if isinstance(frame, bool) or not isinstance(frame, int) or not 0 <= frame < frames:
        raise ValueError(f"frame: expected a latent frame index in [0, {frames}), got {frame!r}")


class VideoHeatMap:
    """Heat maps of the captured key columns for every latent frame: (T, frames, h, w)."""

    def __init__(self, value: torch.Tensor, text, tokenizer=None, frame_scale: int = 1):
        self.value = value
        self.text = text
        self.tokenizer = tokenizer
        self.frame_scale = frame_scale
        self._columns = GlobalHeatMap(value, text, tokenizer)   # word -> key columns, range checks

    @property
    def frames(self) -> int:
        return self.value.shape[1]

    def frame(self, frame: int) -> GlobalHeatMap:
        """The (T, h, w) heat maps of one latent frame."""
        _check_frame(frame, self.frames)
        return GlobalHeatMap(self.value[:, frame], self.text, self.tokenizer)

    def word(self, word: str, occurrence: Optional[int] = None, match: str = "tokens") -> WordVideo:
        """The mean maps of the key columns of ``word`` in every frame (columns as
        :meth:`attnctl.tools.maps.GlobalHeatMap.columns` finds them)."""
        hm = self._columns.word(word, occurrence, match)      # raises for a word not in the prompt
        return WordVideo(hm.value, word, self.frame_scale)

    def strip(self, words: Sequence[str], path: str, video=None, *, frames: Optional[Sequence[int]] = None,
              match: str = "tokens", **kwargs) -> None:
        """A PNG grid: one row per latent frame (all, or ``frames``), one column per word,
        each map over the frame's picture when ``video`` (the decoded frames) is given;
        ``kwargs`` go to attnctl.tools.plot.overlay."""
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt

        from .plot import overlay

        if isinstance(words, str) or not words:
            raise ValueError(f"words: expected a non-empty list of words, got {words!r}")
        rows = list(range(self.frames)) if frames is None else list(frames)
        for f in rows:
            _check_frame(f, self.frames)
        maps = [self.word(w, match=match) for w in words]
        pictures = [image_array(f) for f in video] if video is not None else None
        expected = self.frame_scale * (self.frames - 1) + 1
        if pictures is not None and len(pictures) != expected:
            raise ValueError(f"video: expected {expected} frames for {self.frames} latent frames, got {len(pictures)}")
        fig, axes = plt.subplots(len(rows), len(words), figsize=(2.5 * len(words), 2.5 * len(rows)),
                                 squeeze=False)
        for i, f in enumerate(rows):
            # the last video frame of latent frame f (frame 0 for f = 0)
            picture = pictures[self.frame_scale * f] if pictures is not None else None
            for j, m in enumerate(maps):
                overlay(HeatMap(m.value[f], f"{m.label} · frame {f}"), picture, ax=axes[i][j], **kwargs)
        fig.savefig(path, bbox_inches="tight", dpi=100)
        plt.close(fig)

    def __repr__(self) -> str:
        return f"VideoHeatMap({tuple(self.value.shape)})"
