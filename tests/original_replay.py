"""Materialising replays of the originals' math, written from their code (no attnctl code):

* cloneofsimo/paint-with-words-sd, paint_with_words/paint_with_words.py
  (``_image_context_seperator``, ``_tokens_img_attention_weight``, ``inj_forward``, the
  default ``weight_function``);
* shape-guided-diffusion/shape-guided-diffusion, utils.py (``preprocess_segm``,
  ``new_attention``, the schedules, ``slerp``, ``inversion``, ``noise_to_latent``,
  ``compute_fixed_indices``) and shape_guided_diffusion.py (``shape_guided_diffusion``).

The replays act on explicit (B, H, M, N) probabilities inside
``control_reference.ReferenceProcessor``.
"""
from __future__ import annotations

import math
from difflib import SequenceMatcher

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F

from control_reference import ReferenceState, reference_processors


def layer_grid(latent, M):
    h, w = latent
    while h * w > M:
        h, w = (h + 1) // 2, (w + 1) // 2
    return h, w


# ---- paint-with-words -------------------------------------------------------------------
def pww_color_regions(color_map: np.ndarray, color_context: dict):
    """``_image_context_seperator``: [(phrase, mask·weight)] from an RGB array and
    {colour: "phrase,weight"}."""
    out = []
    for color, v in color_context.items():
        f = float(v.split(",")[-1])
        v = ",".join(v.split(",")[:-1])
        if isinstance(color, str):
            color = (int(color[1:3], 16), int(color[3:5], 16), int(color[5:7], 16))
        where = (color_map == color).all(axis=-1)
        out.append((v, torch.tensor(where, dtype=torch.float32) * f))
    return out


def pww_weight(tokenizer, prompt, regions, grid):
    """``_tokens_img_attention_weight`` at one layer grid: (M, 77), every occurrence of
    each phrase's token ids, masks resized bilinearly with align_corners=True."""
    token_lis = tokenizer([prompt], padding="max_length", max_length=tokenizer.model_max_length,
                          truncation=True).input_ids[0]
    h_r, w_r = grid
    ret = torch.zeros(h_r * w_r, len(token_lis))
    for phrase, img in regions:
        v = tokenizer(phrase, max_length=tokenizer.model_max_length, truncation=True)["input_ids"][1:-1]
        for idx in range(len(token_lis)):
            if token_lis[idx:idx + len(v)] == v:
                flat = F.interpolate(img[None, None], size=(h_r, w_r), mode="bilinear", align_corners=True).squeeze()
                ret[:, idx:idx + len(v)] += flat.reshape(-1, 1).repeat(1, len(v))
    return ret


class PaintWithWordsOriginal(ReferenceState):
    """``inj_forward``: scores = (QKᵀ + 0.1·w·log(σ+1)·max(QKᵀ)) · scale on the conditional
    pass (the unconditional pass has weight 0), σ = scheduler.sigmas[step]."""

    def __init__(self, pipe, prompt, regions, weight=0.1):
        super().__init__()
        self.pipe, self.prompt, self.regions, self.weight = pipe, prompt, regions, weight

    def bias(self, info):
        if not info.is_cross:
            return None
        B, H, M, _ = info.q.shape
        w = pww_weight(self.pipe.tokenizer, self.prompt, self.regions, layer_grid(info.latent, M))
        sigma = self.pipe.scheduler.sigmas[info.step]
        qk = info.q @ info.k.transpose(-1, -2)
        bias = torch.zeros(B, 1, M, w.shape[1])
        for row in range(B // 2, B):
            bias[row, 0] = info.scale * (self.weight * w * math.log(sigma + 1) * qk[row].max())
        return bias


# ---- Shape-Guided Diffusion -------------------------------------------------------------
def sgd_segm(mask_image: PIL.Image.Image, grid):
    """``preprocess_segm`` (repaint=True) at a layer grid: (M,), 1 on the kept background."""
    h, w = grid
    segm = mask_image.convert("L").resize((w, h), resample=PIL.Image.NEAREST)
    segm = np.array(segm).astype(np.float32) / 255.0
    return 1 - torch.from_numpy(segm).reshape(-1)


def sgd_self_scale(schedule, progress):
    if not isinstance(schedule, str):
        return schedule
    if schedule == "linear":
        return 1 - progress
    if schedule == "exponential":
        return 0.95 ** (progress * 50)
    return (1 + math.cos(progress * math.pi)) / 2


class InsideOutsideOriginal(ReferenceState):
    """``new_attention`` on every UNet pass: token masking (attn2) and self-attention
    masking (attn1) with the given index sets."""

    def __init__(self, mask_image, inside, outside, pad, *, cross_schedule=2.5, self_schedule=1.0,
                 mask_tokens=True, mask_self=True, fixed=None, progress_of_step=None):
        super().__init__()
        self.mask_image, self.inside, self.outside, self.pad = mask_image, inside, outside, pad
        self.cross_schedule, self.self_schedule = cross_schedule, self_schedule
        self.mask_tokens, self.mask_self = mask_tokens, mask_self
        self.fixed = fixed                    # (inside fixed, outside fixed) or None
        self.progress = 0.0
        self.progress_of_step = progress_of_step

    def edit(self, info, probs):
        B, H, M, N = probs.shape
        if self.progress_of_step is not None:
            self.progress = self.progress_of_step(info.step)
        attn = probs.reshape(B * H, M, N).clone()
        segm = sgd_segm(self.mask_image, layer_grid(info.latent, M)).to(probs.dtype).view(1, M, 1).expand(B * H, M, 1)
        fixed_in, fixed_out = self.fixed if self.fixed is not None else (None, None)
        scale = self.cross_schedule
        if info.is_cross and not self.mask_tokens:
            attn *= scale
            for fixed in (fixed_in, fixed_out):
                if fixed is not None:
                    attn[:, :, fixed] /= scale
        if info.is_cross and self.mask_tokens:
            inside_slice = attn[:, :, self.inside] * (1 - segm)
            outside_slice = attn[:, :, self.outside] * segm
            attn[:, :, self.inside] = inside_slice * scale
            attn[:, :, self.outside] = outside_slice * scale
            for fixed in (fixed_in, fixed_out):
                if fixed is not None:
                    attn[:, :, fixed] /= scale
            attn[:, :, self.pad] = 0
        if not info.is_cross and self.mask_self:
            _, mask_outside_indices, _ = segm.nonzero(as_tuple=True)
            insideout_mask = torch.ones_like(attn) * (1 - segm)
            insideout_mask[:, :, mask_outside_indices] = segm
            self_attn_scale = sgd_self_scale(self.self_schedule, self.progress)
            attn = attn * ((insideout_mask - 1) * self_attn_scale + 1)
        return attn.view(B, H, M, N)


def sgd_slerp(z1, z2, alpha):
    theta = torch.acos(torch.sum(z1 * z2) / (torch.norm(z1) * torch.norm(z2)))
    return (torch.sin((1 - alpha) * theta) / torch.sin(theta) * z1
            + torch.sin(alpha * theta) / torch.sin(theta) * z2)


def sgd_noise_to_latent(latent, noise_pred, at, eta, at_next):
    x0_t = (latent - noise_pred * (1 - at).sqrt()) / at.sqrt()
    c1 = 0 if eta == 0 else eta * ((1 - at / at_next) * (1 - at_next) / (1 - at)).sqrt()
    c2 = ((1 - at_next) - c1 ** 2).sqrt()
    return at_next.sqrt() * x0_t + c1 * torch.randn_like(latent) + c2 * noise_pred


def sgd_fixed_indices(tokens_inversion, tokens, num_tokens=38):
    first_pad = tokens["attention_mask"].sum().item() - 1
    a = tokens_inversion.input_ids.numpy()[0]
    b = tokens.input_ids.numpy()[0]
    fixed = []
    for name, a0, a1, b0, b1 in SequenceMatcher(None, a, b).get_opcodes():
        if name == "equal" and b0 < first_pad:
            fixed += list(range(b0, min(b1, num_tokens)))
    return torch.tensor(fixed, dtype=torch.long)[1:]


def sgd_original(pipe, init_image, mask_image, *, prompt_inside, prompt_outside, prompt_inversion_inside,
                 prompt_inversion_outside, num_inside=38, num_outside=38, guidance_scale=3.5, steps=50,
                 copy_background=True, run_cross_attention_mask=True, run_self_attention_mask=True,
                 self_attn_schedule=1.0, cross_attn_schedule=2.5, run_inversion=True, noise_mixing=0.0,
                 invert_mask=False, init_image_strength=1.0, generator=None):
    """``shape_guided_diffusion`` (eta 0) on ``pipe``'s models with explicit attention;
    ``init_image`` a (1, 3, H, W) tensor in [-1, 1], ``mask_image`` a PIL image. Latents."""
    from diffusers import DDIMScheduler

    unet, vae, tokenizer, clip = pipe.unet, pipe.vae, pipe.tokenizer, pipe.text_encoder
    height, width = init_image.shape[-2:]
    factor = pipe.vae_scale_factor
    segm = mask_image.convert("L").resize((width // factor, height // factor), resample=PIL.Image.NEAREST)
    mask = 1 - torch.from_numpy(np.tile(np.array(segm).astype(np.float32) / 255.0, (4, 1, 1))[None])
    if invert_mask:
        mask = 1.0 - mask

    def embed(prompt):
        tokens = tokenizer(prompt, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                           return_tensors="pt")
        return tokens, clip(tokens.input_ids).last_hidden_state

    inside_idx = torch.tensor(list(range(1, num_inside + 1)))
    outside_idx = torch.tensor(list(range(num_inside + 1, num_inside + num_outside + 1)))
    pad_idx = torch.tensor([0] + list(range(num_inside + num_outside + 1, 77)))
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              num_train_timesteps=1000)
    scheduler.set_timesteps(steps)
    # latent_dist.sample(generator), with the fp32 draw of the fp32 pipeline at any precision
    dist = vae.encode(init_image).latent_dist
    eps = torch.randn(dist.mean.shape, generator=generator).to(dist.mean.dtype)
    init_latent = (dist.mean + dist.std * eps) * vae.config.scaling_factor
    t_start = steps - int(steps * init_image_strength)
    _, uncond = embed("")
    collect_in = torch.tensor(list(range(1, num_inside + 1)))
    collect_out = torch.tensor(list(range(1, num_outside + 1)))
    emb_inversion = uncond.clone()
    tok_inv_in, e = embed(prompt_inversion_inside)
    emb_inversion[:, inside_idx] = e[:, collect_in]
    tok_inv_out, e = embed(prompt_inversion_outside)
    emb_inversion[:, outside_idx] = e[:, collect_out]
    cond = uncond.clone()
    tok_in, e = embed(prompt_inside)
    cond[:, inside_idx] = e[:, collect_in]
    tok_out, e = embed(prompt_outside)
    cond[:, outside_idx] = e[:, collect_out]
    fixed_in = sgd_fixed_indices(tok_inv_in, tok_in, num_inside)
    fixed_out = outside_idx[sgd_fixed_indices(tok_inv_out, tok_out, num_outside) - 1]
    noise = torch.randn((1, unet.config.in_channels, height // factor, width // factor), generator=generator)
    noise, mask = noise.to(unet.dtype), mask.to(unet.dtype)

    state = InsideOutsideOriginal(mask_image, inside_idx, outside_idx, pad_idx, cross_schedule=cross_attn_schedule,
                                  self_schedule=self_attn_schedule, mask_tokens=run_cross_attention_mask,
                                  mask_self=run_self_attention_mask)
    b = scheduler.betas
    alphas = (1 - b).cumprod(dim=0)
    with reference_processors(unet, state), torch.no_grad():
        if run_inversion:
            seq = torch.flip(scheduler.timesteps, dims=(0,))
            seq_next = [-1] + list(seq[:-1])
            xs = [init_latent]
            state.progress = 0.0
            for i, j in zip(seq_next[1:], seq[1:]):
                t = torch.ones(1) * i
                at = alphas.index_select(0, t.long())
                at_next = alphas.index_select(0, (torch.ones(1) * j).long())
                et = unet(xs[-1], t, encoder_hidden_states=emb_inversion).sample
                x0_t = (xs[-1] - et * (1 - at).sqrt()) / at.sqrt()
                xs.append(at_next.sqrt() * x0_t + 0 * torch.randn_like(xs[-1]) + (1 - at_next).sqrt() * et)
            init_latent = xs[-t_start - 1]
            start_latent = init_latent
        else:
            start_latent = scheduler.add_noise(init_latent, noise, scheduler.timesteps[t_start])
        state.fixed = (fixed_in, fixed_out)
        timesteps = scheduler.timesteps[t_start:]
        seq = torch.flip(timesteps, dims=(0,))
        seq_next = [-1] + list(seq[:-1])
        seq_iter, seq_next_iter = reversed(seq), reversed(seq_next)
        latent = start_latent
        latent = latent * mask + sgd_slerp(latent, noise, noise_mixing) * (1 - mask)
        for i, (t, next_t) in enumerate(zip(seq_iter, seq_next_iter)):
            t = torch.ones(1) * t
            next_t = torch.ones(1) * next_t
            at = alphas.index_select(0, t.long())
            at_next = torch.ones_like(at) if next_t.sum() == -1 else alphas.index_select(0, next_t.long())
            state.progress = i / len(seq_iter)
            pred_cond = unet(latent, t, encoder_hidden_states=cond).sample
            pred_uncond = unet(latent, t, encoder_hidden_states=uncond).sample
            if guidance_scale == -1:
                pred = pred_cond
            else:
                pred = pred_cond + guidance_scale * (pred_cond - pred_uncond)
            latent = sgd_noise_to_latent(latent, pred, at, 0.0, at_next)
            if copy_background:
                if run_inversion:
                    background = xs[-(t_start + i) - 1]
                else:
                    background = scheduler.add_noise(init_latent, noise, seq_iter[i])
                latent = background * mask + latent * (1 - mask)
    return latent
