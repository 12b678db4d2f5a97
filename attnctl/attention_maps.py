"""attnctl.attention_with_maps: attention and its maps at chosen token columns, both
differentiable (the readout that Attend-and-Excite optimises the latent against).

The capture buffers of attnctl.attention are for inference (they are added to in place
and carry no gradient); this functional form returns the maps as an output instead.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from .autograd import differentiable_attention
from .capture import Capture, Tokens, as_token_tensor
from .op import _grad_unsupported, _in_q_order, _needs_grad, _note, choose_backend
from .reference import attention_reference
from .regions import Regions
from .validation import check_capture, validate, values_readable


def attention_with_maps(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    tokens: Tokens,
    *,
    head_weights: Optional[torch.Tensor] = None,
    scale: Optional[float] = None,
    bias: Optional[torch.Tensor] = None,
    prob_mult: Optional[torch.Tensor] = None,
    regions: Optional[Regions] = None,
    backend: str = "auto",
    per_head: bool = False,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """(out, maps): the output of ``attnctl.attention(q, k, v, scale=, bias=, prob_mult=,
    regions=)`` and ``maps[b, m, t] = Σ_h w[b, h] · P[b, h, m, tokens[b, t]]`` (P before
    prob_mult and regions, as captures read it), fp32 (B, M, T).

    Gradients flow from both into q, k, v and bias. On the Triton backend the backward
    recomputes P per tile from the saved row LSE (no (M, N) tensor); the maps' gradient
    enters at the token columns only.

    Args:
        tokens: key columns, (T,) or (B, T) ints (a list is accepted).
        head_weights: w, (H,) or (B, H); 1 for every head when None. Not differentiated.
        backend: "auto" (Triton for CUDA tensors, the reference on CPU), "triton" or "torch".
        per_head: return the per-head maps ``P[b, h, m, tokens[b, t]]``, (B, H, M, T) fp32,
            instead of their weighted sum (for weightings that differ per token column,
            e.g. one head relevance vector per concept); ``head_weights`` must be None.
    """
    if per_head and head_weights is not None:
        raise ValueError("attention_with_maps: head_weights: expected None with per_head=True (the per-head maps "
                         "are returned unweighted)")
    check_values = values_readable(q)
    scale = validate(q, k, v, scale, bias, prob_mult, None, check_token_values=check_values, regions=regions)
    token_tensor = as_token_tensor(tokens, q.device)
    B, H, M = q.shape[:3]
    # The maps buffer only lets check_capture check tokens and head_weights by their shapes.
    check_capture(Capture(maps=q.new_empty(B, M, token_tensor.shape[-1], dtype=torch.float32), tokens=token_tensor,
                          head_weights=head_weights),
                  B, H, M, k.shape[2], q.device, check_token_values=check_values, name="attention_with_maps")
    dispatch = choose_backend(backend, q, has_work=True, needs_grad=_needs_grad(q, k, v, bias, prob_mult, None),
                              cuda_unsupported=("the maps output",),
                              grad_unsupported=_grad_unsupported(prob_mult, None, None), work="a maps output")
    _note(dispatch)
    if dispatch.backend == "triton":
        out, head_maps = differentiable_attention(q, k, v, scale=scale, bias=bias, prob_mult=prob_mult,
                                                  regions=regions, tokens=token_tensor)
    else:
        capture = Capture.zeros(q, k, head_maps=True, tokens=token_tensor)
        out = _in_q_order(attention_reference(q, k, v, scale=scale, bias=bias, prob_mult=prob_mult,
                                              capture=capture, regions=regions), q)
        head_maps = capture.head_maps
    if per_head:
        return out, head_maps
    if head_weights is None:
        return out, head_maps.sum(dim=1)
    return out, torch.einsum("bh,bhmt->bmt", head_weights.float().expand(B, H), head_maps)
