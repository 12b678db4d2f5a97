"""What install needs to know about the MM-DiT transformers (Flux, SD3, SD3.5), as data:
each layer's block kind, the sequence order, and how to read a forward's inputs.

Flux: ``transformer_blocks.i.attn`` are double-stream, ``single_transformer_blocks.i.attn``
single-stream; text first. SD3: ``transformer_blocks.i.attn`` joint (the block with
``context_pre_only`` last), ``transformer_blocks.i.attn2`` SD3.5 medium's image-only
self-attention; image first.

Their text columns hold the tokens of one or more text encoders (:class:`TextSegment`):
Flux's are T5's (``tokenizer_2``, ``prompt_2``); SD3's are 77 CLIP tokens (CLIP-L's and
CLIP-G's states concatenated on the channels: ``tokenizer`` with ``prompt`` and
``tokenizer_2`` with ``prompt_2`` share the columns) followed by T5's (``tokenizer_3``,
``prompt_3``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Sequence, Tuple

import torch

from .joint import CONTEXT_PRE_ONLY, DOUBLE, IMAGE_SELF, JOINT, SINGLE, JointLayer

FLUX, SD3 = "flux", "sd3"
SD3_CLIP_TOKENS = 77   # SD3's CLIP-L‖G tokens come first in its text sequence
T5, CLIP = "t5", "clip"
TEXT_SEGMENTS = (T5, CLIP)


@dataclass(frozen=True)
class TextSegment:
    """The columns of one text encoder's tokens among an MM-DiT call's text columns:
    ``[start, start + length)`` of the text (T5's length is the pipeline's
    ``max_sequence_length``), tokenised by ``tokenizer`` from ``prompts`` (one per prompt
    of the generation). ``name`` is "t5" or "clip"."""

    name: str
    start: int
    length: int
    tokenizer: object
    prompts: Tuple[str, ...]


def text_segments(family: str, pipe, prompts: Sequence[str], arguments) -> Tuple[TextSegment, ...]:
    """The text segments of a generation of ``pipe`` (a Flux or SD3 pipeline) with
    ``prompts``; ``arguments`` are encode_prompt's bound arguments, defaults applied
    (``prompt_2``, ``prompt_3`` default to the prompt there too). A text encoder the
    pipeline lacks (SD3 without T5: zero states) has no segment."""
    def texts(name):
        given = arguments.get(name) or prompts
        return tuple([given] if isinstance(given, str) else given)

    t5_length = int(arguments["max_sequence_length"])
    if family == FLUX:
        encoders = [(T5, 0, t5_length, "tokenizer_2", "text_encoder_2", "prompt_2")]
    else:
        encoders = [(CLIP, 0, SD3_CLIP_TOKENS, "tokenizer", "text_encoder", "prompt"),
                    (CLIP, 0, SD3_CLIP_TOKENS, "tokenizer_2", "text_encoder_2", "prompt_2"),
                    (T5, SD3_CLIP_TOKENS, t5_length, "tokenizer_3", "text_encoder_3", "prompt_3")]
    return tuple(TextSegment(name, start, length, getattr(pipe, tokenizer), texts(argument))
                 for name, start, length, tokenizer, encoder, argument in encoders
                 if getattr(pipe, tokenizer, None) is not None and getattr(pipe, encoder, None) is not None)


def segment_spec(family: str, text: str) -> Tuple[str, int, Optional[int]]:
    """(tokenizer attribute of the pipeline, first column of the segment in the text, its
    length or None = the rest of the text) of text segment ``text`` ("t5" or "clip") of a
    ``family`` model; SD3's "clip" is read with CLIP-L's tokenizer (CLIP-G's gives the same
    columns)."""
    if text not in TEXT_SEGMENTS:
        raise ValueError(f"text: expected one of {TEXT_SEGMENTS} (a text segment), got {text!r}")
    if family == FLUX:
        if text != T5:
            raise ValueError(f"text: Flux attends to T5 tokens only (CLIP gives a pooled vector), got {text!r}")
        return "tokenizer_2", 0, None
    return ("tokenizer_3", SD3_CLIP_TOKENS, None) if text == T5 else ("tokenizer", 0, SD3_CLIP_TOKENS)


def generation_segment(segments: Sequence[TextSegment], text: str, who: str) -> TextSegment:
    """The first of a generation's ``segments`` named ``text``: its tokenizer, columns and
    the texts its encoder got. ``who`` names the caller in the errors."""
    if not segments:
        raise ValueError(f"{who}: the generation did not say which text encoder's tokens are which columns; "
                         "install attnctl on the Flux / SD3 pipeline, not its transformer, and give it the prompt")
    for segment in segments:
        if segment.name == text:
            return segment
    raise ValueError(f"text: this generation's text segments are {[s.name for s in segments]}, got {text!r}")


def mmdit_family(model) -> Optional[str]:
    """"flux" or "sd3" for the transformers attnctl supports, else None."""
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel

    if isinstance(model, FluxTransformer2DModel):
        return FLUX
    if isinstance(model, SD3Transformer2DModel):
        return SD3
    return None


def joint_layers(model, family: str) -> Dict[str, JointLayer]:
    """{layer name: JointLayer} for every attention layer of ``model``."""
    modules = dict(model.named_modules())
    layers = {}
    for name in model.attn_processors:
        layer = name[: -len(".processor")]
        parts = layer.split(".")
        blocks, index, attr = parts[0], int(parts[1]), parts[-1]
        if getattr(modules[layer], "fused_projections", False):
            raise NotImplementedError(f"install: {layer} has fused projections (fuse_qkv_projections()); "
                                      "attnctl replays the unfused processor: call unfuse_qkv_projections() first")
        if family == FLUX:
            kind = DOUBLE if blocks == "transformer_blocks" else SINGLE
        elif attr == "attn2":
            kind = IMAGE_SELF
        else:
            kind = CONTEXT_PRE_ONLY if modules[layer].context_pre_only else JOINT
        layers[layer] = JointLayer(kind, index, text_first=family == FLUX)
    return layers


class ForwardReader:
    """Reads a transformer forward's inputs: batch rows, the image token grid, the text
    length and the timestep. Flux's grid comes from ``img_ids`` (read once per ids tensor:
    the pipeline passes the same one every step), or from ``flux_grid`` when set (ids on
    the meta device have no values); SD3's from the latent and patch size."""

    def __init__(self, model, family: str):
        self.family = family
        self.patch = model.config.patch_size
        self._flux_grid: Tuple[Optional[torch.Tensor], Optional[Tuple[int, int]]] = (None, None)
        self.flux_grid: Optional[Tuple[int, int]] = None

    def __call__(self, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        text = kwargs.get("encoder_hidden_states")
        timestep = kwargs.get("timestep")
        if self.family == SD3:
            grid = (hidden.shape[-2] // self.patch, hidden.shape[-1] // self.patch)
        else:
            grid = self._grid_of_ids(kwargs.get("img_ids"), hidden.shape[1])
        return hidden.shape[0], grid, (text.shape[1] if text is not None else 0), timestep

    def _grid_of_ids(self, ids: Optional[torch.Tensor], tokens: int) -> Tuple[int, int]:
        if ids is None:
            raise ValueError("img_ids: attnctl reads the Flux image grid from the transformer's img_ids "
                             "(as FluxPipeline passes them), got none")
        if self.flux_grid is not None:
            if self.flux_grid[0] * self.flux_grid[1] != tokens:
                raise ValueError(f"image_grid: expected {tokens} image tokens, got {self.flux_grid}")
            return self.flux_grid
        if ids.is_meta:
            raise ValueError("img_ids: on the meta device the ids have no values to read the image grid from; "
                             "set installation.image_grid = (h, w) first")
        held, grid = self._flux_grid
        if held is not ids:
            ids2 = ids[0] if ids.ndim == 3 else ids
            rows, cols = (int(x) + 1 for x in ids2[:, 1:].amax(0).tolist())
            grid = (rows, cols)
            if rows * cols != tokens:
                raise ValueError(f"img_ids: expected a {tokens}-token image grid, got positions spanning "
                                 f"{rows}x{cols}")
            self._flux_grid = (ids, grid)
        return grid
