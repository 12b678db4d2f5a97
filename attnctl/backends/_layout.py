"""Layout helpers shared by the backends' launchers."""
from __future__ import annotations

from typing import Optional, Tuple

import torch


_ZEROS = {n: (0,) * n for n in range(5)}


def broadcast_strides(t: Optional[torch.Tensor], ndim: int) -> Tuple[int, ...]:
    """Strides of ``t`` right-aligned to ``ndim`` dims, 0 on missing and size-1 dims, so a
    kernel reads a broadcast operand without it ever being expanded in memory."""
    if t is None:
        return _ZEROS[ndim]
    strides = [0 if size == 1 else stride for size, stride in zip(t.shape, t.stride())]
    return tuple([0] * (ndim - t.dim()) + strides)


def empty_output(q: torch.Tensor, value_dim: int) -> torch.Tensor:
    """(B, H, M, Dv) output in q's memory order: a (B, M, H, D) view in, such as diffusers
    makes, gives a (B, M, H, Dv) buffer out, so merging heads afterwards is free."""
    B, H, M, _ = q.shape
    if q.stride(1) < q.stride(2):
        return torch.empty(B, M, H, value_dim, dtype=q.dtype, device=q.device).transpose(1, 2)
    return torch.empty(B, H, M, value_dim, dtype=q.dtype, device=q.device)
