"""DAAM 0.2.0 (castorini/daam, tag v0.2.0) replayed for the tests, no attnctl code involved.

Written from the original's daam/trace.py, daam/hook.py, daam/heatmap.py and daam/utils.py:

* hooks (hook.py, UNetCrossAttentionLocator): ``attn2`` of every transformer block of the
  up blocks, then the down blocks, whose class name contains "CrossAttn"; not the mid
  block. The position in that list is DAAM's ``layer_idx``.
* per call (trace.py, UNetCrossAttentionHooker.__call__): P = attn.get_attention_scores(q,
  k) with q, k split by attn.head_to_batch_dim (rows b·H + h); the call's "factor" is
  int(sqrt(latent_hw // M)) with latent_hw = 4096 if unet.config.sample_size ·
  vae_scale_factor is 512 or 1024, else 9216. Calls with N != 77 or factor 8 are skipped.
  The second half of the (B·H) rows (the cond half under CFG) is kept, each row's
  (77, h, w) map (h = w = int(sqrt(M))) added to a running sum keyed (factor, layer_idx,
  head_idx): a plain sum over the steps, no count.
* compute_global_heat_map: every kept key (filtered by factors, head_idx, layer_idx) is
  upsampled bicubically to (x, x), x = sqrt(latent_hw), clamped at 0, and the mean taken
  over keys; the first len(tokenizer.tokenize(prompt)) + 2 token rows are kept;
  ``normalize`` divides by the sum over rows 1..-2 plus 1e-6.
* compute_word_heat_map / compute_token_merge_indices: the word's tokens
  (tokenizer.tokenize(word.lower()), "</w>" removed) are searched as a run in the prompt's
  tokens (same treatment); every position of every match, + 1 for BOS, is averaged.
"""
from __future__ import annotations

import math
from collections import defaultdict

import torch
import torch.nn.functional as F

CONTEXT_SIZE = 77
SKIPPED_FACTOR = 8


def daam_layers(unet):
    """The hooked modules in DAAM's order (up blocks, then down blocks)."""
    modules = []
    for block in list(unet.up_blocks) + list(unet.down_blocks):
        if "CrossAttn" in type(block).__name__:
            for transformer in block.attentions:
                modules.extend(b.attn2 for b in transformer.transformer_blocks)
    return modules


class DaamReplay:
    """Context manager: DAAM's hooks on ``pipe``; afterwards the global and word maps."""

    def __init__(self, pipe):
        self.pipe = pipe
        side = pipe.unet.config.sample_size * pipe.vae_scale_factor
        self.latent_hw = 4096 if side in (512, 1024) else 9216
        self.modules = daam_layers(pipe.unet)
        self.sums = defaultdict(lambda: 0.0)   # (factor, layer_idx, head_idx) -> (77, h, w)
        self._original = None

    def __enter__(self):
        self._original = [m.processor for m in self.modules]
        for idx, module in enumerate(self.modules):
            module.set_processor(_Hook(self, idx))
        return self

    def __exit__(self, *exc):
        for module, processor in zip(self.modules, self._original):
            module.set_processor(processor)

    def add(self, layer_idx, probs):
        factor = int(math.sqrt(self.latent_hw // probs.shape[1]))
        if probs.shape[-1] != CONTEXT_SIZE or factor == SKIPPED_FACTOR:
            return
        side = int(math.sqrt(probs.shape[1]))
        kept = probs[probs.shape[0] // 2:]                         # (H', M, 77): second half of the rows
        maps = kept.permute(0, 2, 1).reshape(kept.shape[0], CONTEXT_SIZE, side, side)
        for head_idx, heat_map in enumerate(maps):
            key = (factor, layer_idx, head_idx)
            self.sums[key] = self.sums[key] + heat_map

    def global_heat_map(self, prompt, factors=None, head_idx=None, layer_idx=None, normalize=False):
        """(len(tokens) + 2, x, x), as compute_global_heat_map returns it."""
        factors = {0, 1, 2, 4, 8, 16, 32, 64} if factors is None else set(factors)
        x = int(math.sqrt(self.latent_hw))
        kept = []
        for (factor, layer, head), heat_map in self.sums.items():
            if factor in factors and head_idx in (None, head) and layer_idx in (None, layer):
                up = F.interpolate(heat_map.unsqueeze(1), size=(x, x), mode="bicubic")
                kept.append(up.clamp_(min=0))
        if not kept:
            raise RuntimeError("No heat maps found.")
        maps = torch.stack(kept, 0).mean(0)[:, 0]
        maps = maps[:len(self.pipe.tokenizer.tokenize(prompt)) + 2]
        if normalize:
            maps = maps / (maps[1:-1].sum(0, keepdim=True) + 1e-6)
        return maps

    def word_columns(self, prompt, word):
        """compute_token_merge_indices(tokenizer, prompt, word): every matched position + 1."""
        tokenize = self.pipe.tokenizer.tokenize
        tokens = [t.replace("</w>", "") for t in tokenize(prompt.lower())]
        search = [t.replace("</w>", "") for t in tokenize(word.lower())]
        starts = [i for i in range(len(tokens)) if tokens[i:i + len(search)] == search]
        if not starts:
            raise ValueError(f"Search word {word} not found in prompt!")
        return [start + j + 1 for start in starts for j in range(len(search))]

    def word_heat_map(self, global_map, prompt, word):
        return global_map[self.word_columns(prompt, word)].mean(0)


class _Hook:
    """UNetCrossAttentionHooker.__call__: explicit softmax, map kept, output as diffusers'."""

    def __init__(self, replay, layer_idx):
        self.replay = replay
        self.layer_idx = layer_idx

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None):
        batch_size, sequence_length, _ = hidden_states.shape
        attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross is not None:
            encoder_hidden_states = attn.norm_cross(encoder_hidden_states)
        key = attn.head_to_batch_dim(attn.to_k(encoder_hidden_states))
        value = attn.head_to_batch_dim(attn.to_v(encoder_hidden_states))
        probs = attn.get_attention_scores(attn.head_to_batch_dim(query), key, attention_mask)
        self.replay.add(self.layer_idx, probs.detach())
        out = attn.batch_to_head_dim(torch.bmm(probs, value))
        return attn.to_out[1](attn.to_out[0](out))
