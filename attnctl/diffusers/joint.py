"""MM-DiT joint attention (Flux, SD3, SD3.5): the joint layout a controller is told, and
the one processor that replaces FluxAttnProcessor and JointAttnProcessor2_0.

What differs between the models is data, not code: the order of the joint sequence
(Flux puts the text first, SD3 the image first) and each layer's block kind. The
processor reproduces both originals' math (diffusers 0.42.1) step for step:

* q, k, v of the image stream (``to_q/k/v``), split into heads, ``norm_q`` / ``norm_k``
  (over the head dim, so the (B, S, H, D) and (B, H, S, D) orders of the two originals
  give the same values);
* with ``encoder_hidden_states`` (Flux double-stream, SD3 joint): the text stream's
  ``add_q/k/v_proj`` and ``norm_added_q/k``, concatenated on the sequence axis in the
  model's order;
* Flux: RoPE on the joint q and k (the kernel receives the rotated q, k);
* attention with the default scale 1/sqrt(D) (both originals pass no scale);
* split back; ``to_add_out`` on the text part unless ``attn.context_pre_only``; ``to_out``
  on the image part where the layer has one (Flux's single-stream blocks have none and
  return the joint output as it is).

SD3's processor ignores ``attention_mask`` (it never passes it to SDPA); so does this one.
Flux's passes it to the dispatcher; no Flux pipeline gives one, and this processor refuses
one instead of guessing its broadcast form.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch

from .compose import planned_attention

# Block kinds a JointLayout names.
DOUBLE = "double"                     # Flux double-stream: text and image streams, text first
SINGLE = "single"                     # Flux single-stream: one stream, text already concatenated first
JOINT = "joint"                       # SD3 joint block: image first
CONTEXT_PRE_ONLY = "context_pre_only"  # SD3's last joint block (its text output is dropped)
IMAGE_SELF = "image_self"             # SD3.5 medium's image-only self-attention (attn2)
BLOCK_KINDS = (DOUBLE, SINGLE, JOINT, CONTEXT_PRE_ONLY, IMAGE_SELF)


@dataclass(frozen=True)
class JointLayout:
    """Where text and image are in one joint attention call.

    Queries and keys are the same joint sequence, so ``text`` and ``image`` are index
    ranges of both the query rows and the key columns. ``grid`` is the image token grid
    after patchify (Flux 1024²: 64×64). ``block`` is one of BLOCK_KINDS, ``index`` the
    block's index among the model's blocks of its list (Flux: transformer_blocks or
    single_transformer_blocks; SD3: transformer_blocks).
    """

    text: range
    image: range
    grid: Tuple[int, int]
    block: str
    index: int

    @property
    def text_first(self) -> bool:
        return self.text.start == 0 and len(self.text) > 0


@dataclass(frozen=True)
class JointLayer:
    """What the processor of one layer knows: its block kind and index, and the model's
    sequence order."""

    block: str
    index: int
    text_first: bool


def _heads(states: torch.Tensor, head_dim: int, projections, norms):
    """(q, k, v) of one stream as (B, S, H, D), q and k through their norms (None: none)."""
    q, k, v = (proj(states).unflatten(-1, (-1, head_dim)) for proj in projections)
    norm_q, norm_k = norms
    return (norm_q(q) if norm_q is not None else q, norm_k(k) if norm_k is not None else k, v)


class JointProcessor:
    """Replaces FluxAttnProcessor / JointAttnProcessor2_0 on one MM-DiT attention layer
    (see the module doc for the math it keeps)."""

    def __init__(self, layer: str, installation, kind: JointLayer):
        self.layer = layer
        self.installation = installation
        self.kind = kind

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: Optional[torch.Tensor] = None,
                 attention_mask: Optional[torch.Tensor] = None, image_rotary_emb=None, *args, **kwargs):
        if attention_mask is not None and self.kind.text_first:  # Flux; SD3's original ignores it
            raise NotImplementedError(f"attention_mask: attnctl's Flux processor ({self.layer}) takes no mask "
                                      f"(FluxPipeline passes none), got a tensor of shape {tuple(attention_mask.shape)}")
        head_dim = attn.to_k.out_features // attn.heads
        query, key, value = _heads(hidden_states, head_dim, (attn.to_q, attn.to_k, attn.to_v),
                                   (attn.norm_q, attn.norm_k))
        text_len = 0
        if encoder_hidden_states is not None:
            text_len = encoder_hidden_states.shape[1]
            text = _heads(encoder_hidden_states, head_dim, (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj),
                          (attn.norm_added_q, attn.norm_added_k))
            query, key, value = (self._join(t, i) for t, i in zip(text, (query, key, value)))
        if image_rotary_emb is not None:
            from diffusers.models.embeddings import apply_rotary_emb

            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)

        # (B, H, S, D) views of the (B, S, H, D) buffers: the op reads any strides and
        # returns its output in q's memory order, so merging the heads is free.
        q, k, v = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)
        installation = self.installation
        out, call = planned_attention(
            installation, lambda: installation.describe_joint(self.layer, self._layout(q.shape[2], text_len), q, k),
            q, k, v, f"MM-DiT joint attention ({self.layer})")
        if call is not None:
            for controller in installation.controllers:
                controller.on_output(call, v, out)
        out = out.transpose(1, 2).flatten(2, 3).to(query.dtype)

        if encoder_hidden_states is None:
            to_out = getattr(attn, "to_out", None)
            return out if to_out is None else to_out[1](to_out[0](out))
        image_len = out.shape[1] - text_len
        if self.kind.text_first:
            text_out, image_out = out.split_with_sizes([text_len, image_len], dim=1)
        else:
            image_out, text_out = out.split_with_sizes([image_len, text_len], dim=1)
        image_out = attn.to_out[1](attn.to_out[0](image_out.contiguous()))
        if not attn.context_pre_only:
            text_out = attn.to_add_out(text_out.contiguous())
        return image_out, text_out

    def _join(self, text: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        """The joint sequence of one of q, k, v in the model's order."""
        return torch.cat([text, image] if self.kind.text_first else [image, text], dim=1)

    def _layout(self, length: int, text_len: int) -> JointLayout:
        """The layout of a call with ``length`` joint tokens, ``text_len`` of them given as
        encoder_hidden_states (Flux single-stream blocks get the text inside
        hidden_states: its length comes from the transformer's input)."""
        installation = self.installation
        if self.kind.block == SINGLE:
            text_len = installation.text_tokens
        elif self.kind.block == IMAGE_SELF:
            text_len = 0
        image_len = length - text_len
        if self.kind.text_first:
            text, image = range(0, text_len), range(text_len, length)
        else:
            image, text = range(0, image_len), range(image_len, length)
        grid = installation.latent
        if grid is None or grid[0] * grid[1] != image_len:
            raise RuntimeError(f"{self.layer}: {image_len} image tokens do not fill the image grid {grid} read "
                               "from the transformer's input; the transformer must run through its forward")
        return JointLayout(text, image, grid, self.kind.block, self.kind.index)

    def __repr__(self) -> str:
        return f"JointProcessor({self.layer!r}, {self.kind.block})"
