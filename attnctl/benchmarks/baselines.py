"""What map tools do today, as diffusers attention processors: materialise P and keep it.

Both wrap diffusers' own materialising ``AttnProcessor`` (QKᵀ -> softmax -> PV through
``Attention.get_attention_scores``), tapping the probabilities the way DAAM and
prompt-to-prompt's AttentionStore do. They are benchmark baselines, not library features.
"""
from __future__ import annotations

from typing import Callable, Dict

import torch
from diffusers.models.attention_processor import AttnProcessor


class _ProbsTap:
    """Stands in for the Attention module and hands every P it computes to ``on_probs``."""

    def __init__(self, attn, on_probs: Callable[[torch.Tensor], None]):
        self._attn = attn
        self._on_probs = on_probs

    def __getattr__(self, name):
        return getattr(self._attn, name)

    def get_attention_scores(self, query, key, attention_mask=None):
        probs = self._attn.get_attention_scores(query, key, attention_mask)
        self._on_probs(probs)
        return probs


class MaterialisingProcessor(AttnProcessor):
    def __init__(self, on_probs: Callable[[torch.Tensor], None]):
        super().__init__()
        self.on_probs = on_probs

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 temb=None, *args, **kwargs):
        return super().__call__(_ProbsTap(attn, self.on_probs), hidden_states, encoder_hidden_states,
                                attention_mask, temb)


def attention_modules(unet):
    from diffusers.models.attention_processor import Attention
    return {name: m for name, m in unet.named_modules() if isinstance(m, Attention)}


def install_daam_style(unet) -> Dict[str, torch.Tensor]:
    """Every cross-attention layer: materialise P, add its head-sum (B, M, N) in fp32 to a
    per-layer map, as DAAM's heat-map hooks do. Returns the maps (filled while running)."""
    maps: Dict[str, torch.Tensor] = {}

    def keeper(name, heads):
        def keep(probs):  # (B*H, M, N)
            summed = probs.unflatten(0, (-1, heads)).float().sum(1)
            maps[name] = summed if name not in maps else maps[name] + summed
        return keep

    procs = {}
    for name, m in attention_modules(unet).items():
        procs[f"{name}.processor"] = (MaterialisingProcessor(keeper(name, m.heads))
                                      if m.is_cross_attention else AttnProcessor())
    unet.set_attn_processor(procs)
    return maps


def install_p2p_self_store(unet) -> Dict[str, torch.Tensor]:
    """Every self-attention layer at every resolution: materialise P and keep a running sum
    of it across steps (prompt-to-prompt's AttentionStore, without its ≤ 32² memory limit)."""
    store: Dict[str, torch.Tensor] = {}

    def keeper(name):
        def keep(probs):
            if name in store:
                store[name] += probs
            else:
                store[name] = probs.clone()
        return keep

    procs = {}
    for name, m in attention_modules(unet).items():
        procs[f"{name}.processor"] = (AttnProcessor() if m.is_cross_attention
                                      else MaterialisingProcessor(keeper(name)))
    unet.set_attn_processor(procs)
    return store
