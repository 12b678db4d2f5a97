"""Attend-and-Excite (Chefer et al., SIGGRAPH 2023) and its HRV-guided form, on attnctl's
differentiable fused maps.

The loop is the original's (diffusers' StableDiffusionAttendAndExcitePipeline, which
follows the authors' code): before each of the first ``max_iter_to_alter`` denoising
steps, every image's latent runs alone through the UNet with its conditional text and
gradients on; the maps of that forward (:mod:`attnctl.tools.excite_maps`) give, per token
to alter, max(smooth(softmax(100 · maps)[..., token])); the loss max_k(1 − max_k)⁺ moves
the latent by −step_size · ∇loss, step_size = scale_factor · sqrt(linspace(1, 0.5,
steps)). At the steps in ``thresholds`` the latent is first refined until every token's
max exceeds the threshold (at most ``max_refinement_steps`` updates). The denoising step
itself (with classifier-free guidance) runs the plain fused attention.

The attention of every layer in those forwards goes through attnctl: the map layers
through ``attention_with_maps`` (Triton: a FlashAttention-2 style backward, no (M, N)
tensor), the others through the op's differentiable path. Those forwards end after their
last map layer (:func:`ends_after_maps`): the original runs the whole UNet and drops its
output, and nothing after the last map layer reaches the loss, so the gradient is the
same without the later blocks' time and saved activations (SD1.x's 16² maps: the 32² and
64² up blocks, the most expensive ones).
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F

from ..diffusers.attach import Attachment
from ..diffusers.install import find_unet
from ..diffusers.unet_layers import attention_layers
from .excite_maps import ExciteMaps, HRVMaps, MeanMaps
from .hrv import HeadRelevance

DEFAULT_THRESHOLDS = {0: 0.05, 10: 0.5, 20: 0.8}
SD_ATTN_RES = (16, 16)     # the original's maps: SD1.x at 512² (64² latent / 4)
SDXL_ATTN_RES = (32, 32)   # the A&E-SDXL port's: SDXL at 1024² (128² latent / 4)


@dataclass(frozen=True)
class Smoothing:
    """The Gaussian smoothing of each token's map before its max (a depthwise convolution,
    reflect padding kernel_size // 2).

    ``form``: "attend_excite" is the kernel of the A&E code (diffusers and the authors):
    exp(−((x − μ) / (2σ))²), a Gaussian of standard deviation σ·√2; "gaussian" is
    exp(−((x − μ) / σ)² / 2), as HRV's copy writes it. Either is normalised to sum 1.
    """

    kernel_size: int = 3
    sigma: float = 0.5
    form: str = "attend_excite"

    def __post_init__(self):
        if self.form not in ("attend_excite", "gaussian"):
            raise ValueError(f"form: expected 'attend_excite' or 'gaussian', got {self.form!r}")
        if self.kernel_size < 1:
            raise ValueError(f"kernel_size: expected a positive size, got {self.kernel_size}")

    def kernel(self, dtype=torch.float32, device=None) -> torch.Tensor:
        """(k, k): the product of the 1-D kernels, normalised."""
        x = torch.arange(self.kernel_size, dtype=torch.float32)
        mean = (self.kernel_size - 1) / 2
        if self.form == "attend_excite":
            g = 1 / (self.sigma * math.sqrt(2 * math.pi)) * torch.exp(-(((x - mean) / (2 * self.sigma)) ** 2))
        else:
            g = 1 / (self.sigma * math.sqrt(2 * math.pi)) * torch.exp(-((x - mean) / self.sigma) ** 2 / 2)
        kernel = g[:, None] * g[None, :]
        return (kernel / kernel.sum()).to(dtype=dtype, device=device)

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        pad = self.kernel_size // 2
        padded = F.pad(image[None, None], (pad, pad, pad, pad), mode="reflect")
        return F.conv2d(padded, self.kernel(image.dtype, image.device)[None, None])[0, 0]


ATTEND_EXCITE_SMOOTHING = Smoothing()


def token_maps(maps: torch.Tensor, indices: Sequence[int]) -> torch.Tensor:
    """(len(indices), h, w): per token index i (a text position, ≥ 1) the softmax over the
    map columns of 100 · maps, at column i − 1.

    ``maps``: (K, h, w, T) from an :class:`ExciteMaps` (K = 1: one map for every token;
    K = len(indices): the k-th map for the k-th token).
    """
    K, T = maps.shape[0], maps.shape[-1]
    if K not in (1, len(indices)):
        raise ValueError(f"maps: expected 1 or {len(indices)} (one per token index) maps, got {K}")
    bad = [i for i in indices if not 1 <= i <= T]
    if bad:
        raise ValueError(f"token_indices: expected text positions in [1, {T}] (0 is the start token), got {bad}")
    probs = torch.softmax(maps * 100, dim=-1)
    return torch.stack([probs[k if K > 1 else 0, :, :, i - 1] for k, i in enumerate(indices)])


def max_attention_per_token(maps: torch.Tensor, indices: Sequence[int],
                            smoothing: Optional[Smoothing] = ATTEND_EXCITE_SMOOTHING) -> List[torch.Tensor]:
    """Per token index: the max over the grid of its (smoothed) :func:`token_maps` map."""
    return [max_of(image, smoothing) for image in token_maps(maps, indices)]


def max_of(image: torch.Tensor, smoothing: Optional[Smoothing]) -> torch.Tensor:
    return (smoothing(image) if smoothing is not None else image).max()


def excite_loss(max_values: Sequence[torch.Tensor]) -> Optional[torch.Tensor]:
    """max_k (1 − max_k) over the tokens, or None when every max_k ≥ 1 (loss 0: the
    original skips the update)."""
    worst = max(range(len(max_values)), key=lambda k: float(1.0 - max_values[k].detach()))
    loss = 1.0 - max_values[worst]
    return loss if float(loss.detach()) > 0 else None


@dataclass
class ExciteResult:
    """What :func:`attend_and_excite` returns: the pipeline's images (in ``output_type``),
    the final latents, per denoising step the loss of each image before its update (0.0
    where none), and per image the token maps (tokens, h, w) of its last Attend-and-Excite
    forward (:func:`token_maps`, before smoothing; detached)."""

    images: object
    latents: torch.Tensor
    losses: List[List[float]] = field(default_factory=list)
    maps: List[torch.Tensor] = field(default_factory=list)


class _MapsComplete(Exception):
    """Ends a UNet forward after its last map layer (see ends_after_maps)."""


@contextlib.contextmanager
def ends_after_maps(unet, controller: ExciteMaps, latent: Tuple[int, int], text_tokens: int):
    """Yields ``forward(*args, **kwargs)``: ``unet``'s forward, ended right after the
    cross-attention layer that completes ``controller``'s maps (returns None). Which
    layers give maps is known from the architecture (attnctl.diffusers.unet_layers) and
    ``controller.wants``; every cross-attention layer that runs checks that its query
    count is the one the architecture predicts (a RuntimeError naming the layer, before
    any map is missed, if not)."""
    layers = {l.name: l for l in attention_layers(unet, latent, text_tokens) if l.is_cross}
    expected = sum(controller.wants(l.name, l.queries) for l in layers.values())
    modules = dict(unet.named_modules())

    def after(name):
        def hook(module, args, kwargs, output):
            hidden = args[0] if args else kwargs["hidden_states"]
            queries = hidden.shape[1] if hidden.dim() == 3 else hidden.shape[-2] * hidden.shape[-1]
            if queries != layers[name].queries:
                raise RuntimeError(f"attend_and_excite: {name} has {queries} query positions, the UNet's "
                                   f"architecture predicts {layers[name].queries} for a {latent} latent")
            if expected and controller.received == expected:
                raise _MapsComplete
        return hook

    hooks = [modules[name].register_forward_hook(after(name), with_kwargs=True) for name in layers]

    def forward(*args, **kwargs):
        try:
            unet(*args, **kwargs)
        except _MapsComplete:
            pass

    try:
        yield forward
    finally:
        for hook in hooks:
            hook.remove()


class _Excite:
    """One Attend-and-Excite run: the map controller, the loss and the latent updates."""

    def __init__(self, pipe, controller: ExciteMaps, smoothing: Optional[Smoothing], max_refinement_steps: int):
        self.pipe = pipe
        self.controller = controller
        self.smoothing = smoothing
        self.max_refinement_steps = max_refinement_steps
        self.last_maps: Optional[torch.Tensor] = None  # token maps of the last forward, detached

    def loss(self, latent, t, indices, unet_kwargs) -> Optional[torch.Tensor]:
        unet = self.pipe.unet
        with ends_after_maps(unet, self.controller, tuple(latent.shape[-2:]),
                             unet_kwargs["encoder_hidden_states"].shape[1]) as forward:
            forward(latent, t, **unet_kwargs)
        images = token_maps(self.controller.maps(), indices)
        self.last_maps = images.detach()
        return excite_loss([max_of(image, self.smoothing) for image in images])

    @staticmethod
    def update(latent, loss, step_size: float) -> torch.Tensor:
        grad = torch.autograd.grad(loss, [latent])[0]
        return latent - step_size * grad

    def refine(self, latent, loss, threshold, t, indices, step_size, unet_kwargs):
        """The original's iterative refinement: update until the loss is at most
        1 − threshold (or max_refinement_steps updates), then one more forward for the
        loss the step's regular update uses."""
        iteration, target = 0, max(0.0, 1.0 - threshold)
        while _greater(loss, target):
            iteration += 1
            latent = latent.clone().detach().requires_grad_(True)
            loss = self.loss(latent, t, indices, unet_kwargs)
            if loss is not None:
                latent = self.update(latent, loss, step_size)
            if iteration >= self.max_refinement_steps:
                break
        latent = latent.clone().detach().requires_grad_(True)
        return self.loss(latent, t, indices, unet_kwargs), latent


def _value(loss: Optional[torch.Tensor]) -> float:
    return 0.0 if loss is None else float(loss.detach())


def _greater(loss: Optional[torch.Tensor], bound: float) -> bool:
    """loss > bound as the original compares: in the loss's dtype (a zero loss is 0)."""
    return bool(loss > bound) if loss is not None else 0 > bound


def _token_lists(token_indices, prompts: int) -> List[List[int]]:
    if isinstance(token_indices, (list, tuple)) and token_indices and all(isinstance(i, int) for i in token_indices):
        token_indices = [list(token_indices)]
    if (not isinstance(token_indices, (list, tuple)) or not token_indices
            or not all(isinstance(ind, (list, tuple)) and ind and all(isinstance(i, int) for i in ind)
                       for ind in token_indices)):
        raise TypeError(f"token_indices: expected a list of ints or a list of lists of ints, got {token_indices!r}")
    if len(token_indices) != prompts:
        raise ValueError(f"token_indices: expected one list per prompt ({prompts}), got {len(token_indices)}")
    return [list(ind) for ind in token_indices]


@torch.no_grad()
def attend_and_excite(pipe, prompt: Union[str, List[str]], token_indices, *, maps: Optional[ExciteMaps] = None,
                      smoothing: Optional[Smoothing] = ATTEND_EXCITE_SMOOTHING,
                      height: Optional[int] = None, width: Optional[int] = None, num_inference_steps: int = 50,
                      guidance_scale: float = 7.5, negative_prompt=None, num_images_per_prompt: int = 1,
                      eta: float = 0.0, generator=None, latents: Optional[torch.Tensor] = None,
                      output_type: str = "pil", max_iter_to_alter: int = 25,
                      thresholds: Optional[Dict[int, float]] = None, scale_factor: float = 20,
                      scale_range=(1.0, 0.5), attn_res=None, max_refinement_steps: int = 20,
                      cross_attention_kwargs=None, backend: Optional[str] = None) -> ExciteResult:
    """Attend-and-Excite on a Stable Diffusion 1.x / 2.x pipeline (a StableDiffusionPipeline
    or anything with its components and methods) or an SDXL pipeline, with the original's
    defaults.

    SD: equals diffusers' StableDiffusionAttendAndExcitePipeline called with the same
    arguments (``token_indices``: text positions, a list per prompt or one list; every
    image of a prompt uses its list), up to floating-point rounding. SDXL: the same loop
    with SDXL's conditioning (pooled text, time ids for the image size, no crop) and the
    A&E-SDXL port's 32² maps by default; the decode is SD's (no fp16 VAE upcast, no
    latents mean/std). attnctl is installed on the pipeline for the call (and uninstalled
    after, unless it was installed before).

    Args beyond the pipeline's:
        attn_res: the grid of MeanMaps; None: (16, 16) (SD, the original), (32, 32) on SDXL
            (the A&E-SDXL port's).
        maps: the map collector; default ``MeanMaps(attn_res)`` (the original's). Pass an
            :class:`HRVMaps` for HRV-guided A&E (or use :func:`hrv_attend_and_excite`).
        smoothing: a :class:`Smoothing` of each token's map before its max, or None.
        scale_range: the step-size schedule's end points (the authors' code exposes it).
        max_refinement_steps: the refinement's cap (20 in the original).
        backend: attnctl's attention backend for the installation (None: as installed, or
            "auto": Triton for CUDA tensors, the reference on CPU).
    """
    thresholds = dict(DEFAULT_THRESHOLDS if thresholds is None else thresholds)
    unet, _ = find_unet(pipe)
    if attn_res is None:
        sdxl = getattr(unet.config, "addition_embed_type", None) == "text_time"
        attn_res = SDXL_ATTN_RES if sdxl else SD_ATTN_RES
    controller = maps if maps is not None else MeanMaps(attn_res)
    if not isinstance(controller, ExciteMaps):
        raise TypeError(f"maps: expected an attnctl.tools.excite_maps.ExciteMaps (MeanMaps, HRVMaps), "
                        f"got {type(controller).__name__}")
    prompts = [prompt] if isinstance(prompt, str) else list(prompt) if isinstance(prompt, (list, tuple)) else None
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise TypeError(f"prompt: expected a prompt or a non-empty list of prompts (str), got {prompt!r}")
    token_lists = _token_lists(token_indices, len(prompts))
    if isinstance(controller, HRVMaps):
        wrong = [ind for ind in token_lists if len(ind) != len(controller.concepts)]
        if wrong:
            raise ValueError(f"token_indices: expected one index per concept of the HRV maps "
                             f"({controller.concepts}), got {wrong[0]}")
    with Attachment(pipe, controller, backend=backend):
        return _run(pipe, prompts, token_lists, controller, smoothing, height, width, num_inference_steps,
                    guidance_scale, negative_prompt, num_images_per_prompt, eta, generator, latents, output_type,
                    max_iter_to_alter, thresholds, scale_factor, scale_range, max_refinement_steps,
                    cross_attention_kwargs or {})


class _Conditioning:
    """The UNet's text conditioning: one image's (the Attend-and-Excite forwards: its
    conditional text) and the whole CFG batch's (the denoising forward). SD: the text
    embeddings. SDXL: also the pooled text embeddings and the size/crop time ids, made as
    StableDiffusionXLPipeline makes them (the A&E-SDXL port's conditioning)."""

    def __init__(self, pipe, prompts, device, num_images_per_prompt, cfg, negative_prompt, height, width):
        self.sdxl = getattr(pipe.unet.config, "addition_embed_type", None) == "text_time"
        self.cfg = cfg
        if not self.sdxl:
            self.text, negative = pipe.encode_prompt(prompts, device, num_images_per_prompt, cfg, negative_prompt)
            self.all_text = torch.cat([negative, self.text]) if cfg else self.text
            self.pooled = None
            return
        text, negative, pooled, negative_pooled = pipe.encode_prompt(
            prompt=prompts, device=device, num_images_per_prompt=num_images_per_prompt,
            do_classifier_free_guidance=cfg, negative_prompt=negative_prompt)
        projection = pipe.text_encoder_2.config.projection_dim if pipe.text_encoder_2 is not None \
            else int(pooled.shape[-1])
        time_ids = pipe._get_add_time_ids((height, width), (0, 0), (height, width), dtype=text.dtype,
                                          text_encoder_projection_dim=projection).to(device)
        self.text, self.pooled, self.time_ids = text, pooled, time_ids
        self.all_text = torch.cat([negative, text]) if cfg else text
        all_pooled = torch.cat([negative_pooled, pooled]) if cfg else pooled
        self.all_added = {"text_embeds": all_pooled, "time_ids": time_ids.repeat(all_pooled.shape[0], 1)}

    @property
    def dtype(self):
        return self.text.dtype

    def image(self, j: int) -> Dict[str, object]:
        kwargs = {"encoder_hidden_states": self.text[j:j + 1]}
        if self.sdxl:
            kwargs["added_cond_kwargs"] = {"text_embeds": self.pooled[j:j + 1], "time_ids": self.time_ids}
        return kwargs

    def batch(self) -> Dict[str, object]:
        kwargs = {"encoder_hidden_states": self.all_text}
        if self.sdxl:
            kwargs["added_cond_kwargs"] = self.all_added
        return kwargs


def _run(pipe, prompts, token_lists, controller, smoothing, height, width, num_inference_steps, guidance_scale,
         negative_prompt, num_images_per_prompt, eta, generator, latents, output_type, max_iter_to_alter, thresholds,
         scale_factor, scale_range, max_refinement_steps, cross_attention_kwargs) -> ExciteResult:
    unet = pipe.unet
    height = height or unet.config.sample_size * pipe.vae_scale_factor
    width = width or unet.config.sample_size * pipe.vae_scale_factor
    device = pipe._execution_device
    cfg = guidance_scale > 1.0
    images = len(prompts) * num_images_per_prompt
    conditioning = _Conditioning(pipe, prompts, device, num_images_per_prompt, cfg, negative_prompt, height, width)
    pipe.scheduler.set_timesteps(num_inference_steps, device=device)
    timesteps = pipe.scheduler.timesteps
    latents = pipe.prepare_latents(images, unet.config.in_channels, height, width, conditioning.dtype, device,
                                   generator, latents)
    extra_step_kwargs = pipe.prepare_extra_step_kwargs(generator, eta)
    step_size = scale_factor * np.sqrt(np.linspace(scale_range[0], scale_range[1], len(timesteps)))
    indices = [ind for ind in token_lists for _ in range(num_images_per_prompt)]
    excite = _Excite(pipe, controller, smoothing, max_refinement_steps)
    extra = dict(cross_attention_kwargs=cross_attention_kwargs) if cross_attention_kwargs else {}
    losses: List[List[float]] = []
    last_maps: List[torch.Tensor] = [None] * images

    for i, t in enumerate(timesteps):
        with torch.enable_grad():
            latents = latents.clone().detach().requires_grad_(True)
            updated, step_losses = [], []
            for j, (latent, index) in enumerate(zip(latents, indices)):
                latent, unet_kwargs = latent[None], {**conditioning.image(j), **extra}
                loss = excite.loss(latent, t, index, unet_kwargs)
                last_maps[j] = excite.last_maps
                if i in thresholds and _greater(loss, 1.0 - thresholds[i]):
                    loss, latent = excite.refine(latent, loss, thresholds[i], t, index, float(step_size[i]),
                                                 unet_kwargs)
                    last_maps[j] = excite.last_maps
                if i < max_iter_to_alter and loss is not None:
                    latent = excite.update(latent, loss, float(step_size[i]))
                step_losses.append(_value(loss))
                updated.append(latent)
            latents = torch.cat(updated)
            losses.append(step_losses)
        model_input = torch.cat([latents] * 2) if cfg else latents
        model_input = pipe.scheduler.scale_model_input(model_input, t)
        noise = unet(model_input, t, **conditioning.batch(), **extra).sample
        if cfg:
            uncond, text = noise.chunk(2)
            noise = uncond + guidance_scale * (text - uncond)
        latents = pipe.scheduler.step(noise, t, latents, **extra_step_kwargs).prev_sample

    latents = latents.detach()
    if output_type == "latent":
        out = latents
    else:
        decoded = pipe.vae.decode(latents / pipe.vae.config.scaling_factor, return_dict=False)[0]
        out = pipe.image_processor.postprocess(decoded, output_type=output_type)
    return ExciteResult(out, latents, losses, [m.cpu() for m in last_maps if m is not None])


def hrv_attend_and_excite(pipe, prompt: str, token_indices: Sequence[int], hrv: HeadRelevance,
                          concepts: Sequence[str], *, attention_res: int = 8,
                          smoothing: Optional[Smoothing] = None, head_divisor: Optional[float] = None,
                          **kwargs) -> ExciteResult:
    """HRV-guided Attend-and-Excite (the HRV paper's multi-concept generation,
    SNU-DRL/HRV applications/attend_and_excite_hrv.py) with the original's defaults: the
    maps of :class:`HRVMaps` (each token weighted by its concept's head relevance,
    ``concepts[k]`` for ``token_indices[k]``; maps resized to 8²), no smoothing (the
    original's ``--smooth_attentions`` is off by default; ``Smoothing(form="gaussian")``
    is its kernel when on), and A&E's loop, step sizes and thresholds. The original runs
    one prompt, one image, with classifier-free guidance; so does this (the loop itself
    takes batches, each image its own maps and updates). Other keyword arguments go to
    :func:`attend_and_excite`.
    """
    if not isinstance(prompt, str):
        raise TypeError(f"prompt: expected one prompt (the original generates one image at a time), got {prompt!r}")
    maps = HRVMaps(hrv, concepts, attention_res=attention_res, head_divisor=head_divisor)
    return attend_and_excite(pipe, prompt, list(token_indices), maps=maps, smoothing=smoothing, **kwargs)
