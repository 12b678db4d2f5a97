"""``attnctl.trace(pipe)``: cross-attention heat maps captured inside the fused kernel.

The trace is a controller. On each cross-attention call it selects (by layer, resolution,
step) and hands the op a Capture whose buffers persist for the generation, so the kernel
adds every step's maps into them: no (B, H, M, N) tensor, no per-call allocation after
the first step, no loop over tokens, no device sync.

By default it captures what DAAM 0.2.0 keeps (see :mod:`attnctl.tools.daam`): DAAM's
layers, every head apart, and the key columns of DAAM's global map (BOS, the prompt's
tokens, the first EOS). Heads stay apart because DAAM clamps each head's map after
upsampling the map summed over steps: a clamp after the step sum cannot be folded per
call, so each head's step sum is kept, for the prompt's columns only.
"""
from __future__ import annotations

from typing import Dict, Iterable, Optional, Tuple

import torch

from ..capture import Capture
from ..diffusers.controller import AttentionCall, BatchLayout, Controller, DenoiseStep, Plan
from ..diffusers.install import Generation, install, installation_of
from .daam import counts_in_daam, is_daam_layer, output_side
from .maps import ALL_STEPS, LayerMaps, TraceMaps, resolution_matches, select_layers
from .words import record_prompt

TOKEN_CHOICES = ("prompt", "all")


class _LayerTrace:
    __slots__ = ("maps", "selected", "head_weights")

    def __init__(self, maps: LayerMaps, selected: bool, head_weights):
        self.maps = maps          # its dicts hold the buffers the kernel accumulates into
        self.selected = selected
        self.head_weights = head_weights


class TraceController(Controller):
    """Captures cross-attention maps and token mass; see :func:`trace` for the options."""

    def __init__(self, *, layers=None, resolutions=None, heads: Optional[Iterable[int]] = None,
                 steps: Optional[Iterable[int]] = None, per_step: bool = False, per_head: bool = True,
                 tokens: str = "prompt", uncond: bool = False):
        if tokens not in TOKEN_CHOICES:
            raise ValueError(f"tokens: expected one of {TOKEN_CHOICES}, got {tokens!r}")
        self.layer_patterns = layers
        self.resolutions = _as_list(resolutions, "resolutions")
        self.heads = sorted(set(_as_list(heads, "heads"))) if heads is not None else None
        self.steps = frozenset(_as_list(steps, "steps")) if steps is not None else None
        self.per_step = bool(per_step)
        self.per_head = bool(per_head)
        self.tokens = tokens
        self.uncond = bool(uncond)
        self.allowed_layers: Optional[frozenset] = None  # set by Trace from the UNet's layers
        self.daam_side: Optional[int] = None  # set by Trace: DAAM's output side for the pipeline
        self.generation: Optional[Generation] = None
        self.texts = None          # the generation's prompts as tokenised, when known
        self.kept_columns: Optional[int] = None  # key columns captured (None: all N)
        self.layout: Optional[BatchLayout] = None
        self.latent: Optional[Tuple[int, int]] = None
        self.steps_run = 0
        self._layers: Dict[str, _LayerTrace] = {}
        self._columns: Dict[Tuple[int, torch.device], torch.Tensor] = {}
        # One Capture for every call, its buffers pointed at the layer's (and step's) own:
        # the op range-checks a tokens tensor once per Capture (a device sync), so sharing
        # it makes that one check per trace instead of one per layer and step.
        self._capture = Capture()
        self._plan = Plan(capture=self._capture)

    def on_generation_start(self, generation: Generation) -> None:
        self.generation = generation
        self._layers = {}  # the previous generation's TraceMaps keep their own buffers
        self.steps_run = 0
        self.texts = None
        if generation.prompts is not None and generation.tokenizer is not None:
            self.texts = [record_prompt(generation.tokenizer, p) for p in generation.prompts]
        # DAAM keeps BOS, the prompt's tokens and the first EOS; for a batch, the longest's.
        self.kept_columns = (max(len(t.tokens) for t in self.texts)
                             if self.tokens == "prompt" and self.texts else None)

    def on_step(self, step: DenoiseStep, layout: BatchLayout) -> None:
        self.layout = layout
        self.steps_run = step.index + 1

    def plan(self, call: AttentionCall) -> Optional[Plan]:
        if not call.is_cross:
            return None
        layer = self._layers.get(call.layer)
        if layer is None:
            layer = self._layers[call.layer] = self._new_layer(call)
        if not layer.selected or (self.steps is not None and call.step.index not in self.steps):
            return None
        key = call.step.index if self.per_step else ALL_STEPS
        maps = layer.maps.maps.get(key)
        if maps is None:
            maps = self._allocate(call, layer, key)
        token_mass = layer.maps.token_mass[key]
        if token_mass.shape != (call.batch, call.heads, call.keys):
            raise RuntimeError(f"trace: layer {call.layer} changed shape within a generation "
                               f"(B, H, N) {tuple(token_mass.shape)} -> {(call.batch, call.heads, call.keys)}")
        capture = self._capture
        capture.token_mass = token_mass
        capture.tokens = self._columns[(maps.shape[-1], call.device)]
        # Only the rows that will be read: the kernel skips capture work for the others.
        capture.rows = None if self.uncond else call.layout.cond_rows
        if self.per_head:
            capture.head_maps = maps
        else:
            capture.maps, capture.head_weights = maps, layer.head_weights
        return self._plan

    def _new_layer(self, call: AttentionCall) -> _LayerTrace:
        if call.grid is None:
            raise RuntimeError(f"trace: the query grid of {call.layer} is unknown (M={call.queries}, "
                               f"latent {call.latent}); the UNet must run through its forward")
        self.latent = call.latent
        selected = (self.allowed_layers is None or call.layer in self.allowed_layers) and (
            self.resolutions is None or resolution_matches(self.resolutions, call.grid, call.factor))
        if self.layer_patterns is None:  # DAAM's selection also goes by its factor of the call
            selected = selected and counts_in_daam(self.daam_side, call.queries)
        weights = None
        if self.heads is not None and not self.per_head:
            weights = torch.zeros(call.heads, device=call.device)
            weights[[h for h in self.heads if h < call.heads]] = 1.0
        maps = LayerMaps(call.layer, call.grid, call.factor, call.heads)
        return _LayerTrace(maps, selected, weights)

    def _allocate(self, call: AttentionCall, layer: _LayerTrace, key: int) -> torch.Tensor:
        B, H, M, N = call.batch, call.heads, call.queries, call.keys
        T = min(self.kept_columns, N) if self.kept_columns is not None else N
        if (T, call.device) not in self._columns:
            self._columns[(T, call.device)] = torch.arange(T, dtype=torch.int32, device=call.device)
        zeros = dict(device=call.device, dtype=torch.float32)
        maps = torch.zeros((B, H, M, T) if self.per_head else (B, M, T), **zeros)
        layer.maps.maps[key] = maps
        layer.maps.token_mass[key] = torch.zeros(B, H, N, **zeros)
        return maps

    def result(self) -> TraceMaps:
        if self.generation is None or self.layout is None:
            raise RuntimeError("trace: no generation has run inside this trace yet; call the pipeline "
                               "inside `with attnctl.trace(pipe) as tc:` before reading maps")
        layers = [l.maps for l in self._layers.values() if l.selected and l.maps.maps]
        if not layers:
            raise RuntimeError("trace: no cross-attention call was captured (the step or resolution "
                               "filters, or DAAM's layer selection at this image size, excluded all of "
                               "them; layers='*' takes every cross-attention layer)")
        gen = self.generation
        return TraceMaps(layers, self.layout, self.latent, gen.image_scale, self.texts, self.per_head,
                         self.per_step, self.heads, self.steps_run, gen.tokenizer, daam_side=self.daam_side,
                         uncond=self.uncond)


def _as_list(value, name: str) -> Optional[list]:
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        value = [value]
    try:
        return list(value)
    except TypeError:
        raise TypeError(f"{name}: expected an int or an iterable, got {type(value).__name__}") from None


class Trace:
    """Context manager returned by :func:`trace`. Inside it, every generation of the pipeline
    is traced; afterwards (or between generations) read the latest generation's maps."""

    def __init__(self, pipe, controller: TraceController, backend: Optional[str]):
        self.pipe = pipe
        self.controller = controller
        self.backend = backend
        self.installation = None
        self._owns_installation = False

    def __enter__(self) -> "Trace":
        self._owns_installation = installation_of(self.pipe) is None
        self.installation = install(self.pipe, backend=self.backend)
        try:
            self._select_layers()
            self.installation.add(self.controller)
        except Exception:
            self._close()
            raise
        return self

    def _select_layers(self) -> None:
        installation, controller = self.installation, self.controller
        cross = installation.cross_layers
        pipe = installation.pipe
        if pipe is not None:
            controller.daam_side = output_side(installation.unet.config.sample_size,
                                               getattr(pipe, "vae_scale_factor", None))
        if controller.layer_patterns is not None:
            controller.allowed_layers = frozenset(select_layers(cross, controller.layer_patterns))
            return
        if controller.daam_side is None:
            what = "a bare UNet" if pipe is None else f"a UNet of sample_size {installation.unet.config.sample_size!r}"
            raise ValueError("layers: DAAM's layer selection (the default) goes by DAAM's factor of each "
                             "call, which needs the pipeline's UNet sample size and VAE factor; got "
                             f"{what}; pass layers='*' (every cross-attention layer) or name patterns")
        controller.allowed_layers = frozenset(n for n in cross if is_daam_layer(n))

    def __exit__(self, *exc) -> None:
        self._close()

    def _close(self) -> None:
        if self.installation is not None:
            self.installation.remove(self.controller)
            if self._owns_installation:
                self.installation.uninstall()

    def maps(self) -> TraceMaps:
        """The latest generation's captures (raises before any generation)."""
        return self.controller.result()

    def heat_map(self, image: int = 0, **filters):
        """See :meth:`TraceMaps.heat_map`."""
        return self.maps().heat_map(image, **filters)

    def word_heat_map(self, word: str, image: int = 0, *, occurrence: Optional[int] = None,
                      match: str = "tokens", **filters):
        """See :meth:`TraceMaps.word_heat_map`."""
        return self.maps().word_heat_map(word, image, occurrence=occurrence, match=match, **filters)

    def save(self, path: str) -> None:
        self.maps().save(path)


def trace(pipe, *, layers=None, resolutions=None, heads=None, steps=None, per_step: bool = False,
          per_head: bool = True, tokens: str = "prompt", uncond: bool = False,
          backend: Optional[str] = None) -> Trace:
    """Trace cross-attention heat maps of an SD 1.x / 2.x / SDXL pipeline::

        with attnctl.trace(pipe) as tc:
            image = pipe("a cat on a hamburger").images[0]
        tc.word_heat_map("cat").plot(image, "cat.png")

    The defaults capture what DAAM 0.2.0 needs to give its result exactly.

    Args:
        layers: None (DAAM's layers: down and up blocks, not the mid block, and only the
            levels DAAM's factor rule keeps, see attnctl.tools.daam); or names to match
            (globs, or substrings without wildcards), ``"*"`` for every cross-attention layer.
        resolutions: only these downsampling factors (1 = latent grid, 2, 4, 8) or (h, w) grids.
        heads: only these head indices.
        steps: only these denoising step indices.
        per_step: keep each step's maps apart (select steps afterwards).
        per_head: True (DAAM): keep each head's maps apart, so each head is clamped after
            upsampling, as DAAM does; False: sum the heads in the kernel (H times less
            memory; the clamp then acts on the sum, which differs where bicubic undershoot
            differs in sign between heads).
        tokens: "prompt" (DAAM): capture BOS, the prompt's tokens and the first EOS (the
            columns of DAAM's global map; every column when the prompt text is unknown);
            "all": every key column, padding included.
        uncond: also capture CFG's unconditional half (for ``heat_map(half="uncond")``); by
            default only the conditional rows are captured and the kernel does no capture
            work for the others.
        backend: the attention backend ("auto" picks the fused Triton kernel on CUDA).

    If attnctl is not installed on ``pipe`` the trace installs it and uninstalls on exit.
    """
    controller = TraceController(layers=layers, resolutions=resolutions, heads=heads, steps=steps,
                                 per_step=per_step, per_head=per_head, tokens=tokens, uncond=uncond)
    return Trace(pipe, controller, backend)
