"""Prompt-to-prompt editing (Hertz et al. 2022) on the fused kernels, at every resolution.

Generate the source prompt and the target prompt(s) in one batch; prompt 0 is the source
by convention, prompts 1.. are targets (any number, with or without classifier-free
guidance; image i of a target prompt edits image i of the source prompt). The edits act
on the conditional rows of the targets only, as the original code does:

* cross-attention, in the steps of the word's window (``cross_steps``): the target's
  attention maps are replaced by the edited source maps R, mixed per word with α_t ∈ {0, 1}:
  ``P_new = R·α_t + P_tgt·(1 - α_t)``;
* self-attention, in the ``self_steps`` window: ``P_tgt ← P_src``, at every layer by
  default (the original keeps it to layers of ≤ 16² queries, for memory; here nothing is
  materialised). ``self_max_queries=256`` replicates the original's cap exactly.

Every edit R is linear in the source map, so P_new·V = P_src·(W·V) + P_tgt·(g·V) with a
77×77 matrix W and a per-token factor g per target and step: the op's injection
(``source``) with values W·V, plus the target's own attention with ``prob_mult = g`` (the
two-source form, each term with its own normaliser). No (M, N) map is materialised.

* :class:`Replace` (word swap): R = P_src·M with the token mapper M of the swapped words.
* :class:`Refine` (words added or removed): R[n] = P_src[mapper[n]]·a_n + P_tgt[n]·(1 - a_n),
  mapper and a from a global alignment of the token ids (:mod:`attnctl.tools.alignment`).
* :class:`Reweight` (equalizer): R·e with per-word factors e, after a Replace or Refine
  (``after=``), or alone (then R = P_src·e, as the original does).

Windows: a fraction f (= (0, f)), a pair (start, end) of fractions in [0, 1], and for
``cross_steps`` also a dict {word: window} with a ``"default_"`` entry (per-word schedule;
a word found in only some targets sets its window in those targets, the others follow
``"default_"``). Defaults: ``cross_steps=0.8``, ``self_steps=0.4`` (the original notebook's).
They follow the original's step arithmetic: cross-attention uses steps
[int(start·(S+1)), int(end·(S+1))), self-attention [int(start·S), int(end·S)), S the number
of denoising steps (taken from the scheduler's ``num_inference_steps``, or ``num_steps=``).
"""
from __future__ import annotations

import math
from typing import Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch

from ..diffusers.controller import AttentionCall, BatchLayout, Controller, DenoiseStep, Plan
from .alignment import refinement_mapper

Window = Union[float, Tuple[float, float]]
DEFAULT_CROSS_STEPS = 0.8
DEFAULT_SELF_STEPS = 0.4

__all__ = ["Edit", "Replace", "Refine", "Reweight", "LocalBlend", "edit", "word_columns", "replacement_mapper"]


def _window(value, name: str) -> Tuple[float, float]:
    given = value
    if isinstance(value, bool):
        raise ValueError(f"{name}: expected a fraction in [0, 1] or a pair (start, end) of them, got {value!r}")
    if isinstance(value, (int, float)):
        value = (0.0, float(value))
    if (not isinstance(value, (tuple, list)) or len(value) != 2
            or not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in value)):
        raise ValueError(f"{name}: expected a fraction in [0, 1] or a pair (start, end) of them, got {value!r}")
    start, end = float(value[0]), float(value[1])
    if not (math.isfinite(start) and math.isfinite(end) and 0.0 <= start <= end <= 1.0):
        raise ValueError(f"{name}: expected 0 <= start <= end <= 1, got {given!r}")
    return start, end


def word_columns(tokenizer, prompt: str, word_index: int, length: int = 77) -> List[int]:
    """Key columns of the ``word_index``-th space-separated word of ``prompt``."""
    words = prompt.split(" ")
    before = len(tokenizer(" ".join(words[:word_index])).input_ids) - 2 if word_index else 0
    count = len(tokenizer(words[word_index]).input_ids) - 2
    return [c for c in range(1 + before, 1 + before + count) if c < length]


def _word_positions(tokenizer, prompt: str, word: str, name: str, length: int = 77) -> List[int]:
    """Columns of every occurrence of ``word`` (one or more space-separated words)."""
    words = prompt.split(" ")
    query = word.split(" ")
    starts = [i for i in range(len(words) - len(query) + 1) if words[i:i + len(query)] == query]
    if not starts:
        raise ValueError(f"{name}: {word!r} is not a word of the prompt {prompt!r} (its words: {', '.join(words)})")
    return [c for i in starts for j in range(len(query)) for c in word_columns(tokenizer, prompt, i + j, length)]


def replacement_mapper(tokenizer, source: str, target: str, length: int = 77) -> torch.Tensor:
    """The original's word-swap mapper M (length, length): R = P_src·M. Prompts must have
    the same number of space-separated words; a swapped word of several tokens spreads its
    attention evenly over the target word's tokens."""
    words_x, words_y = source.split(" "), target.split(" ")
    if len(words_x) != len(words_y):
        raise ValueError(f"Replace: expected the source and target prompts to have the same number of words "
                         f"(a word swap), got {len(words_x)} words in {source!r} and {len(words_y)} in {target!r}; "
                         "use Refine for prompts that add or remove words")
    swapped = [i for i in range(len(words_y)) if words_y[i] != words_x[i]]
    inds_source = [word_columns(tokenizer, source, i, length) for i in swapped]
    inds_target = [word_columns(tokenizer, target, i, length) for i in swapped]
    mapper = torch.zeros(length, length)
    i = j = cur = 0
    while i < length and j < length:
        if cur < len(inds_source) and inds_source[cur] and inds_source[cur][0] == i:
            src, tgt = inds_source[cur], inds_target[cur]
            if len(src) == len(tgt):
                mapper[src, tgt] = 1.0
            else:
                for t in tgt:
                    mapper[src, t] = 1.0 / len(tgt)
            cur += 1
            i += len(src)
            j += len(tgt)
        elif cur < len(inds_source):
            mapper[i, j] = 1.0
            i += 1
            j += 1
        else:
            mapper[j, j] = 1.0
            i += 1
            j += 1
    return mapper


class Edit(Controller):
    """Base of the prompt-to-prompt controllers (see the module docstring)."""

    def __init__(self, *, cross_steps: Union[Window, Mapping[str, Window], None] = None,
                 self_steps: Optional[Window] = None, num_steps: Optional[int] = None,
                 local_blend: Optional["LocalBlend"] = None, self_max_queries: Optional[int] = None,
                 strengthen=None):
        from .hrv import ConceptStrengthening

        if local_blend is not None and not isinstance(local_blend, LocalBlend):
            raise TypeError(f"local_blend: expected an attnctl.p2p.LocalBlend or None, got {type(local_blend).__name__}")
        self.strengthen = ([] if strengthen is None else
                           list(strengthen) if isinstance(strengthen, (list, tuple)) else [strengthen])
        if not all(isinstance(x, ConceptStrengthening) for x in self.strengthen):
            raise TypeError(f"strengthen: expected an attnctl ConceptStrengthening (or a list of them), got "
                            f"{strengthen!r}")
        if self.strengthen and local_blend is not None:
            raise ValueError("strengthen: expected no local_blend with it (LocalBlend combines head-summed maps, "
                             "concept strengthening rescales each head)")
        if self_max_queries is not None and (isinstance(self_max_queries, bool) or not isinstance(self_max_queries, int)
                                             or self_max_queries < 1):
            raise ValueError(f"self_max_queries: expected a positive int (the original's cap is 16**2 = 256) or None, "
                             f"got {self_max_queries!r}")
        # Remembered so that a controller given as another's ``after=`` can refuse to have
        # windows of its own (they would be ignored, as in the original).
        self.windows_given = (cross_steps is not None or self_steps is not None or num_steps is not None
                              or self_max_queries is not None or bool(self.strengthen))
        cross_steps = DEFAULT_CROSS_STEPS if cross_steps is None else cross_steps
        self_steps = DEFAULT_SELF_STEPS if self_steps is None else self_steps
        self.local_blend = local_blend
        self.self_max_queries = self_max_queries
        if isinstance(cross_steps, Mapping):
            self.cross_windows = {str(w): _window(v, f"cross_steps[{w!r}]") for w, v in cross_steps.items()}
        else:
            self.cross_windows = {"default_": _window(cross_steps, "cross_steps")}
        self.cross_windows.setdefault("default_", (0.0, 1.0))
        self.self_window = _window(self_steps, "self_steps")
        if num_steps is not None and (isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1):
            raise ValueError(f"num_steps: expected a positive int or None, got {num_steps!r}")
        self.num_steps = num_steps
        self._prompts: Optional[Tuple[str, ...]] = None
        self._tokenizer = None
        self._terms: Dict[int, Tuple[torch.Tensor, torch.Tensor]] = {}
        self._cache: Dict[Tuple, Optional[Plan]] = {}
        self._steps: Optional[int] = None

    # ---- what each edit contributes: R·c = P_src·(W0·diag(c)·V) + P_tgt·(g0·c·V) ----
    def terms(self, target: int, length: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """(W0 (length, length), g0 (length,)) of target prompt ``target`` (1-based)."""
        raise NotImplementedError

    def _terms_of(self, target: int, length: int):
        key = (target, length)
        if key not in self._terms:
            self._terms[key] = self.terms(target, length)
        return self._terms[key]

    # ---- generation state ------------------------------------------------------------------
    def on_generation_start(self, generation) -> None:
        if generation.prompts is None or generation.tokenizer is None:
            raise ValueError(f"{type(self).__name__}: needs the prompt texts (source first, then targets); "
                             "the pipeline got prompt_embeds without a prompt")
        if len(generation.prompts) < 2:
            raise ValueError(f"{type(self).__name__}: expected at least 2 prompts (prompt 0 the source, then "
                             f"the targets), got {len(generation.prompts)}")
        self._start(tuple(generation.prompts), generation.tokenizer)

    def _start(self, prompts, tokenizer) -> None:
        self._prompts, self._tokenizer = prompts, tokenizer
        self._terms, self._cache, self._steps = {}, {}, None
        self._on_device: Dict[Tuple, torch.Tensor] = {}   # sources and own-term factors per device
        if self.local_blend is not None:
            self.local_blend._start(prompts, tokenizer)
        # Resolve the words of per-word windows now, so that a bad word fails early.
        self._word_windows = []
        for word, window in self.cross_windows.items():
            if word == "default_":
                continue
            cols = {t: _positions_or_empty(tokenizer, prompts[t], word) for t in range(1, len(prompts))}
            if not any(cols.values()):
                raise ValueError(f"cross_steps: {word!r} is not a word of any target prompt "
                                 f"({', '.join(repr(p) for p in prompts[1:])})")
            self._word_windows.append((cols, window))
        self._strengthen_columns = []
        for spec in self.strengthen:
            cols = {t: _positions_or_empty(tokenizer, prompts[t], spec.word) for t in range(1, len(prompts))}
            if not any(cols.values()):
                raise ValueError(f"strengthen: word {spec.word!r} is in none of the target prompts "
                                 f"({', '.join(repr(p) for p in prompts[1:])})")
            self._strengthen_columns.append((spec, cols))
        for t in range(1, len(prompts)):
            self._terms_of(t, 77)

    def on_step(self, step: DenoiseStep, layout: BatchLayout) -> None:
        if self._steps is None:
            steps = self.num_steps
            if steps is None:
                steps = getattr(step._scheduler, "num_inference_steps", None)
            if not steps:
                raise RuntimeError(f"{type(self).__name__}: the number of denoising steps is unknown "
                                   "(pass num_steps=)")
            self._steps = int(steps)

    # ---- per-call plans ----------------------------------------------------------------------
    def plan(self, call: AttentionCall) -> Optional[Plan]:
        if self._prompts is None:
            raise RuntimeError(f"{type(self).__name__}: no generation has started (install it on a pipeline)")
        blend = self.local_blend is not None and call.is_cross and call.factor == self.local_blend.level
        key = (call.is_cross, call.step.index, call.batch, call.keys, call.device, call.layout, blend,
               call.queries if blend else None, call.layer if self.strengthen and call.is_cross else None)
        if key not in self._cache:
            if len(self._cache) > 64:
                self._cache.clear()
            self._cache[key] = self._build(call)
        return self._cache[key]

    def _rows(self, layout: BatchLayout):
        """(row, source row, target prompt index) of every conditional target row."""
        out = []
        ipp = layout.images_per_prompt
        for image in range(layout.images):
            prompt = layout.prompt_of_image(image)
            if prompt == 0 or prompt >= len(self._prompts):
                continue
            out.append((layout.row(image, "cond"), layout.row(image % ipp, "cond"), prompt))
        return out

    def _build(self, call: AttentionCall) -> Optional[Plan]:
        plan = self._edit_plan(call)
        lb = self.local_blend
        if lb is None or not call.is_cross or call.factor != lb.level:
            return plan
        # Local blend: capture the maps of this level's cross-attention calls (every column;
        # the applied map of a target row is combined from the two terms at the step's end).
        inj, own = lb._captures(call)
        if plan is None:
            lb._step_terms = (None, None)
            return Plan(capture=inj)
        lb._step_terms = (plan.value_map, plan.own_prob_mult)
        plan.capture = inj
        if plan.own_prob_mult is not None:
            plan.own_capture = own
        return plan

    def _edit_plan(self, call: AttentionCall) -> Optional[Plan]:
        steps = self._steps if self._steps is not None else (self.num_steps or 1)
        t = call.step.index
        rows = self._rows(call.layout)
        if not rows:
            return None
        source = torch.arange(call.batch, dtype=torch.int64)
        if not call.is_cross:
            start, end = self.self_window
            if not int(start * steps) <= t < int(end * steps):
                return None
            if self.self_max_queries is not None and call.queries > self.self_max_queries:
                return None     # the original's cap: larger layers keep the target's own attention
            for row, src, _ in rows:
                source[row] = src
            return Plan(source=self._device_source(source, call.device))
        N = call.keys
        # Rows that are not edited (uncond rows, the source's rows) inject their own P with
        # W = I and no own term: P·(I·V) + 0 is bit-identical to the plain P·V.
        W = torch.eye(N).repeat(call.batch, 1, 1)
        own = torch.zeros(call.batch, 1, 1, N)
        active = False
        for row, src, prompt in rows:
            alpha = self._alpha(prompt, t, steps, N)
            if not alpha.any():
                # A target outside every window of this step keeps its own attention: the own
                # term alone (no injected term, W = 0), not P·V twice.
                W[row] = 0.0
                own[row, 0, 0] = 1.0
                continue
            active = True
            W0, g0 = self._terms_of(prompt, N)
            W[row] = W0 * alpha[None, :]
            own[row, 0, 0] = g0 * alpha + (1.0 - alpha)
            source[row] = src
        if not active:
            return None
        restoring = [spec for spec in self._strengthen_columns if t >= spec[0].start_step]
        if restoring:
            W, own = self._restore(call, rows, t, steps, W, own, restoring)
        own_rows = [row for row, _, _ in rows if own[row].any()]
        return Plan(source=self._device_source(source, call.device), value_map=W.to(call.device, non_blocking=True),
                    own_prob_mult=self._device_factor(own, call.device) if own_rows else None)

    def _restore(self, call: AttentionCall, rows, t: int, steps: int, W: torch.Tensor, own: torch.Tensor, specs):
        """Concept strengthening (official P2P-HRV): at a restored word's columns c of a
        target row the edited map α·R + (1 - α)·P_tgt becomes α·s_h·P_tgt + (1 - α)·P_tgt,
        s the concept's HRV of head h: the injected columns are dropped where α = 1 and the
        own term's factor is α·s_h + 1 - α. Per-head W (B, H, N, N) and own (B, H, 1, N)."""
        H, N = call.heads, call.keys
        W = W[:, None].repeat(1, H, 1, 1)
        own = own.repeat(1, H, 1, 1)
        for row, _, prompt in rows:
            alpha = self._alpha(prompt, t, steps, N)
            for spec, cols in specs:
                c = [x for x in cols[prompt] if x < N]
                if not c or not alpha[c].any():
                    continue
                a = alpha[c]
                s = spec.layer_factors(call.layer, H)
                W[row][..., c] *= 1.0 - a
                own[row, :, 0, c] = a[None, :] * s[:, None] + (1.0 - a[None, :])
        return W, own

    def _device_source(self, source: torch.Tensor, device) -> torch.Tensor:
        """One device tensor per distinct source map and device for the whole generation:
        the op reads a source's values on the host once per tensor (a device sync), so
        handing it the same tensor at every layer and step keeps that to a few syncs."""
        key = (tuple(source.tolist()), str(device))
        if key not in self._on_device:
            self._on_device[key] = source.to(device, non_blocking=True)
        return self._on_device[key]

    def _device_factor(self, own: torch.Tensor, device) -> torch.Tensor:
        """One device tensor per distinct own-term factor and device, as for the sources:
        the op checks a factor's values once per tensor (a device sync), and within a window
        every step gives the same factor."""
        key = (tuple(own.shape), tuple(own.flatten().tolist()), str(device))
        if key not in self._on_device:
            self._on_device[key] = own.to(device, non_blocking=True)
        return self._on_device[key]

    def _alpha(self, prompt: int, t: int, steps: int, N: int) -> torch.Tensor:
        """α_t per token column of target ``prompt`` (the original's alpha_time_words)."""
        def inside(window):
            start, end = window
            return int(start * (steps + 1)) <= t < int(end * (steps + 1))
        alpha = torch.full((N,), float(inside(self.cross_windows["default_"])))
        for cols, window in self._word_windows:
            c = [x for x in cols[prompt] if x < N]
            if c:
                alpha[c] = float(inside(window))
        return alpha


def _positions_or_empty(tokenizer, prompt, word):
    try:
        return _word_positions(tokenizer, prompt, word, "word")
    except ValueError:
        return []


class LocalBlend:
    """Blend the target latents into the source's outside the edited words (the original's
    LocalBlend): after every denoising step, the cross-attention maps of ``words`` at the
    layers of downsampling ``level`` (4: 16² for SD1.x at 512², 32² for SDXL at 1024²),
    summed over heads, layers and the steps so far, are max-pooled (3×3), resized to the
    latent, normalised by their maximum and thresholded; a target image keeps its own
    latent inside the union of its mask and the source's, and takes the source's outside.

    ``words``: one entry per prompt (source first), each a word or a list of words of that
    prompt. Pass it to an edit (``Replace(..., local_blend=blend)``); :func:`edit` then
    gives it to the pipeline as ``callback_on_step_end`` (or pass it yourself).
    """

    def __init__(self, words: Sequence[Union[str, Sequence[str]]], *, threshold: float = 0.3, level: int = 4):
        if isinstance(words, str) or not isinstance(words, Sequence) or len(words) < 2:
            raise ValueError(f"words: expected one word (or list of words) per prompt, source first, got {words!r}")
        self.words = [[w] if isinstance(w, str) else list(w) for w in words]
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0 <= threshold <= 1:
            raise ValueError(f"threshold: expected a number in [0, 1], got {threshold!r}")
        if isinstance(level, bool) or not isinstance(level, int) or level < 1 or level & (level - 1):
            raise ValueError(f"level: expected a power of two (the layers' downsampling), got {level!r}")
        self.threshold, self.level = float(threshold), level
        self._prompts = None

    def check_level(self, unet, latent: Tuple[int, int]) -> None:
        """Before generating: ``level`` must be the downsampling of some cross-attention
        layer of ``unet`` at the (h, w) ``latent`` (as the processors will read it back from
        the layer's query count). :func:`edit` checks it; when the controller is installed
        by hand, a missing level is found after the first step."""
        from ..diffusers.install import query_grid
        from ..diffusers.unet_layers import attention_layers

        levels = sorted({query_grid(latent, layer.queries)[1] for layer in attention_layers(unet, latent, 77)
                         if layer.is_cross} - {None})
        if self.level not in levels:
            raise ValueError(f"LocalBlend level: expected the downsampling of a cross-attention layer of this UNet "
                             f"at the latent {tuple(latent)} (one of {levels}), got {self.level}")

    def _start(self, prompts, tokenizer) -> None:
        if len(self.words) != len(prompts):
            raise ValueError(f"LocalBlend words: expected one entry per prompt ({len(prompts)}), got {len(self.words)}")
        self._alpha = torch.zeros(len(prompts), 77)
        for i, (prompt, words) in enumerate(zip(prompts, self.words)):
            for word in words:
                self._alpha[i, _word_positions(tokenizer, prompt, word, f"LocalBlend words[{i}]")] = 1.0
        self._prompts = prompts
        self._inj = self._own = self._store = None
        self._grid = None
        self._step_terms = (None, None)

    def _captures(self, call: AttentionCall):
        B, M, N = call.batch, call.queries, call.keys
        if self._inj is None or self._inj.maps.shape != (B, M, N) or self._inj.maps.device != call.device:
            from ..capture import Capture
            tokens = torch.arange(N, device=call.device)
            self._inj = Capture(maps=torch.zeros(B, M, N, device=call.device), tokens=tokens)
            self._own = Capture(maps=torch.zeros(B, M, N, device=call.device), tokens=tokens)
            self._layout, self._grid = call.layout, call.grid
        return self._inj, self._own

    def __call__(self, pipe, step_index, timestep, callback_kwargs):
        """diffusers' ``callback_on_step_end``: returns the blended latents."""
        latents = callback_kwargs["latents"]
        if self._inj is None:
            if self._prompts is None:
                raise RuntimeError("LocalBlend: no generation has started (give it to an edit controller)")
            raise RuntimeError(f"LocalBlend: no cross-attention layer has downsampling level={self.level} "
                               "in this UNet at this size")
        W, own = self._step_terms
        maps = self._inj.maps.clone() if W is None else torch.bmm(self._inj.maps, W.float())
        if own is not None:
            maps = maps + self._own.maps * own[:, 0].float()
        self._inj.maps.zero_()
        self._own.maps.zero_()
        layout = self._layout
        cond = maps[layout.cond_rows.start:layout.cond_rows.stop]
        self._store = cond if self._store is None else self._store + cond
        h, w = self._grid
        ipp = layout.images_per_prompt
        prompt_of = [layout.prompt_of_image(i) for i in range(layout.images)]
        alpha = self._alpha[prompt_of, : maps.shape[-1]].to(maps.device)
        m = (self._store * alpha[:, None, :]).sum(-1).view(-1, 1, h, w)
        m = torch.nn.functional.max_pool2d(m, (3, 3), (1, 1), padding=(1, 1))
        m = torch.nn.functional.interpolate(m, size=tuple(latents.shape[2:]))
        top = m.amax(dim=(2, 3), keepdim=True)
        mask = (m / torch.where(top > 0, top, torch.ones_like(top))).gt(self.threshold)
        out = latents.clone()
        for image, prompt in enumerate(prompt_of):
            if prompt == 0 or prompt >= len(self._prompts):
                continue
            src = image % ipp
            union = (mask[image] | mask[src]).to(latents.dtype)
            out[image] = latents[src] + union * (latents[image] - latents[src])
        callback_kwargs = dict(callback_kwargs)
        callback_kwargs["latents"] = out
        return callback_kwargs


class Replace(Edit):
    """Word swap: target prompts with the same number of words as the source."""

    def _start(self, prompts, tokenizer) -> None:
        for target in prompts[1:]:
            replacement_mapper(tokenizer, prompts[0], target)   # raises on unequal word counts
        super()._start(prompts, tokenizer)

    def terms(self, target, length):
        return replacement_mapper(self._tokenizer, self._prompts[0], self._prompts[target], length), torch.zeros(length)


class Refine(Edit):
    """Words added to or removed from the source prompt: the target's tokens aligned to the
    source's by global sequence alignment of the token ids."""

    def terms(self, target, length):
        tok = self._tokenizer
        ids_x = tok(self._prompts[0], truncation=True, max_length=length).input_ids
        ids_y = tok(self._prompts[target], truncation=True, max_length=length).input_ids
        mapper, alphas = refinement_mapper(ids_x, ids_y, length)
        W = torch.zeros(length, length)
        cols = torch.arange(length)
        aligned = mapper >= 0
        W[mapper[aligned], cols[aligned]] = alphas[aligned]
        return W, 1.0 - alphas


class Reweight(Edit):
    """Equalizer: the attention of chosen words of the target prompts multiplied by a
    factor, after the edit ``after`` (a Replace or Refine, whose role is only its token map,
    as in the original: it must not be given windows, local_blend or num_steps of its own;
    this controller's are used) or, alone, on the source's maps.

    ``weights``: {word: factor}, the same factor for every target, or {word: (f_1, ..., f_T)}
    with one factor per target prompt (the original's ``get_equalizer(text, words, values)``
    with one value per target). A word is looked up in each target prompt (every
    occurrence)."""

    def __init__(self, weights: Mapping[str, Union[float, Sequence[float]]], *, after: Optional[Edit] = None,
                 **windows):
        super().__init__(**windows)
        if not isinstance(weights, Mapping) or not weights:
            raise ValueError(f"weights: expected a non-empty dict {{word: factor}}, got {weights!r}")
        self.weights = {str(w): _factors(f, f"weights[{w!r}]") for w, f in weights.items()}
        if after is not None and not isinstance(after, Edit):
            raise TypeError(f"after: expected a Replace, Refine or Reweight controller, got {type(after).__name__}")
        if after is not None and (after.windows_given or after.local_blend is not None):
            raise ValueError(f"after: expected a {type(after).__name__} without cross_steps, self_steps, num_steps, "
                             "self_max_queries, strengthen or local_blend: only its token map is used (as in the "
                             "original); give those to the Reweight")
        self.after = after

    def _start(self, prompts, tokenizer) -> None:
        if self.after is not None:
            self.after._start(prompts, tokenizer)
        targets = len(prompts) - 1
        self._equalizers = {}
        for word, factors in self.weights.items():
            if len(factors) not in (1, targets):
                raise ValueError(f"weights[{word!r}]: expected one factor or one per target prompt ({targets}), "
                                 f"got {len(factors)}")
        for t in range(1, len(prompts)):
            e = torch.ones(77)
            for word, factors in self.weights.items():
                e[_word_positions(tokenizer, prompts[t], word, f"weights[{word!r}]")] = factors[(t - 1) % len(factors)]
            self._equalizers[t] = e
        super()._start(prompts, tokenizer)

    def terms(self, target, length):
        e = self._equalizers[target][:length]
        if self.after is None:
            return torch.diag(e), torch.zeros(length)
        W0, g0 = self.after._terms_of(target, length)
        return W0 * e[None, :], g0 * e


def _factors(value, name: str) -> Tuple[float, ...]:
    values = tuple(value) if isinstance(value, (tuple, list)) else (value,)
    if not values or any(isinstance(f, bool) or not isinstance(f, (int, float)) or not math.isfinite(f)
                         for f in values):
        raise ValueError(f"{name}: expected a finite number or a non-empty list of them (one per target), "
                         f"got {value!r}")
    return tuple(float(f) for f in values)


def edit(pipe, source: str, targets: Union[str, Sequence[str]], controller: Edit, *, backend: Optional[str] = None,
         **pipe_kwargs):
    """Generate ``source`` and the edited ``targets`` in one batch with ``controller``
    installed; returns the pipeline's output (image 0 the source, then the targets).

    Without ``latents=`` every prompt starts from the same initial noise, as in the
    original (ptp_utils.py ``init_latent``): one latent (1, C, h, w) drawn from
    ``generator`` (fp32, on the generator's device; the global RNG without one) and
    expanded over the prompts; with ``num_images_per_prompt = n`` one latent per image
    index, (n, C, h, w) from the generator, image i of every prompt starting from latent i.
    Pass ``latents=`` to choose other noise (e.g. a different one per prompt).

    attnctl is installed for this call only (an installation that was already there is
    kept, with only ``controller`` removed at the end). A LocalBlend runs after every step,
    before the user's own ``callback_on_step_end`` (which then sees the blended latents)."""
    from ..diffusers.attach import Attachment
    from ..diffusers.install import find_unet

    if not isinstance(source, str):
        raise TypeError(f"source: expected a prompt (str), got {type(source).__name__}")
    targets = [targets] if isinstance(targets, str) else list(targets)
    if not targets:
        raise ValueError("targets: expected at least one target prompt, got none")
    wrong = [t for t in targets if not isinstance(t, str)]
    if wrong:
        raise TypeError(f"targets: expected prompts (str), got a {type(wrong[0]).__name__}")
    if not isinstance(controller, Edit):
        raise TypeError(f"controller: expected attnctl.p2p.Replace, Refine or Reweight, got {type(controller).__name__}")
    unet, _ = find_unet(pipe)
    latent = _latent_size(pipe, unet, pipe_kwargs)
    if controller.local_blend is not None:
        controller.local_blend.check_level(unet, latent)
    pipe_kwargs = dict(pipe_kwargs)
    if pipe_kwargs.get("latents") is None:
        pipe_kwargs["latents"] = shared_latents(pipe, unet, latent, 1 + len(targets),
                                                pipe_kwargs.get("num_images_per_prompt") or 1,
                                                pipe_kwargs.get("generator"))
    if controller.local_blend is not None:
        _add_blend_callback(controller.local_blend, pipe_kwargs)
    with Attachment(pipe, controller, backend=backend):
        return pipe([source] + targets, **pipe_kwargs)


def _latent_size(pipe, unet, pipe_kwargs: dict) -> Tuple[int, int]:
    """The (h, w) latent of the pipeline call: its ``height`` / ``width`` (default the
    UNet's sample size in pixels) over the VAE's downsampling, as the pipelines compute it."""
    scale = pipe.vae_scale_factor
    height = pipe_kwargs.get("height") or unet.config.sample_size * scale
    width = pipe_kwargs.get("width") or unet.config.sample_size * scale
    return int(height) // scale, int(width) // scale


def shared_latents(pipe, unet, latent: Tuple[int, int], prompts: int, images_per_prompt: int,
                   generator=None) -> torch.Tensor:
    """The original's initial noise for ``prompts`` prompts: one latent per image index,
    shared by every prompt, in the pipeline's batch order (prompt-major: image i of prompt
    p is row p·n + i, n = ``images_per_prompt``)."""
    if isinstance(images_per_prompt, bool) or not isinstance(images_per_prompt, int) or images_per_prompt < 1:
        raise ValueError(f"num_images_per_prompt: expected a positive int, got {images_per_prompt!r}")
    if isinstance(generator, (list, tuple)):
        # diffusers' list holds one generator per row of the batch, i.e. per prompt: a
        # different noise for each, which is what the shared latent is not.
        raise ValueError(f"generator: expected one torch.Generator or None (every prompt starts from the same "
                         f"latents, drawn from it), got a list of {len(generator)}; pass latents= to choose "
                         "each row's noise")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator: expected a torch.Generator or None, got {type(generator).__name__}")
    device = generator.device if generator is not None else "cpu"
    noise = torch.randn((images_per_prompt, unet.config.in_channels, *latent), generator=generator, device=device)
    return noise.repeat(prompts, 1, 1, 1).to(pipe._execution_device, unet.dtype)


def _add_blend_callback(blend: LocalBlend, pipe_kwargs: dict) -> None:
    """Make ``pipe_kwargs``' step callback run the blend, then the user's own callback."""
    from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback

    user = pipe_kwargs.get("callback_on_step_end")
    if isinstance(user, (PipelineCallback, MultiPipelineCallbacks)):
        # The pipeline takes such a callback's tensor inputs from it; once chained into a
        # plain function they must be passed explicitly.
        pipe_kwargs["callback_on_step_end_tensor_inputs"] = list(dict.fromkeys(["latents", *user.tensor_inputs]))
    inputs = pipe_kwargs.get("callback_on_step_end_tensor_inputs", ["latents"])
    if "latents" not in inputs:
        raise ValueError(f"callback_on_step_end_tensor_inputs: expected it to include 'latents' (the "
                         f"LocalBlend blends them), got {inputs!r}")
    pipe_kwargs["callback_on_step_end"] = blend if user is None or user is blend else _chain(blend, user)


def _chain(blend: LocalBlend, user):
    """One ``callback_on_step_end``: the blend, then the user's callback on its result."""
    if not callable(user):
        raise TypeError(f"callback_on_step_end: expected a callable, got {type(user).__name__}")

    def callback(pipe, step_index, timestep, callback_kwargs):
        return user(pipe, step_index, timestep, blend(pipe, step_index, timestep, callback_kwargs))

    return callback
