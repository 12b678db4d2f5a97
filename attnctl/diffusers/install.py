"""install / uninstall: put AttnctlProcessor on every attention layer of a UNet (or
JointProcessor on every layer of a Flux / SD3 transformer) and keep the per-generation
state (step, latent size, batch layout, prompts) the processors share.

State comes from two hooks that restore exactly on uninstall:

* the pipeline's ``encode_prompt`` (called once at the start of every SD / SDXL
  generation) marks a new generation and records its prompts, images per prompt and
  whether classifier-free guidance doubles the batch;
* a forward pre-hook on the UNet counts UNet calls since that start (the step index: one
  UNet call per denoising step with CFG, batch 2B, and without, batch B) and records the
  latent size, from which each layer's query grid (h, w) follows for any aspect ratio.
  On a Flux / SD3 transformer the hook records the image token grid after patchify and
  the text length (see attnctl.diffusers.mmdit); on PixArt, Sana and Wan the token grid
  (and Wan's latent frames) after patchify (see attnctl.diffusers.dit). WanPipeline calls
  its transformer once per CFG half (conditional first), and so does FluxPipeline's true
  CFG (``negative_prompt`` with ``true_cfg_scale > 1``: the prompt's call, then the
  negative prompt's); the hook tells the halves apart by their order and gives both calls
  of a step the same step index.
"""
from __future__ import annotations

import inspect
import sys
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from ..op import BACKENDS
from .controller import AttentionCall, BatchLayout, Controller, DenoiseStep
from .dit import SANA, WAN, DiTReader, WanProcessor, dit_family, encoder_texts, softmax_layers
from .joint import IMAGE_SELF, JointLayer, JointLayout, JointProcessor
from .mmdit import FLUX, ForwardReader, TextSegment, joint_layers, mmdit_family, text_segments
from .processor import AttnctlProcessor

_ATTRIBUTE = "_attnctl_installation"


@dataclass(frozen=True)
class Generation:
    """One pipeline call, as seen by ``encode_prompt``.

    ``prompts`` is None when the pipeline got ``prompt_embeds`` without text. On PixArt,
    Sana and Wan they are the texts the pipeline tokenises (see
    attnctl.diffusers.dit.encoder_texts: PixArt and Sana lower-case them). On Flux and SD3,
    ``tokenizer`` is the pipeline's first (CLIP) tokenizer; ``segments`` says which text
    encoder's tokens are which text columns (attnctl.diffusers.mmdit.TextSegment; empty
    without prompt text). ``text_length``: on PixArt, Sana and Wan the call's
    ``max_sequence_length``, the tokens the text encoder got each prompt cut to (Sana with
    ``instruction``: the text columns after it); None: the tokenizer's own limit (SD's CLIP).
    """

    index: int
    prompts: Optional[Tuple[str, ...]]
    num_prompts: int
    images_per_prompt: int
    cfg: bool
    tokenizer: object = None
    instruction: Optional[Tuple[str, ...]] = None  # Sana: complex_human_instruction put before each prompt
    text_length: Optional[int] = None              # PixArt / Sana / Wan: max_sequence_length (see below)
    image_scale: int = 1  # image pixels per latent pixel (the VAE's downsampling; MM-DiT / PixArt / Sana / Wan: per token)
    segments: Tuple[TextSegment, ...] = ()         # Flux / SD3: the text encoders' columns


def find_model(target):
    """(model, pipeline or None) for a UNet / Flux / SD3 / PixArt / Sana / Wan pipeline or
    such a model."""
    from diffusers import UNet2DConditionModel

    def supported(model):
        return isinstance(model, UNet2DConditionModel) or mmdit_family(model) is not None or (
            dit_family(model) is not None)

    if supported(target):
        return target, None
    for attr in ("unet", "transformer"):
        model = getattr(target, attr, None)
        if model is not None and supported(model):
            return model, target
    raise TypeError("install: expected a diffusers pipeline whose `unet` is a UNet2DConditionModel (Stable "
                    "Diffusion 1.x, 2.x, SDXL) or whose `transformer` is a FluxTransformer2DModel or "
                    "SD3Transformer2DModel (Flux, SD3, SD3.5), PixArtTransformer2DModel (PixArt-α/Σ), "
                    "SanaTransformer2DModel or WanTransformer3DModel (Wan 2.1), or such a model, got "
                    f"{_describe(target)}")


def _describe(target) -> str:
    parts = []
    components = getattr(target, "components", None)
    if isinstance(components, dict):
        parts = [f"{k}: {type(v).__name__}" for k, v in components.items() if isinstance(v, torch.nn.Module)]
    return type(target).__name__ + (f" (models: {', '.join(parts)})" if parts else "")


def find_unet(target):
    from diffusers import UNet2DConditionModel

    if isinstance(target, UNet2DConditionModel):
        return target, None
    unet = getattr(target, "unet", None)
    if isinstance(unet, UNet2DConditionModel):
        return unet, target
    raise TypeError("install: expected a diffusers pipeline whose `unet` is a UNet2DConditionModel "
                    f"(Stable Diffusion 1.x, 2.x, SDXL) or such a UNet, got {_describe(target)}")


def query_grid(latent: Tuple[int, int], queries: int) -> Tuple[Optional[Tuple[int, int]], Optional[int]]:
    """(h, w) of a layer with ``queries`` positions in a UNet whose input is ``latent``, and
    its downsampling factor. UNet downsamplers are stride-2 convolutions with padding 1,
    so each level is ceil(h/2) x ceil(w/2)."""
    h, w = latent
    factor = 1
    while h * w > queries and (h > 1 or w > 1):
        h, w, factor = (h + 1) // 2, (w + 1) // 2, factor * 2
    return ((h, w), factor) if h * w == queries else (None, None)


def _eager(hook):
    """``hook`` run eagerly under torch.compile (torch.compiler.disable). Applied when the
    hook is registered, not as a decorator: decorating at import would import torch._dynamo,
    and with it triton, when attnctl is imported, before the CLI can choose Triton's CPU
    interpreter (which must be set before triton first reads it)."""
    return torch.compiler.disable(hook)


class Installation:
    """attnctl installed on one UNet or MM-DiT transformer; shared by its processors. Use it
    as a context manager to uninstall on exit."""

    def __init__(self, model, pipe, backend: str):
        self.model = model
        self.family = mmdit_family(model)  # "flux" or "sd3" on an MM-DiT, else None
        self.dit = dit_family(model)        # "pixart", "sana" or "wan", else None
        self.frames = 1                     # latent frames after patchify of the current input (Wan)
        self.pipe = pipe
        self.backend = backend
        self.controllers: List[Controller] = []
        self.generation: Optional[Generation] = None
        self.step = DenoiseStep(0, None, None)
        self.layout = BatchLayout(rows=0, cfg=False)
        self.latent: Optional[Tuple[int, int]] = None
        self._unet_calls = 0
        self._generations = 0
        self._grids: Dict[Tuple, Tuple] = {}
        self._original = model.attn_processors  # name -> the exact processor objects
        self._cross_layers: Optional[List[str]] = None
        self._had_encode_prompt = None
        self.text_tokens = 0  # MM-DiT: text tokens of the transformer's current input
        self._last_step = None  # MM-DiT: (generation, scheduler step index) of the last transformer call
        # Flux: (caller frame id, its bytecode offset) of the encode_prompt call that started the
        # generation, until its first transformer call; whether a negative prompt was encoded after it
        self._encoding: Optional[Tuple[int, int]] = None
        self._true_cfg = False
        self.joint: Dict[str, JointLayer] = {}  # MM-DiT: each layer's block kind
        self._hook = None
        self._wrapped = False  # whether encode_prompt is this installation's wrapper
        try:
            self._put_in(model, pipe)
        except BaseException:
            self._restore()   # a failed install leaves the model and pipeline as they were
            raise

    def _put_in(self, model, pipe) -> None:
        if self.dit is not None:
            replayed = softmax_layers(model, self.dit)
            make = WanProcessor if self.dit == WAN else AttnctlProcessor
            processors = {name: make(replayed[name], self) if name in replayed else proc
                          for name, proc in self._original.items()}
            self._read_dit = DiTReader(model, self.dit)
            self._hook = model.register_forward_pre_hook(_eager(self._before_dit), with_kwargs=True)
        elif self.family is None:
            processors = {name: AttnctlProcessor(name[: -len(".processor")], self) for name in self._original}
            self._hook = model.register_forward_pre_hook(_eager(self._before_unet), with_kwargs=True)
        else:
            self.joint = joint_layers(model, self.family)
            processors = {f"{layer}.processor": JointProcessor(layer, self, kind) for layer, kind in self.joint.items()}
            self._read_forward = ForwardReader(model, self.family)
            self._hook = model.register_forward_pre_hook(_eager(self._before_transformer), with_kwargs=True)
        # the processors attnctl puts in (all but Sana's linear self-attention)
        self._routed = [name for name, proc in processors.items() if proc is not self._original[name]]
        if pipe is not None and hasattr(pipe, "encode_prompt"):
            self._wrap_encode_prompt(pipe)
        model.set_attn_processor(processors)
        setattr(model, _ATTRIBUTE, self)

    @property
    def image_grid(self) -> Optional[Tuple[int, int]]:
        """Flux: the image token grid, when set by the caller instead of read from img_ids."""
        return self._read_forward.flux_grid if self.family == FLUX else None

    @image_grid.setter
    def image_grid(self, grid: Tuple[int, int]) -> None:
        if self.family != FLUX:
            raise ValueError(f"image_grid: only Flux reads its grid from img_ids; this installation is on "
                             f"{type(self.model).__name__}")
        self._read_forward.flux_grid = tuple(grid)

    @property
    def model_family(self) -> str:
        """"unet", "flux", "sd3", "pixart", "sana" or "wan" (what AttentionCall.family says)."""
        return self.dit or self.family or "unet"

    @property
    def unet(self):
        """The model attnctl is installed on (named for the UNet tools that read it)."""
        return self.model

    # ---- controllers -------------------------------------------------------------------
    def add(self, controller: Controller) -> Controller:
        if not isinstance(controller, Controller):
            raise TypeError(f"controller: expected an attnctl.Controller, got {type(controller).__name__}")
        if controller not in self.controllers:
            self.controllers.append(controller)
            if self.generation is not None:
                controller.on_generation_start(self.generation)
        return controller

    def remove(self, controller: Controller) -> None:
        if controller in self.controllers:
            self.controllers.remove(controller)

    @property
    def layers(self) -> List[str]:
        """Names of every attention layer attnctl routes, as processors know them (on Sana
        the cross-attention layers: its linear self-attention keeps diffusers' processor)."""
        return [name[: -len(".processor")] for name in self._routed]

    @property
    def cross_layers(self) -> List[str]:
        """Names of the cross-attention layers (those whose keys are the text; on an MM-DiT
        every joint layer, not SD3.5's image-only attn2)."""
        if self._cross_layers is None and self.family is not None:
            self._cross_layers = [name for name, kind in self.joint.items() if kind.block != IMAGE_SELF]
        if self._cross_layers is None:
            modules = dict(self.model.named_modules())
            self._cross_layers = [name for name in self.layers if modules[name].is_cross_attention]
        return self._cross_layers

    # ---- generation / step state -------------------------------------------------------
    def start_generation(self, prompts: Optional[Sequence[str]] = None, *, num_prompts: Optional[int] = None,
                         images_per_prompt: int = 1, cfg: bool = False, tokenizer=None,
                         instruction: Optional[Sequence[str]] = None, text_length: Optional[int] = None,
                         segments: Sequence[TextSegment] = ()) -> Generation:
        """Mark the start of a generation (the pipeline hook does this; call it yourself
        when driving a bare UNet)."""
        if isinstance(prompts, str):
            prompts = [prompts]
        if num_prompts is None:
            num_prompts = len(prompts) if prompts is not None else 1
        self._generations += 1
        vae = getattr(self.pipe, "vae_scale_factor", None) or getattr(self.pipe, "vae_scale_factor_spatial", None)
        scale = int(vae) if vae else 1
        if self.dit is not None:   # the latent a controller sees is the token grid: pixels per token
            scale *= self._read_dit.patch[-1]
        elif self.family is not None:  # Flux packs 2x2 latent pixels into a token; SD3 patchifies
            scale *= 2 if self.family == FLUX else self.model.config.patch_size
        self.generation = Generation(
            index=self._generations, prompts=tuple(prompts) if prompts is not None else None,
            num_prompts=num_prompts, images_per_prompt=int(images_per_prompt), cfg=bool(cfg),
            tokenizer=tokenizer, image_scale=scale, instruction=tuple(instruction) if instruction else None,
            text_length=text_length, segments=tuple(segments))
        self._unet_calls = 0
        self._true_cfg = False
        self.check_processors()
        for controller in self.controllers:
            controller.on_generation_start(self.generation)
        return self.generation

    def replaced_layers(self) -> List[str]:
        """Layers whose processor is no longer this installation's (replaced by a
        ``set_attn_processor`` after install)."""
        processors = self.model.attn_processors
        return [name[: -len(".processor")] for name in self._routed
                if not (isinstance(processors[name], (AttnctlProcessor, JointProcessor, WanProcessor))
                        and processors[name].installation is self)]

    def check_processors(self, adding: Sequence[Controller] = ()) -> None:
        """Raise if processors were replaced while controllers are (or are being) attached:
        those layers would run without the controllers, silently."""
        controllers = self.controllers + [c for c in adding if c not in self.controllers]
        if not controllers:
            return
        replaced = self.replaced_layers()
        if replaced:
            raise RuntimeError(
                f"attnctl: the attention processors of {len(replaced)} of {len(self._original)} layers (e.g. "
                f"{replaced[0]!r}) were replaced after attnctl was installed (set_attn_processor?), so the "
                f"controllers ({', '.join(type(c).__name__ for c in controllers)}) would not run there; call "
                "attnctl.uninstall(pipe) and install again")

    def _wrap_encode_prompt(self, pipe) -> None:
        self._had_encode_prompt = pipe.__dict__.get("encode_prompt")
        self._wrapped = True
        original = pipe.encode_prompt
        signature = inspect.signature(original)

        def encode_prompt(*args, **kwargs):
            caller = sys._getframe(1)
            site = (id(caller), caller.f_lasti)
            if self.family == FLUX and self._encoding is not None and self._encoding[0] == site[0] and (
                    self._encoding != site):
                # FluxPipeline's true CFG encodes the negative prompt right after the prompt, from
                # another line of the same call, before any transformer call: the generation stays
                # the prompt's (its words and segments), and each step runs the prompt's call, then
                # the negative prompt's.
                self._true_cfg = True
                return original(*args, **kwargs)
            bound = signature.bind_partial(*args, **kwargs)
            bound.apply_defaults()
            a = bound.arguments
            prompt, embeds = a.get("prompt"), a.get("prompt_embeds")
            num = (1 if isinstance(prompt, str) else len(prompt)) if prompt is not None else (
                embeds.shape[0] if embeds is not None else 1)
            tokenizer = getattr(pipe, "tokenizer", None) or getattr(pipe, "tokenizer_2", None)
            per_prompt = a.get("num_images_per_prompt") or a.get("num_videos_per_prompt") or 1  # Wan: videos
            if prompt is not None and self.dit is not None:
                prompt = encoder_texts(self.dit, pipe, prompt, a)
            where = {}   # where the prompt's tokens land among the text columns
            if self.dit is not None:   # the length the encoder cuts to, not the tokenizer's (often unset)
                where = dict(text_length=a.get("max_sequence_length"))
                if self.dit == SANA:
                    where["instruction"] = a.get("complex_human_instruction")
            elif self.family is not None and prompt is not None:
                prompts = [prompt] if isinstance(prompt, str) else prompt
                where = dict(segments=text_segments(self.family, pipe, prompts, a))
            self.start_generation(prompt, num_prompts=num, images_per_prompt=per_prompt,
                                  cfg=bool(a.get("do_classifier_free_guidance", False)), tokenizer=tokenizer, **where)
            self._encoding = site
            return original(*args, **kwargs)

        encode_prompt.__signature__ = signature
        pipe.encode_prompt = encode_prompt

    # The step hooks run eagerly under torch.compile(model): they count UNet calls and
    # call the controllers' on_step, Python state that changes every step; traced, each
    # new step index would be a guard failure and a recompile.
    def _before_unet(self, module, args, kwargs) -> None:
        sample = args[0] if args else kwargs["sample"]
        timestep = args[1] if len(args) > 1 else kwargs.get("timestep")
        self._start_step(sample.shape[0], tuple(sample.shape[-2:]), timestep)

    def _before_transformer(self, module, args, kwargs) -> None:
        rows, grid, self.text_tokens, timestep = self._read_forward(args, kwargs)
        self._encoding = None   # an encode_prompt call from now on starts a generation
        if self._true_cfg:
            half = "cond" if self._unet_calls % 2 == 0 else "uncond"
            self._start_step(rows, grid, timestep, half=half, index=self._unet_calls // 2)
            return
        # Two calls in one scheduler step without a negative prompt encoded for them (a loop
        # of one's own): controllers would take the second call for the next step.
        step_index = getattr(getattr(self.pipe, "scheduler", None), "step_index", False)
        marker = (self._generations, step_index)
        if self.controllers and step_index is not False and marker == self._last_step:
            raise NotImplementedError("install: two transformer calls in one scheduler step that attnctl cannot "
                                      "tell apart (FluxPipeline's true CFG is told apart by its encode_prompt call "
                                      "for the negative prompt; this generation had none)")
        self._last_step = marker
        self._start_step(rows, grid, timestep)

    def _before_dit(self, module, args, kwargs) -> None:
        rows, self.frames, grid, timestep = self._read_dit(args, kwargs)
        gen = self.generation
        if self.dit == WAN and gen is not None and gen.cfg and rows == gen.num_prompts * gen.images_per_prompt:
            # WanPipeline: per step one call with the prompt, then one with the negative prompt.
            half = "cond" if self._unet_calls % 2 == 0 else "uncond"
            self._start_step(rows, grid, timestep, half=half, index=self._unet_calls // 2)
        else:
            self._start_step(rows, grid, timestep)

    def _start_step(self, rows: int, latent: Tuple[int, int], timestep, half: Optional[str] = None,
                    index: Optional[int] = None) -> None:
        self.latent = latent
        gen = self.generation
        if gen is None:
            self.layout = BatchLayout(rows=rows, cfg=False)
        else:
            images = gen.num_prompts * gen.images_per_prompt
            # A pipeline may skip CFG on some calls; the batch size tells.
            cfg = gen.cfg and rows == 2 * images
            self.layout = BatchLayout(rows=rows, cfg=cfg, images_per_prompt=gen.images_per_prompt, half=half)
        scheduler = getattr(self.pipe, "scheduler", None)
        self.step = DenoiseStep(self._unet_calls if index is None else index, timestep, scheduler)
        self._unet_calls += 1
        for controller in self.controllers:
            controller.on_step(self.step, self.layout)

    def describe(self, layer: str, is_cross: bool, spatial: Optional[Tuple[int, int]],
                 q: torch.Tensor, k: torch.Tensor, scale: Optional[float] = None) -> AttentionCall:
        """The AttentionCall for a processor's call (grid from the latent unless the layer's
        input was 4-D and so tells its own size)."""
        M = q.shape[2]
        key = (self.latent, M, spatial)
        derived = self._grids.get(key)
        if derived is None:
            if spatial is not None:
                factor = query_grid(self.latent, M)[1] if self.latent is not None else None
                derived = (spatial, factor)
            elif self.latent is not None:
                derived = query_grid(self.latent, M)
            else:
                derived = (None, None)
            self._grids[key] = derived
        layout = self.layout
        if layout.rows != q.shape[0]:  # a layer called outside a hooked UNet forward
            layout = BatchLayout(rows=q.shape[0], cfg=False)
        call = AttentionCall(layer, is_cross, derived[0], derived[1], self.latent, self.step, layout, q, k,
                             self.backend, scale)
        call.family = self.model_family
        return call

    def describe_tokens(self, layer: str, is_cross: bool, q: torch.Tensor, k: torch.Tensor,
                        context: str) -> AttentionCall:
        """The AttentionCall of a Wan attention call: queries are the video tokens, frame by
        frame on the (h, w) token grid; ``context`` says what a cross-attention's keys are."""
        grid, frames = self.latent, self.frames
        if grid is None or frames * grid[0] * grid[1] != q.shape[2]:
            raise RuntimeError(f"{layer}: {q.shape[2]} query tokens do not fill {frames} frames of the token grid "
                               f"{grid} read from the transformer's input; the transformer must run through its "
                               "forward")
        layout = self.layout
        if layout.rows != q.shape[0]:
            layout = BatchLayout(rows=q.shape[0], cfg=False)
        call = AttentionCall(layer, is_cross, grid, 1, grid, self.step, layout, q, k, self.backend)
        call.frames, call.context, call.family = frames, context, self.model_family
        return call

    def describe_joint(self, layer: str, joint: JointLayout, q: torch.Tensor, k: torch.Tensor) -> AttentionCall:
        """The AttentionCall of an MM-DiT joint attention call (grid: the image token grid)."""
        layout = self.layout
        if layout.rows != q.shape[0]:
            layout = BatchLayout(rows=q.shape[0], cfg=False)
        call = AttentionCall(layer, False, joint.grid, 1, joint.grid, self.step, layout, q, k, self.backend)
        call.joint, call.family = joint, self.model_family
        return call

    # ---- teardown ----------------------------------------------------------------------
    def uninstall(self) -> None:
        """Restore the original processor objects and remove every hook."""
        if getattr(self.model, _ATTRIBUTE, None) is not self:
            return
        self._restore()
        self.controllers.clear()

    def _restore(self) -> None:
        """Undo what installing did, as far as it got: processors, hook, encode_prompt."""
        processors = self.model.attn_processors
        if any(processors[name] is not proc for name, proc in self._original.items()):
            self.model.set_attn_processor(dict(self._original))
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        if self._wrapped:
            if self._had_encode_prompt is None:
                self.pipe.__dict__.pop("encode_prompt", None)
            else:
                self.pipe.__dict__["encode_prompt"] = self._had_encode_prompt
            self._wrapped = False
        if getattr(self.model, _ATTRIBUTE, None) is self:
            delattr(self.model, _ATTRIBUTE)

    @property
    def active(self) -> bool:
        return getattr(self.model, _ATTRIBUTE, None) is self

    def __enter__(self) -> "Installation":
        return self

    def __exit__(self, *exc) -> None:
        self.uninstall()


def installation_of(target) -> Optional[Installation]:
    """The active installation on a pipeline, UNet or MM-DiT transformer, or None."""
    model, _ = find_model(target)
    return getattr(model, _ATTRIBUTE, None)


def install(target, *controllers: Controller, backend: Optional[str] = None) -> Installation:
    """Route every attention layer of ``target`` (an SD 1.x / 2.x / SDXL pipeline or its
    UNet2DConditionModel; a Flux, SD3 or SD3.5 pipeline or its transformer) through
    attnctl, with ``controllers`` attached.

    Installing twice returns the existing installation (adding the controllers; a given
    ``backend`` replaces the installed one). Use the result as a context manager, or call
    ``uninstall``, to restore the original processors.
    """
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {', '.join(BACKENDS)}, got {backend!r}")
    for i, controller in enumerate(controllers):
        if not isinstance(controller, Controller):
            raise TypeError(f"controllers[{i}]: expected an attnctl.Controller, got {type(controller).__name__}")
    model, pipe = find_model(target)
    installation = getattr(model, _ATTRIBUTE, None)
    if installation is not None:
        installation.check_processors(controllers)
    # A controller's on_generation_start may raise: the call then leaves everything as it was.
    created = installation is None
    if created:
        installation = Installation(model, pipe, backend or "auto")
    previous_backend, previous_controllers = installation.backend, list(installation.controllers)
    try:
        if backend is not None:
            installation.backend = backend
        for controller in controllers:
            installation.add(controller)
    except BaseException:
        if created:
            installation.uninstall()
        else:
            installation.backend = previous_backend
            installation.controllers[:] = previous_controllers
        raise
    return installation


def uninstall(target) -> None:
    """Restore the original attention processors of ``target`` (no-op if not installed)."""
    installation = installation_of(target)
    if installation is not None:
        installation.uninstall()
