"""The PyTorch reference: the semantics every backend must match.

It materialises S and P, so it is the oracle, not a fast path::

    S[b,h,m,n] = scale · q[b,h,m]·k[b,h,n] + bias[b,h,m,n]
    P          = softmax_n(S)                  (a row of all -inf gives P = 0)
    O[b,h,m]   = Σ_n P[b,h,m,n] · f[b,h,m,n] · v[b,h,n]      (f = prob_mult)

With ``source`` (injection) S[b] is computed from q, k and bias of item source[b]; with
``own`` (attnctl.OwnTerm, the two-source form) the output adds Σ_n P_b·own.prob_mult·
own.values, P_b the softmax of item b's own logits.

With ``regions`` (attnctl.Regions) in scale mode the numerator factor is f · f_regions,
f_regions[q, k] = 1 - s·[r(q) >= 0, r(k) >= 0, r(q) != r(k)]; in mask mode S[q, k] = -inf
where both are labelled and regions.allowed[r(q), r(k)] is False (before the softmax).

Captures (see attnctl.capture) are statistics of P before f, added in fp32 to the rows of
``capture.rows`` (all by default); the probe
capture is Σ_m softmax_c(scale · q · probe_keys), a softmax over the probe keys alone.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from .capture import Capture
from .injection import OwnTerm
from .regions import Regions


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
    regions: Optional[Regions] = None,
    source: Optional[torch.Tensor] = None,
    own: Optional[OwnTerm] = None,
) -> torch.Tensor:
    """Attention by the contract's definition, computed in ``compute_dtype``.

    ``source`` (B,) ints (injection): item b's S and P are those of item source[b] (its q,
    k and bias); values, prob_mult, regions and captures are b's. ``own``: the two-source
    form's second term, item b's own P on ``own.values`` (see attnctl.injection).

    ``compute_dtype=torch.float32`` is the oracle. Passing the inputs' own low precision
    measures the error that precision alone causes, the yardstick for fp16/bf16 kernels.
    """
    qc, kc = q.to(compute_dtype), k.to(compute_dtype)
    out = _term(qc, kc, v.to(compute_dtype), scale, bias, prob_mult, capture, regions, source)
    if own is not None:
        out = out + _term(qc, kc, own.values.to(compute_dtype), scale, bias, own.prob_mult, own.capture,
                          regions, None)
    return out.to(q.dtype)


def _term(qc, kc, vc, scale, bias, prob_mult, capture, regions, source) -> torch.Tensor:
    """Σ_n P·f·v in the inputs' compute dtype, P from the logits of item source[b] (or b)."""
    if source is not None:
        idx = source.long().to(qc.device)
        qc, kc = qc[idx], kc[idx]
        if bias is not None and bias.dim() == 4 and bias.shape[0] != 1:
            bias = bias[idx]
    scores = torch.matmul(qc, kc.transpose(-1, -2)) * scale
    if bias is not None:
        scores = scores + bias.to(qc.dtype)
    if regions is not None and regions.is_mask:
        B, _, M, N = scores.shape
        scores = scores.masked_fill(~regions.keep(B, M, N).to(scores.device), float("-inf"))
    probs, lse = softmax_with_empty_rows(scores)
    if capture is not None:
        add_captures(capture, probs, lse)
        if capture.probe_keys is not None and capture.probe_mass is not None:
            start, stop = capture.row_range(qc.shape[0])
            keys = capture.probe_keys[start:stop] if capture.probe_keys.shape[0] != 1 else capture.probe_keys
            capture.probe_mass[start:stop] += probe_mass_reference(qc[start:stop], keys.to(qc.dtype), scale).float()
    if prob_mult is not None:
        probs = probs * prob_mult.to(qc.dtype)
    if regions is not None and not regions.is_mask:
        B, _, M, N = probs.shape
        probs = probs * regions.factor(B, M, N, qc.dtype).to(probs.device)
    return torch.matmul(probs, vc)


def add_captures(capture: Capture, probs: torch.Tensor, lse: torch.Tensor) -> None:
    """Add the statistics of ``probs`` (B, H, M, N) to the capture's buffers, in the rows
    of ``capture.rows`` only (the others are left as they are)."""
    B, H = probs.shape[:2]
    rows = slice(*capture.row_range(B))
    p = probs.float()
    if capture.token_mass is not None:
        capture.token_mass[rows] += p.sum(dim=2)[rows]
    if capture.lse is not None:
        capture.lse[rows] += lse.float()[rows]
    if capture.wants_token_columns:
        cols = token_columns(p, capture.tokens)[rows]  # (R, H, M, T)
        if capture.head_maps is not None:
            capture.head_maps[rows] += cols
        if capture.maps is not None:
            w = capture.head_weights
            w = torch.ones(B, H, device=p.device) if w is None else w.float().expand(B, H)
            capture.maps[rows] += torch.einsum("bh,bhmt->bmt", w[rows], cols)


def token_columns(p: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """P[b, h, m, tokens[b, t]] for tokens of shape (T,) or (B, T)."""
    B, H, M, _ = p.shape
    idx = tokens.long().to(p.device)
    idx = idx.expand(B, idx.shape[-1]) if idx.dim() == 1 else idx
    idx = idx[:, None, None, :].expand(B, H, M, idx.shape[-1])
    return torch.gather(p, 3, idx)


def probe_mass_reference(q: torch.Tensor, probe_keys: torch.Tensor, scale: float) -> torch.Tensor:
    """Σ_m softmax_c(scale · q[b, h, m] · probe_keys[b, h, c]): (B, H, C), in q's dtype."""
    logits = torch.matmul(q, probe_keys.transpose(-1, -2)) * scale   # (B, H, M, C)
    return torch.softmax(logits, dim=-1).sum(dim=2)


def logit_max_reference(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """max over (m, n) of the unscaled logits q[b, h, m] · k[b, h, n]: (B, H) fp32."""
    return torch.matmul(q.float(), k.float().transpose(-1, -2)).amax(dim=(-1, -2))
