"""HRV-guided Attend-and-Excite replayed as the original writes it (SNU-DRL/HRV,
applications/attend_and_excite_hrv.py), materialising softmax(QKᵀ) per layer; no attnctl
code involved.

The original's loop is Attend-and-Excite's (the authors', which diffusers'
StableDiffusionAttendAndExcitePipeline follows) for one prompt and one image with
classifier-free guidance; its extra no-grad forwards inside the refinement only print.
So the replay runs diffusers' pipeline loop with the original's AttentionStoreHead
(per-head maps of every cross-attention layer, each resized to attention_res² — blurred
like torchvision's gaussian_blur, then bicubic — and summed with the head relevance
``concept_vectors[concept, head_index == "<place>, layer: <l>, head: <h>"] / 128``) and its
_compute_max_attention_per_index (softmax over text columns 1 … 76, smoothing off by
default, HRV's Gaussian when on).
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as nnf


def torchvision_gaussian_blur(img, kernel_size, sigma):
    """torchvision.transforms.functional.gaussian_blur on a float tensor (C, H, W) or
    (N, C, H, W), transcribed (torchvision is not a dependency here)."""
    kx, ky = kernel_size
    sx, sy = sigma

    def kernel1d(k, s):
        ksize_half = (k - 1) * 0.5
        x = torch.linspace(-ksize_half, ksize_half, steps=k, dtype=img.dtype)
        pdf = torch.exp(-0.5 * (x / s).pow(2))
        return pdf / pdf.sum()

    kernel = torch.mm(kernel1d(ky, sy)[:, None], kernel1d(kx, sx)[None, :])
    kernel = kernel.expand(img.shape[-3], 1, kernel.shape[0], kernel.shape[1])
    squeeze = img.dim() == 3
    if squeeze:
        img = img[None]
    img = nnf.pad(img, [kx // 2, kx // 2, ky // 2, ky // 2], mode="reflect")
    img = nnf.conv2d(img, kernel, groups=img.shape[-3])
    return img[0] if squeeze else img


class GaussianSmoothingHRV(torch.nn.Module):
    """HRV's copy of GaussianSmoothing (the exp(-((x - mean) / std) ** 2 / 2) kernel)."""

    def __init__(self, channels, kernel_size, sigma, dim=2):
        super().__init__()
        kernel_size = [kernel_size] * dim
        sigma = [sigma] * dim
        kernel = 1
        meshgrids = torch.meshgrid([torch.arange(size, dtype=torch.float32) for size in kernel_size], indexing="ij")
        for size, std, mgrid in zip(kernel_size, sigma, meshgrids):
            mean = (size - 1) / 2
            kernel *= 1 / (std * math.sqrt(2 * math.pi)) * torch.exp(-((mgrid - mean) / std) ** 2 / 2)
        kernel = kernel / torch.sum(kernel)
        kernel = kernel.view(1, 1, *kernel.size())
        kernel = kernel.repeat(channels, *[1] * (kernel.dim() - 1))
        self.register_buffer("weight", kernel)
        self.groups = channels

    def forward(self, input):
        return nnf.conv2d(input, weight=self.weight.to(input.dtype), groups=self.groups)


class AttentionStoreHead:
    """The original's AttentionStoreHead.forward, with its module-level args passed in."""

    def __init__(self, concepts, all_concepts, concept_vectors, head_index, attention_res):
        self.concepts = concepts                  # args.concepts: one per token to alter
        self.all_concepts = all_concepts          # CONCEPTS: the rows of concept_vectors
        self.concept_vectors = concept_vectors
        self.head_index = head_index
        self.attention_res = attention_res
        self.averaged_maps = [0 for _ in range(len(concepts))]

    def __call__(self, attn, is_cross, place_in_unet, layer, num_heads):
        if not is_cross or attn.shape[0] == 2 * num_heads:
            return attn
        batch_size = attn.shape[0] // num_heads
        reshaped_attn = attn.reshape(batch_size, num_heads, *attn.shape[1:])
        res = int(math.sqrt(reshaped_attn.shape[2]))
        cross_maps = reshaped_attn.reshape(reshaped_attn.shape[1], res, res, reshaped_attn.shape[-1])
        R = self.attention_res
        if res < R:
            cross_maps = cross_maps.permute(0, 3, 1, 2)
            cross_maps = nnf.interpolate(cross_maps, size=(R, R), mode="bicubic", align_corners=False)
            cross_maps = cross_maps.permute(0, 2, 3, 1)
        elif res > R:
            cross_maps = cross_maps.permute(0, 3, 1, 2)
            kernel_size_ = (res // R) + 1
            sigma_ = 0.3 * ((kernel_size_ - 1) * 0.5 - 1) + 0.8
            cross_maps = torchvision_gaussian_blur(cross_maps, (kernel_size_, kernel_size_), (sigma_, sigma_))
            cross_maps = nnf.interpolate(cross_maps, size=(R, R), mode="bicubic", align_corners=False)
            cross_maps = cross_maps.permute(0, 2, 3, 1)
        if place_in_unet == "down" and layer == 0:
            self.averaged_maps = [0 for _ in range(len(self.concepts))]
        for idx, concept in enumerate(self.concepts):
            for head in range(num_heads):
                head_pos = f"{place_in_unet}, layer: {layer}, head: {head}"
                soft_rescale_factor = self.concept_vectors[self.all_concepts.index(concept),
                                                           np.where(self.head_index == head_pos)[0][0]]
                self.averaged_maps[idx] += (float(soft_rescale_factor) * cross_maps[head, :, :, :] / 128)
        return attn


def register_attention_control(unet, controller):
    """The original's register_attention_control: every Attention module's forward
    replaced, ``layer = count // 2`` counting Attention modules within down / up / mid."""
    from diffusers.models.attention_processor import Attention

    def ca_forward(self, place_in_unet, count):
        to_out = self.to_out[0]

        def forward(hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
            is_cross = encoder_hidden_states is not None
            layer = count // 2
            batch_size, sequence_length, _ = (
                hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape)
            attention_mask = self.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            query = self.to_q(hidden_states)
            if encoder_hidden_states is None:
                encoder_hidden_states = hidden_states
            key = self.to_k(encoder_hidden_states)
            value = self.to_v(encoder_hidden_states)
            wo_head = key.shape[0]
            query = self.head_to_batch_dim(query)
            key = self.head_to_batch_dim(key)
            value = self.head_to_batch_dim(value)
            num_heads = int(key.shape[0] // wo_head)
            attention_probs = self.get_attention_scores(query, key, attention_mask)
            attention_probs = controller(attention_probs, is_cross, place_in_unet, layer, num_heads)
            hidden_states = torch.bmm(attention_probs, value)
            hidden_states = self.batch_to_head_dim(hidden_states)
            return to_out(hidden_states)
        return forward

    originals = {}

    def register_recr(net_, count, place_in_unet):
        if isinstance(net_, Attention):
            originals[net_] = net_.forward
            net_.forward = ca_forward(net_, place_in_unet, count)
            return count + 1
        for child in net_.children():
            count = register_recr(child, count, place_in_unet)
        return count

    for name, net in unet.named_children():
        if "down" in name:
            register_recr(net, 0, "down")
        elif "up" in name:
            register_recr(net, 0, "up")
        elif "mid" in name:
            register_recr(net, 0, "mid")
    return originals


def hrv_max_attention_per_index(attention_maps, indices_to_alter, model_max_length, smooth_attentions=False,
                                sigma=0.5, kernel_size=3):
    """The original's _compute_max_attention_per_index (HRV maps, normalize_before_eot=False)."""
    last_idx = model_max_length
    attention_for_text = attention_maps[:, :, :, 1:last_idx]
    attention_for_text = attention_for_text * 100
    attention_for_text = nnf.softmax(attention_for_text, dim=-1)
    indices_to_alter = [index - 1 for index in indices_to_alter]
    max_values_list = []
    for idx, i in enumerate(indices_to_alter):
        image = attention_for_text[idx, :, :, i]
        if smooth_attentions:
            smoothing = GaussianSmoothingHRV(channels=1, kernel_size=kernel_size, sigma=sigma, dim=2)
            input = nnf.pad(image.unsqueeze(0).unsqueeze(0), [kernel_size // 2] * 4, mode="reflect")
            image = smoothing(input).squeeze(0).squeeze(0)
        max_values_list.append(image.max())
    return max_values_list


def hrv_pipeline(pipe, store, smooth_attentions=False):
    """diffusers' Attend-and-Excite pipeline on ``pipe``'s components whose maps and max
    are the original HRV's; the caller registers ``store`` with register_attention_control."""
    from diffusers import StableDiffusionAttendAndExcitePipeline

    class HRVAttendAndExcite(StableDiffusionAttendAndExcitePipeline):
        def register_attention_control(self):
            pass  # the original's forwards are registered by the caller

        def _aggregate_and_get_max_attention_per_token(self, indices):
            attention_maps = torch.stack(store.averaged_maps, dim=0)
            return hrv_max_attention_per_index(attention_maps, indices, self.tokenizer.model_max_length,
                                               smooth_attentions=smooth_attentions)

    components = {k: v for k, v in pipe.components.items() if k != "image_encoder"}
    replay = HRVAttendAndExcite(**components, requires_safety_checker=False)
    replay.set_progress_bar_config(disable=True)
    return replay


def sdxl_port_replay(pipe, prompt, indices_to_alter, latents, *, attention_res=32, num_inference_steps=50,
                     guidance_scale=7.5, max_iter_to_alter=25, thresholds={0: 0.05, 10: 0.5, 20: 0.8},
                     scale_factor=20, scale_range=(1.0, 0.5), max_refinement_steps=20, height=None, width=None):
    """An A&E-SDXL port's loop (AttendAndExcitePipelineXL.__call__, one prompt, one image,
    smoothing on, normalize_eot off), materialising through diffusers' Attend-and-Excite
    processors and store (mean over heads and layers at attention_res², as the authors'
    aggregate_attention for one image). Returns the final latents."""
    from diffusers.pipelines.deprecated.stable_diffusion_attend_and_excite.pipeline_stable_diffusion_attend_and_excite \
        import AttendExciteAttnProcessor, AttentionStore, GaussianSmoothing

    unet = pipe.unet
    height = height or unet.config.sample_size * pipe.vae_scale_factor
    width = width or unet.config.sample_size * pipe.vae_scale_factor
    store = AttentionStore((attention_res, attention_res))
    saved = unet.attn_processors
    procs = {}
    for name in saved:
        place = "mid" if name.startswith("mid_block") else "up" if name.startswith("up_blocks") else "down"
        procs[name] = AttendExciteAttnProcessor(attnstore=store, place_in_unet=place)
    store.num_att_layers = len(procs)
    unet.set_attn_processor(procs)  # (empties the dict)

    def max_per_index():
        attention_maps = store.aggregate_attention(from_where=("up", "down", "mid"))
        attention_for_text = attention_maps[:, :, 1:-1] * 100
        attention_for_text = torch.nn.functional.softmax(attention_for_text, dim=-1)
        out = []
        for i in [index - 1 for index in indices_to_alter]:
            image = attention_for_text[:, :, i]
            smoothing = GaussianSmoothing(channels=1, kernel_size=3, sigma=0.5, dim=2)
            image = smoothing(nnf.pad(image.unsqueeze(0).unsqueeze(0), (1, 1, 1, 1), mode="reflect")).squeeze(0).squeeze(0)
            out.append(image.max())
        return out

    def compute_loss(values):
        return max([max(0, 1.0 - v) for v in values])

    def update(latents, loss, step_size):
        grad_cond = torch.autograd.grad(loss.requires_grad_(True), [latents], retain_graph=True)[0]
        return latents - step_size * grad_cond

    try:
        with torch.no_grad():
            device = pipe._execution_device
            pipe.scheduler.set_timesteps(num_inference_steps, device=device)
            timesteps = pipe.scheduler.timesteps
            prompt_embeds, negative_prompt_embeds, pooled, negative_pooled = pipe.encode_prompt(
                prompt=prompt, device=device, num_images_per_prompt=1, do_classifier_free_guidance=guidance_scale > 1.0)
            latents = pipe.prepare_latents(1, unet.config.in_channels, height, width, prompt_embeds.dtype, device,
                                           None, latents)
            time_ids = pipe._get_add_time_ids((height, width), (0, 0), (height, width), dtype=prompt_embeds.dtype,
                                              text_encoder_projection_dim=pipe.text_encoder_2.config.projection_dim)
            added_cond_kwargs = {"text_embeds": pooled, "time_ids": time_ids}
            scale_range = np.linspace(scale_range[0], scale_range[1], len(timesteps))

            def forward(latents, t):
                unet(latents, t, encoder_hidden_states=prompt_embeds, added_cond_kwargs=added_cond_kwargs)
                unet.zero_grad()
                return max_per_index()

            for i, t in enumerate(timesteps):
                with torch.enable_grad():
                    latents = latents.clone().detach().requires_grad_(True)
                    loss = compute_loss(forward(latents, t))
                    step_size = scale_factor * np.sqrt(scale_range[i])
                    if i in thresholds.keys() and loss > 1.0 - thresholds[i]:
                        iteration, target_loss = 0, max(0, 1.0 - thresholds[i])
                        while loss > target_loss:
                            iteration += 1
                            latents = latents.clone().detach().requires_grad_(True)
                            loss = compute_loss(forward(latents, t))
                            if loss != 0:
                                latents = update(latents, loss, step_size)
                            if iteration >= max_refinement_steps:
                                break
                        latents = latents.clone().detach().requires_grad_(True)
                        loss = compute_loss(forward(latents, t))
                    if i < max_iter_to_alter:
                        if loss != 0:
                            latents = update(latents, loss, step_size)
                latent_model_input = torch.cat([latents] * 2)
                latent_model_input = pipe.scheduler.scale_model_input(latent_model_input, t)
                noise_pred = unet(latent_model_input, t,
                                  encoder_hidden_states=torch.cat([negative_prompt_embeds, prompt_embeds]),
                                  added_cond_kwargs={"text_embeds": torch.cat([negative_pooled, pooled]),
                                                     "time_ids": torch.cat([time_ids, time_ids])}).sample
                noise_pred_uncond, noise_pred_text = noise_pred.chunk(2)
                noise_pred = noise_pred_uncond + guidance_scale * (noise_pred_text - noise_pred_uncond)
                latents = pipe.scheduler.step(noise_pred, t, latents).prev_sample
        return latents
    finally:
        unet.set_attn_processor(saved)
