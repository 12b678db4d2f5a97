"""Shape-Guided Diffusion (Park et al. 2022, shape-guided-diffusion/shape-guided-diffusion)
on attnctl's inside-outside attention (:class:`attnctl.tools.inside_outside.InsideOutside`).

Inpainting of the region of an object mask with a plain Stable Diffusion UNet, as the
original's ``shape_guided_diffusion``:

1. The text condition is one 77-token sequence: the empty prompt's start token, then
   positions 1..num_inside taken from the inside prompt's encoding (its positions
   1..num_inside), then num_outside positions from the outside prompt's. Inside-outside
   attention ties the first block to the object's pixels and the second to the rest, boosts
   both ×2.5 except the tokens the prompt shares with the inversion prompt ("fixed"), zeroes
   the start token, and masks self-attention across the object's boundary, on both
   halves of classifier-free guidance.
2. DDIM inversion of the image's latent under the inversion prompts (inside-outside
   attention on, no fixed tokens, schedules at progress 0), or plain noising when
   ``run_inversion=False``.
3. The start latent's region is slerped towards the noise (``noise_mixing``, 0 = off).
4. DDIM sampling (η = ``eta``) with guidance ε = ε_c + g·(ε_c − ε_u) (the original's form:
   g = 3.5 there is diffusers' 4.5); after each step the background is copied back from
   the inverted (or noised) latents at the step's timestep t, as the original does.

Differences from the original, all choices of the caller's side: the image is not resized
to 512² (give it at the size to generate; sides must divide by the UNet's total
downsampling); the mask is thresholded (the original uses its grey values: the same for a
black-and-white mask); the betas come from ``pipe.scheduler``'s config (the original
hard-codes SD's, which are the same); the unconditional and conditional passes run as one
batch; η > 0 draws its noise from ``generator``.
"""
from __future__ import annotations

from difflib import SequenceMatcher
from typing import List, Optional, Sequence

import torch

from ..diffusers.install import install, installation_of
from ._args import finite
from ._masks import as_mask, check_mask_size, mask_on_grid
from .inside_outside import CROSS_BOOST, InsideOutside, SCHEDULES


def slerp(z1: torch.Tensor, z2: torch.Tensor, alpha: float) -> torch.Tensor:
    """Spherical interpolation of two whole tensors (the original's ``slerp``)."""
    theta = torch.acos(torch.sum(z1 * z2) / (torch.norm(z1) * torch.norm(z2)))
    return (torch.sin((1 - alpha) * theta) / torch.sin(theta) * z1
            + torch.sin(alpha * theta) / torch.sin(theta) * z2)


def fixed_positions(inversion_ids: Sequence[int], ids: Sequence[int], first_pad: int, num_tokens: int) -> List[int]:
    """Positions of ``ids`` (a padded prompt whose end token is at ``first_pad``) in runs
    equal to the inversion prompt's ids, before the end token and below ``num_tokens``,
    without the start token (the original's ``compute_fixed_indices``)."""
    fixed: List[int] = []
    for name, _, _, b0, b1 in SequenceMatcher(None, list(inversion_ids), list(ids)).get_opcodes():
        if name == "equal" and b0 < first_pad:
            fixed += range(b0, min(b1, num_tokens))
    return fixed[1:]


def _image_tensor(image) -> torch.Tensor:
    """(1, 3, H, W) in [-1, 1] from a PIL image, an (H, W, 3|4) uint8 array or a
    (1|, 3, H, W) float tensor already in [-1, 1]."""
    if isinstance(image, torch.Tensor):
        x = image[None] if image.dim() == 3 else image
        if x.dim() != 4 or x.shape[:2] != (1, 3) or not x.is_floating_point():
            raise ValueError(f"image: expected a float tensor (1, 3, H, W) or (3, H, W) in [-1, 1], got "
                             f"{x.dtype} of shape {tuple(image.shape)}")
        return x
    import numpy as np

    try:
        array = np.asarray(image)
    except Exception:
        raise TypeError(f"image: expected a PIL image, an array or a tensor, got {type(image).__name__}") from None
    if array.dtype != np.uint8 or array.ndim != 3 or array.shape[-1] not in (3, 4):
        raise ValueError(f"image: expected an RGB(A) image of uint8 (H, W, 3|4), got {array.dtype} of shape "
                         f"{array.shape}")
    x = torch.from_numpy(array[:, :, :3].astype(np.float32)).permute(2, 0, 1)[None] / 255.0
    return 2.0 * x - 1.0


def _encode(pipe, prompt: str, device):
    tokenizer = pipe.tokenizer
    tokens = tokenizer(prompt, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                       return_tensors="pt")
    return tokens, pipe.text_encoder(tokens.input_ids.to(device))[0]


def _condition(pipe, empty, inside: str, outside: str, num_inside: int, num_outside: int, device):
    """The original's spliced condition and its inside/outside token ids."""
    tokens_in, emb_in = _encode(pipe, inside, device)
    tokens_out, emb_out = _encode(pipe, outside, device)
    condition = empty.clone()
    condition[:, 1:num_inside + 1] = emb_in[:, 1:num_inside + 1]
    condition[:, num_inside + 1:num_inside + num_outside + 1] = emb_out[:, 1:num_outside + 1]
    return condition, tokens_in, tokens_out


def _fixed(inversion_tokens, tokens, num_tokens: int) -> List[int]:
    first_pad = int(tokens.attention_mask.sum()) - 1
    return fixed_positions(inversion_tokens.input_ids[0].tolist(), tokens.input_ids[0].tolist(), first_pad,
                           num_tokens)


@torch.no_grad()
def shape_guided_inpaint(pipe, image, mask, *, prompt_inside: str, prompt_outside: str,
                         prompt_inversion_inside: str, prompt_inversion_outside: str,
                         num_inside: int = 38, num_outside: int = 38, invert_mask: bool = False,
                         guidance_scale: float = 3.5, steps: int = 50, copy_background: bool = True,
                         run_cross_attention_mask: bool = True, run_self_attention_mask: bool = True,
                         self_attn_schedule=1.0, cross_attn_schedule: float = CROSS_BOOST,
                         run_inversion: bool = True, eta: float = 0.0, noise_mixing: float = 0.0,
                         init_image_strength: float = 1.0, generator: Optional[torch.Generator] = None,
                         noise: Optional[torch.Tensor] = None, threshold: float = 0.5,
                         output_type: str = "pil", backend: Optional[str] = None):
    """Inpaint the white region of ``mask`` (image or latent size; ``invert_mask`` keeps
    it and repaints the rest) in ``image`` with ``prompt_inside`` there and
    ``prompt_outside`` around it. Arguments and defaults are the original's
    ``shape_guided_diffusion``; ``self_attn_schedule`` is a number or "linear",
    "exponential", "cosine"; ``guidance_scale=-1`` uses the conditional prediction alone.
    Returns ``pipe.image_processor.postprocess`` of the result (``output_type`` "pil", "np"
    or "pt") or the latents (``"latent"``)."""
    from diffusers import DDIMScheduler

    unet, vae = pipe.unet, pipe.vae
    device, dtype = unet.device, unet.dtype
    x = _image_tensor(image)
    height, width = x.shape[-2:]
    factor = pipe.vae_scale_factor
    multiple = factor * 2 ** (len(unet.config.block_out_channels) - 1)
    if height % multiple or width % multiple:
        raise ValueError(f"image: expected sides divisible by {multiple} (the VAE's {factor} x the UNet's "
                         f"downsampling), got {height}x{width}")
    if unet.config.addition_embed_type is not None:
        raise ValueError(f"pipe: expected a Stable Diffusion 1.x/2.x pipeline (a UNet conditioned on the text "
                         f"alone, as the original's), got a UNet with addition_embed_type="
                         f"{unet.config.addition_embed_type!r} ({type(pipe).__name__})")
    if unet.config.in_channels != vae.config.latent_channels:
        raise ValueError(f"pipe: expected a text-to-image UNet taking the {vae.config.latent_channels} latent "
                         f"channels (Shape-Guided Diffusion runs a plain SD UNet), got {unet.config.in_channels}")
    latent_size = (height // factor, width // factor)
    object_mask = as_mask(mask, "mask")
    check_mask_size(object_mask, "mask", latent_size, factor)
    text_length = pipe.tokenizer.model_max_length
    if num_inside < 1 or num_outside < 0 or num_inside + num_outside + 1 > text_length:
        raise ValueError(f"num_inside, num_outside: expected num_inside >= 1, num_outside >= 0 and "
                         f"1 + num_inside + num_outside <= {text_length}, got {num_inside}, {num_outside}")
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps: expected an int >= 1, got {steps!r}")
    if isinstance(self_attn_schedule, str) and self_attn_schedule not in SCHEDULES:
        raise ValueError(f"self_attn_schedule: expected a number or one of {', '.join(SCHEDULES)}, "
                         f"got {self_attn_schedule!r}")
    guidance_scale, eta, noise_mixing = (finite(v, n) for v, n in ((guidance_scale, "guidance_scale"),
                                         (eta, "eta"), (noise_mixing, "noise_mixing")))
    strength = finite(init_image_strength, "init_image_strength")
    if not 0.0 <= strength <= 1.0 or int(steps * strength) < 1:
        raise ValueError(f"init_image_strength: expected a number in [0, 1] with steps x init_image_strength >= 1, "
                         f"got {init_image_strength!r} (steps={steps})")
    threshold = finite(threshold, "threshold")
    noise_shape = (1, unet.config.in_channels, *latent_size)
    if noise is not None and tuple(noise.shape) != noise_shape:
        raise ValueError(f"noise: expected shape {noise_shape}, got {tuple(noise.shape)}")

    # keep = 1 on the background (black), 0 on the object (white): the original's latent mask.
    inside = (mask_on_grid(object_mask, latent_size, "nearest-exact") > threshold).float().view(1, 1, *latent_size)
    keep = (inside if invert_mask else 1.0 - inside).to(device, dtype)

    config = pipe.scheduler.config
    ddim = DDIMScheduler(num_train_timesteps=config.num_train_timesteps, beta_start=config.beta_start,
                         beta_end=config.beta_end, beta_schedule=config.beta_schedule,
                         trained_betas=config.get("trained_betas"))
    ddim.set_timesteps(steps)
    alphas = ddim.alphas_cumprod.to(device)
    init_latent = vae.encode(x.to(device, vae.dtype)).latent_dist.sample(generator=generator)
    init_latent = (init_latent * vae.config.scaling_factor).to(dtype)
    t_start = steps - int(steps * strength)

    _, empty = _encode(pipe, "", device)
    inversion, inv_in, inv_out = _condition(pipe, empty, prompt_inversion_inside, prompt_inversion_outside,
                                            num_inside, num_outside, device)
    condition, tok_in, tok_out = _condition(pipe, empty, prompt_inside, prompt_outside, num_inside, num_outside,
                                            device)
    fixed = _fixed(inv_in, tok_in, num_inside) + [num_inside + p for p in _fixed(inv_out, tok_out, num_outside)]

    if noise is None:
        noise = torch.randn(noise_shape, generator=generator, device=generator.device if generator else device)
    noise = noise.to(device, dtype)

    def controller(fixed_columns):
        inside_cols = list(range(1, num_inside + 1))
        outside_cols = list(range(num_inside + 1, num_inside + num_outside + 1))
        pad_cols = [0] + list(range(num_inside + num_outside + 1, text_length))
        self_strength = self_attn_schedule if run_self_attention_mask else None
        if run_cross_attention_mask:
            return InsideOutside(object_mask, inside_cols, outside_cols, fixed=fixed_columns,
                                 cross_boost=cross_attn_schedule, zeroed=pad_cols, self_strength=self_strength,
                                 threshold=threshold)
        # The original without the token mask: every token's probability x cross_attn_schedule
        # (fixed ones excepted), no region factor, nothing zeroed.
        return InsideOutside(object_mask, list(range(text_length)), fixed=fixed_columns,
                             cross_boost=cross_attn_schedule, cross_strength=0.0, zeroed=(),
                             self_strength=self_strength, threshold=threshold)

    installed = installation_of(pipe) is not None
    installation = install(pipe, backend=backend)
    inversion_control, control = controller([]), controller(fixed)
    try:
        installation.start_generation(None, num_prompts=1, cfg=True, tokenizer=pipe.tokenizer)
        if run_inversion:
            # The original inverts with no fixed tokens and the schedules at progress 0.
            installation.add(inversion_control)
            inversion_control.progress = 0.0
            inverted = _invert(unet, init_latent, ddim.timesteps.tolist(), alphas, inversion)
            installation.remove(inversion_control)
            start = inverted[-t_start - 1]
        else:
            start = ddim.add_noise(init_latent, noise, ddim.timesteps[t_start:t_start + 1])
        latent = start * keep + slerp(start, noise, noise_mixing) * (1 - keep)

        installation.add(control)
        text = torch.cat([empty, condition])
        timesteps = ddim.timesteps[t_start:].tolist()
        for i, t in enumerate(timesteps):
            control.progress = i / len(timesteps)
            t_next = timesteps[i + 1] if i + 1 < len(timesteps) else -1
            at = alphas[t]
            at_next = alphas[t_next] if t_next >= 0 else torch.ones_like(at)
            timestep = torch.full((1,), float(t), device=device)
            uncond, cond = unet(torch.cat([latent, latent]), timestep, encoder_hidden_states=text).sample.chunk(2)
            eps = cond if guidance_scale == -1 else cond + guidance_scale * (cond - uncond)
            latent = _ddim_step(latent, eps, at, at_next, eta, generator)
            if copy_background:
                background = (inverted[-(t_start + i) - 1] if run_inversion
                              else ddim.add_noise(init_latent, noise, ddim.timesteps[t_start + i:t_start + i + 1]))
                latent = background * keep + latent * (1 - keep)
    finally:
        if installed:   # the caller's installation (and its controllers) stays
            installation.remove(inversion_control)
            installation.remove(control)
        else:
            installation.uninstall()
    if output_type == "latent":
        return latent
    decoded = vae.decode((latent / vae.config.scaling_factor).to(vae.dtype)).sample
    return pipe.image_processor.postprocess(decoded, output_type=output_type)


def _invert(unet, latent, timesteps: List[int], alphas, condition) -> List[torch.Tensor]:
    """DDIM inversion over the ascending ``timesteps`` (the original's ``inversion`` with
    run_inversion=True): [x_0, x_t1, ..., x_tlast]."""
    ascending = sorted(timesteps)
    latents = [latent]
    for t, t_next in zip(ascending[:-1], ascending[1:]):
        timestep = torch.full((1,), float(t), device=latent.device)
        eps = unet(latents[-1], timestep, encoder_hidden_states=condition).sample
        latents.append(_ddim_step(latents[-1], eps, alphas[t], alphas[t_next], 0.0, None))
    return latents


def _ddim_step(latent, eps, at, at_next, eta: float, generator):
    """x_t -> x_t_next (the original's ``noise_to_latent``)."""
    x0 = (latent - eps * (1 - at).sqrt()) / at.sqrt()
    c1 = eta * ((1 - at / at_next) * (1 - at_next) / (1 - at)).sqrt() if eta else 0.0
    c2 = ((1 - at_next) - c1 ** 2).sqrt()
    fresh = (c1 * torch.randn(latent.shape, generator=generator,
                              device=generator.device if generator else latent.device).to(latent)) if eta else 0.0
    return at_next.sqrt() * x0 + fresh + c2 * eps
