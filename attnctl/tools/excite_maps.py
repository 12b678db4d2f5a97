"""The cross-attention maps Attend-and-Excite optimises against, as differentiable outputs
of attnctl's fused attention (``attnctl.attention_with_maps`` through the processors'
``Plan.maps``), never a materialised softmax over all heads.

A controller here answers only on cross-attention calls whose queries require grad (the
Attend-and-Excite forwards of :mod:`attnctl.tools.attend_excite`; the denoising forwards
run plain fused attention), and is reset before every UNet forward. ``maps()`` then gives
(K, h, w, T) maps of the one image of that forward: K = 1 shared map, or one per token to
alter; column t is the text token t + 1 (the start token is never a column).

* :class:`MeanMaps` — Attend-and-Excite (Chefer et al.; diffusers'
  StableDiffusionAttendAndExcitePipeline, the authors' code): the mean over every head of
  the cross-attention layers whose query count is attn_res[0]·attn_res[1] (16² on SD1.x
  at 512²), text columns 1 … N−2 (the authors' ``[1:-1]``: the last column, a padding
  token, is left out).
* :class:`HRVMaps` — HRV-guided Attend-and-Excite (SNU-DRL/HRV,
  applications/attend_and_excite_hrv.py): per token to alter, Σ over every head of every
  cross-attention layer of hrv[concept, head] / (number of heads) · P_head, each layer's
  maps resized to attention_res² first (Gaussian blur then bicubic when larger, bicubic
  when smaller), text columns 1 … N−1 (the original's ``[1:model_max_length]``).
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from ..diffusers.controller import AttentionCall, BatchLayout, Controller, DenoiseStep, MapsRequest, Plan
from .hrv import HeadRelevance, _layer_slice


class ExciteMaps(Controller):
    """Base of the map collectors: the per-forward reset, the call filter and the token
    columns. Subclasses define ``columns_left_out_at_end``, ``wants``, ``_reset``,
    ``_receive`` and ``_result``."""

    #: how many columns at the end of the text are left out of the softmax
    columns_left_out_at_end: int = 1

    def __init__(self):
        self._tokens: Dict[Tuple[int, torch.device], torch.Tensor] = {}
        self._received = 0

    def on_step(self, step: DenoiseStep, layout: BatchLayout) -> None:
        self._reset()
        self._received = 0

    def wants(self, layer: str, queries: int) -> bool:
        """Whether the maps of cross-attention ``layer`` with ``queries`` positions are read
        (a layer's shape alone decides, so the map layers are known before a forward)."""
        raise NotImplementedError

    @property
    def received(self) -> int:
        """The map layers received in the UNet forward that runs (or ran) last."""
        return self._received

    def plan(self, call: AttentionCall) -> Optional[Plan]:
        if not call.is_cross or not call.query.requires_grad or not self.wants(call.layer, call.queries):
            return None
        key = (call.keys, call.device)
        tokens = self._tokens.get(key)
        if tokens is None:
            tokens = torch.arange(1, call.keys - self.columns_left_out_at_end, device=call.device)
            self._tokens[key] = tokens
        layer = call.layer

        def receive(head_maps: torch.Tensor) -> None:
            self._received += 1
            self._receive(layer, call.grid, head_maps)

        return Plan(maps=MapsRequest(tokens, receive))

    def maps(self) -> torch.Tensor:
        """(K, h, w, T) maps of the last UNet forward's image."""
        if self._received == 0:
            raise RuntimeError(f"{type(self).__name__}: no cross-attention maps were received in the last UNet forward "
                               "(no layer matched, or the forward ran without gradients)")
        return self._result()

    def _reset(self) -> None:
        raise NotImplementedError

    def _receive(self, layer: str, grid, head_maps: torch.Tensor) -> None:
        raise NotImplementedError

    def _result(self) -> torch.Tensor:
        raise NotImplementedError


class MeanMaps(ExciteMaps):
    """Attend-and-Excite's maps: the mean of P over the heads of the cross-attention layers
    with attn_res[0]·attn_res[1] queries, read as an attn_res grid (as the original
    reshapes it: pass (h, w) of the latent / 2^k for non-square images; diffusers' own
    default for attn_res=None, (ceil(width/32), ceil(height/32)), is (w, h))."""

    columns_left_out_at_end = 1

    def __init__(self, attn_res: Tuple[int, int] = (16, 16)):
        super().__init__()
        if len(attn_res) != 2 or any(int(r) < 1 for r in attn_res):
            raise ValueError(f"attn_res: expected two positive sizes, got {attn_res!r}")
        self.attn_res = (int(attn_res[0]), int(attn_res[1]))
        self._reset()

    def wants(self, layer: str, queries: int) -> bool:
        return queries == self.attn_res[0] * self.attn_res[1]

    def _reset(self) -> None:
        self._sum: Optional[torch.Tensor] = None
        self._heads = 0

    def _receive(self, layer, grid, head_maps: torch.Tensor) -> None:
        if head_maps.shape[0] != 1:
            raise ValueError(f"MeanMaps: expected the maps of one image per forward (Attend-and-Excite runs each "
                             f"image alone), got a batch of {head_maps.shape[0]}")
        summed = head_maps.sum(dim=1)
        self._sum = summed if self._sum is None else self._sum + summed
        self._heads += head_maps.shape[1]

    def _result(self) -> torch.Tensor:
        return (self._sum / self._heads).reshape(1, *self.attn_res, self._sum.shape[-1])


class HRVMaps(ExciteMaps):
    """HRV-guided Attend-and-Excite's maps: one map per token to alter, weighting every
    head by that token's concept's head relevance.

    Args:
        hrv: a :class:`attnctl.tools.hrv.HeadRelevance` over the model's cross-attention
            heads (built, or loaded with ``HeadRelevance.load_official``).
        concepts: the concept of each token to alter, in the order of the token indices
            (the original's ``--concepts``; repeats allowed).
        attention_res: the side of the square the maps are resized to (the original: 8).
        head_divisor: the maps are Σ_h hrv·P / head_divisor; the original hard-codes SD
            1.4's 128 heads. None: the HRV's number of heads (128 on SD 1.x).
    """

    columns_left_out_at_end = 0

    def __init__(self, hrv: HeadRelevance, concepts: Sequence[str], *, attention_res: int = 8,
                 head_divisor: Optional[float] = None):
        super().__init__()
        if isinstance(concepts, str) or len(concepts) == 0:
            raise ValueError(f"concepts: expected a non-empty list of concept names (one per token to alter), "
                             f"got {concepts!r}")
        if int(attention_res) < 1:
            raise ValueError(f"attention_res: expected a positive size, got {attention_res!r}")
        self.hrv = hrv
        self.concepts = list(concepts)
        self.attention_res = int(attention_res)
        self.head_divisor = float(hrv.num_heads if head_divisor is None else head_divisor)
        self._vectors = torch.stack([hrv.vector(c) for c in self.concepts]).float()  # (K, H_total)
        self._offsets = hrv.offsets()
        self._weights: Dict[Tuple[str, torch.device], torch.Tensor] = {}
        self._reset()

    def wants(self, layer: str, queries: int) -> bool:
        return True

    def layer_weights(self, layer: str, heads: int, device) -> torch.Tensor:
        """(K, heads): hrv[concept_k, head] / head_divisor for the heads of ``layer``."""
        key = (layer, torch.device(device))
        weights = self._weights.get(key)
        if weights is None:
            columns = [_layer_slice(self.hrv, self._offsets, vector, layer, heads) for vector in self._vectors]
            weights = (torch.stack(columns) / self.head_divisor).to(device, non_blocking=True)
            self._weights[key] = weights
        return weights

    def _reset(self) -> None:
        self._sum: Optional[torch.Tensor] = None

    def _receive(self, layer, grid, head_maps: torch.Tensor) -> None:
        B, H, M, T = head_maps.shape
        if B != 1:
            raise ValueError(f"HRVMaps: expected the maps of one image per forward, got a batch of {B}")
        if grid is None:
            side = int(round(M ** 0.5))
            if side * side != M:
                raise ValueError(f"HRVMaps: layer {layer} has {M} queries and no known grid; expected a square")
            grid = (side, side)
        weighted = torch.einsum("kh,hmt->kmt", self.layer_weights(layer, H, head_maps.device), head_maps[0])
        maps = weighted.reshape(len(self.concepts), *grid, T).permute(0, 3, 1, 2)  # (K, T, h, w)
        resized = resize_like_hrv(maps, self.attention_res).permute(0, 2, 3, 1)   # (K, R, R, T)
        self._sum = resized if self._sum is None else self._sum + resized

    def _result(self) -> torch.Tensor:
        return self._sum


def resize_like_hrv(maps: torch.Tensor, size: int) -> torch.Tensor:
    """(C, T, h, w) maps resized to size² as HRV's attention store does: bicubic
    (align_corners=False) when smaller; when larger, first a Gaussian blur against
    aliasing, kernel k = h // size + 1 (from the height), σ = 0.3·((k − 1)/2 − 1) + 0.8
    (torchvision's gaussian_blur: reflect padding), then bicubic."""
    h, w = maps.shape[-2:]
    if (h, w) == (size, size):
        return maps
    if h > size:
        k = h // size + 1
        maps = gaussian_blur(maps, k, 0.3 * ((k - 1) * 0.5 - 1) + 0.8)
    return F.interpolate(maps, size=(size, size), mode="bicubic", align_corners=False)


def gaussian_blur(x: torch.Tensor, kernel_size: int, sigma: float) -> torch.Tensor:
    """torchvision.transforms.functional.gaussian_blur on (..., h, w) float maps: a separable
    normalised Gaussian over linspace(−(k−1)/2, (k−1)/2, k), reflect-padded by k // 2."""
    if kernel_size % 2 != 1 or kernel_size < 1:
        raise ValueError(f"kernel_size: expected an odd positive size, got {kernel_size}")
    half = (kernel_size - 1) * 0.5
    grid = torch.linspace(-half, half, steps=kernel_size, dtype=x.dtype, device=x.device)
    pdf = torch.exp(-0.5 * (grid / sigma).pow(2))
    kernel1d = pdf / pdf.sum()
    kernel = torch.mm(kernel1d[:, None], kernel1d[None, :])
    shape = x.shape
    flat = x.reshape(-1, 1, *shape[-2:])
    pad = kernel_size // 2
    flat = F.pad(flat, [pad, pad, pad, pad], mode="reflect")
    return F.conv2d(flat, kernel[None, None]).reshape(shape)


__all__: List[str] = ["ExciteMaps", "MeanMaps", "HRVMaps", "resize_like_hrv", "gaussian_blur"]
