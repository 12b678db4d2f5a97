"""A materialising replay of structured diffusion guidance, written from
weixi-feng/Structured-Diffusion-Guidance (no attnctl code):

* scripts/txt2img_demo.py: ``preprocess_prompts``, ``single_align``, ``multi_align``,
  ``align_sequence`` and the construction of ``c = {'k': k_c, 'v': v_c}`` in both modes;
* structured_stable_diffusion/modules/encoders/modules.py: ``FrozenCLIPEmbedder``
  (the conditioning of a text: last hidden states of the 77-token padded ids);
* structured_stable_diffusion/modules/attention.py: ``CrossAttention.forward``,
  ``struct_qkv`` / ``multi_qkv`` (cross-attention: the unconditional half plain, the
  conditional half one softmax per key set and the outputs of every (key, value) pair
  averaged) and ``normal_qkv`` (self-attention), with explicit (b·h, i, j) probabilities.

The UNet's attention layers are diffusers' modules; the processor replays the original's
forward on their projections. The pipeline's encoder states give the unconditional half
(the original's ``uc``: the empty prompt); the conditional half reads the replayed
conditioning instead of the pipeline's.
"""
from __future__ import annotations

import contextlib

import torch
from torch import einsum


def preprocess_prompts(prompts):
    if isinstance(prompts, (list, tuple)):
        return [p.lower().strip().strip(".").strip() for p in prompts]
    return prompts.lower().strip().strip(".").strip()


def get_learned_conditioning(pipe, text):
    """FrozenCLIPEmbedder.forward."""
    tokenizer, transformer = pipe.tokenizer, pipe.text_encoder
    batch_encoding = tokenizer(text, truncation=True, max_length=tokenizer.model_max_length, return_length=True,
                               return_overflowing_tokens=False, padding="max_length", return_tensors="pt")
    tokens = batch_encoding["input_ids"]
    outputs = transformer(input_ids=tokens)
    return outputs.last_hidden_state


def single_align(main_seq, seqs, spans, dim=1):
    main_seq = main_seq.transpose(0, dim)
    for seq, span in zip(seqs, spans):
        seq = seq.transpose(0, dim)
        start, end = span[0] + 1, span[1] + 1
        seg_length = end - start
        main_seq[start:end] = seq[1:1 + seg_length]
    return main_seq.transpose(0, dim)


def multi_align(main_seq, seq, span, dim=1):
    seq = seq.transpose(0, dim)
    main_seq = main_seq.transpose(0, dim)
    start, end = span[0] + 1, span[1] + 1
    seg_length = end - start
    main_seq[start:end] = seq[1:1 + seg_length]
    return main_seq.transpose(0, dim)


def align_sequence(main_seq, seqs, spans, dim=1, single=False):
    aligned_seqs = []
    if single:
        return [single_align(main_seq, seqs, spans, dim=dim)]
    for seq, span in zip(seqs, spans):
        aligned_seqs.append(multi_align(main_seq.clone(), seq, span, dim=dim))
    return aligned_seqs


def conditioning(pipe, prompts, nps, spans, conjunction, prompt_first_key=False):
    """txt2img_demo.py's ``c``: ``nps`` / ``spans`` as its parser returns them (the full
    prompt first). ``prompt_first_key``: not the original; the conjunction keys start with
    an untouched copy of the prompt's conditioning (test-written variant)."""
    nps = [[np] * len(prompts) for np in nps]
    with torch.no_grad():
        if conjunction:
            c = [get_learned_conditioning(pipe, np) for np in nps]
            first = c[0].clone() if prompt_first_key else c[0]
            k_c = [first] + align_sequence(c[0], c[1:], spans[1:])
            v_c = align_sequence(c[0], c[1:], spans[1:], single=True)
            c = {'k': k_c, 'v': v_c}
        else:
            c = [get_learned_conditioning(pipe, np) for np in nps]
            k_c = c[:1]
            v_c = [c[0]] + align_sequence(c[0], c[1:], spans[1:])
            c = {'k': k_c, 'v': v_c}
    return c


def _heads(t, h):
    """rearrange(t, 'b n (h d) -> (b h) n d')."""
    b, n, hd = t.shape
    return t.view(b, n, h, hd // h).permute(0, 2, 1, 3).reshape(b * h, n, hd // h)


def _merge(t, h):
    """rearrange(t, '(b h) n d -> b n (h d)')."""
    bh, n, d = t.shape
    return t.view(bh // h, h, n, d).permute(0, 2, 1, 3).reshape(bh // h, n, h * d)


class StructuredCrossAttentionOriginal:
    """CrossAttention.forward of the original on a diffusers Attention module; ``context``
    is the original's ``{'k': [...], 'v': [...]}`` for the conditional half."""

    def __init__(self, context):
        self.context = context

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None):
        assert hidden_states.ndim == 3 and attention_mask is None and attn.group_norm is None
        x = hidden_states
        q = attn.to_q(x)
        if encoder_hidden_states is None:
            out = self.normal_qkv(attn, q, x)
        else:
            uc = encoder_hidden_states[:encoder_hidden_states.shape[0] // 2]
            out = self.multi_qkv(attn, q, uc, self.context['k'], self.context['v'])
        return attn.to_out[1](attn.to_out[0](out)) / attn.rescale_output_factor

    def multi_qkv(self, attn, q, uc_context, context_k, context_v):
        h = attn.heads
        assert uc_context.size(0) == context_k[0].size(0) == context_v[0].size(0)
        true_bs = uc_context.size(0) * h

        k_uc, v_uc = attn.to_k(uc_context), attn.to_v(uc_context)
        k_c = [attn.to_k(c_k) for c_k in context_k]
        v_c = [attn.to_v(c_v) for c_v in context_v]

        q = _heads(q, h)
        k_uc = _heads(k_uc, h)
        v_uc = _heads(v_uc, h)
        k_c = [_heads(k, h) for k in k_c]
        v_c = [_heads(v, h) for v in v_c]

        sim_uc = einsum('b i d, b j d -> b i j', q[:true_bs], k_uc) * attn.scale
        sim_c = [einsum('b i d, b j d -> b i j', q[true_bs:], k) * attn.scale for k in k_c]

        attn_uc = sim_uc.softmax(dim=-1)
        attn_c = [sim.softmax(dim=-1) for sim in sim_c]

        out_uc = einsum('b i j, b j d -> b i d', attn_uc, v_uc)

        n_keys, n_values = len(k_c), len(v_c)
        if n_keys == n_values:
            out_c = sum([einsum('b i j, b j d -> b i d', a, v) for a, v in zip(attn_c, v_c)]) / len(v_c)
        else:
            assert n_keys == 1 or n_values == 1
            out_c = sum([einsum('b i j, b j d -> b i d', a, v) for a in attn_c for v in v_c]) / (n_keys * n_values)

        out = torch.cat([out_uc, out_c], dim=0)
        return _merge(out, h)

    def normal_qkv(self, attn, q, context):
        h = attn.heads
        k = attn.to_k(context)
        v = attn.to_v(context)
        q, k, v = (_heads(t, h) for t in (q, k, v))
        sim = einsum('b i d, b j d -> b i j', q, k) * attn.scale
        a = sim.softmax(dim=-1)
        out = einsum('b i j, b j d -> b i d', a, v)
        return _merge(out, h)


@contextlib.contextmanager
def original_processors(unet, context):
    original = unet.attn_processors
    unet.set_attn_processor(StructuredCrossAttentionOriginal(context))
    try:
        yield
    finally:
        unet.set_attn_processor(dict(original))
