"""A concept stream: extra text rows run through an MM-DiT's text side beside the prompt,
never entering the prompt-image attention (the image is exactly what it is without them).

Tools that need text-side states of words other than the prompt's at every block use it:
ConceptAttention (the concepts' outputs, Flux double-stream blocks) and HRV construction
on Flux / SD3 (the probe keys of each concept word at every joint layer: a word's text
keys at block i come from its text-stream state after i blocks).

Per transformer forward, :func:`start` embeds the rows (``context_embedder``) and forms
their modulation embedding: the transformer's own time (and guidance) embedding of a
pooled vector, zero (``pooled="zero"``, ConceptAttention) or the forward's own
``pooled_projections`` (``"prompt"``: the temb the prompt's text rows get). Per block,
:meth:`ConceptStream.enter` forms the rows' q, k, v exactly as the block forms the prompt
text rows' (the layer's processor does the same projections and norms):

* Flux double-stream (``FluxTransformerBlock``) and SD3 joint blocks
  (``JointTransformerBlock``): ``norm1_context``, ``add_q/k/v_proj``, ``norm_added_q/k``;
* SD3's ``context_pre_only`` block: ``norm1_context`` (AdaLayerNormContinuous) alone; its
  text output is dropped, so the stream ends there;
* Flux single-stream (``FluxSingleTransformerBlock``): ``norm`` (AdaLayerNormZeroSingle),
  ``to_q/k/v``, ``norm_q/k`` (the text rows are part of the block's one sequence).

The caller attends the rows' queries over [the rows' keys; the call's image keys] (with
the image values) — the rows take the place of the prompt text, which they do not see —
and :meth:`ConceptStream.advance` applies the block's text-side residual update to the
result: ``to_add_out``, gate, ``norm2_context`` / ``ff_context`` (double / joint), or
``proj_mlp`` / ``act_mlp`` / ``proj_out`` and gate (single). RoPE: Flux's text positions
(``txt_ids``) are zeros, where the rotation is the identity, so the rows' q and k need
none; the image keys come from the call, already rotated.
"""
from __future__ import annotations

from typing import Optional

import torch

from ..diffusers.joint import CONTEXT_PRE_ONLY, DOUBLE, IMAGE_SELF, JOINT, SINGLE, JointLayout
from ..diffusers.mmdit import FLUX

POOLED = ("zero", "prompt")


class BlockStep:
    """The rows' q, k, v (B, H, C, D) at one block, and what the block's update needs."""

    __slots__ = ("block", "kind", "q", "k", "v", "modulation", "mlp")

    def __init__(self, block, kind: str, q, k, v, modulation=(), mlp=None):
        self.block, self.kind = block, kind
        self.q, self.k, self.v = q, k, v
        self.modulation = modulation      # double / joint: gate_msa, shift_mlp, scale_mlp, gate_mlp; single: gate
        self.mlp = mlp                    # single: act_mlp(proj_mlp(normed))


class ConceptStream:
    """The concept rows of one transformer forward: ``states`` (B, C, dim), the modulation
    embedding ``temb`` (B, dim) and, when asked, the joint sequence's RoPE (cos, sin)."""

    __slots__ = ("states", "temb", "rope", "family")

    def __init__(self, states: torch.Tensor, temb: torch.Tensor, rope=None, family: str = FLUX):
        self.states = states
        self.temb = temb
        self.rope = rope
        self.family = family

    def enter(self, model, joint: JointLayout) -> BlockStep:
        """q, k, v of the rows at the block of ``joint`` (a layer with text keys)."""
        kind = joint.block
        if kind == IMAGE_SELF:
            raise ValueError("concept stream: SD3.5's image-only attn2 has no text side")
        if kind == SINGLE:
            block = model.single_transformer_blocks[joint.index]
            normed, gate = block.norm(self.states, emb=self.temb)
            attn = block.attn
            q, k, v = _heads(attn, normed, (attn.to_q, attn.to_k, attn.to_v), (attn.norm_q, attn.norm_k))
            return BlockStep(block, kind, q, k, v, (gate,), block.act_mlp(block.proj_mlp(normed)))
        block = model.transformer_blocks[joint.index]
        attn = block.attn
        side = (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj), (attn.norm_added_q, attn.norm_added_k)
        if kind == CONTEXT_PRE_ONLY:
            return BlockStep(block, kind, *_heads(attn, block.norm1_context(self.states, self.temb), *side))
        normed, *modulation = block.norm1_context(self.states, emb=self.temb)
        return BlockStep(block, kind, *_heads(attn, normed, *side), tuple(modulation))

    def advance(self, step: BlockStep, attn_out: torch.Tensor) -> None:
        """The block's text-side residual update of the rows; ``attn_out`` (B, C, H·D) is
        their attention output with the heads concatenated."""
        block, states = step.block, self.states
        if step.kind == CONTEXT_PRE_ONLY:
            raise ValueError("concept stream: the context_pre_only block drops the text stream; it ends there")
        if step.kind == SINGLE:
            (gate,) = step.modulation
            states = states + gate.unsqueeze(1) * block.proj_out(torch.cat([attn_out, step.mlp], dim=2))
        else:
            gate_msa, shift_mlp, scale_mlp, gate_mlp = step.modulation
            states = states + gate_msa.unsqueeze(1) * block.attn.to_add_out(attn_out)
            normed = block.norm2_context(states) * (1 + scale_mlp[:, None]) + shift_mlp[:, None]
            states = states + gate_mlp.unsqueeze(1) * block.ff_context(normed)
        # Flux clips its fp16 streams after each block (SD3's joint block does not)
        if self.family == FLUX and states.dtype == torch.float16:
            states = states.clip(-65504, 65504)
        self.states = states


def _heads(attn, states: torch.Tensor, projections, norms):
    """q, k, v (B, H, C, D) of ``states`` through ``projections`` and the q / k norms."""
    head_dim = attn.to_k.out_features // attn.heads
    q, k, v = (proj(states).unflatten(-1, (-1, head_dim)) for proj in projections)
    if norms[0] is not None:
        q = norms[0](q)
    if norms[1] is not None:
        k = norms[1](k)
    return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)


def start(model, family: str, kwargs: dict, embeds: torch.Tensor, *, pooled: str = "zero",
          rows: Optional[range] = None, rope: bool = False) -> ConceptStream:
    """The stream of one forward of ``model`` (its keyword inputs ``kwargs``): ``embeds``
    (C, joint_attention_dim) text-encoder states, one per row; ``rows``: the batch items
    that get the stream (default all); ``rope``: keep the joint sequence's RoPE (Flux)."""
    if pooled not in POOLED:
        raise ValueError(f"pooled: expected one of {POOLED}, got {pooled!r}")
    dtype = model.context_embedder.weight.dtype
    batch = kwargs["encoder_hidden_states"].shape[0]
    rows = range(batch) if rows is None else rows
    vector = kwargs["pooled_projections"][rows.start:rows.stop]
    if pooled == "zero":
        vector = torch.zeros(vector.shape, device=vector.device, dtype=dtype)
    # the timestep and guidance as the transformer's forward embeds them
    timestep = kwargs["timestep"][rows.start:rows.stop]
    if family == FLUX:
        timestep = timestep.to(dtype) * 1000
        guidance = kwargs.get("guidance")
        if guidance is None:
            temb = model.time_text_embed(timestep, vector)
        else:
            temb = model.time_text_embed(timestep, guidance[rows.start:rows.stop].to(dtype) * 1000, vector)
    else:
        temb = model.time_text_embed(timestep, vector)
    states = model.context_embedder(embeds.to(dtype)).unsqueeze(0).expand(len(rows), -1, -1)
    table = None
    if rope:
        ids = [kwargs[name][0] if kwargs[name].ndim == 3 else kwargs[name] for name in ("txt_ids", "img_ids")]
        table = model.pos_embed(torch.cat(ids, dim=0))
    return ConceptStream(states, temb, table, family)


def stream_layers(joint: JointLayout) -> bool:
    """Whether a joint layer has the text keys a concept stream takes part in."""
    return joint.block in (DOUBLE, SINGLE, JOINT, CONTEXT_PRE_ONLY)
