"""Structured diffusion guidance (Feng et al., ICLR 2023) as an attnctl controller and tool,
with the math and defaults of weixi-feng/Structured-Diffusion-Guidance
(scripts/txt2img_demo.py, structured_stable_diffusion/modules/attention.py).

The prompt and each of its noun phrases are encoded on their own by the text encoder; a
phrase's encoding (without its start token) is copied into the prompt's encoding at the
phrase's token positions ("aligned"). In the conditional half of every cross-attention
layer:

* default mode (one key, several values): P = softmax(scale·q·K_prompt) and the output is
  the mean over the value sets [prompt, aligned phrase 1, ..., aligned phrase n] of
  P·V_set. The output is linear in V, so it is one attention pass over the averaged
  values: nothing beyond one op call with the mixed values;
* conjunction mode (several keys, one value): the value is the prompt's encoding with
  every phrase aligned into it, and the output is the mean over the key sets of
  softmax(scale·q·K_set)·V. The original's key sets are [its value encoding, aligned
  phrase 1, ..., aligned phrase n]: its in-place alignment of the value overwrites the
  prompt's encoding that it had put first among the keys (``first_key="all_aligned"``);
  ``first_key="prompt"`` keeps the prompt's own encoding there (the paper's description).

The unconditional half is plain attention on the unconditional encoding, as in the
original. Self-attention is untouched.

Noun phrases are given by the user (the original parses them with stanza or a scene-graph
parser; neither ships offline). A phrase is a string, found as a run of whole words of
the prompt, or ``(phrase, (start, end))``: the original's (noun phrase, span) pairs, token
positions counted without the start token, end exclusive.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple, Union

import torch

from ..diffusers.controller import AttentionCall, Controller, Plan
from ..diffusers.install import Generation, install, installation_of

Phrase = Union[str, Tuple[str, Tuple[int, int]]]
FIRST_KEYS = ("all_aligned", "prompt")


def preprocess_prompt(prompt: str) -> str:
    """The original script's ``preprocess_prompts``: lower case, a trailing period removed."""
    return prompt.lower().strip().strip(".").strip()


def encode(pipe, texts: Sequence[str]) -> torch.Tensor:
    """The text encoder's last hidden states (len(texts), 77, C) of ``texts`` padded to the
    tokenizer's length: what the pipeline's ``encode_prompt`` gives for SD 1.x (and the
    original's ``FrozenCLIPEmbedder``)."""
    tokenizer, encoder = pipe.tokenizer, pipe.text_encoder
    tokens = tokenizer(list(texts), padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                       return_tensors="pt")
    mask = tokens.attention_mask.to(encoder.device) if getattr(encoder.config, "use_attention_mask", False) else None
    with torch.no_grad():
        return encoder(tokens.input_ids.to(encoder.device), attention_mask=mask)[0]


def _body_ids(tokenizer, text: str) -> List[int]:
    """Token ids of ``text`` without start and end tokens, truncated as the pipeline does."""
    return tokenizer(text, truncation=True, max_length=tokenizer.model_max_length).input_ids[1:-1]


def phrase_spans(tokenizer, prompt: str, phrases: Sequence[Phrase]) -> List[Tuple[str, Tuple[int, int]]]:
    """(phrase, (start, end)) for every phrase: token positions in ``prompt`` without its
    start token, end exclusive (the original's spans). A string phrase must occur exactly
    once in the prompt as a run of whole words."""
    if isinstance(phrases, str) or not isinstance(phrases, Sequence) or not phrases:
        raise ValueError(f"phrases: expected a non-empty list of noun phrases (strings or (phrase, (start, end)) "
                         f"pairs), got {phrases!r}")
    ids = _body_ids(tokenizer, prompt)
    tokens = tokenizer.convert_ids_to_tokens(ids)
    out = []
    for item in phrases:
        if isinstance(item, str):
            out.append((item, _find(tokenizer, prompt, ids, tokens, item)))
            continue
        if not (isinstance(item, (tuple, list)) and len(item) == 2 and isinstance(item[0], str)
                and isinstance(item[1], (tuple, list)) and len(item[1]) == 2
                and all(isinstance(i, int) and not isinstance(i, bool) for i in item[1])):
            raise ValueError(f"phrases: expected a phrase string or (phrase, (start, end)) with int token "
                             f"positions, got {item!r}")
        text, (start, end) = item[0], tuple(item[1])
        if not 0 <= start < end <= len(ids):
            raise ValueError(f"phrases: span {(start, end)} of {text!r}: expected 0 <= start < end <= {len(ids)} "
                             f"(the prompt's tokens without the start token), got {(start, end)}")
        length = len(_body_ids(tokenizer, text))
        if length != end - start:
            raise ValueError(f"phrases: {text!r} has {length} tokens, its span {(start, end)} covers "
                             f"{end - start}; expected the same number")
        out.append((text, (start, end)))
    for text, span in out:
        if span == (0, len(ids)):
            raise ValueError(f"phrases: {text!r} spans the whole prompt; expected noun phrases inside it (the "
                             "prompt's own encoding is always among the sets, as the original leaves the full "
                             "sentence out of its aligned phrases)")
    return out


def _find(tokenizer, prompt: str, ids: List[int], tokens: List[str], phrase: str) -> Tuple[int, int]:
    if not phrase.strip():
        raise ValueError(f"phrases: expected non-empty phrases, got {phrase!r}")
    query = _body_ids(tokenizer, phrase)
    n = len(query)
    # A run of whole words: it starts after the start token or after a word's last token.
    starts = [i for i in range(len(ids) - n + 1)
              if ids[i:i + n] == query and (i == 0 or tokens[i - 1].endswith("</w>"))]
    if not starts:
        raise ValueError(f"phrases: {phrase!r} is not a run of whole words of the prompt {prompt!r}")
    if len(starts) > 1:
        raise ValueError(f"phrases: {phrase!r} occurs {len(starts)} times in the prompt {prompt!r} (token "
                         f"positions {starts}); give ({phrase!r}, (start, end)) to choose one")
    return starts[0], starts[0] + n


def _check_overlaps(spans: Sequence[Tuple[str, Tuple[int, int]]], conjunction: bool) -> None:
    for i, (a, (s1, e1)) in enumerate(spans):
        for b, (s2, e2) in spans[i + 1:]:
            if max(s1, s2) >= min(e1, e2):
                continue
            nested = (s1 <= s2 and e2 <= e1) or (s2 <= s1 and e1 <= e2)
            if conjunction or not nested or (s1, e1) == (s2, e2):
                why = ("conjunction mode aligns every phrase into one value encoding, where a later phrase "
                       "would overwrite an earlier one" if conjunction and nested and (s1, e1) != (s2, e2)
                       else "spans must be disjoint or nested (as a parse tree's noun phrases are), and distinct")
                raise ValueError(f"phrases: {a!r} at {(s1, e1)} and {b!r} at {(s2, e2)} overlap; {why}")


def align(prompt_states: torch.Tensor, phrase_states: torch.Tensor, span: Tuple[int, int]) -> torch.Tensor:
    """A copy of ``prompt_states`` (N, C) whose positions start+1 .. end (after the start
    token) hold the phrase's own states at 1 .. end-start (the original's ``multi_align``)."""
    start, end = span
    out = prompt_states.clone()
    out[start + 1:end + 1] = phrase_states[1:1 + end - start]
    return out


class StructuredGuidance(Controller):
    """Structured diffusion guidance on the conditional half of every cross-attention call.

    ``pipe``: an SD 1.x / 2.x pipeline (its tokenizer and text encoder encode the phrases).
    ``prompt``: the prompt the pipeline is called with (every prompt of a generation must be
    this one). ``phrases``: noun phrases (see the module). ``conjunction``: the original's
    ``--conjunction`` (several keys, one value); False is its default (one key, several
    values). ``first_key``: conjunction mode's first key set, "all_aligned" (the original's
    code) or "prompt".
    """

    def __init__(self, pipe, prompt: str, phrases: Sequence[Phrase], *, conjunction: bool = False,
                 first_key: str = "all_aligned"):
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError(f"prompt: expected a non-empty string, got {prompt!r}")
        if first_key not in FIRST_KEYS:
            raise ValueError(f"first_key: expected one of {FIRST_KEYS}, got {first_key!r}")
        for name in ("tokenizer", "text_encoder"):
            if getattr(pipe, name, None) is None:
                raise TypeError(f"pipe: expected a Stable Diffusion pipeline with a {name}, got {type(pipe).__name__}")
        if getattr(pipe, "text_encoder_2", None) is not None:
            raise TypeError(f"pipe: expected an SD 1.x / 2.x pipeline (one text encoder, as the original), got "
                            f"{type(pipe).__name__} with two text encoders")
        self.prompt = prompt
        self.conjunction = bool(conjunction)
        self.first_key = first_key
        self.spans = phrase_spans(pipe.tokenizer, prompt, phrases)
        _check_overlaps(self.spans, self.conjunction)
        states = encode(pipe, [prompt] + [text for text, _ in self.spans])
        self.keys, self.values = self._structure(states)
        self._plans = {}

    @classmethod
    def from_parse(cls, pipe, nps: Sequence[str], spans: Sequence[Tuple[int, int]], **options) -> "StructuredGuidance":
        """From the original's parser output (``get_all_nps`` / ``get_all_spans_from_scene_graph``):
        ``nps[0]`` the prompt and ``spans[0]`` its span, then the noun phrases and their
        token spans."""
        if isinstance(nps, str) or len(nps) != len(spans) or len(nps) < 2:
            raise ValueError(f"nps, spans: expected equal-length lists, the prompt and its span first, then at "
                             f"least one phrase; got {len(nps) if not isinstance(nps, str) else nps!r} noun "
                             f"phrase(s) and {len(spans)} span(s)")
        return cls(pipe, nps[0], [(text, tuple(span)) for text, span in zip(nps[1:], spans[1:])], **options)

    def _structure(self, states: torch.Tensor) -> Tuple[Optional[torch.Tensor], torch.Tensor]:
        """(key sets (K, N, C) or None for the call's own keys, value sets (K, N, C))."""
        prompt, phrases = states[0], states[1:]
        aligned = [align(prompt, p, span) for p, (_, span) in zip(phrases, self.spans)]
        if not self.conjunction:
            return None, torch.stack([prompt] + aligned)
        every = prompt.clone()
        for p, (_, (start, end)) in zip(phrases, self.spans):
            every[start + 1:end + 1] = p[1:1 + end - start]
        first = every if self.first_key == "all_aligned" else prompt
        return torch.stack([first] + aligned), every[None]

    def on_generation_start(self, generation: Generation) -> None:
        if generation.prompts is not None and any(p != self.prompt for p in generation.prompts):
            raise ValueError(f"StructuredGuidance: prompt: expected every prompt of the generation to be "
                             f"{self.prompt!r} (its phrases were encoded for it), got {list(generation.prompts)}")

    def plan(self, call: AttentionCall) -> Optional[Plan]:
        if not call.is_cross:
            return None
        if call.keys != self.values.shape[1]:
            raise ValueError(f"StructuredGuidance: {call.layer} has {call.keys} text tokens; expected "
                             f"{self.values.shape[1]} (the tokenizer's length)")
        rows = call.layout.cond_rows
        key = (rows, call.device)
        plan = self._plans.get(key)
        if plan is None:
            keys = None if self.keys is None else self.keys[:, None].to(call.device, non_blocking=True)
            plan = self._plans[key] = Plan(value_states=self.values[:, None].to(call.device, non_blocking=True), key_states=keys,
                                           state_rows=rows)
        return plan


def structured_guidance(pipe, prompt: str, phrases: Sequence[Phrase], *, conjunction: bool = False,
                        first_key: str = "all_aligned", preprocess: bool = True, backend: Optional[str] = None,
                        **pipe_kwargs):
    """Generate with structured diffusion guidance: ``pipe(prompt, **pipe_kwargs)`` with a
    :class:`StructuredGuidance` controller attached (installing attnctl for the call when
    the pipeline has no installation; an existing one keeps its controllers and backend
    unless ``backend`` is given). ``preprocess``: the original script lower-cases the
    prompt and strips a trailing period first (phrases are found in the processed prompt).
    Returns the pipeline's output."""
    if preprocess:
        prompt = preprocess_prompt(prompt)
    controller = StructuredGuidance(pipe, prompt, phrases, conjunction=conjunction, first_key=first_key)
    installed = installation_of(pipe) is not None
    installation = install(pipe, controller, backend=backend)
    try:
        return pipe(prompt, **pipe_kwargs)
    finally:
        if installed:
            installation.remove(controller)
        else:
            installation.uninstall()
