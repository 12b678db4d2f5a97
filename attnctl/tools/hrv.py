"""Head relevance vectors (HRV; Park et al., arXiv 2412.02237) built inside ordinary
generation, and the controllers that use them.

**Construction** (the official head_relevance_calculation.py by default). Each visual
concept is given by one or more concept words. Every word is encoded by the pipeline's own
text encoder(s) (exactly as a prompt is); the token embeddings of the word itself form its
probe tokens. Per cross-attention layer they go through that layer's ``to_k`` (and
``norm_cross`` / ``norm_k`` where the layer has them) once, giving probe keys
(1, H, C, D). At every cross-attention call one word of each concept is drawn
(``probe_words="sample"``, a seeded generator; ``"all"`` probes every word) and the probe
set is [the start-of-text token (``probe_sot``, as the official keeps it)] + the drawn
words' tokens; the fused kernel adds, per head, Σ_m softmax_c(scale · q · probe_key_c)
over the pixels of the call (a softmax over the probe set alone, no V; see
``Capture.probe_keys``). After each UNet call, per image of the conditional half, per layer
and head, each concept's score is the mean over its probe tokens, and the concept with the
highest score gets a vote (one-hot argmax; ties to the first concept). Votes are summed
over prompts and steps into counts (heads × concepts); each head is normalised over
concepts, then each concept over heads so that Σ_h HRV_c[h] = H, the number of
cross-attention heads (128 in SD1.x, 1300 in SDXL). A concept that never wins a head keeps
an all-zero vector (listed in ``HeadRelevance.never_selected``). Heads are ordered as the
official files order them (see :mod:`attnctl.tools.hrv_official`).

On Flux / SD3 / SD3.5 (MM-DiT joint attention) the probe keys of a layer are the concept
words' text-stream keys at that block, from a concept stream run beside the prompt, and
the heads are those of every joint layer with text keys, in forward order: see
:mod:`attnctl.tools.hrv_joint`.

The votes are taken on the device with no loop over tokens or sync. With
``probe_words="all"`` the probe buffers are allocated on a layer's first call of a
generation and zeroed after their votes are taken; with ``"sample"`` each call gathers its
drawn words' keys and a small (B, H, C) buffer.

**Controllers.** :class:`OrderedWeakening` (MoRHF / LeRHF: scale every prompt token's
probabilities by ``factor``, default -2, in the k most or least relevant heads of a
concept) and :class:`ConceptAdjusting` (P[h, :, t] *= 2·HRV_desired[h] - HRV_undesired[h]
for the words' token columns t, optionally clamping each HRV first). Both act on the
conditional half only and give a (B, H, 1, N) prob_mult cached per layer and generation
(on joint attention: 1 except at the prompt's text columns; ``pipe=`` gives the tokenizer).
:class:`ConceptStrengthening` is given to a prompt-to-prompt edit (``strengthen=``): as
the official P2P-HRV does, inside the word's replace window the target word's columns take
the target's own map scaled per head by HRV_c[h] (from a start step on).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from ..capture import Capture
from ..diffusers.controller import AttentionCall, BatchLayout, Controller, DenoiseStep, Plan
from ..diffusers.attach import Attachment
from ..diffusers.install import Generation, find_model, installation_of
from ..diffusers.mmdit import TEXT_SEGMENTS, generation_segment
from .concept_stream import stream_layers
from .hrv_joint import JointProbes
from .hrv_official import official_order
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
    ``counts``: (H_total, K) votes (argmax wins summed over images, steps, prompts); None
    for vectors loaded from the official release (it ships no votes).
    ``layers``: (layer name, heads); head i of the flat vector is head ``i - offset`` of
    the layer whose range holds i. A built HRV lists the layers in the official HRV order
    (down, mid, up; forward order within each), so flat head i is head i of the official
    files (see :mod:`attnctl.tools.hrv_official`).
    ``per_step``: (S, K, H_total) HRVs of each denoising step alone, when requested.
    """

    concepts: List[str]
    layers: List[Tuple[str, int]]
    hrv: torch.Tensor
    counts: Optional[torch.Tensor]
    model_id: str = ""
    words: Dict[str, List[str]] = field(default_factory=dict)
    per_step: Optional[torch.Tensor] = None

    @property
    def num_heads(self) -> int:
        return int(self.hrv.shape[1])

    @property
    def never_selected(self) -> List[str]:
        totals = self.hrv.sum(1) if self.counts is None else self.counts.sum(0)
        return [c for c, total in zip(self.concepts, totals.tolist()) if total == 0]

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
        (``"least"``) HRV_concept. Ties: the head with the smaller flat index (official
        order: down, mid, up) comes first, for "most" and "least" alike (a stable sort; the
        official top/bottom lists use numpy's unstable argsort, so their tie order is the
        numpy build's)."""
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

        tensors = {"hrv": self.hrv.detach().float().cpu().contiguous()}
        if self.counts is not None:
            tensors["counts"] = self.counts.detach().float().cpu().contiguous()
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
                   tensors["hrv"], tensors.get("counts"), meta.get("model_id", ""),
                   json.loads(meta.get("words", "{}")), tensors.get("per_step"))

    @classmethod
    def load_official(cls, vectors: str, head_index: str, concepts: Union[str, Sequence[str]], *,
                      unet=None) -> "HeadRelevance":
        """Head relevance vectors released with the HRV paper: the paths of a
        ``category_vectors_*.npy`` and its ``head_index_*.npy``, and the concept names (a
        list, or the path of the official description CSV). Heads are matched by their
        official names to the cross-attention layers of ``unet`` (a UNet or pipeline; by
        default the published SD 1.x or SDXL architecture, chosen by the number of heads).
        No votes ship with the files, so ``counts`` is None."""
        from . import hrv_official

        layers = (hrv_official.cross_attention_layers(unet) if unet is not None
                  else hrv_official.published_layers(int(np.load(head_index).shape[0])))
        names, hrv = hrv_official.read(vectors, head_index, concepts, layers)
        return cls(names, layers, hrv, None, model_id=str(vectors))

    def save_official(self, vectors: str, head_index: str) -> None:
        """Write ``hrv`` as the official release does: (K, H) float32 vectors and the head
        names, in the official head order (whatever this HRV's layer order)."""
        from . import hrv_official

        hrv_official.write(vectors, head_index, self.hrv, self.layers)

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


def encode_words(pipe, words: Sequence[str]) -> Tuple[torch.Tensor, List[int], Optional[torch.Tensor]]:
    """Token embeddings of each word as the denoiser sees text (the pipeline's
    encode_prompt, bypassing attnctl's hook), keeping the word's own tokens: (1, C, dim),
    the number of tokens of each word, and the start-of-text token's embedding (dim,) (the
    same for every text: CLIP's causal attention lets it see only itself); None where the
    tokenizer puts no start token (T5: PixArt, Wan)."""
    import inspect

    tokenizer = getattr(pipe, "tokenizer", None) or getattr(pipe, "tokenizer_2", None)
    if tokenizer is None:
        raise TypeError(f"pipe: expected a pipeline with a tokenizer, got {type(pipe).__name__}")
    device = find_model(pipe)[0].device
    # WanPipeline counts videos per prompt
    per_prompt = ("num_videos_per_prompt" if "num_videos_per_prompt" in inspect.signature(pipe.encode_prompt).parameters
                  else "num_images_per_prompt")
    rows, sizes, sot = [], [], None
    with torch.no_grad():
        for word in words:
            text = record_prompt(tokenizer, word)
            positions = [p for _, pos in text.words for p in pos]
            if not positions:
                raise ValueError(f"concept word {word!r}: the tokenizer gives it no tokens")
            # type(pipe).encode_prompt: the class's function, not attnctl's per-instance hook,
            # so encoding concept words does not start a "generation".
            embeds = type(pipe).encode_prompt(pipe, prompt=word, device=device, do_classifier_free_guidance=False,
                                              **{per_prompt: 1})[0]
            rows.append(embeds[0, positions])
            sizes.append(len(positions))
            if positions[0] > 0:
                sot = embeds[0, 0]
    return torch.cat(rows)[None], sizes, sot


def layer_probe_keys(attn, embeds: torch.Tensor) -> torch.Tensor:
    """(1, H, C, D) probe keys of a diffusers Attention layer for text embeddings (1, C, dim),
    as AttnProcessor2_0 forms keys."""
    from diffusers.models.transformers.transformer_wan import WanAttention

    with torch.no_grad():
        x = embeds.to(dtype=attn.to_k.weight.dtype, device=attn.to_k.weight.device)
        if isinstance(attn, WanAttention):   # WanAttnProcessor: norm_k over all heads, before the split
            key = attn.norm_k(attn.to_k(x))
            return key.view(1, -1, attn.heads, key.shape[-1] // attn.heads).transpose(1, 2)
        if attn.norm_cross:
            x = attn.norm_encoder_hidden_states(x)
        key = attn.to_k(x)
        head_dim = key.shape[-1] // attn.heads
        key = key.view(1, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
    return key


class _LayerProbe:
    __slots__ = ("keys", "capture", "avg", "pending", "mass", "rows")

    def __init__(self, keys: Optional[torch.Tensor]):
        self.keys = keys                    # (1, H, C, D): every probe token of the layer (None: MM-DiT)
        self.capture = Capture(probe_keys=keys) if keys is not None else None
        self.avg: Optional[torch.Tensor] = None   # (C_call, K): this call's tokens -> concept means
        self.pending = False
        self.mass: Optional[torch.Tensor] = None  # MM-DiT: (R, H, C_call), the conditional images' rows
        self.rows: Optional[range] = None         # rows of the mass that vote (None: from the layout)


PROBE_WORDS = ("sample", "all")


class HRVBuilder(Controller):
    """Controller that votes, per call, for each head's most attended concept.

    Use :func:`build_hrv`; or install it yourself, run generations, then ``result()``.
    ``probe_words``, ``probe_sot``, ``seed``, ``text``: see :func:`build_hrv`. On Flux /
    SD3 it holds a forward pre-hook on the transformer (the concept stream's inputs) until
    ``close()``.
    """

    def __init__(self, pipe, concepts: Concepts, *, per_step: bool = False, model_id: str = "",
                 probe_words: str = "sample", probe_sot: bool = True, seed: int = 0, text: Optional[str] = None):
        if probe_words not in PROBE_WORDS:
            raise ValueError(f"probe_words: expected one of {PROBE_WORDS}, got {probe_words!r}")
        from attnctl.diffusers.mmdit import mmdit_family
        family = mmdit_family(getattr(pipe, "transformer", None))
        if family is None and text is not None:
            raise ValueError(f"text: selects the text segment of an MM-DiT (Flux, SD3); {type(pipe).__name__} has "
                             f"one text, got {text!r}")
        self.words = _concept_words(concepts)
        self.concepts = list(self.words)
        self.per_step = bool(per_step)
        self.model_id = model_id
        self.probe_words, self.probe_sot = probe_words, bool(probe_sot)
        self._generator = torch.Generator().manual_seed(int(seed))
        flat_words = [w for ws in self.words.values() for w in ws]
        self.joint: Optional[JointProbes] = None
        if family is not None:      # the probe keys come from a concept stream, per block
            self.joint = JointProbes(pipe, family, flat_words, "t5" if text is None else text, self.probe_sot)
            embeds, sizes = None, self.joint.sizes
        else:
            embeds, sizes, sot = encode_words(pipe, flat_words)
            if self.probe_sot and sot is None:
                raise ValueError("probe_sot: this pipeline's tokenizer puts no start-of-text token before the "
                                 "text (T5: PixArt, Wan); pass probe_sot=False")
            if self.probe_sot:       # probe token 0: the start-of-text token, in no concept
                embeds = torch.cat([sot[None, None].to(embeds.dtype), embeds], 1)
        # token range of every word in the probe set, grouped by concept
        self._word_tokens: List[List[List[int]]] = []
        first, word_sizes = int(self.probe_sot), iter(sizes)
        for ws in self.words.values():
            ranges = []
            for size in (next(word_sizes) for _ in ws):
                ranges.append(list(range(first, first + size)))
                first += size
            self._word_tokens.append(ranges)
        self._all_tokens = list(range(first))
        self._avg_all = self._averaging([[t for r in ranges for t in r] for ranges in self._word_tokens],
                                        self._all_tokens)
        self.embeds = embeds
        self.unet = find_model(pipe)[0]      # the UNet, or the PixArt / Wan transformer
        self._avg: Dict[torch.device, torch.Tensor] = {}
        self.layers: Dict[str, _LayerProbe] = {}
        self.layer_heads: Dict[str, int] = {}
        self.counts: Dict[str, torch.Tensor] = {}               # layer -> (H, K)
        self.step_counts: Dict[int, Dict[str, torch.Tensor]] = {}
        self.layout: Optional[BatchLayout] = None
        self._pending_step = 0
        self._modules = dict(self.unet.named_modules())

    @staticmethod
    def _averaging(concept_tokens: List[List[int]], probe_tokens: List[int]) -> torch.Tensor:
        """(C, K): column k averages concept k's tokens among ``probe_tokens`` (the SOT row,
        when probed, is all zero: it enters the softmax but no concept's score)."""
        row = {t: i for i, t in enumerate(probe_tokens)}
        avg = torch.zeros(len(probe_tokens), len(concept_tokens))
        for k, tokens in enumerate(concept_tokens):
            avg[[row[t] for t in tokens], k] = 1.0 / len(tokens)
        return avg

    def sample_words(self) -> List[int]:
        """One word index per concept (the official probe: a concept's word drawn per
        cross-attention call), from the builder's seeded generator."""
        counts = [len(ranges) for ranges in self._word_tokens]
        if len(set(counts)) == 1:       # the official draw: randint(0, words, (concepts,))
            return torch.randint(0, counts[0], (len(counts),), generator=self._generator).tolist()
        return [int(torch.randint(0, n, (1,), generator=self._generator)) for n in counts]

    def _draw(self, device) -> Tuple[Optional[List[int]], torch.Tensor]:
        """This call's probe tokens (None: every token, ``probe_words="all"``) and their
        averaging (C_call, K)."""
        if self.probe_words == "all":
            avg = self._avg.get(device)
            if avg is None:
                avg = self._avg[device] = self._avg_all.to(device, non_blocking=True)
            return None, avg
        chosen = [ranges[i] for ranges, i in zip(self._word_tokens, self.sample_words())]
        tokens = ([0] if self.probe_sot else []) + [t for r in chosen for t in r]
        return tokens, self._averaging(chosen, tokens).to(device, non_blocking=True)

    def _call_probe(self, probe: _LayerProbe, call: AttentionCall) -> None:
        """Point the layer's capture at this call's probe tokens and averaging."""
        tokens, probe.avg = self._draw(call.device)
        if tokens is None:
            cap = probe.capture
            if cap.probe_mass is None or cap.probe_mass.shape[0] != call.batch:
                cap.probe_mass = torch.zeros(call.batch, call.heads, probe.keys.shape[2], device=call.device)
        else:
            keys = probe.keys[:, :, torch.tensor(tokens, device=probe.keys.device)]
            probe.capture = Capture(probe_keys=keys)
            probe.capture.probe_mass = torch.zeros(call.batch, call.heads, len(tokens), device=call.device)
        probe.mass = probe.capture.probe_mass

    # ---- protocol ----------------------------------------------------------------------
    def on_generation_start(self, generation: Generation) -> None:
        self.flush()

    def on_step(self, step: DenoiseStep, layout: BatchLayout) -> None:
        self.flush()
        self.layout = layout
        self._pending_step = step.index

    def plan(self, call: AttentionCall) -> Optional[Plan]:
        # Wan: its unconditional call, and I2V's image-context attention, have no cond text rows
        if not call.is_cross or call.context != "text" or not call.layout.cond_rows:
            return None
        probe = self.layers.get(call.layer)
        if probe is None:
            keys = layer_probe_keys(self._modules[call.layer], self.embeds)
            probe = self.layers[call.layer] = _LayerProbe(keys.to(call.device, call.dtype))
            self.layer_heads[call.layer] = call.heads
        self._call_probe(probe, call)
        if call.layout.rows == call.batch:
            self.layout = call.layout
        # Votes read the cond rows only: the kernel probes no other row.
        probe.capture.rows = call.layout.cond_rows if call.layout.rows == call.batch else None
        probe.pending = True
        return Plan(capture=probe.capture)

    def on_output(self, call: AttentionCall, value: torch.Tensor, out: torch.Tensor) -> None:
        """MM-DiT: the probe of a joint layer with text keys, after its call (see
        :mod:`attnctl.tools.hrv_joint`)."""
        joint = call.joint
        if self.joint is None or joint is None or not stream_layers(joint):
            return
        tokens, avg = self._draw(call.device)
        mass = self.joint.probe(call, value, self.layout or call.layout, tokens)
        if mass is None:
            return
        probe = self.layers.get(call.layer)
        if probe is None:
            probe = self.layers[call.layer] = _LayerProbe(None)
            self.layer_heads[call.layer] = call.heads
        probe.mass, probe.rows, probe.avg, probe.pending = mass, range(mass.shape[0]), avg, True

    def close(self) -> None:
        """MM-DiT: remove the transformer pre-hook of the concept stream (build_hrv does)."""
        if self.joint is not None:
            self.joint.close()

    # ---- votes -------------------------------------------------------------------------
    def flush(self) -> None:
        """Turn the probe mass of the last UNet call into votes (device ops only)."""
        layout = self.layout
        for name, probe in self.layers.items():
            if not probe.pending:
                continue
            probe.pending = False
            mass = probe.mass
            rows = probe.rows
            if rows is None:
                rows = (layout.cond_rows if layout is not None and layout.rows == mass.shape[0]
                        else range(mass.shape[0]))
            avg = probe.avg
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
        order = [n for n in self.layer_order() if n in self.counts]
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

    def layer_order(self) -> List[str]:
        """Layer names in the order of the flat head index: the official HRV order on UNets
        (down, mid, up; forward order within), forward order on PixArt, Wan, Flux and SD3."""
        installation = installation_of(self.unet)
        names = installation.cross_layers if installation is not None else list(self.counts)
        if self.joint is not None or (installation is not None and installation.dit is not None):
            return names        # PixArt, Wan, Flux, SD3: forward order (no official HRV)
        return [name for name, _ in official_order([(name, 0) for name in names])]


def build_hrv(pipe, concepts: Concepts, prompts: Sequence[str], *, steps: int = 50,
              guidance_scale: float = 7.5, seed: int = 0, batch_size: int = 4, per_step: bool = False,
              height: Optional[int] = None, width: Optional[int] = None, model_id: Optional[str] = None,
              backend: Optional[str] = None, probe_words: str = "sample", probe_sot: bool = True,
              text: Optional[str] = None, **pipe_kwargs) -> HeadRelevance:
    """Run ``prompts`` through ``pipe`` (SD 1.x / 2.x / SDXL; PixArt, Wan, Flux and SD3 /
    SD3.5 with ``probe_sot=False``: T5 puts no start token) and build the HRVs of
    ``concepts``. On Flux / SD3 the heads are those of every joint layer with text keys,
    in forward order, probed through a concept stream (:mod:`attnctl.tools.hrv_joint`).

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
        probe_words: "sample" (official, head_relevance_calculation.py): at every
            cross-attention call one word of each concept is drawn (uniformly, from a
            generator seeded with ``seed``; one draw per call, shared by the images of a
            batch) and the probe set holds the drawn words' tokens; "all": every word of
            every concept is probed at once and a concept's score is the mean over all its
            tokens.
        probe_sot: include the start-of-text token in the probe softmax, as the official
            code does (it keeps the first concept's SOT); it is in no concept's score.
        text: Flux / SD3 only: the text segment whose tokens of each word are probed, "t5"
            (default; Flux has no other) or "clip" (SD3's CLIP-L‖G tokens).
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
    builder = HRVBuilder(pipe, concepts, per_step=per_step, model_id=model_id, probe_words=probe_words,
                         probe_sot=probe_sot, seed=seed, text=text)
    size = {k: v for k, v in (("height", height), ("width", width)) if v is not None}
    try:
        with Attachment(pipe, builder, backend=backend):
            for i in range(0, len(prompts), batch_size):
                generator = torch.Generator(device="cpu").manual_seed(seed + i // batch_size)
                with torch.no_grad():
                    pipe(prompts[i:i + batch_size], num_inference_steps=steps, guidance_scale=guidance_scale,
                         generator=generator, output_type="latent", **size, **pipe_kwargs)
            return builder.result()
    finally:
        builder.close()


# ---------------------------------------------------------------------------------------
# Controllers that use HRVs
# ---------------------------------------------------------------------------------------

class _HeadTokenController(Controller):
    """Shared machinery: a (B, H, 1, N) prob_mult per layer and generation, equal to
    ``head_factor[h]`` at the chosen token columns of the conditional rows and 1 elsewhere.

    On MM-DiT joint attention (Flux, SD3) the token columns are those of the prompt's
    tokens in one text segment (``text``: "t5", or SD3's "clip"), as that segment's encoder
    got them (Flux's T5: ``prompt_2``), placed at the call's text columns (Flux: text first;
    SD3: after the image); image columns and SD3.5's image-only ``attn2`` keep factor 1."""

    def __init__(self, hrv: HeadRelevance, text: str = "t5"):
        if not isinstance(hrv, HeadRelevance):
            raise TypeError(f"hrv: expected an attnctl HeadRelevance, got {type(hrv).__name__}")
        if text not in TEXT_SEGMENTS:
            raise ValueError(f"text: expected one of {TEXT_SEGMENTS} (the text segment whose tokens are scaled), "
                             f"got {text!r}")
        self.hrv = hrv
        self.text = text
        self._offsets = hrv.offsets()
        self._head_factor = self.head_factors()            # (H_total,)
        self.generation: Optional[Generation] = None
        self._columns: Optional[List[List[int]]] = None    # per prompt
        self._joint_columns: Optional[List[List[int]]] = None  # MM-DiT: per prompt, in the joint text
        self._cache: Dict[Tuple, torch.Tensor] = {}

    def head_factors(self) -> torch.Tensor:
        raise NotImplementedError

    def token_columns(self, prompt) -> List[int]:
        raise NotImplementedError

    def on_generation_start(self, generation: Generation) -> None:
        self.generation = generation
        self._cache = {}
        self._joint_columns = None
        if generation.prompts is None or generation.tokenizer is None:
            raise ValueError(f"{type(self).__name__}: needs the prompt text to find token columns; "
                             "the pipeline got prompt_embeds without a prompt")
        self._columns = None

    def plan(self, call: AttentionCall) -> Optional[Plan]:
        if call.joint is not None:
            if not len(call.joint.text) or not call.layout.cond_rows:
                return None
        elif not call.is_cross or call.context != "text" or not call.layout.cond_rows:
            return None
        key = (call.layer, call.batch, call.keys, call.device)
        pm = self._cache.get(key)
        if pm is None:
            pm = self._cache[key] = self._build(call)
        return Plan(prob_mult=pm)

    def _build(self, call: AttentionCall) -> torch.Tensor:
        factor = _layer_slice(self.hrv, self._offsets, self._head_factor, call.layer, call.heads)
        if self.generation is None:
            raise RuntimeError(f"{type(self).__name__}: no generation has started (install it on a pipeline)")
        if call.joint is not None:
            per_prompt, first, stop = self._text_columns(call), call.joint.text.start, len(call.joint.text)
        else:
            if self._columns is None:   # the pipeline's tokenizer (on Flux / SD3 a CLIP one the joint text lacks)
                gen = self.generation
                self._columns = [self.token_columns(record_prompt(gen.tokenizer, p, gen.text_length))
                                 for p in gen.prompts]
            per_prompt, first, stop = self._columns, 0, call.keys
        columns = torch.zeros(call.batch, call.keys)
        layout = call.layout
        for i, row in enumerate(layout.cond_rows):
            prompt = layout.prompt_of_image(i)
            cols = [first + c for c in per_prompt[min(prompt, len(per_prompt) - 1)] if c < stop]
            columns[row, cols] = 1.0
        pm = 1.0 + columns[:, None, None, :] * (factor[None, :, None, None] - 1.0)
        return pm.to(call.device, non_blocking=True)


    def _text_columns(self, call: AttentionCall) -> List[List[int]]:
        """MM-DiT: per prompt, the token columns within the joint text."""
        if self._joint_columns is None:
            segment = generation_segment(self.generation.segments, self.text, type(self).__name__)
            self._joint_columns = [[segment.start + c for c in self.token_columns(
                record_prompt(segment.tokenizer, prompt, segment.length))] for prompt in segment.prompts]
        return self._joint_columns


class OrderedWeakening(_HeadTokenController):
    """Multiply every prompt token's probabilities by ``factor`` (default -2) in the k heads
    most (``order="most"``, MoRHF) or least (``"least"``, LeRHF) relevant to ``concept``,
    conditional half only. Prompt tokens: every token of the prompt's words (not the start,
    end or padding tokens). Flux / SD3: ``text``, see the base class."""

    def __init__(self, hrv: HeadRelevance, concept: str, k: int, *, order: str = "most",
                 factor: float = -2.0, text: str = "t5"):
        self.concept, self.k, self.order, self.factor = concept, k, order, float(factor)
        super().__init__(hrv, text)

    def head_factors(self) -> torch.Tensor:
        heads = self.hrv.ranked_heads(self.concept, self.k, self.order)
        f = torch.ones(self.hrv.num_heads)
        f[heads] = self.factor
        return f

    def token_columns(self, prompt) -> List[int]:
        return [p for _, pos in prompt.words for p in pos]


class ConceptAdjusting(_HeadTokenController):
    """P[h, :, t] *= 2·HRV_desired[h] - HRV_undesired[h] at the token columns t of ``word``,
    conditional half only (the official concept adjusting, reduce_misinterpretation*.ipynb).

    ``occurrence="all"`` (the official ``get_equalizer``): every occurrence of the word in
    a prompt; an int picks one (0: the first).
    ``clamp``: a number c is the official clamping (an upper bound: min(HRV, c) for both
    vectors; the official notebooks use 9); a pair (lo, hi) clamps both ways (an attnctl
    extension); None: no clamp (the official default). Flux / SD3: ``text``, see the base
    class."""

    def __init__(self, hrv: HeadRelevance, word: str, desired: str, undesired: str, *,
                 clamp: Union[None, float, Tuple[float, float]] = None, occurrence: Union[str, int] = "all",
                 text: str = "t5"):
        self.word, self.desired, self.undesired = word, desired, undesired
        self.clamp, self.occurrence = _clamp_bounds(clamp), _occurrence(occurrence)
        super().__init__(hrv, text)

    def head_factors(self) -> torch.Tensor:
        d, u = self.hrv.vector(self.desired), self.hrv.vector(self.undesired)
        if self.clamp is not None:
            d, u = d.clamp(*self.clamp), u.clamp(*self.clamp)
        return 2 * d - u

    def token_columns(self, prompt) -> List[int]:
        return _word_columns(prompt, self.word, self.occurrence)


def _clamp_bounds(clamp) -> Optional[Tuple[Optional[float], Optional[float]]]:
    """None, an upper bound c (-> (None, c)) or a pair (lo, hi)."""
    if clamp is None:
        return None
    if isinstance(clamp, (int, float)) and not isinstance(clamp, bool):
        return None, float(clamp)
    if (not isinstance(clamp, (tuple, list)) or len(clamp) != 2
            or not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in clamp) or clamp[0] > clamp[1]):
        raise ValueError(f"clamp: expected an upper bound (the official clamping value), a pair (lo, hi) with "
                         f"lo <= hi, or None, got {clamp!r}")
    return float(clamp[0]), float(clamp[1])


def _occurrence(occurrence) -> Union[str, int]:
    if occurrence == "all" or (isinstance(occurrence, int) and not isinstance(occurrence, bool) and occurrence >= 0):
        return occurrence
    raise ValueError(f"occurrence: expected 'all' or the index of one occurrence (0 = first), got {occurrence!r}")


def _word_columns(prompt, word: str, occurrence: Union[str, int]) -> List[int]:
    """Token columns of ``word`` in a recorded prompt: every occurrence, or one."""
    if occurrence != "all":
        return prompt.positions(word, occurrence)
    prompt.positions(word)            # raises, naming the prompt, when the word is absent
    query = query_words(word)
    texts = [text for text, _ in prompt.words]
    starts = [i for i in range(len(texts) - len(query) + 1) if texts[i:i + len(query)] == query]
    return [p for i in starts for _, pos in prompt.words[i:i + len(query)] for p in pos]


class ConceptStrengthening:
    """The official P2P-HRV concept strengthening (SNU-DRL/HRV applications/p2p_hrv.py,
    ``use_soft_vector``), given to a prompt-to-prompt edit:
    ``Replace(cross_steps=.8, self_steps=.9, strengthen=ConceptStrengthening(hrv, "red", "Color"))``.

    In a target's conditional cross-attention, from step ``start_step`` on (the official
    ``token_restoration_start_step``, default 0), the edited map at the token columns of
    ``word`` (every occurrence, in each target prompt that has it) is restored to the
    target's own map scaled per head by HRV_concept[h], inside the word's replace window;
    outside the window the target keeps its own map unscaled (the original's
    R·α + P_tgt·(1 - α) with R's word columns = P_tgt·HRV). Before ``start_step`` the edit
    is the plain edit. ``clamp`` (an upper bound or a pair (lo, hi)) clamps the HRV first:
    an attnctl extension (the official uses the vector as it is)."""

    def __init__(self, hrv: HeadRelevance, word: str, concept: str, *, start_step: int = 0,
                 clamp: Union[None, float, Tuple[float, float]] = None):
        if not isinstance(hrv, HeadRelevance):
            raise TypeError(f"hrv: expected an attnctl HeadRelevance, got {type(hrv).__name__}")
        if not isinstance(word, str) or not word.strip():
            raise ValueError(f"word: expected a non-empty string, got {word!r}")
        if isinstance(start_step, bool) or not isinstance(start_step, int) or start_step < 0:
            raise ValueError(f"start_step: expected a non-negative int (a denoising step index), got {start_step!r}")
        self.hrv, self.word, self.concept, self.start_step = hrv, word, concept, start_step
        self.clamp = _clamp_bounds(clamp)
        vector = hrv.vector(concept)
        self._vector = vector.clamp(*self.clamp) if self.clamp is not None else vector
        self._offsets = hrv.offsets()

    def layer_factors(self, layer: str, heads: int) -> torch.Tensor:
        """HRV_concept of the ``heads`` heads of ``layer``, (heads,)."""
        return _layer_slice(self.hrv, self._offsets, self._vector, layer, heads)


def _layer_slice(hrv: HeadRelevance, offsets, vector: torch.Tensor, layer: str, heads: int) -> torch.Tensor:
    where = offsets.get(layer)
    if where is None:
        raise ValueError(f"hrv: layer {layer} is not in this HRV (built for "
                         f"{hrv.model_id or 'another model'} with {len(hrv.layers)} layers)")
    start, expected = where
    if expected != heads:
        raise ValueError(f"hrv: layer {layer} has {heads} heads, the HRV expects {expected}")
    return vector[start:start + heads].float()
