"""Head relevance vectors (HRV; Park et al., arXiv 2412.02237) built inside ordinary
generation, and the controllers that use them.

**Construction.** Each visual concept is given by one or more concept words. Every word
is encoded by the pipeline's own text encoder(s) (exactly as a prompt is), and the token
embeddings of the word itself (start, end and padding tokens excluded) are stacked into a
probe set of C tokens. Per cross-attention layer the probe set goes through that layer's
``to_k`` (and ``norm_cross`` / ``norm_k`` where the layer has them) once, giving probe
keys (1, H, C, D). During generation the fused kernel adds, per head,
Σ_m softmax_c(scale · q · probe_key_c) over the pixels of the call (a softmax over the
probe set alone, no V; see ``Capture.probe_keys``). After each UNet call, per image of the
conditional half, per layer and head, each concept's score is the mean over its tokens,
and the concept with the highest score gets a vote (one-hot argmax; ties to the first
concept). Votes are summed over prompts and steps into counts (heads × concepts); each
head is normalised over concepts, then each concept over heads so that Σ_h HRV_c[h] = H,
the number of cross-attention heads (128 in SD1.x, 1300 in SDXL). A concept that never
wins a head keeps an all-zero vector (listed in ``HeadRelevance.never_selected``).

All of this runs on the device with no per-call allocation, loop over tokens or sync:
the probe buffers are allocated on a layer's first call of a generation and zeroed after
their votes are taken.

**Controllers.** :class:`OrderedWeakening` (MoRHF / LeRHF: scale every prompt token's
probabilities by ``factor``, default -2, in the k most or least relevant heads of a
concept) and :class:`ConceptAdjusting` (P[h, :, t] *= 2·HRV_desired[h] - HRV_undesired[h]
for the words' token columns t, optionally clamping each HRV first). Both act on the
conditional half only and give a (B, H, 1, N) prob_mult cached per layer and generation.
:class:`ConceptStrengthening` rescales the edited word's map per head by HRV_c[h] inside a
prompt-to-prompt edit: installed next to an attnctl.p2p edit, its factor is applied to the
edited map in the target's token columns (the composition folds it into the edit's token
map; see attnctl.diffusers.compose), so the target word attends through the heads that
carry its concept.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch

from ..capture import Capture
from ..diffusers.controller import AttentionCall, BatchLayout, Controller, DenoiseStep, Plan
from ..diffusers.install import Generation, install, installation_of
from .words import query_words, record_prompt

FORMAT = "attnctl-hrv/1"
Concepts = Union[Sequence[str], Mapping[str, Union[str, Sequence[str]]]]


# ---------------------------------------------------------------------------------------
# The result
# ---------------------------------------------------------------------------------------

@dataclass
class HeadRelevance:
    """Head relevance vectors of ``concepts`` over the cross-attention heads of a model.

    ``hrv``: (K, H_total) float32, row c is HRV_c (Σ_h = H_total unless never selected).
    ``counts``: (H_total, K) votes (argmax wins summed over images, steps, prompts).
    ``layers``: (layer name, heads) in the UNet's order; head i of the flat vector is
    head ``i - offset`` of the layer whose range holds i.
    ``per_step``: (S, K, H_total) HRVs of each denoising step alone, when requested.
    """

    concepts: List[str]
    layers: List[Tuple[str, int]]
    hrv: torch.Tensor
    counts: torch.Tensor
    model_id: str = ""
    words: Dict[str, List[str]] = field(default_factory=dict)
    per_step: Optional[torch.Tensor] = None

    @property
    def num_heads(self) -> int:
        return int(self.hrv.shape[1])

    @property
    def never_selected(self) -> List[str]:
        return [c for c, total in zip(self.concepts, self.counts.sum(0).tolist()) if total == 0]

    def index(self, concept: str) -> int:
        if not isinstance(concept, str) or concept not in self.concepts:
            raise ValueError(f"concept: expected one of {self.concepts}, got {concept!r}")
        return self.concepts.index(concept)

    def vector(self, concept: str, step: Optional[int] = None) -> torch.Tensor:
        """HRV_concept (H_total,), of one step when ``step`` is given (needs per_step)."""
        c = self.index(concept)
        if step is None:
            return self.hrv[c]
        if self.per_step is None:
            raise ValueError("step: this HRV was built without per_step=True, so it has no per-step vectors")
        if not 0 <= step < self.per_step.shape[0]:
            raise ValueError(f"step: expected an index in [0, {self.per_step.shape[0]}), got {step}")
        return self.per_step[step, c]

    def offsets(self) -> Dict[str, Tuple[int, int]]:
        """layer -> (first flat head index, heads)."""
        out, start = {}, 0
        for name, heads in self.layers:
            out[name] = (start, heads)
            start += heads
        return out

    def ranked_heads(self, concept: str, k: int, order: str = "most") -> torch.Tensor:
        """Flat indices of the k heads with the largest (``order="most"``) or smallest
        (``"least"``) HRV_concept; ties broken by head index (stable)."""
        vec = self.vector(concept)
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= self.num_heads:
            raise ValueError(f"k: expected an integer in [1, {self.num_heads}] (the number of heads), got {k!r}")
        if order not in ("most", "least"):
            raise ValueError(f"order: expected 'most' (MoRHF) or 'least' (LeRHF), got {order!r}")
        ranks = torch.argsort(vec, descending=order == "most", stable=True)
        return ranks[:k]

    def layer_heads(self) -> List[Tuple[str, int]]:
        """(layer, head) of every flat head index."""
        return [(name, h) for name, heads in self.layers for h in range(heads)]

    # ---- files ---------------------------------------------------------------------------
    def save(self, path: str) -> None:
        """safetensors file: tensors ``hrv``, ``counts`` (and ``per_step``); concept names,
        concept words, layers and model id in its metadata."""
        from safetensors.torch import save_file

        tensors = {"hrv": self.hrv.detach().float().cpu().contiguous(),
                   "counts": self.counts.detach().float().cpu().contiguous()}
        if self.per_step is not None:
            tensors["per_step"] = self.per_step.detach().float().cpu().contiguous()
        meta = {"format": FORMAT, "concepts": json.dumps(self.concepts), "model_id": self.model_id,
                "layers": json.dumps([[n, h] for n, h in self.layers]), "words": json.dumps(self.words)}
        save_file(tensors, path, metadata=meta)

    @classmethod
    def load(cls, path: str) -> "HeadRelevance":
        from safetensors import safe_open

        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") != FORMAT:
                raise ValueError(f"path: expected an attnctl HRV file (format {FORMAT}), got "
                                 f"format {meta.get('format')!r} in {path}")
            tensors = {name: f.get_tensor(name) for name in f.keys()}
        return cls(json.loads(meta["concepts"]), [(n, int(h)) for n, h in json.loads(meta["layers"])],
                   tensors["hrv"], tensors["counts"], meta.get("model_id", ""),
                   json.loads(meta.get("words", "{}")), tensors.get("per_step"))

    def plot(self, path: str, *, title: Optional[str] = None) -> None:
        """PNG of the head × concept matrix (heads along x, layer boundaries marked)."""
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt

        K, Htot = self.hrv.shape
        fig, ax = plt.subplots(figsize=(min(24, 3 + Htot * 0.08), 1.5 + 0.45 * K))
        im = ax.imshow(self.hrv.float().cpu().numpy(), aspect="auto", cmap="viridis", interpolation="nearest")
        ax.set_yticks(range(K), self.concepts)
        ax.set_xlabel(f"cross-attention head (flat index over {len(self.layers)} layers)")
        start = 0
        for _, heads in self.layers[:-1]:
            start += heads
            ax.axvline(start - 0.5, color="white", linewidth=0.5, alpha=0.6)
        ax.set_title(title or f"head relevance vectors{' — ' + self.model_id if self.model_id else ''}")
        fig.colorbar(im, ax=ax, label="HRV (Σ over heads = H)")
        fig.savefig(path, bbox_inches="tight", dpi=100)
        plt.close(fig)


def normalise_counts(counts: torch.Tensor) -> torch.Tensor:
    """(..., H, K) votes -> (..., K, H) HRVs: each head over concepts, then each concept over
    heads scaled to Σ_h = H (concepts with no vote stay 0)."""
    counts = counts.double()
    per_head = counts / counts.sum(-1, keepdim=True).clamp_min(1e-300)
    per_concept = per_head.sum(-2, keepdim=True)
    H = counts.shape[-2]
    hrv = torch.where(per_concept > 0, per_head / per_concept.clamp_min(1e-300) * H, torch.zeros_like(per_head))
    return hrv.transpose(-1, -2).float()


# ---------------------------------------------------------------------------------------
# Construction
# ---------------------------------------------------------------------------------------

def _concept_words(concepts: Concepts) -> Dict[str, List[str]]:
    if isinstance(concepts, str):
        raise TypeError("concepts: expected a list of concept words or a dict {concept: words}, got a str")
    if isinstance(concepts, Mapping):
        out = {str(name): ([words] if isinstance(words, str) else list(words)) for name, words in concepts.items()}
    else:
        out = {str(word): [str(word)] for word in concepts}
    if len(out) < 2:
        raise ValueError(f"concepts: expected at least two concepts (the vote is an argmax over them), got {list(out)}")
    for name, words in out.items():
        if not words or not all(isinstance(w, str) and w.strip() for w in words):
            raise ValueError(f"concepts[{name!r}]: expected non-empty words, got {words!r}")
    return out


def encode_words(pipe, words: Sequence[str]) -> Tuple[torch.Tensor, List[int]]:
    """Token embeddings of each word as the UNet sees text (the pipeline's encode_prompt,
    bypassing attnctl's hook), keeping the word's own tokens: (1, C, dim) and the number of
    tokens of each word."""
    tokenizer = getattr(pipe, "tokenizer", None) or getattr(pipe, "tokenizer_2", None)
    if tokenizer is None:
        raise TypeError(f"pipe: expected a pipeline with a tokenizer, got {type(pipe).__name__}")
    device = pipe.unet.device
    rows, sizes = [], []
    with torch.no_grad():
        for word in words:
            text = record_prompt(tokenizer, word)
            positions = [p for _, pos in text.words for p in pos]
            if not positions:
                raise ValueError(f"concept word {word!r}: the tokenizer gives it no tokens")
            # type(pipe).encode_prompt: the class's function, not attnctl's per-instance hook,
            # so encoding concept words does not start a "generation".
            embeds = type(pipe).encode_prompt(pipe, prompt=word, device=device, num_images_per_prompt=1,
                                              do_classifier_free_guidance=False)[0]
            rows.append(embeds[0, positions])
            sizes.append(len(positions))
    return torch.cat(rows)[None], sizes


def layer_probe_keys(attn, embeds: torch.Tensor) -> torch.Tensor:
    """(1, H, C, D) probe keys of a diffusers Attention layer for text embeddings (1, C, dim),
    as AttnProcessor2_0 forms keys."""
    with torch.no_grad():
        x = embeds.to(dtype=attn.to_k.weight.dtype, device=attn.to_k.weight.device)
        if attn.norm_cross:
            x = attn.norm_encoder_hidden_states(x)
        key = attn.to_k(x)
        head_dim = key.shape[-1] // attn.heads
        key = key.view(1, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
    return key


class _LayerProbe:
    __slots__ = ("keys", "capture", "pending")

    def __init__(self, keys: torch.Tensor):
        self.keys = keys
        self.capture = Capture(probe_keys=keys)
        self.pending = False


class HRVBuilder(Controller):
    """Controller that votes, per call, for each head's most attended concept.

    Use :func:`build_hrv`; or install it yourself, run generations, then ``result()``.
    """

    def __init__(self, pipe, concepts: Concepts, *, per_step: bool = False, model_id: str = ""):
        self.words = _concept_words(concepts)
        self.concepts = list(self.words)
        self.per_step = bool(per_step)
        self.model_id = model_id
        flat_words = [w for ws in self.words.values() for w in ws]
        embeds, sizes = encode_words(pipe, flat_words)
        # concept of every probe token, and the (C, K) matrix averaging each concept's tokens
        owner = []
        i = 0
        for c, ws in enumerate(self.words.values()):
            for _ in ws:
                owner.extend([c] * sizes[i])
                i += 1
        C, K = len(owner), len(self.concepts)
        avg = torch.zeros(C, K)
        avg[torch.arange(C), torch.tensor(owner)] = 1.0
        avg /= avg.sum(0, keepdim=True)
        self.embeds = embeds
        self.unet = pipe.unet
        self._avg: Dict[torch.device, torch.Tensor] = {}
        self._avg_cpu = avg
        self.layers: Dict[str, _LayerProbe] = {}
        self.layer_heads: Dict[str, int] = {}
        self.counts: Dict[str, torch.Tensor] = {}               # layer -> (H, K)
        self.step_counts: Dict[int, Dict[str, torch.Tensor]] = {}
        self.layout: Optional[BatchLayout] = None
        self._pending_step = 0
        self._modules = dict(pipe.unet.named_modules())

    # ---- protocol ----------------------------------------------------------------------
    def on_generation_start(self, generation: Generation) -> None:
        self.flush()

    def on_step(self, step: DenoiseStep, layout: BatchLayout) -> None:
        self.flush()
        self.layout = layout
        self._pending_step = step.index

    def plan(self, call: AttentionCall) -> Optional[Plan]:
        if not call.is_cross:
            return None
        probe = self.layers.get(call.layer)
        if probe is None:
            keys = layer_probe_keys(self._modules[call.layer], self.embeds)
            probe = self.layers[call.layer] = _LayerProbe(keys.to(call.device, call.dtype))
            self.layer_heads[call.layer] = call.heads
        cap = probe.capture
        if cap.probe_mass is None or cap.probe_mass.shape[0] != call.batch:
            cap.probe_mass = torch.zeros(call.batch, call.heads, probe.keys.shape[2], device=call.device)
        if call.layout.rows == call.batch:
            self.layout = call.layout
        # Votes read the cond rows only: the kernel probes no other row.
        cap.rows = call.layout.cond_rows if call.layout.rows == call.batch else None
        probe.pending = True
        return Plan(capture=cap)

    # ---- votes -------------------------------------------------------------------------
    def flush(self) -> None:
        """Turn the probe mass of the last UNet call into votes (device ops only)."""
        layout = self.layout
        for name, probe in self.layers.items():
            if not probe.pending:
                continue
            probe.pending = False
            mass = probe.capture.probe_mass
            rows = layout.cond_rows if layout is not None and layout.rows == mass.shape[0] else range(mass.shape[0])
            avg = self._avg.get(mass.device)
            if avg is None:
                avg = self._avg[mass.device] = self._avg_cpu.to(mass.device)
            scores = mass[rows.start:rows.stop] @ avg                  # (images, H, K)
            votes = torch.nn.functional.one_hot(scores.argmax(-1), avg.shape[1]).sum(0)  # (H, K)
            self.counts[name] = self.counts.get(name, 0) + votes
            if self.per_step:
                per = self.step_counts.setdefault(self._pending_step, {})
                per[name] = per.get(name, 0) + votes
            mass.zero_()

    def result(self) -> HeadRelevance:
        self.flush()
        if not self.counts:
            raise RuntimeError("hrv: no cross-attention call was seen; run the pipeline with the builder installed")
        order = [n for n in self._layer_order() if n in self.counts]
        counts = torch.cat([self.counts[n].cpu() for n in order]).float()       # (H_total, K)
        per_step = None
        if self.per_step:
            steps = sorted(self.step_counts)
            K = len(self.concepts)
            per_step = torch.stack([
                normalise_counts(torch.cat([self.step_counts[s].get(n, torch.zeros(self.layer_heads[n], K)).cpu()
                                            for n in order]).float()) for s in steps])
        return HeadRelevance(self.concepts, [(n, self.layer_heads[n]) for n in order],
                             normalise_counts(counts), counts, self.model_id, self.words, per_step)

    def _layer_order(self) -> List[str]:
        installation = installation_of(self.unet)
        if installation is not None:
            return installation.cross_layers
        return list(self.counts)


def build_hrv(pipe, concepts: Concepts, prompts: Sequence[str], *, steps: int = 50,
              guidance_scale: float = 7.5, seed: int = 0, batch_size: int = 4, per_step: bool = False,
              height: Optional[int] = None, width: Optional[int] = None, model_id: Optional[str] = None,
              backend: Optional[str] = None, **pipe_kwargs) -> HeadRelevance:
    """Run ``prompts`` through ``pipe`` (SD 1.x / 2.x / SDXL) and build the HRVs of ``concepts``.

    Args:
        concepts: concept words (each its own concept), or {concept: word or words}.
        prompts: the generation prompts (votes sum over them, their images and steps).
        steps, guidance_scale, height, width, **pipe_kwargs: passed to the pipeline;
            latents only are produced (no VAE decode).
        seed: generator seed of the first batch (batch i uses seed + i): reproducible.
        batch_size: prompts per pipeline call.
        per_step: also keep each denoising step's HRVs.
        model_id: recorded in the result (default: the pipeline's name_or_path).
        backend: attention backend ("auto": fused Triton kernel on CUDA).
    """
    if isinstance(prompts, str):
        prompts = [prompts]
    prompts = list(prompts)
    if not prompts:
        raise ValueError("prompts: expected at least one prompt, got none")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size: expected a positive integer, got {batch_size!r}")
    if model_id is None:
        model_id = str(getattr(getattr(pipe, "config", None), "_name_or_path", "") or "")
    builder = HRVBuilder(pipe, concepts, per_step=per_step, model_id=model_id)
    owns = installation_of(pipe) is None
    installation = install(pipe, backend=backend)
    installation.add(builder)
    size = {k: v for k, v in (("height", height), ("width", width)) if v is not None}
    try:
        for i in range(0, len(prompts), batch_size):
            generator = torch.Generator(device="cpu").manual_seed(seed + i // batch_size)
            with torch.no_grad():
                pipe(prompts[i:i + batch_size], num_inference_steps=steps, guidance_scale=guidance_scale,
                     generator=generator, output_type="latent", **size, **pipe_kwargs)
        return builder.result()
    finally:
        installation.remove(builder)
        if owns:
            installation.uninstall()


# ---------------------------------------------------------------------------------------
# Controllers that use HRVs
# ---------------------------------------------------------------------------------------

class _HeadTokenController(Controller):
    """Shared machinery: a (B, H, 1, N) prob_mult per layer and generation, equal to
    ``head_factor[h]`` at the chosen token columns of the conditional rows and 1 elsewhere."""

    def __init__(self, hrv: HeadRelevance):
        if not isinstance(hrv, HeadRelevance):
            raise TypeError(f"hrv: expected an attnctl HeadRelevance, got {type(hrv).__name__}")
        self.hrv = hrv
        self._offsets = hrv.offsets()
        self._head_factor = self.head_factors()            # (H_total,)
        self.generation: Optional[Generation] = None
        self._columns: Optional[List[List[int]]] = None    # per prompt
        self._cache: Dict[Tuple, torch.Tensor] = {}

    def head_factors(self) -> torch.Tensor:
        raise NotImplementedError

    def token_columns(self, prompt) -> List[int]:
        raise NotImplementedError

    def on_generation_start(self, generation: Generation) -> None:
        self.generation = generation
        self._cache = {}
        if generation.prompts is None or generation.tokenizer is None:
            raise ValueError(f"{type(self).__name__}: needs the prompt text to find token columns; "
                             "the pipeline got prompt_embeds without a prompt")
        self._columns = [self.token_columns(record_prompt(generation.tokenizer, p)) for p in generation.prompts]

    def plan(self, call: AttentionCall) -> Optional[Plan]:
        if not call.is_cross:
            return None
        key = (call.layer, call.batch, call.keys, call.device)
        pm = self._cache.get(key)
        if pm is None:
            pm = self._cache[key] = self._build(call)
        return Plan(prob_mult=pm)

    def _build(self, call: AttentionCall) -> torch.Tensor:
        where = self._offsets.get(call.layer)
        if where is None:
            raise ValueError(f"hrv: layer {call.layer} is not in this HRV (built for "
                             f"{self.hrv.model_id or 'another model'} with {len(self.hrv.layers)} layers)")
        start, heads = where
        if heads != call.heads:
            raise ValueError(f"hrv: layer {call.layer} has {call.heads} heads, the HRV expects {heads}")
        if self._columns is None:
            raise RuntimeError(f"{type(self).__name__}: no generation has started (install it on a pipeline)")
        factor = self._head_factor[start:start + heads].float()
        columns = torch.zeros(call.batch, call.keys)
        layout = call.layout
        for i, row in enumerate(layout.cond_rows):
            prompt = layout.prompt_of_image(i)
            cols = [c for c in self._columns[min(prompt, len(self._columns) - 1)] if c < call.keys]
            columns[row, cols] = 1.0
        pm = 1.0 + columns[:, None, None, :] * (factor[None, :, None, None] - 1.0)
        return pm.to(call.device)


class OrderedWeakening(_HeadTokenController):
    """Multiply every prompt token's probabilities by ``factor`` (default -2) in the k heads
    most (``order="most"``, MoRHF) or least (``"least"``, LeRHF) relevant to ``concept``,
    conditional half only. Prompt tokens: every token of the prompt's words (not the start,
    end or padding tokens)."""

    def __init__(self, hrv: HeadRelevance, concept: str, k: int, *, order: str = "most",
                 factor: float = -2.0):
        self.concept, self.k, self.order, self.factor = concept, k, order, float(factor)
        super().__init__(hrv)

    def head_factors(self) -> torch.Tensor:
        heads = self.hrv.ranked_heads(self.concept, self.k, self.order)
        f = torch.ones(self.hrv.num_heads)
        f[heads] = self.factor
        return f

    def token_columns(self, prompt) -> List[int]:
        return [p for _, pos in prompt.words for p in pos]


class ConceptAdjusting(_HeadTokenController):
    """P[h, :, t] *= 2·HRV_desired[h] - HRV_undesired[h] at the token columns t of ``word``
    (every sub-token; the first occurrence in each prompt), conditional half only.

    ``clamp=(lo, hi)`` clamps each HRV before the combination (None: no clamp)."""

    def __init__(self, hrv: HeadRelevance, word: str, desired: str, undesired: str, *,
                 clamp: Optional[Tuple[float, float]] = None):
        if clamp is not None and (len(clamp) != 2 or not clamp[0] <= clamp[1]):
            raise ValueError(f"clamp: expected (lo, hi) with lo <= hi, or None, got {clamp!r}")
        self.word, self.desired, self.undesired, self.clamp = word, desired, undesired, clamp
        super().__init__(hrv)

    def head_factors(self) -> torch.Tensor:
        d, u = self.hrv.vector(self.desired), self.hrv.vector(self.undesired)
        if self.clamp is not None:
            d, u = d.clamp(*self.clamp), u.clamp(*self.clamp)
        return 2 * d - u

    def token_columns(self, prompt) -> List[int]:
        return prompt.positions(self.word)


class ConceptStrengthening(_HeadTokenController):
    """P[h, :, t] *= HRV_concept[h] at the token columns t of ``word`` (first occurrence) in
    every conditional row whose prompt has the word; prompts without it are untouched.

    Meant for prompt-to-prompt edits (install it with the edit, e.g.
    ``attnctl.install(pipe, Replace(...), ConceptStrengthening(hrv, "dog", "animal"))``):
    the edited target word's map, whether injected from the source or the target's own, is
    rescaled by the concept's head relevance (mean 1 over heads, so the total is kept).
    ``clamp=(lo, hi)`` clamps the HRV first."""

    def __init__(self, hrv: HeadRelevance, word: str, concept: str, *,
                 clamp: Optional[Tuple[float, float]] = None):
        if clamp is not None and (len(clamp) != 2 or not clamp[0] <= clamp[1]):
            raise ValueError(f"clamp: expected (lo, hi) with lo <= hi, or None, got {clamp!r}")
        self.word, self.concept, self.clamp = word, concept, clamp
        super().__init__(hrv)

    def head_factors(self) -> torch.Tensor:
        v = self.hrv.vector(self.concept)
        return v.clamp(*self.clamp) if self.clamp is not None else v

    def token_columns(self, prompt) -> List[int]:
        texts = [text for text, _ in prompt.words]
        return prompt.positions(self.word) if _contains(texts, query_words(self.word)) else []

    def on_generation_start(self, generation: Generation) -> None:
        super().on_generation_start(generation)
        if not any(self._columns):
            raise ValueError(f"ConceptStrengthening: word {self.word!r} is in none of the prompts "
                             f"({', '.join(repr(p) for p in generation.prompts)})")


def _contains(words: List[str], query: List[str]) -> bool:
    return any(words[i:i + len(query)] == query for i in range(len(words) - len(query) + 1))
