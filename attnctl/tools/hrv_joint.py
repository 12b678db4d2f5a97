"""Head relevance vectors on MM-DiT joint attention (Flux, SD3, SD3.5): the probes and
the text columns the HRV controls act on.

Why a concept stream: on a UNet the text keys of every cross-attention layer are the text
encoder's states through that layer's ``to_k``. In joint attention the text keys of block
i come from the text stream after i blocks, so a concept word's probe keys at block i need
the word's own text-stream state at block i. :class:`JointProbes` runs every probe token
(each concept word's tokens, encoded by the pipeline's ``encode_prompt`` exactly as a
prompt is, kept at the word's own positions of the chosen text segment) as a
:mod:`concept stream <attnctl.tools.concept_stream>` beside the prompt, modulated by the
forward's own temb (the prompt's pooled vector); the image is bit-identical with and
without it.

The vote at each joint layer with text keys (Flux: 19 double + 38 single blocks; SD3: every
joint block, ``context_pre_only`` included; not SD3.5's image-only ``attn2``): per head,
Σ over the IMAGE query rows of the conditional images of a softmax over the probe keys
alone (the stream's keys at that block: RoPE is the identity at Flux's text positions,
whose ids are zeros), as on UNets. The joint call's own probe capture would sum over its
text query rows too (``Capture.rows`` restricts batch items, not query rows), so the probe
is its own fused op call: queries = the image rows of the call's q (a view), keys = the
probe keys, its token mass captured; its output is discarded (one (B, H, P, D) write per
layer call: the cost of the probe).

Text segments (``text``): Flux's text is T5 alone ("t5"); SD3's joint context is the 77
CLIP-L‖G tokens, then T5: "t5" (default) probes a word's T5 tokens, "clip" its CLIP
tokens (then the start-of-text token can join the probe set, ``probe_sot``, as on UNets).
"""
from __future__ import annotations

import inspect
from typing import List, Optional, Sequence

import torch

from ..capture import Capture
from ..diffusers.controller import AttentionCall, BatchLayout
from ..diffusers.install import installation_of
from ..diffusers.joint import CONTEXT_PRE_ONLY
from ..diffusers.mmdit import FLUX, SD3_CLIP_TOKENS, segment_spec
from ..op import attention
from . import concept_stream
from .words import record_prompt


def segment_tokenizer(pipe, family: str, text: str):
    attribute, offset, length = segment_spec(family, text)
    tokenizer = getattr(pipe, attribute, None)
    if tokenizer is None:
        raise ValueError(f"pipe: the {text!r} text segment is read with the pipeline's {attribute}; "
                         f"{type(pipe).__name__} has none")
    return tokenizer, offset, length


class JointProbes:
    """The MM-DiT side of :class:`attnctl.tools.hrv.HRVBuilder`: the probe tokens as a
    concept stream and their per-layer probe mass. Holds a forward pre-hook on the
    transformer until :meth:`close`."""

    def __init__(self, pipe, family: str, words: Sequence[str], text: str, probe_sot: bool):
        self.pipe, self.family = pipe, family
        self.model = pipe.transformer
        tokenizer, self.offset, self.length = segment_tokenizer(pipe, family, text)
        self.columns: List[List[int]] = []          # per word: its columns in the joint text
        for word in words:
            recorded = record_prompt(tokenizer, word, self.length)
            columns = [self.offset + p for _, pos in recorded.words for p in pos]
            if not columns:
                raise ValueError(f"concept word {word!r}: the tokenizer gives it no tokens")
            self.columns.append(columns)
        if probe_sot and min(c for cols in self.columns for c in cols) == self.offset:
            raise ValueError(f"probe_sot: the {text!r} segment's tokenizer puts no start-of-text token before the "
                             "text (T5); pass probe_sot=False (or text='clip' on SD3)")
        self.probe_sot = probe_sot
        self.words = list(words)
        self._embeds = {}
        self._inputs: Optional[dict] = None
        self.stream: Optional[concept_stream.ConceptStream] = None
        self.rows = range(0)
        self._last_layer: Optional[str] = None
        self._checked_ids: Optional[torch.Tensor] = None
        self._hook = self.model.register_forward_pre_hook(self._before_transformer, with_kwargs=True)

    @property
    def sizes(self) -> List[int]:
        return [len(c) for c in self.columns]

    def close(self) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        self.stream = self._inputs = None

    def _before_transformer(self, module, args, kwargs) -> None:
        # The stream starts at this forward's first joint call, when the installation has
        # read the forward's batch layout (this hook may run before the installation's).
        self._inputs, self.stream = kwargs, None

    def embeds(self, text_tokens: int, device, dtype) -> torch.Tensor:
        """(C, joint_attention_dim): the probe tokens' text-encoder states, each word
        encoded alone as a prompt of this forward's text length (cached per length)."""
        key = (text_tokens, device, dtype)
        if key not in self._embeds:
            t5_length = text_tokens - (0 if self.family == FLUX else SD3_CLIP_TOKENS)
            rows = []
            for word, columns in zip(self.words, self.columns):
                states = encode_as_prompt(self.pipe, word, t5_length)[0]
                if self.probe_sot and not rows:
                    rows.append(states[self.offset:self.offset + 1])   # the SOT state: the same for every text
                rows.append(states[columns])
            self._embeds[key] = torch.cat(rows).to(device=device, dtype=dtype)
        return self._embeds[key]

    def _start(self, layout: BatchLayout, batch: int) -> None:
        kwargs = self._inputs
        text = kwargs["encoder_hidden_states"]
        if self.family == FLUX:
            self._check_text_positions(kwargs["txt_ids"])
        self.rows = layout.cond_rows if layout.rows == batch else range(batch)
        embeds = self.embeds(text.shape[1], text.device, self.model.context_embedder.weight.dtype)
        self.stream = concept_stream.start(self.model, self.family, kwargs, embeds, pooled="prompt", rows=self.rows)
        installation = installation_of(self.model)
        self._last_layer = installation.cross_layers[-1] if installation is not None else None

    def _check_text_positions(self, ids: torch.Tensor) -> None:
        """The stream's rows take RoPE's identity, as the prompt's text rows do only where
        their positions are zeros (FluxPipeline's txt_ids); checked once per ids tensor."""
        if ids is self._checked_ids:
            return
        if ids.is_meta or bool(ids.any()):
            raise NotImplementedError("txt_ids: HRV's concept stream places the concept rows at position 0, as "
                                      "FluxPipeline places the prompt's text (txt_ids all zeros); got text "
                                      "positions that are not all zero")
        self._checked_ids = ids

    def probe(self, call: AttentionCall, value: torch.Tensor, layout: BatchLayout,
              tokens: Optional[List[int]]) -> Optional[torch.Tensor]:
        """This joint call's probe mass (R, H, C_call) over the conditional images' R rows,
        then the stream's step through the call's block. ``tokens``: the probe tokens of
        this call (None: all). None when the forward did not pass the pre-hook."""
        joint = call.joint
        if self.stream is None:
            if self._inputs is None:
                return None
            self._start(layout, call.batch)
        stream, rows = self.stream, self.rows
        if not rows:
            return None
        step = stream.enter(self.model, joint)
        image = slice(joint.image.start, joint.image.stop)
        keys, values = step.k, step.v
        if tokens is not None:
            index = torch.tensor(tokens, device=keys.device)
            keys, values = keys[:, :, index], values[:, :, index]
        query = call.query[rows.start:rows.stop, :, image]
        mass = torch.zeros(len(rows), call.heads, keys.shape[2], device=call.device)
        attention(query, keys, values, capture=Capture(token_mass=mass), backend=call.backend)
        if joint.block != CONTEXT_PRE_ONLY and call.layer != self._last_layer:
            # the rows attend [their keys; the image keys], as the prompt's text rows
            # attend [text keys; image keys]
            keys = torch.cat([step.k, call.key[rows.start:rows.stop, :, image]], dim=2)
            values = torch.cat([step.v, value[rows.start:rows.stop, :, image]], dim=2)
            out = attention(step.q, keys, values, backend=call.backend)
            stream.advance(step, out.transpose(1, 2).flatten(2).to(stream.states.dtype))
        return mass


def encode_as_prompt(pipe, word: str, t5_length: int) -> torch.Tensor:
    """The joint text states (1, T, dim) the pipeline's ``encode_prompt`` gives ``word`` as
    a prompt of T5 length ``t5_length`` (the class's function, not attnctl's per-instance
    hook, so encoding a word does not start a "generation")."""
    encode = type(pipe).encode_prompt
    parameters = inspect.signature(encode).parameters
    extra = {"prompt_3": None, "do_classifier_free_guidance": False} if "prompt_3" in parameters else {}  # SD3
    device = pipe.transformer.device
    with torch.no_grad():
        return encode(pipe, prompt=word, prompt_2=None, device=device, num_images_per_prompt=1,
                      max_sequence_length=t5_length, **extra)[0]
