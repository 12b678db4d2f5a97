"""``attnctl.concept_attention(pipe, concepts)``: ConceptAttention maps of a Flux generation
(Helbling et al., ICML 2025, arXiv 2502.04320), with the concept attention fused.

What the original (helblazer811/ConceptAttention, ``concept_attention/flux``: the paper's
``ConceptAttentionFluxPipeline``) computes, and this tool replays:

The concept stream itself (the concept rows through the blocks' text side) is
:mod:`attnctl.tools.concept_stream`, shared with HRV construction on Flux / SD3.

* Concepts: each concept word is encoded alone by the pipeline's T5 (padded to the
  prompt's T5 length, no mask, as the prompt is) and its first token's state kept; the
  pooled vector of the concept stream is zero. The concept stream's modulation is the
  model's time (and guidance) embedding of that zero vector.
* In every double-stream block the concepts run through the text side of the block
  (``norm1_context``, ``add_q/k/v_proj``, ``norm_added_q/k``, ``to_add_out``,
  ``norm2_context``, ``ff_context``) beside the prompt, without entering the prompt-image
  attention: the image is exactly what it is without concepts.
* Concept queries attend over the concept keys and the image keys (RoPE on both; the
  concepts' positions are 0, where RoPE is the identity), not over the prompt.
* Maps live in the attention's output space: per block, the concept rows' output
  (before ``to_add_out``) times the image rows' output of the prompt-image attention
  (before ``to_out``), heads concatenated: (B, C, P); a softmax over the concepts; the mean
  over the selected blocks (default 15-18 of 19) and steps (default all).

The fused form: the prompt-image attention is the installation's ordinary fused call; the
concept attention adds one op call per block whose only query rows are the C concepts
(the original runs C + P query rows and drops the P image rows). The image rows' output
comes from the ordinary call (``Controller.on_output``), the (B, C, P) products are
formed and accumulated on the device, in fp32 after the softmax; nothing goes to the host
until read. Blocks after the last selected one skip the concept stream.

The cross-attention baseline the paper compares against (the original returns it beside
the maps: ``cross_attention_maps``) comes with ``cross_attention=True``: the same
softmax and mean of the products of the concept queries and the image queries (after
the q norm, before RoPE; the installation's call holds the RoPE'd image q, which is
rotated back by the transformer's own RoPE angles).

The original repository also holds a diffusers port (``concept_attention/diffusers/flux``)
that differs: blocks 10-17 by default and products of the vectors after the output
projections. This tool follows the paper's pipeline above.

Deviations, all from the original's generality: any batch (every row gets the concepts),
any aspect ratio (maps on the image token grid; the original reshapes to 64 x 64), and the
softmax and mean in fp32 (the original's run in the model's dtype).
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch

from ..diffusers.controller import AttentionCall, BatchLayout, Controller, DenoiseStep
from ..diffusers.install import install, installation_of
from ..diffusers.joint import DOUBLE
from ..diffusers.mmdit import FLUX
from ..op import attention
from . import concept_stream
from .maps import HeatMap

# The original pipeline's default blocks (``layer_indices=list(range(15, 19))``): the last
# four of Flux's 19 double-stream blocks.
DEFAULT_LAYERS = tuple(range(15, 19))


class ConceptMaps:
    """Maps of one generation: ``maps`` (B, C, h, w) fp32 on the device, the mean over the
    selected blocks and steps of softmax-over-concepts output-space products."""

    def __init__(self, maps: torch.Tensor, concepts: Sequence[str], layers: Sequence[int], steps: Sequence[int]):
        self.maps = maps
        self.concepts = list(concepts)
        self.layers = list(layers)
        self.steps = list(steps)

    def map(self, concept: str, image: int = 0) -> HeatMap:
        """The (h, w) map of ``concept`` for batch row ``image``."""
        if concept not in self.concepts:
            raise KeyError(f"concept: expected one of {self.concepts}, got {concept!r}")
        if not 0 <= image < self.maps.shape[0]:
            raise IndexError(f"image: expected an index in [0, {self.maps.shape[0]}), got {image}")
        return HeatMap(self.maps[image, self.concepts.index(concept)], concept)

    def plot(self, image, path: str, *, row: int = 0, columns: int = 4) -> None:
        """One panel per concept of batch row ``row``, over ``image`` (None: the maps
        alone), written to ``path``; colours
        scaled by the min and max over all concepts of the row, as the original does."""
        from .plot import overlay_grid

        maps = self.maps[row].detach().float().cpu()
        maps = (maps - maps.min()) / (maps.max() - maps.min() + 1e-8)
        overlay_grid([HeatMap(m, c) for m, c in zip(maps, self.concepts)], image, path=path, columns=columns,
                     normalize=False)

    def save(self, path: str) -> None:
        """safetensors: ``maps`` and the concepts, blocks and steps as metadata."""
        from safetensors.torch import save_file

        save_file({"maps": self.maps.detach().cpu().contiguous()}, path,
                  metadata={"concepts": "\n".join(self.concepts), "layers": ",".join(map(str, self.layers)),
                            "steps": ",".join(map(str, self.steps))})


OUTPUT, CROSS_ATTENTION = "output", "cross_attention"


class ConceptAttentionController(Controller):
    """Runs the concept stream and accumulates the maps; see :func:`concept_attention`."""

    def __init__(self, concepts: Sequence[str], *, layers=DEFAULT_LAYERS, steps=None, softmax: bool = True,
                 cross_attention: bool = False):
        if isinstance(concepts, str) or not isinstance(concepts, Sequence) or not concepts:
            raise ValueError(f"concepts: expected a non-empty list of words, got {concepts!r}")
        bad = [c for c in concepts if not isinstance(c, str) or not c.strip()]
        if bad:
            raise ValueError(f"concepts: expected non-empty strings, got {bad!r}")
        self.concepts = list(concepts)
        self.layers = _indices(layers, "layers")
        if not self.layers:
            raise ValueError("layers: expected at least one double-stream block index, got none")
        self.steps = frozenset(_indices(steps, "steps")) if steps is not None else None
        self.softmax = bool(softmax)
        self.cross_attention = bool(cross_attention)
        self.transformer = None
        self.text_encoder = self.tokenizer = None
        self._stream: Optional[concept_stream.ConceptStream] = None
        self._embeds: Dict[Tuple[int, torch.device, torch.dtype], torch.Tensor] = {}
        self._step = 0
        self._sums: Dict[str, torch.Tensor] = {}
        self._count = 0
        self._grid: Optional[Tuple[int, int]] = None
        self._steps_seen: List[int] = []

    # ---- set-up by ConceptAttention ----------------------------------------------------
    def attach(self, transformer, tokenizer, text_encoder) -> None:
        blocks = len(transformer.transformer_blocks)
        outside = [i for i in self.layers if not 0 <= i < blocks]
        if outside:
            raise ValueError(f"layers: expected double-stream block indices in [0, {blocks}), got {outside} "
                             f"(the default is the original's {list(DEFAULT_LAYERS)}, Flux's last four)")
        if tokenizer is None or text_encoder is None:
            raise ValueError("pipe: ConceptAttention encodes the concepts with the pipeline's T5 "
                             "(tokenizer_2, text_encoder_2); this pipeline has none")
        self.transformer, self.tokenizer, self.text_encoder = transformer, tokenizer, text_encoder

    # ---- protocol -----------------------------------------------------------------------
    def on_generation_start(self, generation) -> None:
        self._sums, self._count, self._grid, self._steps_seen = {}, 0, None, []

    def on_step(self, step: DenoiseStep, layout: BatchLayout) -> None:
        self._step = step.index

    def before_transformer(self, module, args, kwargs) -> None:
        """Forward pre-hook of the transformer: the concept stream's start for this step."""
        self._stream = None
        if self.steps is not None and self._step not in self.steps:
            return
        text = kwargs["encoder_hidden_states"]
        model = self.transformer
        embeds = self._concept_embeds(text.shape[1], text.device, model.context_embedder.weight.dtype)
        # The transformer's own time / guidance embedding, of a zero pooled vector (the
        # original's concept_vec is zeros_like(clip(...))).
        self._stream = concept_stream.start(model, FLUX, kwargs, embeds, pooled="zero", rope=self.cross_attention)
        if self._step not in self._steps_seen:
            self._steps_seen.append(self._step)

    def _concept_embeds(self, length: int, device, dtype) -> torch.Tensor:
        """(C, joint_attention_dim): each concept's first T5 state, the concept padded to
        ``length`` tokens like the prompt (cached per length, device and dtype)."""
        key = (length, device, dtype)
        if key not in self._embeds:
            encoder = self.text_encoder
            ids = self.tokenizer(self.concepts, padding="max_length", max_length=length, truncation=True,
                                 return_tensors="pt").input_ids.to(next(encoder.parameters()).device)
            with torch.no_grad():
                states = encoder(ids, output_hidden_states=False)[0]
            self._embeds[key] = states[:, 0].to(device=device, dtype=dtype)
        return self._embeds[key]

    def on_output(self, call: AttentionCall, value: torch.Tensor, out: torch.Tensor) -> None:
        stream, joint = self._stream, call.joint
        if stream is None or joint is None or joint.block != DOUBLE or joint.index > self.layers[-1]:
            return
        step = stream.enter(self.transformer, joint)
        q, k, v = step.q, step.k, step.v
        image = slice(joint.image.start, joint.image.stop)
        # Concept queries over [concept keys; image keys]: C query rows, C + P key columns.
        keys = torch.cat([k, call.key[:, :, image]], dim=2)
        values = torch.cat([v, value[:, :, image]], dim=2)
        concept_out = attention(q, keys, values, backend=call.backend)
        concept_out = concept_out.transpose(1, 2).flatten(2).to(stream.states.dtype)  # (B, C, H·D)
        if joint.index in self.layers:
            self._accumulate(OUTPUT, torch.bmm(concept_out, out.transpose(1, 2)[:, image].flatten(2)
                                               .to(concept_out.dtype).transpose(1, 2)), joint.grid)
            if self.cross_attention:
                self._accumulate(CROSS_ATTENTION, torch.einsum("bhcd,bhpd->bcp", q, _unrotated(
                    call.query[:, :, image], stream.rope, image).to(q.dtype)), joint.grid)
            self._count += 1
        if joint.index < self.layers[-1]:
            stream.advance(step, concept_out)

    def _accumulate(self, space: str, scores: torch.Tensor, grid: Tuple[int, int]) -> None:
        """Adds the (B, C, P) products of one block and step (softmax over C) into fp32."""
        scores = scores.float()
        if self.softmax:
            scores = scores.softmax(dim=1)
        held = self._sums.get(space)
        if held is None:
            self._sums[space], self._grid = torch.zeros_like(scores), grid
        elif held.shape != scores.shape:
            raise RuntimeError(f"concept_attention: the (B, C, P) maps changed shape within a generation "
                               f"{tuple(held.shape)} -> {tuple(scores.shape)}")
        self._sums[space] += scores

    def result(self, space: str = OUTPUT) -> ConceptMaps:
        if space == CROSS_ATTENTION and not self.cross_attention:
            raise RuntimeError("cross_attention_maps: the baseline is captured only when asked for: "
                               "concept_attention(pipe, concepts, cross_attention=True)")
        if space not in self._sums:
            raise RuntimeError("concept_attention: no map was captured yet (run the pipeline inside "
                               "`with attnctl.concept_attention(pipe, concepts) as ca:`; the steps filter "
                               "may exclude every step)")
        h, w = self._grid
        maps = (self._sums[space] / self._count).unflatten(2, (h, w))
        return ConceptMaps(maps, self.concepts, self.layers, sorted(self._steps_seen))


def _unrotated(query: torch.Tensor, rope, image: slice) -> torch.Tensor:
    """The image rows' q (B, H, P, D) before RoPE: the rotation by the negated angles."""
    from diffusers.models.embeddings import apply_rotary_emb

    cos, sin = (x[image] for x in rope)
    return apply_rotary_emb(query, (cos, -sin), sequence_dim=2)


def _indices(values, name: str) -> List[int]:
    if values is None:
        return []
    if isinstance(values, int) and not isinstance(values, bool):
        values = [values]
    try:
        out = sorted({int(v) for v in values})
    except (TypeError, ValueError):
        raise TypeError(f"{name}: expected an int or an iterable of ints, got {values!r}") from None
    return out


class ConceptAttention:
    """Context manager returned by :func:`concept_attention`."""

    def __init__(self, pipe, controller: ConceptAttentionController, backend: Optional[str]):
        self.pipe = pipe
        self.controller = controller
        self.backend = backend
        self.installation = None
        self._owns_installation = False
        self._hook = None

    def __enter__(self) -> "ConceptAttention":
        self._owns_installation = installation_of(self.pipe) is None
        self.installation = install(self.pipe, backend=self.backend)
        try:
            installation = self.installation
            if installation.family != FLUX:
                raise ValueError(f"pipe: ConceptAttention runs on Flux's double-stream blocks; expected a "
                                 f"FluxPipeline, got {type(self.pipe).__name__}")
            self.controller.attach(installation.model, getattr(self.pipe, "tokenizer_2", None),
                                   getattr(self.pipe, "text_encoder_2", None))
            self._hook = installation.model.register_forward_pre_hook(self.controller.before_transformer,
                                                                      with_kwargs=True)
            installation.add(self.controller)
        except Exception:
            self._close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self._close()

    def _close(self) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        if self.installation is not None:
            if self.controller in self.installation.controllers:
                self.installation.remove(self.controller)
            if self._owns_installation:
                self.installation.uninstall()

    def maps(self) -> ConceptMaps:
        """The latest generation's ConceptAttention maps (raises before any generation)."""
        return self.controller.result(OUTPUT)

    def cross_attention_maps(self) -> ConceptMaps:
        """The latest generation's cross-attention baseline (needs ``cross_attention=True``)."""
        return self.controller.result(CROSS_ATTENTION)


def concept_attention(pipe, concepts: Sequence[str], *, layers=DEFAULT_LAYERS, steps=None, softmax: bool = True,
                      cross_attention: bool = False, backend: Optional[str] = None) -> ConceptAttention:
    """ConceptAttention maps of a Flux pipeline's generations::

        with attnctl.concept_attention(pipe, ["dragon", "rock", "sky"]) as ca:
            image = pipe("a dragon standing on a rock").images[0]
        ca.maps().plot(image, "concepts.png")

    Args:
        concepts: the concept words (any number); each is encoded alone by T5.
        layers: double-stream block indices whose maps are averaged (default the original's
            15-18 of Flux's 19).
        steps: denoising step indices averaged (default all, as the original); the concept
            stream runs only on these steps.
        softmax: softmax over the concepts per block and step before the mean (the
            original's default); False averages the raw output-space products.
        cross_attention: also keep the cross-attention baseline (concept q · image q,
            read with ``cross_attention_maps()``), as the original returns beside the maps.
        backend: the attention backend ("auto" picks the fused Triton kernel on CUDA).

    The generated image is unchanged. If attnctl is not installed on ``pipe`` this installs
    it and uninstalls on exit. See the module doc for the math and the deviations.
    """
    return ConceptAttention(pipe, ConceptAttentionController(
        concepts, layers=layers, steps=steps, softmax=softmax, cross_attention=cross_attention),
                            backend)
