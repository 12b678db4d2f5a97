"""Launchers of the differentiable Triton path: a forward that keeps what the backward
needs (row LSE, per-head maps at the token columns) and the backward kernels."""
from __future__ import annotations

from typing import NamedTuple, Optional, Tuple

import torch
import triton

from attnctl.capture import Capture
from attnctl.kernels.attention import LOG2E
from attnctl.kernels.attention_bwd import attention_bwd_dkdv_kernel, attention_bwd_dq_kernel
from attnctl.regions import Regions
from ._layout import broadcast_strides
from .triton_backend import _pow2_at_least_16, attention_triton


class SavedForward(NamedTuple):
    out: torch.Tensor        # (B, H, M, Dv), q's dtype and memory order
    lse: torch.Tensor        # (B, H, M) fp32, natural log
    head_maps: torch.Tensor  # (B, H, M, T) fp32: P[b, h, m, tokens[b, t]]; T = 0 without tokens


def forward_for_backward(q, k, v, *, scale: float, bias: Optional[torch.Tensor],
                         prob_mult: Optional[torch.Tensor], regions: Optional[Regions],
                         tokens: Optional[torch.Tensor]) -> SavedForward:
    """The fused forward, capturing the row LSE (and per-head maps when ``tokens`` is given)
    into zeroed buffers: one kernel launch."""
    B, H, M, _ = q.shape
    capture = Capture.zeros(q, k, lse=True, head_maps=tokens is not None, tokens=tokens)
    out = attention_triton(q, k, v, scale=scale, bias=bias, prob_mult=prob_mult, capture=capture, regions=regions)
    head_maps = capture.head_maps if tokens is not None else q.new_zeros(B, H, M, 0, dtype=torch.float32)
    return SavedForward(out, capture.lse, head_maps)


def backward_configs(head_dim: int, value_dim: int, elem_size: int) -> Tuple[dict, dict]:
    """Tiles of the (dK/dV, dq) kernels. Each holds a long block of the rows it accumulates
    (128 keys for dK/dV, 128 queries for dq) and streams short blocks of 32 of the other
    side, as FlashAttention-2's Triton backward does; the held block halves for each
    doubling of the padded head dim past 64, and for fp32. Sized by ptxas's report
    (tests/compile_backward.py, every control on, 8 warps): no spill on sm_90 beyond 16
    bytes in dq; on sm_80 dK/dV at head dims <= 64 spills about 330 bytes. Untimed: no GPU
    has run these kernels yet."""
    block_d = _pow2_at_least_16(head_dim)
    block_dv = _pow2_at_least_16(value_dim)
    # fp32 tiles take twice the registers: half the held block.
    held = 128 * 64 // max(64, block_d, block_dv) // (elem_size // 2)
    common = dict(BLOCK_D=block_d, BLOCK_DV=block_dv, num_warps=8, num_stages=2 if elem_size == 2 else 1)
    return dict(common, BLOCK_M=32, BLOCK_N=max(32, held)), dict(common, BLOCK_M=max(32, held), BLOCK_N=32)


def query_splits(programs: int, query_blocks: int, target_programs: int = 264) -> int:
    """Query splits of the dK/dV kernel: enough programs for about two waves of an H100
    (132 SMs), never more splits than query blocks."""
    return max(1, min(query_blocks, triton.cdiv(target_programs, programs)))


class Launch(NamedTuple):
    kernel: object
    grid: tuple
    args: list
    meta: dict


def backward_launches(grad_out: torch.Tensor, grad_head_maps: Optional[torch.Tensor], q, k, v,
                      saved: SavedForward, *, scale: float, bias: Optional[torch.Tensor],
                      prob_mult: Optional[torch.Tensor], regions: Optional[Regions],
                      tokens: Optional[torch.Tensor], bias_grad: bool):
    """(launches, (dq, dk32, dv32, dbias32 or None)): the two kernel launches of the backward
    and the buffers they write (dk, dv, dbias fp32, accumulated with atomics). Computes
    Δ = rowsum(dO∘O) (+ Σ_t G·P at the token columns) first."""
    B, H, M, D = q.shape
    N, DV = k.shape[2], v.shape[3]
    delta = (grad_out.float() * saved.out.float()).sum(-1)
    if grad_head_maps is not None:
        delta = delta + (grad_head_maps.float() * saved.head_maps).sum(-1)
    delta = delta.contiguous()
    T = tokens.shape[-1] if grad_head_maps is not None else 0
    token_cols = tokens if grad_head_maps is not None else None
    dq = torch.empty_like(q)
    dk = torch.zeros(B, H, N, D, dtype=torch.float32, device=q.device)
    dv = torch.zeros(B, H, N, DV, dtype=torch.float32, device=q.device)
    dbias = torch.zeros(bias.shape, dtype=torch.float32, device=q.device) if bias_grad else None
    labels_q = regions.labels_q if regions is not None else None
    labels_k = regions.labels_k if regions is not None else None

    def ptr(t):  # absent operands get q: their loads are compiled out by the flags below
        return t if t is not None else q

    dkdv_cfg, dq_cfg = backward_configs(D, DV, q.element_size())
    common = [
        q, k, v, grad_out, saved.lse, delta, ptr(bias), ptr(prob_mult), ptr(labels_q), ptr(labels_k),
        ptr(grad_head_maps), ptr(token_cols),
    ]
    strides = [
        *q.stride(), *k.stride(), *v.stride(), *grad_out.stride(), *saved.lse.stride(),
        *broadcast_strides(bias, 4), *broadcast_strides(prob_mult, 4),
        *broadcast_strides(labels_q, 2), *broadcast_strides(labels_k, 2),
        *broadcast_strides(grad_head_maps, 4), *broadcast_strides(token_cols, 2),
    ]
    region_strength = float(regions.strength) if regions is not None else 0.0
    meta = dict(
        D=D, DV=DV, HAS_BIAS=bias is not None, HAS_PROB_MULT=prob_mult is not None,
        HAS_REGIONS=regions is not None, HAS_MAP_GRAD=grad_head_maps is not None,
        # fp32 inputs must not be rounded to tf32 on tensor cores: the contract is fp32-exact.
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
    )
    key_blocks = triton.cdiv(N, dkdv_cfg["BLOCK_N"])
    splits = query_splits(key_blocks * B * H, triton.cdiv(M, dkdv_cfg["BLOCK_M"]))
    db_strides = broadcast_strides(dbias, 4)
    launches = [
        Launch(attention_bwd_dkdv_kernel, (key_blocks, B * H, splits),
               [*common, dk, dv, *strides, *dk.stride(), *dv.stride(),
                H, M, N, T, splits, scale * LOG2E, scale, region_strength], dict(meta, **dkdv_cfg)),
        Launch(attention_bwd_dq_kernel, (triton.cdiv(M, dq_cfg["BLOCK_M"]), B * H),
               [*common, dq, ptr(dbias), *strides, *dq.stride(), *db_strides,
                H, M, N, T, scale * LOG2E, scale, region_strength],
               dict(meta, BIAS_GRAD=bias_grad, DBIAS_ROWS_SHARED=db_strides[2] == 0,
                    DBIAS_COLS_SHARED=db_strides[3] == 0, **dq_cfg)),
    ]
    return launches, (dq, dk, dv, dbias)


def attention_backward_triton(grad_out: torch.Tensor, grad_head_maps: Optional[torch.Tensor],
                              q, k, v, saved: SavedForward, *, scale: float, bias: Optional[torch.Tensor],
                              prob_mult: Optional[torch.Tensor], regions: Optional[Regions],
                              tokens: Optional[torch.Tensor], bias_grad: bool):
    """(dq, dk, dv, dbias or None) of the forward ``saved`` came from.

    ``grad_head_maps`` (B, H, M, T): the upstream of the per-head maps (None: only the
    output is differentiated). dk, dv and dbias are accumulated in fp32 (atomics: the order
    of additions, and so the last bits, may differ between runs), then cast to the inputs'
    dtypes; dbias has the bias's own (broadcast) shape."""
    launches, (dq, dk, dv, dbias) = backward_launches(
        grad_out, grad_head_maps, q, k, v, saved, scale=scale, bias=bias, prob_mult=prob_mult,
        regions=regions, tokens=tokens, bias_grad=bias_grad)
    for launch in launches:
        launch.kernel[launch.grid](*launch.args, **launch.meta)
    return (dq, dk.to(k.dtype), dv.to(v.dtype),
            dbias.to(bias.dtype) if dbias is not None else None)
