"""The controller protocol: what a processor tells controllers, and what they answer.

Per attention call the processor describes the call (:class:`AttentionCall`) and asks each
installed :class:`Controller` for a :class:`Plan`. A controller answers ``None`` when it
has nothing to do on that call. The plans of several controllers compose into the single
op call (see :mod:`attnctl.diffusers.compose`):

* ``bias``      pre-softmax logits; biases add.
* ``prob_mult`` post-softmax factors on the numerator (no renormalisation); they multiply.
* ``capture``   an :class:`attnctl.Capture` whose buffers the controller owns, shaped for
  this call's (B, H, M, N); the op adds P's statistics into them. Several captures are
  served by one kernel pass and routed back (at most one of them may carry probe keys).
* ``regions``   an :class:`attnctl.Regions` (per-query / per-key labels and a strength):
  a post-softmax factor the kernel computes from the labels; it multiplies with the
  prob_mults. Only one controller per call may give regions.
* ``source``    injection (prompt-to-prompt): a (B,) int tensor, row b's attention
  probabilities computed from row source[b]'s q, k and bias (the op's ``source``).
  Only one controller per call may give it.
* ``value_map`` with ``source``: a (B, N, N) matrix W per row, or (B, H|1, N, N) per
  head; the injected term reads values W[b] @ v[b], so P_src·(W·V) = (P_src·W)·V without
  any (M, N) tensor.
* ``own_prob_mult`` with ``source``: the two-source form. The call's output becomes
  (P_src·f)·(W·V) + (P_b·own_prob_mult)·V, each term with its own normaliser (one op
  call with ``own=``); broadcastable to (B, H, M, N), zero where a row has no own term.
  Other controllers' prob_mults multiply both terms.
* ``own_capture`` with ``own_prob_mult``: a Capture of the second (own) term's P, owned
  by the injecting controller (other controllers' captures see the injected term).
* ``value_states`` with ``state_rows``: text encoder states (K, R|1, N, C) whose values
  replace the call's values on the batch rows ``state_rows`` (a range of R rows): the
  layer's own ``to_v`` projects each of the K encodings and the projections are averaged,
  so P·mean_k(V_k) = mean_k(P·V_k) costs one attention pass (structured diffusion
  guidance). P still comes from the call's keys.
* ``key_states`` with ``state_rows``: text encoder states (K, R|1, N, C) whose keys
  (the layer's ``to_k``) each give the rows ``state_rows`` their own softmax; those rows'
  output is the mean of the K attention outputs (one op call over K·R extra batch rows).
  It composes with no other control on the call.
* ``maps``      a :class:`MapsRequest`: the call's per-head maps at some token columns
  as a differentiable tensor (``attnctl.attention_with_maps``), handed to the request's
  ``receive``; for methods that optimise against the maps (Attend-and-Excite). Only one
  controller per call may ask, and not with captures or injection.

Every tensor a controller returns must broadcast to (B, H, M, N) of the call and live on
``call.device``. Controllers should cache what they return per layer (and per step when it
changes with the step): ``plan`` runs on every attention call of the denoising loop, so it
must not loop over tokens, sync the device or allocate (B, H, M, N) tensors.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Tuple
import weakref

import torch

from ..capture import Capture
from ..regions import Regions


@dataclass(frozen=True)
class BatchLayout:
    """Which batch rows of a UNet call are what.

    With classifier-free guidance the pipelines concatenate [uncond; cond] along the
    batch, so rows ``[0, rows/2)`` are unconditional and the rest conditional. Within a
    half, row ``i`` is image ``i`` of the generation, made from prompt
    ``i // images_per_prompt``.

    ``half`` ("cond" or "uncond") marks a call that holds one CFG half only: WanPipeline
    calls its transformer once per half, so ``cfg`` is False and every row is of ``half``.
    """

    rows: int
    cfg: bool
    images_per_prompt: int = 1
    half: Optional[str] = None

    @property
    def images(self) -> int:
        return self.rows // 2 if self.cfg else self.rows

    @property
    def uncond_rows(self) -> range:
        if self.half is not None:
            return range(self.rows) if self.half == "uncond" else range(0)
        return range(0, self.images) if self.cfg else range(0)

    @property
    def cond_rows(self) -> range:
        if self.half == "uncond":
            return range(0)
        return range(self.rows - self.images, self.rows)

    def rows_of(self, half: str) -> range:
        """Rows of ``half`` ("cond" or "uncond")."""
        if half == "cond":
            return self.cond_rows
        if half == "uncond":
            if not self.cfg and self.half is None:
                raise ValueError("half: 'uncond' was requested but this generation ran without "
                                 "classifier-free guidance, so it has no unconditional rows")
            return self.uncond_rows
        raise ValueError(f"half: expected 'cond' or 'uncond', got {half!r}")

    def row(self, image: int, half: str = "cond") -> int:
        """The batch row of ``image`` in ``half``."""
        rows = self.rows_of(half)
        if not 0 <= image < len(rows):
            raise IndexError(f"image: expected an index in [0, {len(rows)}), got {image}")
        return rows[image]

    def prompt_of_image(self, image: int) -> int:
        return image // self.images_per_prompt


class DenoiseStep:
    """The denoising step a UNet call belongs to: its index in the pipeline's loop, the
    timestep passed to the UNet and the scheduler (for ``sigma``)."""

    __slots__ = ("index", "timestep", "_scheduler", "_sigma")

    def __init__(self, index: int, timestep, scheduler=None):
        self.index = index
        self.timestep = timestep
        self._scheduler = scheduler
        self._sigma: Optional[float] = None

    @property
    def num_steps(self) -> Optional[int]:
        """The scheduler's number of inference steps (None when no scheduler is known)."""
        return getattr(self._scheduler, "num_inference_steps", None)

    @property
    def num_calls(self) -> Optional[int]:
        """Model calls the scheduler's timesteps make (``num_steps``, but 2N - 1 for Heun);
        None when no scheduler is known."""
        timesteps = getattr(self._scheduler, "timesteps", None)
        return len(timesteps) if timesteps is not None else self.num_steps

    @property
    def sigma(self) -> float:
        """The noise level σ of this step: the scheduler's ``sigmas[index]`` (k-diffusion
        style schedulers) or sqrt((1 - ᾱ_t) / ᾱ_t) from ``alphas_cumprod`` (DDPM style).

        Computed on first use only: reading a device timestep syncs the device once.
        """
        if self._sigma is None:
            self._sigma = _sigma_of(self._scheduler, self.index, self.timestep)
        return self._sigma


_host_timesteps: dict = {}   # id(scheduler.timesteps) -> (weak reference, its values as a list)


def _host_timestep(scheduler, index: int, timestep) -> int:
    """The step's timestep as an int without reading the device tensor the model got (a
    host sync per step): the scheduler's timesteps, read on the host once per schedule
    (set_timesteps makes a new tensor), at the index that ``sigmas`` shares."""
    steps = getattr(scheduler, "timesteps", None)
    if not isinstance(steps, torch.Tensor) or index >= steps.numel():
        return int(timestep)
    entry = _host_timesteps.get(id(steps))
    if entry is None or entry[0]() is not steps:
        if len(_host_timesteps) > 16:
            _host_timesteps.clear()
        entry = _host_timesteps[id(steps)] = (weakref.ref(steps), [int(t) for t in steps.tolist()])
    return entry[1][index]


def _sigma_of(scheduler, index: int, timestep) -> float:
    if scheduler is None:
        raise RuntimeError("sigma: no scheduler is known for this call (install attnctl on a pipeline, "
                           "not on a bare UNet, to get the scheduler's noise levels)")
    sigmas = getattr(scheduler, "sigmas", None)
    if isinstance(sigmas, torch.Tensor) and index < sigmas.numel():
        return float(sigmas[index])
    alphas = getattr(scheduler, "alphas_cumprod", None)
    if isinstance(alphas, torch.Tensor):
        a = float(alphas[_host_timestep(scheduler, index, timestep)])
        return ((1.0 - a) / a) ** 0.5
    raise RuntimeError(f"sigma: scheduler {type(scheduler).__name__} has neither sigmas nor alphas_cumprod")


class AttentionCall:
    """One attention call as a controller sees it.

    Attributes:
        layer: the attention module's name in the UNet, e.g.
            ``"down_blocks.0.attentions.0.transformer_blocks.0.attn2"``.
        is_cross: True for cross-attention (keys are text tokens).
        grid: (h, w) of the query positions, derived from the latent size seen by the UNet
            and the layer's downsampling (any aspect ratio); None when unknown (a UNet
            called outside a hooked forward with a 3-D input).
        latent: (h, w) of the latent the UNet received (None when unknown).
        factor: the layer's downsampling relative to the latent, a power of two (1, 2, 4,
            8 in SD); None when the grid is unknown.
        step: the :class:`DenoiseStep` (``step.index`` counts UNet calls since the
            generation started: one per denoising step, with or without CFG).
        layout: the :class:`BatchLayout` of the rows.
        batch, heads, queries, keys, head_dim: B, H, M, N, D of the op call.
        device, dtype: those of q.
        query, key: the call's q (B, H, M, D) and k (B, H, N, D) themselves (views, read
            only), for controls that depend on the logits (paint-with-words' logit max).
        backend: the attention backend of the installation ("auto", "triton", ...).
        scale: the softmax scale of the layer (``attn.scale``; 1/sqrt(head_dim) if unknown).
        joint: on MM-DiT joint attention (Flux, SD3) an
            :class:`attnctl.diffusers.joint.JointLayout`: which query rows / key columns
            are text and which image, the image token grid, the block kind and index;
            None on UNet layers. There ``is_cross`` is False, ``grid`` and ``latent`` are
            the image token grid and ``factor`` is 1.
        frames: latent frames after patchify of a video model's queries (Wan), 1 for
            images. The queries are the frames one after the other, each on ``grid``:
            query ``(f·h + y)·w + x``.
        context: what a cross-attention call's keys are: "text", or "image" for the CLIP
            image-context tokens a Wan I2V layer attends to in a second call (whose output
            is added to the text call's).
        family: the model the call belongs to: "unet" (SD 1.x / 2.x / SDXL), "flux", "sd3"
            (MM-DiT joint attention), "pixart", "sana" or "wan" (cross-attention
            transformers); None for a call described outside an installation.
    """

    __slots__ = ("layer", "is_cross", "grid", "factor", "latent", "step", "layout", "batch", "heads",
                 "queries", "keys", "head_dim", "device", "dtype", "query", "key", "backend", "scale", "joint",
                 "frames", "context", "family")

    def __init__(self, layer: str, is_cross: bool, grid: Optional[Tuple[int, int]],
                 factor: Optional[int], latent: Optional[Tuple[int, int]], step: DenoiseStep,
                 layout: BatchLayout, q: torch.Tensor, k: torch.Tensor, backend: str = "auto",
                 scale: Optional[float] = None):
        self.layer = layer
        self.is_cross = is_cross
        self.grid = grid
        self.factor = factor
        self.latent = latent
        self.step = step
        self.layout = layout
        self.batch, self.heads, self.queries, self.head_dim = q.shape
        self.keys = k.shape[2]
        self.device = q.device
        self.dtype = q.dtype
        self.query = q
        self.key = k
        self.backend = backend
        self.scale = float(scale) if scale is not None else self.head_dim ** -0.5
        self.joint = None
        self.frames = 1
        self.context = "text"
        self.family: Optional[str] = None

    def __repr__(self) -> str:
        return (f"AttentionCall({self.layer}, cross={self.is_cross}, grid={self.grid}, "
                f"step={self.step.index}, B={self.batch}, H={self.heads}, M={self.queries}, N={self.keys})")


@dataclass(frozen=True)
class MapsRequest:
    """Differentiable maps of one call: ``tokens`` (T,) or (B, T) key columns; the
    processor calls ``receive(head_maps)`` with ``P[b, h, m, tokens[b, t]]``, (B, H, M, T)
    fp32, through which gradients flow into the call's q and k (and so into the latent)."""

    tokens: torch.Tensor
    receive: Callable[[torch.Tensor], None]


@dataclass
class Plan:
    """What a controller wants applied to, and captured from, one attention call.

    Later controls extend this class with new optional fields; each new field needs a
    composition rule in :func:`attnctl.diffusers.compose.compose`, which refuses plans
    whose fields it does not know how to combine.
    """

    bias: Optional[torch.Tensor] = None
    prob_mult: Optional[torch.Tensor] = None
    capture: Optional[Capture] = None
    regions: Optional[Regions] = None
    source: Optional[torch.Tensor] = None
    value_map: Optional[torch.Tensor] = None
    own_prob_mult: Optional[torch.Tensor] = None
    own_capture: Optional[Capture] = None
    value_states: Optional[torch.Tensor] = None
    key_states: Optional[torch.Tensor] = None
    state_rows: Optional[range] = None
    maps: Optional[MapsRequest] = None


class Controller:
    """Base class of controllers. Override ``plan``; the hooks are optional.

    A controller is attached to an installation (``attnctl.install(pipe, controller)`` or
    ``installation.add(controller)``) and is asked, per attention call, what to do.
    """

    def plan(self, call: AttentionCall) -> Optional[Plan]:
        """The plan for ``call``, or None to leave it alone."""
        return None

    def on_generation_start(self, generation) -> None:
        """A pipeline call began (its prompts and batch layout are in ``generation``, an
        :class:`attnctl.diffusers.install.Generation`)."""

    def on_step(self, step: DenoiseStep, layout: BatchLayout) -> None:
        """A UNet forward is about to run (once per denoising step)."""

    def on_output(self, call: AttentionCall, value: torch.Tensor, out: torch.Tensor) -> None:
        """MM-DiT joint layers only: the call's values ``value`` (B, H, N, Dv) and the op's
        output ``out`` (B, H, M, Dv), right after the attention and before the output
        projections; read only (tools that work in the attention's output space, e.g.
        ConceptAttention, take their vectors from here)."""
