"""Launcher for the Triton kernel: output allocation, strides, block sizes, grid."""
from __future__ import annotations

from typing import Optional

import torch
import triton

from attnctl.capture import Capture
from attnctl.kernels.attention import LOG2E, attention_fwd_kernel
from ._layout import broadcast_strides, empty_output


def _pow2_at_least_16(n: int) -> int:
    # tl.dot needs every block dim >= 16 and a power of two.
    return max(16, triton.next_power_of_2(n))


def launch_config(head_dim: int, value_dim: int, num_keys: int, num_tokens: int) -> dict:
    """Block sizes by shape. N up to 128 keys (cross-attention, N = 77) fits a single key
    block, which makes token-mass capture single-pass."""
    block_d = _pow2_at_least_16(head_dim)
    block_dv = _pow2_at_least_16(value_dim)
    block_n = _pow2_at_least_16(num_keys) if num_keys <= 128 else 64
    wide = max(block_d, block_dv) > 64
    return dict(
        BLOCK_M=64 if wide else 128,
        BLOCK_N=block_n,
        BLOCK_D=block_d,
        BLOCK_DV=block_dv,
        BLOCK_T=min(64, _pow2_at_least_16(num_tokens)),
        num_warps=8 if wide else 4,
        num_stages=2,
    )


def attention_triton(q, k, v, *, scale: float, bias: Optional[torch.Tensor],
                     prob_mult: Optional[torch.Tensor], capture: Optional[Capture]) -> torch.Tensor:
    B, H, M, D = q.shape
    N, DV = k.shape[2], v.shape[3]
    out = empty_output(q, DV)
    cap = capture if capture is not None else Capture()
    tokens = cap.tokens if cap.wants_token_columns else None
    T = tokens.shape[-1] if tokens is not None else 0
    cfg = launch_config(D, DV, N, T)
    # Unused pointers get q: their loads are compiled out by the constexpr flags.
    def ptr(t):
        return t if t is not None else q

    grid = (triton.cdiv(M, cfg["BLOCK_M"]), B * H)
    attention_fwd_kernel[grid](
        q, k, v, out, ptr(bias), ptr(prob_mult), ptr(cap.token_mass), ptr(cap.maps),
        ptr(cap.head_maps), ptr(cap.lse), ptr(tokens), ptr(cap.head_weights),
        *q.stride(), *k.stride(), *v.stride(), *out.stride(),
        *broadcast_strides(bias, 4), *broadcast_strides(prob_mult, 4),
        *broadcast_strides(cap.token_mass, 3), *broadcast_strides(cap.maps, 3),
        *broadcast_strides(cap.head_maps, 4), *broadcast_strides(cap.lse, 3),
        *broadcast_strides(tokens, 2), *broadcast_strides(cap.head_weights, 2),
        H, M, N, T, scale * LOG2E,
        D=D, DV=DV,
        HAS_BIAS=bias is not None, HAS_PROB_MULT=prob_mult is not None,
        CAPTURE_TOKEN_MASS=cap.token_mass is not None, CAPTURE_MAPS=cap.maps is not None,
        CAPTURE_HEAD_MAPS=cap.head_maps is not None, CAPTURE_LSE=cap.lse is not None,
        HAS_HEAD_WEIGHTS=cap.head_weights is not None,
        SINGLE_KEY_BLOCK=N <= cfg["BLOCK_N"],
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        **cfg,
    )
    return out
