"""Gradients through the fused Triton attention and through its attention maps.

The differentiable Triton path is two torch.library ops, so torch.compile traces it
(fullgraph) and autograd differentiates it:

* ``attnctl::attention_differentiable`` (forward): the fused kernel, capturing the row
  LSE and, for ``tokens``, the per-head maps P[b, h, m, tokens[b, t]] (before prob_mult).
  Returns (out, lse, head_maps); nothing of size (M, N) is kept.
* ``attnctl::attention_differentiable_backward``: the Triton backward
  (attnctl.kernels.attention_bwd), P recomputed per tile from the saved LSE; the maps'
  upstream enters dS at the captured columns.

Differentiable: q, k, v and bias. prob_mult and the region labels are constants
(a prob_mult that requires grad is refused by the op's dispatch).

Injection and the two-source form (``source``, ``own``) are differentiated as the sum of
single-source calls (:func:`differentiable_output`): each term its own softmax, LSE and Δ,
the logit operands gathered at ``source`` (a (B, H, M, D) copy, never (M, N)), so the
gather's backward adds the injected term's dq, dk, dbias into the source items. Without
gradients the fused kernel still runs both terms in one pass.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from .backends._layout import empty_output
from .injection import OwnTerm
from .regions import Regions


def _regions(labels_q, labels_k, strength: float) -> Optional[Regions]:
    return Regions(labels_q, labels_k, strength) if labels_q is not None else None


@torch.library.custom_op("attnctl::attention_differentiable", mutates_args=())
def _forward_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                bias: Optional[torch.Tensor], prob_mult: Optional[torch.Tensor],
                labels_q: Optional[torch.Tensor], labels_k: Optional[torch.Tensor], region_strength: float,
                tokens: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from .backends.triton_backward import forward_for_backward
    saved = forward_for_backward(q, k, v, scale=scale, bias=bias, prob_mult=prob_mult,
                                 regions=_regions(labels_q, labels_k, region_strength), tokens=tokens)
    return saved.out, saved.lse, saved.head_maps


@_forward_op.register_fake
def _forward_fake(q, k, v, scale, bias, prob_mult, labels_q, labels_k, region_strength, tokens):
    B, H, M, _ = q.shape
    T = tokens.shape[-1] if tokens is not None else 0
    return (empty_output(q, v.shape[-1]), q.new_empty(B, H, M, dtype=torch.float32),
            q.new_empty(B, H, M, T, dtype=torch.float32))


@torch.library.custom_op("attnctl::attention_differentiable_backward", mutates_args=())
def _backward_op(grad_out: torch.Tensor, grad_head_maps: Optional[torch.Tensor],
                 q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 out: torch.Tensor, lse: torch.Tensor, head_maps: torch.Tensor, scale: float,
                 bias: Optional[torch.Tensor], prob_mult: Optional[torch.Tensor],
                 labels_q: Optional[torch.Tensor], labels_k: Optional[torch.Tensor], region_strength: float,
                 tokens: Optional[torch.Tensor], bias_grad: bool
                 ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv, dbias); dbias is empty when ``bias_grad`` is False."""
    from .backends.triton_backward import SavedForward, attention_backward_triton
    dq, dk, dv, dbias = attention_backward_triton(
        grad_out, grad_head_maps, q, k, v, SavedForward(out, lse, head_maps), scale=scale, bias=bias,
        prob_mult=prob_mult, regions=_regions(labels_q, labels_k, region_strength), tokens=tokens,
        bias_grad=bias_grad)
    return dq, dk, dv, dbias if dbias is not None else q.new_empty(0)


@_backward_op.register_fake
def _backward_fake(grad_out, grad_head_maps, q, k, v, out, lse, head_maps, scale, bias, prob_mult,
                   labels_q, labels_k, region_strength, tokens, bias_grad):
    dbias = bias.new_empty(bias.shape) if bias_grad else q.new_empty(0)
    return torch.empty_like(q), k.new_empty(k.shape), v.new_empty(v.shape), dbias


_SAVED = ("q", "k", "v", "bias", "prob_mult", "labels_q", "labels_k", "tokens")


def _setup_context(ctx, inputs, output):
    q, k, v, scale, bias, prob_mult, labels_q, labels_k, region_strength, tokens = inputs
    out, lse, head_maps = output
    ctx.scale, ctx.region_strength = scale, region_strength
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(q, k, v, bias, prob_mult, labels_q, labels_k, tokens, out, lse, head_maps)


def _backward(ctx, grad_out, grad_lse, grad_head_maps):
    q, k, v, bias, prob_mult, labels_q, labels_k, tokens, out, lse, head_maps = ctx.saved_tensors
    if grad_out is None:  # only the maps are differentiated
        grad_out = torch.zeros_like(out)
    if tokens is None:
        grad_head_maps = None
    elif grad_head_maps is None:
        grad_head_maps = torch.zeros_like(head_maps)
    bias_grad = bias is not None and ctx.needs_input_grad[4]
    if ctx.needs_input_grad[5]:
        raise NotImplementedError("prob_mult: the Triton backward treats prob_mult as a constant; "
                                  "expected a prob_mult that does not require grad")
    dq, dk, dv, dbias = _backward_op(grad_out, grad_head_maps, q, k, v, out, lse, head_maps, ctx.scale, bias,
                                     prob_mult, labels_q, labels_k, ctx.region_strength, tokens, bias_grad)
    return dq, dk, dv, None, dbias if bias_grad else None, None, None, None, None, None


_forward_op.register_autograd(_backward, setup_context=_setup_context)


def differentiable_attention(q, k, v, *, scale: float, bias: Optional[torch.Tensor],
                             prob_mult: Optional[torch.Tensor], regions: Optional[Regions],
                             tokens: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """(out, head_maps) of the differentiable Triton path on validated arguments; head_maps
    is (B, H, M, T) fp32 for ``tokens`` (T = 0 without)."""
    out, _, head_maps = torch.ops.attnctl.attention_differentiable(
        q, k, v, scale, bias, prob_mult,
        regions.labels_q if regions is not None else None, regions.labels_k if regions is not None else None,
        float(regions.strength) if regions is not None else 0.0, tokens)
    return out, head_maps


def differentiable_output(q, k, v, *, scale: float, bias: Optional[torch.Tensor],
                          prob_mult: Optional[torch.Tensor], regions: Optional[Regions],
                          source: Optional[torch.Tensor] = None, own: Optional[OwnTerm] = None) -> torch.Tensor:
    """The op's output on validated arguments, differentiable: one differentiable call, or
    with injection ``source`` the call on item source[b]'s q, k and bias plus, for ``own``,
    the call on item b's own logits and ``own.values`` (each term normalised by itself)."""
    if source is None:
        return differentiable_attention(q, k, v, scale=scale, bias=bias, prob_mult=prob_mult, regions=regions)[0]
    index = source.long()
    source_bias = bias[index] if bias is not None and bias.dim() == 4 and bias.shape[0] != 1 else bias
    out = differentiable_attention(q[index], k[index], v, scale=scale, bias=source_bias, prob_mult=prob_mult,
                                   regions=regions)[0]
    if own is not None:
        out = out + differentiable_attention(q, k, own.values, scale=scale, bias=bias, prob_mult=own.prob_mult,
                                             regions=regions)[0]
    return out
