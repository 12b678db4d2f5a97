"""Replaying a diffusers model's stock attention with torch's SDPA made explicit: the
materialising references of the tests keep the stock processors (projections, norms,
RoPE, output) and put their own math where the processor calls
``F.scaled_dot_product_attention``; ``materialised`` is the common one that keeps P, and
``reference_word_map`` / ``assert_matches_materialised`` read word maps off what it kept."""
from __future__ import annotations

import contextlib
import dataclasses

import torch
import torch.nn.functional as F

EPS32 = torch.finfo(torch.float32).eps
# torch's own SDPA, taken at import (before any replay): the pass-through of a replay and
# what a reference calls to hand a call on to torch
torch_sdpa = F.scaled_dot_product_attention


@dataclasses.dataclass(frozen=True)
class ReplayedCall:
    """An SDPA call made inside one of the model's attention modules."""
    layer: str         # the module's name in the model
    is_cross: bool     # its ``is_cross_attention`` (False where it has none)
    forward: int       # which forward of the model it belongs to, from 0 (Wan: CFG's halves are two)


@contextlib.contextmanager
def sdpa_replay(model, attention):
    """Within the context, an SDPA call made inside an attention module of ``model`` (one
    with a ``processor``) returns ``attention(call, query, key, value, attn_mask)``
    (``call`` a ReplayedCall); calls elsewhere (text encoders, the CLIP vision tower) go
    to torch's SDPA. The module is tracked from its forward's start to its end, so a module
    calling SDPA twice (Wan I2V's text and image context) is named both times. The stock
    processors ask for no dropout, causal mask, scale or GQA (asserted): a replay knows only
    softmax(q·kᵀ/√D + mask). Hooks and SDPA are restored on exit."""
    assert F.scaled_dot_product_attention is torch_sdpa, "a replay inside a replay"
    modules = {name: module for name, module in model.named_modules() if hasattr(module, "processor")}
    current, forwards = [None], [-1]

    def enter(name):
        current[0] = name

    def count_forward(module, args):
        forwards[0] += 1

    def explicit(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        if current[0] is None:
            return torch_sdpa(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                              scale=scale, enable_gqa=enable_gqa)
        assert dropout_p == 0.0 and not is_causal and scale is None and not enable_gqa, (
            f"{current[0]}: SDPA asked for dropout_p={dropout_p}, is_causal={is_causal}, scale={scale}, "
            f"enable_gqa={enable_gqa}; the replay computes softmax(q·kᵀ/√D + mask) only")
        layer = current[0]
        call = ReplayedCall(layer, getattr(modules[layer], "is_cross_attention", False), forwards[0])
        return attention(call, query, key, value, attn_mask)

    hooks = [model.register_forward_pre_hook(count_forward)]
    try:
        for name, module in modules.items():
            hooks.append(module.register_forward_pre_hook(lambda m, a, name=name: enter(name)))
            hooks.append(module.register_forward_hook(lambda m, a, o: enter(None)))
        F.scaled_dot_product_attention = explicit
        yield
    finally:
        F.scaled_dot_product_attention = torch_sdpa
        for hook in hooks:
            hook.remove()


@contextlib.contextmanager
def materialised(model, keep=lambda call, key: True, masked=False):
    """The stock attention with SDPA made explicit in fp64: softmax(q·kᵀ/√D + mask)·v.
    Yields {layer: Σ P (B, H, M, N)} over the calls ``keep(call, key)`` accepts, and under
    (layer, "fp32") the same sums with P formed in fp32 from the same q, k (the
    reference's own fp32 error, from which tolerances are derived). ``masked``: the stock
    processors may pass an additive mask (without it, a mask is refused)."""
    store = {}

    def explicit(call, q, k, v, attn_mask):
        assert masked or attn_mask is None, f"{call.layer}: an attention mask in an unmasked replay"
        logits = (q.double() @ k.double().transpose(-1, -2)) * q.shape[-1] ** -0.5
        logits32 = (q.float() @ k.float().transpose(-1, -2)) * q.shape[-1] ** -0.5
        if attn_mask is not None:
            logits, logits32 = logits + attn_mask.double(), logits32 + attn_mask.float()
        p = torch.softmax(logits, dim=-1)
        if keep(call, k):
            store[call.layer] = store.get(call.layer, 0) + p
            store[call.layer, "fp32"] = store.get((call.layer, "fp32"), 0) + torch.softmax(logits32, dim=-1)
        return (p @ v.double()).to(q.dtype)

    with sdpa_replay(model, explicit):
        yield store


def reference_word_map(store, row, columns, grid, layers, image_rows=slice(None), heads=None, precision=None):
    """From a ``materialised`` store: the mean over ``layers`` and heads (all, or ``heads``)
    of Σ P[row, h, image rows, columns], averaged over the columns, shaped as ``grid``
    ((h, w), or (frames, h, w) on video)."""
    def block(name):
        p = store[name if precision is None else (name, precision)][row]
        return (p if heads is None else p[heads])[:, image_rows][:, :, columns]

    total = sum(block(name).sum(0) for name in layers)
    count = len(layers) * (store[layers[0]].shape[1] if heads is None else len(heads))
    return (total / count).mean(-1).reshape(grid).float()


def assert_matches_materialised(got, store, *args, **kwargs):
    """``got`` against ``reference_word_map(store, ...)`` in fp64, within twice the error of
    the same map from the fp32 P plus a few fp32 ulp of its largest value (maps are added in
    another order, and a step's q, k differ by the previous steps' rounding)."""
    expected = reference_word_map(store, *args, **kwargs)
    own_error = (reference_word_map(store, *args, precision="fp32", **kwargs) - expected).abs().max()
    atol = 2 * own_error.item() + 8 * EPS32 * expected.abs().max().item()
    torch.testing.assert_close(got, expected, rtol=0, atol=atol)
