"""The PyTorch reference: the semantics every backend must match.

It materialises S and P, so it is the oracle, not a fast path::

    S[b,h,m,n] = scale · q[b,h,m]·k[b,h,n] + bias[b,h,m,n]
    P          = softmax_n(S)                  (a row of all -inf gives P = 0)
    O[b,h,m]   = Σ_n P[b,h,m,n] · f[b,h,m,n] · v[b,h,n]      (f = prob_mult)

Captures (see attnctl.capture) are statistics of P before f, added in fp32.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from .capture import Capture


def softmax_with_empty_rows(scores: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Softmax over the last dim and its log-sum-exp; rows of all -inf give P = 0, LSE = -inf."""
    row_max = scores.amax(dim=-1, keepdim=True)
    row_max = torch.where(torch.isneginf(row_max), torch.zeros_like(row_max), row_max)
    exp = torch.exp(scores - row_max)
    row_sum = exp.sum(dim=-1, keepdim=True)
    probs = exp / torch.where(row_sum == 0, torch.ones_like(row_sum), row_sum)
    lse = (row_max + torch.log(row_sum)).squeeze(-1)
    return probs, lse


def attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float,
    bias: Optional[torch.Tensor] = None,
    prob_mult: Optional[torch.Tensor] = None,
    capture: Optional[Capture] = None,
    compute_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Attention by the contract's definition, computed in ``compute_dtype``.

    ``compute_dtype=torch.float32`` is the oracle. Passing the inputs' own low precision
    measures the error that precision alone causes, the yardstick for fp16/bf16 kernels.
    """
    qc, kc, vc = (t.to(compute_dtype) for t in (q, k, v))
    scores = torch.matmul(qc, kc.transpose(-1, -2)) * scale
    if bias is not None:
        scores = scores + bias.to(compute_dtype)
    probs, lse = softmax_with_empty_rows(scores)
    if capture is not None:
        add_captures(capture, probs, lse)
    if prob_mult is not None:
        probs = probs * prob_mult.to(compute_dtype)
    return torch.matmul(probs, vc).to(q.dtype)


def add_captures(capture: Capture, probs: torch.Tensor, lse: torch.Tensor) -> None:
    """Add the statistics of ``probs`` (B, H, M, N) to the capture's buffers."""
    p = probs.float()
    if capture.token_mass is not None:
        capture.token_mass += p.sum(dim=2)
    if capture.lse is not None:
        capture.lse += lse.float()
    if capture.wants_token_columns:
        cols = token_columns(p, capture.tokens)  # (B, H, M, T)
        if capture.head_maps is not None:
            capture.head_maps += cols
        if capture.maps is not None:
            B, H = p.shape[:2]
            w = capture.head_weights
            w = torch.ones(B, H, device=p.device) if w is None else w.float().expand(B, H)
            capture.maps += torch.einsum("bh,bhmt->bmt", w, cols)


def token_columns(p: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """P[b, h, m, tokens[b, t]] for tokens of shape (T,) or (B, T)."""
    B, H, M, _ = p.shape
    idx = tokens.long().to(p.device)
    idx = idx.expand(B, idx.shape[-1]) if idx.dim() == 1 else idx
    idx = idx[:, None, None, :].expand(B, H, M, idx.shape[-1])
    return torch.gather(p, 3, idx)
