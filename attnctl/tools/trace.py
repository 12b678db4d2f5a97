"""``attnctl.trace(pipe)``: cross-attention heat maps captured inside the fused kernel.

The trace is a controller. On each cross-attention call it selects (by layer, resolution,
step) and hands the op a Capture whose buffers persist for the generation, so the kernel
adds every step's maps into them: no (B, H, M, N) tensor, no per-call allocation after
the first step, no loop over tokens, no device sync. Every key column is captured, so any
word can be asked for afterwards.
"""
from __future__ import annotations

from typing import Dict, Iterable, Optional, Tuple

import torch

from ..capture import Capture
from ..diffusers.controller import AttentionCall, BatchLayout, Controller, DenoiseStep, Plan
from ..diffusers.install import Generation, install, installation_of
from .maps import ALL_STEPS, LayerMaps, TraceMaps, resolution_matches, select_layers
from .words import record_prompt


class _LayerTrace:
    __slots__ = ("maps", "selected", "head_weights")

    def __init__(self, maps: LayerMaps, selected: bool, head_weights):
        self.maps = maps          # its dicts hold the buffers the kernel accumulates into
        self.selected = selected
        self.head_weights = head_weights


class TraceController(Controller):
    """Captures cross-attention maps and token mass; see :func:`trace` for the options."""

    def __init__(self, *, layers=None, resolutions=None, heads: Optional[Iterable[int]] = None,
                 steps: Optional[Iterable[int]] = None, per_step: bool = False, per_head: bool = False,
                 uncond: bool = False):
        self.layer_patterns = layers
        self.resolutions = _as_list(resolutions, "resolutions")
        self.heads = sorted(set(_as_list(heads, "heads"))) if heads is not None else None
        self.steps = frozenset(_as_list(steps, "steps")) if steps is not None else None
        self.per_step = bool(per_step)
        self.per_head = bool(per_head)
        self.uncond = bool(uncond)
        self.allowed_layers: Optional[frozenset] = None  # set by Trace from the UNet's layers
        self.generation: Optional[Generation] = None
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
        capture.tokens = self._columns[(call.keys, call.device)]
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
        weights = None
        if self.heads is not None and not self.per_head:
            weights = torch.zeros(call.heads, device=call.device)
            weights[[h for h in self.heads if h < call.heads]] = 1.0
        maps = LayerMaps(call.layer, call.grid, call.factor, call.heads)
        return _LayerTrace(maps, selected, weights)

    def _allocate(self, call: AttentionCall, layer: _LayerTrace, key: int) -> torch.Tensor:
        B, H, M, N = call.batch, call.heads, call.queries, call.keys
        if (N, call.device) not in self._columns:
            self._columns[(N, call.device)] = torch.arange(N, dtype=torch.int32, device=call.device)
        zeros = dict(device=call.device, dtype=torch.float32)
        maps = torch.zeros((B, H, M, N) if self.per_head else (B, M, N), **zeros)
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
                               "filters excluded all of them)")
        gen = self.generation
        prompts = None
        if gen.prompts is not None and gen.tokenizer is not None:
            prompts = [record_prompt(gen.tokenizer, p) for p in gen.prompts]
        return TraceMaps(layers, self.layout, self.latent, gen.image_scale, prompts, self.per_head,
                         self.per_step, self.heads, self.steps_run, gen.tokenizer, uncond=self.uncond)


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
            cross = self.installation.cross_layers
            if self.controller.layer_patterns is not None:
                self.controller.allowed_layers = frozenset(select_layers(cross, self.controller.layer_patterns))
            self.installation.add(self.controller)
        except Exception:
            self._close()
            raise
        return self

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

    def word_heat_map(self, word: str, image: int = 0, *, occurrence: int = 0, **filters):
        """See :meth:`TraceMaps.word_heat_map`."""
        return self.maps().word_heat_map(word, image, occurrence=occurrence, **filters)

    def save(self, path: str) -> None:
        self.maps().save(path)


def trace(pipe, *, layers=None, resolutions=None, heads=None, steps=None, per_step: bool = False,
          per_head: bool = False, uncond: bool = False, backend: Optional[str] = None) -> Trace:
    """Trace cross-attention heat maps of an SD 1.x / 2.x / SDXL pipeline::

        with attnctl.trace(pipe) as tc:
            image = pipe("a cat on a hamburger").images[0]
        tc.word_heat_map("cat").plot(image, "cat.png")

    Args:
        layers: only layers whose names match (globs, or substrings without wildcards).
        resolutions: only these downsampling factors (1 = latent grid, 2, 4, 8) or (h, w) grids.
        heads: only these head indices (summed in the kernel unless ``per_head``).
        steps: only these denoising step indices.
        per_step: keep each step's maps apart (select steps afterwards).
        per_head: keep each head's maps apart (exact DAAM per-head clamping, head selection
            afterwards; H times the memory).
        uncond: also capture CFG's unconditional half (for ``heat_map(half="uncond")``); by
            default only the conditional rows are captured and the kernel does no capture
            work for the others.
        backend: the attention backend ("auto" picks the fused Triton kernel on CUDA).

    If attnctl is not installed on ``pipe`` the trace installs it and uninstalls on exit.
    """
    controller = TraceController(layers=layers, resolutions=resolutions, heads=heads, steps=steps,
                                 per_step=per_step, per_head=per_head, uncond=uncond)
    return Trace(pipe, controller, backend)
