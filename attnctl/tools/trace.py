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

On Flux and SD3 (MM-DiT joint attention) there is no DAAM original; the trace captures
the text key columns of one text segment (T5 by default: Flux's only sequence, SD3's 256
tokens after the 77 CLIP ones; ``text="clip"`` takes SD3's CLIP segment) from every
joint block, heads summed in the kernel, over all joint query rows (the text rows, 11 %
of Flux 1024²'s 4608, are captured and never read: slicing them out would need a second
kernel call). P is the joint softmax, normalised over all keys, text and image.

On PixArt, Sana and Wan (a separate cross-attention layer per block) the trace captures
every cross-attention layer, heads summed in the kernel, the prompt's T5 / Gemma / umT5
pieces and the end token, plus token mass; maps live on the token grid after patchify,
for Wan per latent frame (its queries are the frames one after the other). WanPipeline
runs CFG's halves as two transformer calls; the trace captures the conditional one.

FluxPipeline's true CFG also runs the negative prompt as a transformer call of its own
(after the prompt's, each step): the trace captures the prompt's call, and with
``uncond=True`` the negative prompt's too, into rows of its own, so that the maps read as
CFG's two halves (``half="uncond"``).
"""
from __future__ import annotations

from typing import Dict, Iterable, Optional, Tuple

import torch

from ..capture import Capture
from ..diffusers.controller import AttentionCall, BatchLayout, Controller, DenoiseStep, Plan
from ..diffusers.attach import Attachment
from ..diffusers.install import Generation
from .daam import counts_in_daam, daam_layer_problem, is_daam_layer, output_side
from .maps import ALL_STEPS, LayerMaps, TraceMaps, resolution_matches, select_layers
from ..diffusers.joint import BLOCK_KINDS, IMAGE_SELF
from ..diffusers.dit import WAN
from ..diffusers.mmdit import FLUX, TEXT_SEGMENTS, segment_spec
from .words import record_after_instruction, record_prompt

TOKEN_CHOICES = ("prompt", "all")


class _LayerTrace:
    __slots__ = ("maps", "selected", "head_weights", "columns", "current", "current_mass")

    def __init__(self, maps: LayerMaps, selected: bool, head_weights):
        self.maps = maps          # its dicts hold the buffers the kernel accumulates into
        self.selected = selected
        self.head_weights = head_weights
        self.columns: Optional[torch.Tensor] = None  # the captured key columns (shared per (T, first, device))
        # The buffers of the current step's key in ``maps`` (token mass: None on MM-DiT);
        # None until the layer's first captured call allocates them.
        self.current: Optional[torch.Tensor] = None
        self.current_mass: Optional[torch.Tensor] = None


class TraceController(Controller):
    """Captures cross-attention maps and token mass; see :func:`trace` for the options."""

    def __init__(self, *, layers=None, resolutions=None, heads: Optional[Iterable[int]] = None,
                 steps: Optional[Iterable[int]] = None, per_step: bool = False, per_head: Optional[bool] = None,
                 tokens: str = "prompt", kinds: Optional[Iterable[str]] = None, text: str = "t5",
                 uncond: bool = False):
        if tokens not in TOKEN_CHOICES:
            raise ValueError(f"tokens: expected one of {TOKEN_CHOICES}, got {tokens!r}")
        if text not in TEXT_SEGMENTS:
            raise ValueError(f"text: expected one of {TEXT_SEGMENTS}, got {text!r}")
        self.kinds = frozenset(_as_list([kinds] if isinstance(kinds, str) else kinds, "kinds") or ()) or None
        with_text = [k for k in BLOCK_KINDS if k != IMAGE_SELF]  # SD3.5's attn2 has no text to trace
        bad = sorted(set(self.kinds or ()) - set(with_text))
        if bad:
            raise ValueError(f"kinds: expected block kinds among {with_text}, got {bad}")
        self.text = text
        self.layer_patterns = layers
        self.resolutions = _as_list(resolutions, "resolutions")
        self.heads = sorted(set(_as_list(heads, "heads"))) if heads is not None else None
        self.steps = frozenset(_as_list(steps, "steps")) if steps is not None else None
        self.per_step = bool(per_step)
        self.per_head = per_head  # None: True on UNets (DAAM), False on MM-DiT (set by Trace)
        self.tokens = tokens
        self.uncond = bool(uncond)
        self.segment = None  # MM-DiT: (tokenizer, first column in the text, length or None = the rest)
        self.allowed_layers: Optional[frozenset] = None  # set by Trace from the UNet's layers
        self.daam_side: Optional[int] = None  # set by Trace: DAAM's output side for the pipeline
        self.daam_check = None  # set by Trace on UNets under DAAM's layers: (installation, VAE factor)
        self.image_scale: Optional[int] = None  # MM-DiT: image pixels per image token (VAE x patch)
        self.dit: Optional[str] = None  # set by Trace on PixArt / Sana / Wan: the family
        self.frame_scale = 1  # Wan: video frames per latent frame after patchify (the VAE's 4)
        self.generation: Optional[Generation] = None
        self.texts = None          # the generation's prompts as tokenised, when known
        self.kept_columns: Optional[int] = None  # key columns captured (None: all N)
        self.layout: Optional[BatchLayout] = None
        self.latent: Optional[Tuple[int, int]] = None
        self.steps_run = 0
        # Per-step state, set by on_step: whether this step is captured, and its key in the
        # layers' maps (the step index with per_step, else ALL_STEPS).
        self._active = True
        self._key = ALL_STEPS
        self._layers: Dict[str, _LayerTrace] = {}
        self._columns: Dict[Tuple[int, int, torch.device], torch.Tensor] = {}
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
        self.kept_columns = None
        if self.segment is None and generation.prompts is not None and generation.tokenizer is not None:
            self._record_texts(generation.tokenizer, generation.text_length)

    def _record_texts(self, tokenizer, max_length: Optional[int], prompts=None) -> None:
        gen = self.generation
        prompts = gen.prompts if prompts is None else prompts
        if gen.instruction:   # Sana with its complex_human_instruction
            self.texts = [record_after_instruction(tokenizer, p, gen.instruction, gen.text_length) for p in prompts]
        else:
            self.texts = [record_prompt(tokenizer, p, max_length) for p in prompts]
        # DAAM keeps BOS, the prompt's tokens and the first EOS; for a batch, the longest's
        # (T5: the prompt's pieces and </s>, no padding).
        self.kept_columns = (max(len(t.tokens) for t in self.texts) if self.tokens == "prompt" else None)

    def _segment_columns(self, call: AttentionCall) -> Tuple[int, int]:
        """MM-DiT: (first key column, length) of the traced text segment in this call; the
        first call records the prompts with the segment's tokenizer and length."""
        tokenizer, offset, length = self.segment
        text = call.joint.text
        if length is None:
            length = len(text) - offset
        gen = self.generation
        # A bare transformer has no pipeline tokenizer: the one given to start_generation.
        tokenizer = tokenizer if tokenizer is not None else getattr(gen, "tokenizer", None)
        if self.texts is None and gen is not None and gen.prompts is not None and tokenizer is not None:
            # The texts this segment's encoder got (Flux's T5 reads prompt_2, SD3's prompt_3 / _2).
            encoded = next((s.prompts for s in gen.segments if s.tokenizer is tokenizer), None)
            self._record_texts(tokenizer, length, encoded)
        return text.start + offset, length

    def on_step(self, step: DenoiseStep, layout: BatchLayout) -> None:
        if layout.half != "uncond":  # the conditional call's layout (see _halves_apart for both)
            self.layout = layout
            if step.index == 0:
                self._check_call(step)
        self.steps_run = step.index + 1
        # Every per-step decision is taken here, in the model's forward pre-hook, which runs
        # eagerly under torch.compile: plan() reads no step index, only state that is the
        # same at every step (a bool, each layer's current buffers), so a compiled UNet
        # compiles once for the first step (which allocates) and once for the rest.
        self._active = self.steps is None or step.index in self.steps
        self._key = step.index if self.per_step else ALL_STEPS
        if self._active and self.per_step:
            for layer in self._layers.values():
                if layer.current is not None and self._key not in layer.maps.maps:  # Wan: one step, two calls
                    self._point_at(layer, self._key, torch.zeros_like(layer.current),
                                   None if layer.current_mass is None else torch.zeros_like(layer.current_mass))

    @staticmethod
    def _point_at(layer: _LayerTrace, key: int, maps: torch.Tensor, token_mass: Optional[torch.Tensor]) -> None:
        layer.maps.maps[key] = layer.current = maps
        layer.current_mass = token_mass
        if token_mass is not None:
            layer.maps.token_mass[key] = token_mass

    def _halves_apart(self, layout: BatchLayout) -> bool:
        """Whether this trace keeps both CFG halves of calls that hold one each (Flux's true
        CFG with uncond=True): the maps then have 2B rows, [0, B) the negative prompt's
        call, [B, 2B) the prompt's."""
        return layout.half is not None and self.uncond

    def _check_call(self, step: DenoiseStep) -> None:
        """Before the first denoising step (the call's size and step count now known):
        raise where ``steps`` or DAAM's layer rule would leave nothing to capture."""
        total = step.num_calls
        if self.steps is not None and total:
            late = sorted(s for s in self.steps if s >= total)
            if late:
                raise ValueError(f"steps: expected denoising step indices below {total} (this call runs {total} "
                                 f"steps: 0-{total - 1}), got {late}")
        if self.daam_check is not None:
            installation, factor = self.daam_check
            problem = daam_layer_problem(installation.unet, factor, installation.latent)
            if problem:
                raise ValueError(f"layers: {problem}; generate at such a size, or pass layers='*' (every "
                                 "cross-attention layer) or layer names")

    def plan(self, call: AttentionCall) -> Optional[Plan]:
        if not call.is_cross and (call.joint is None or not call.joint.text):
            return None
        if call.context != "text":   # Wan I2V's image context
            return None
        apart = self._halves_apart(call.layout)
        if not call.layout.cond_rows and not apart:   # a call of the unconditional half alone
            return None
        layer = self._layers.get(call.layer)
        if layer is None:
            layer = self._layers[call.layer] = self._new_layer(call)
        if not layer.selected or not self._active:
            return None
        maps = layer.current
        if maps is None:
            maps = self._allocate(call, layer, self._key)
        elif layer.maps.image_rows is not None and layer.maps.image_rows != (call.joint.image.start,
                                                                              call.joint.image.stop):
            raise RuntimeError(f"trace: layer {call.layer} changed its joint layout within a generation")
        token_mass = layer.current_mass  # None on MM-DiT (see _allocate)
        held = (maps.shape[0], maps.shape[-2], token_mass.shape[1:] if token_mass is not None else None)
        rows = 2 * call.batch if apart else call.batch
        if held != (rows, call.queries, (call.heads, call.keys) if token_mass is not None else None):
            raise RuntimeError(f"trace: layer {call.layer} changed shape within a generation (B, M) "
                               f"{held[:2]} -> {(rows, call.queries)}")
        if apart:   # this call's half of the rows (views: the kernel adds into them in place)
            half = slice(call.batch, None) if call.layout.cond_rows else slice(0, call.batch)
            maps = maps[half]
            token_mass = token_mass[half] if token_mass is not None else None
        capture = self._capture
        capture.token_mass = token_mass
        capture.tokens = layer.columns
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
        if call.joint is not None:
            selected = selected and (self.kinds is None or call.joint.block in self.kinds)
        elif self.layer_patterns is None and self.dit is None:  # DAAM's selection also goes by its factor
            selected = selected and counts_in_daam(self.daam_side, call.queries)
        weights = None
        if self.heads is not None and not self.per_head:
            weights = torch.zeros(call.heads, device=call.device)
            weights[[h for h in self.heads if h < call.heads]] = 1.0
        image_rows = (call.joint.image.start, call.joint.image.stop) if call.joint is not None else None
        maps = LayerMaps(call.layer, call.grid, call.factor, call.heads, image_rows=image_rows, frames=call.frames)
        return _LayerTrace(maps, selected, weights)

    def _allocate(self, call: AttentionCall, layer: _LayerTrace, key: int) -> torch.Tensor:
        B, H, M, N = call.batch, call.heads, call.queries, call.keys
        if self._halves_apart(call.layout):
            B *= 2
        first, available = self._segment_columns(call) if call.joint is not None else (0, N)
        T = min(self.kept_columns, available) if self.kept_columns is not None else available
        if (T, first, call.device) not in self._columns:
            self._columns[(T, first, call.device)] = torch.arange(first, first + T, dtype=torch.int32,
                                                                 device=call.device)
        layer.columns = self._columns[(T, first, call.device)]
        zeros = dict(device=call.device, dtype=torch.float32)
        maps = torch.zeros((B, H, M, T) if self.per_head else (B, M, T), **zeros)
        # Not on MM-DiT joint attention: its N (all text and image keys) spans many key
        # blocks, where token mass costs the kernel a second pass over QKᵀ (+50 % FLOPs).
        token_mass = torch.zeros(B, H, N, **zeros) if call.joint is None else None
        self._point_at(layer, key, maps, token_mass)
        return maps

    def result(self) -> TraceMaps:
        if self.generation is None or self.layout is None:
            raise RuntimeError("trace: no generation has run inside this trace yet; call the pipeline "
                               "inside `with attnctl.trace(pipe) as tc:` before reading maps")
        layers = [l.maps for l in self._layers.values() if l.selected and l.maps.maps]
        if not layers:
            raise RuntimeError("trace: no cross-attention call was captured (the step, resolution or "
                               "block-kind filters, or DAAM's layer selection at this image size, excluded "
                               "all of them; layers='*' takes every cross-attention layer)")
        gen = self.generation
        joint = self.segment is not None
        tokenizer = self.segment[0] if joint and self.segment[0] is not None else gen.tokenizer
        layout = self.layout
        if self._halves_apart(layout):
            layout = BatchLayout(rows=2 * layout.rows, cfg=True, images_per_prompt=layout.images_per_prompt)
        return TraceMaps(layers, layout, self.latent, self.image_scale or gen.image_scale, self.texts,
                         self.per_head, self.per_step, self.heads, self.steps_run, tokenizer,
                         daam_side=self.daam_side, uncond=self.uncond, joint=joint, family=self.dit,
                         frame_scale=self.frame_scale)


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
        self._attachment: Optional[Attachment] = None

    def __enter__(self) -> "Trace":
        self._attachment = Attachment(self.pipe, backend=self.backend)
        self.installation = self._attachment.installation
        try:
            self._select_layers()
            self._attachment.add(self.controller)
        except BaseException:
            self._close(failed=True)
            raise
        return self

    def _select_layers(self) -> None:
        installation, controller = self.installation, self.controller
        cross = installation.cross_layers
        pipe = installation.pipe
        if installation.dit is not None:
            self._select_dit()
            controller.allowed_layers = frozenset(select_layers(cross, controller.layer_patterns))
            return
        if installation.family is not None:
            self._select_joint_text()
            controller.allowed_layers = frozenset(select_layers(cross, controller.layer_patterns))
            return
        if controller.kinds is not None:
            raise ValueError(f"kinds: block kinds select MM-DiT (Flux, SD3) blocks; this is a UNet, got "
                             f"{sorted(controller.kinds)}")
        if controller.text != "t5":
            raise ValueError(f"text: selects the text segment of an MM-DiT (SD3) trace; a UNet has one, got "
                             f"{controller.text!r}")
        if controller.per_head is None:
            controller.per_head = True
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
        controller.daam_check = (installation, pipe.vae_scale_factor)

    def _select_dit(self) -> None:
        """PixArt / Sana / Wan: heads summed by default, maps on the token grid."""
        installation, controller = self.installation, self.controller
        family = installation.dit
        if controller.kinds is not None:
            raise ValueError(f"kinds: block kinds select MM-DiT (Flux, SD3) blocks; this is {family}, got "
                             f"{sorted(controller.kinds)}")
        if controller.text != "t5":
            raise ValueError(f"text: selects the text segment of an MM-DiT (SD3) trace; {family} has one, got "
                             f"{controller.text!r}")
        if controller.uncond and family == WAN:
            raise ValueError("uncond: WanPipeline runs CFG's unconditional half as a transformer call of its own, "
                             "which the trace does not capture; got uncond=True")
        if controller.per_head is None:
            controller.per_head = False
        controller.dit = family
        pipe = installation.pipe
        config = installation.model.config
        if family == WAN:
            vae = getattr(pipe, "vae_scale_factor_spatial", None)
            patch_t, patch = config.patch_size[0], config.patch_size[1]
            controller.frame_scale = int(getattr(pipe, "vae_scale_factor_temporal", None) or 1) * patch_t
        else:
            vae, patch = getattr(pipe, "vae_scale_factor", None), config.patch_size
        controller.image_scale = int(vae or 1) * patch

    def _select_joint_text(self) -> None:
        """MM-DiT: the text segment whose key columns are traced, and its tokenizer."""
        installation, controller = self.installation, self.controller
        pipe = installation.pipe
        present = sorted({layer.block for layer in installation.joint.values()} - {IMAGE_SELF})
        missing = sorted(set(controller.kinds or ()) - set(present))
        if missing:
            raise ValueError(f"kinds: expected block kinds of this {type(installation.model).__name__} "
                             f"({', '.join(present)}), got {missing}")
        if controller.per_head is None:
            controller.per_head = False
        segment = segment_spec(installation.family, controller.text)
        tokenizer = getattr(pipe, segment[0], None) if pipe is not None else None
        controller.segment = (tokenizer,) + segment[1:]
        vae = getattr(pipe, "vae_scale_factor", None) if pipe is not None else None
        patch = installation.model.config.patch_size
        # Flux packs 2x2 latent pixels into a token (its patch_size is 1); SD3 patchifies by patch_size.
        controller.image_scale = int(vae or 1) * (2 if installation.family == FLUX else patch)

    def __exit__(self, kind, value, traceback) -> None:
        self._close(failed=kind is not None)

    def _close(self, failed: bool = False) -> None:
        if self._attachment is not None:
            self._attachment.close(failed)
            self._attachment = None

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
          per_head: Optional[bool] = None, tokens: str = "prompt", kinds=None, text: str = "t5",
          uncond: bool = False, backend: Optional[str] = None) -> Trace:
    """Trace cross-attention heat maps of an SD 1.x / 2.x / SDXL pipeline, or the text
    columns of the joint attention of a Flux / SD3 / SD3.5 pipeline::

        with attnctl.trace(pipe) as tc:
            image = pipe("a cat on a hamburger").images[0]
        tc.word_heat_map("cat").plot(image, "cat.png")

    On UNets the defaults capture what DAAM 0.2.0 needs to give its result exactly. On
    Flux / SD3 they capture every joint block, heads summed, the prompt's T5 pieces and
    its ``</s>`` (no padding), and heat maps are read on the image token grid.

    Args:
        layers: None (DAAM's layers: down and up blocks, not the mid block, and only the
            levels DAAM's factor rule keeps, see attnctl.tools.daam); or names to match
            (globs, or substrings without wildcards), ``"*"`` for every cross-attention layer.
        resolutions: only these downsampling factors (1 = latent grid, 2, 4, 8) or (h, w) grids.
        heads: only these head indices.
        steps: only these denoising step indices.
        per_step: keep each step's maps apart (select steps afterwards).
        per_head: None: True on UNets, False on MM-DiT. True (DAAM): keep each head's maps
            apart, so each head is clamped after upsampling, as DAAM does; False: sum the
            heads in the kernel (H times less memory; the clamp then acts on the sum, which
            differs where bicubic undershoot differs in sign between heads).
        tokens: "prompt" (DAAM): capture BOS, the prompt's tokens and the first EOS (the
            columns of DAAM's global map; every column when the prompt text is unknown);
            "all": every key column, padding included (MM-DiT: every column of the segment).
        kinds: MM-DiT only: block kinds to capture ("double", "single" for Flux; "joint",
            "context_pre_only" for SD3); None: all.
        text: MM-DiT only: the text segment whose columns are captured: "t5" (default) or,
            on SD3, "clip" (its 77 CLIP-L‖G tokens).
        uncond: also capture CFG's unconditional half (for ``heat_map(half="uncond")``; on
            Flux with true CFG the negative prompt's transformer call); by default only the
            conditional rows are captured and the kernel does no capture work for the others.
        backend: the attention backend ("auto" picks the fused Triton kernel on CUDA).

    If attnctl is not installed on ``pipe`` the trace installs it and uninstalls on exit.
    """
    controller = TraceController(layers=layers, resolutions=resolutions, heads=heads, steps=steps,
                                 per_step=per_step, per_head=per_head, tokens=tokens, kinds=kinds, text=text,
                                 uncond=uncond)
    return Trace(pipe, controller, backend)
