"""Replacement text states on some batch rows of a cross-attention call (a plan's
``value_states`` / ``key_states`` with ``state_rows``): the layer's own projections
applied to other encodings of the text.

Values: the output is linear in V, so averaging the outputs of K value sets under one P
equals one attention pass over the averaged values, P·mean_k(V_k). Keys: each key set
has its own softmax; the K passes run as one op call over extra batch rows.
"""
from __future__ import annotations

import torch

from ..op import attention


def _project(attn, states: torch.Tensor, projection, dtype: torch.dtype) -> torch.Tensor:
    """(K, R, N, C) encoder states through the layer's norm_cross and ``projection``:
    (K, R, N, H, D)."""
    K, R, N, C = states.shape
    x = states.to(dtype).reshape(K * R, N, C)
    if attn.norm_cross:
        x = attn.norm_encoder_hidden_states(x)
    out = projection(x)
    return out.view(K, R, N, attn.heads, -1)


def _check(name: str, states: torch.Tensor, rows: range, like: torch.Tensor, layer: str) -> None:
    B, _, N, _ = like.shape
    if not isinstance(states, torch.Tensor) or states.dim() != 4 or states.shape[2] != N:
        raise ValueError(f"{name}: expected (K, R|1, {N}, C) text states for {layer}, got "
                         f"{tuple(states.shape) if isinstance(states, torch.Tensor) else type(states).__name__}")
    if not isinstance(rows, range) or rows.step != 1 or not 0 <= rows.start < rows.stop <= B:
        raise ValueError(f"state_rows: expected a range of consecutive rows within the batch of {B} of {layer}, "
                         f"got {rows!r}")
    if states.shape[1] not in (1, len(rows)):
        raise ValueError(f"{name}: expected {len(rows)} or 1 rows (state_rows {rows}), got {states.shape[1]}")
    if states.device != like.device:
        raise ValueError(f"{name}: expected a tensor on {like.device}, got {states.device}")


def mixed_values(attn, value: torch.Tensor, states: torch.Tensor, rows: range, layer: str) -> torch.Tensor:
    """``value`` (B, H, N, D) with rows ``rows`` replaced by the mean over K of the
    projected ``states``."""
    _check("value_states", states, rows, value, layer)
    mixed = _project(attn, states, attn.to_v, value.dtype).mean(0).transpose(1, 2)    # (R|1, H, N, D)
    out = value.clone()
    out[rows.start:rows.stop] = mixed
    return out


def attention_over_key_sets(attn, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                            states: torch.Tensor, rows: range, layer: str, backend: str) -> torch.Tensor:
    """The op's output (B, H, M, D) where rows ``rows`` average K attentions, the k-th
    with keys projected from ``states[k]`` (and the call's values)."""
    _check("key_states", states, rows, key, layer)
    K = states.shape[0]
    R = len(rows)
    keys = _project(attn, states, attn.to_k, key.dtype).transpose(2, 3)                 # (K, R|1, H, N, D)
    if attn.norm_k is not None:
        keys = attn.norm_k(keys)
    keys = keys.expand(K, R, *keys.shape[2:])
    picked = slice(rows.start, rows.stop)
    # Batch: the call's rows (rows `rows` with key set 0), then K-1 copies of rows `rows`.
    q = torch.cat([query] + [query[picked]] * (K - 1))
    k = torch.cat([key[:rows.start], keys[0], key[rows.stop:]] + list(keys[1:]))
    v = torch.cat([value] + [value[picked]] * (K - 1))
    out = attention(q, k, v, scale=attn.scale, backend=backend)
    B = query.shape[0]
    result = out[:B].clone()
    result[picked] = out[picked].float().add(out[B:].float().reshape(K - 1, R, *out.shape[1:]).sum(0)).div(K).to(out.dtype)
    return result
