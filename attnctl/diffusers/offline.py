"""Stable Diffusion pipelines built offline: small configs, random weights, a tokenizer
made in memory. No download, no model hub. Used by the demo, the tests and benchmarks.

The tokenizer is a real CLIPTokenizer whose vocabulary is the 256 byte-level characters
and their end-of-word forms, with no merges: every word splits into one token per
character, which exercises word -> sub-token merging on every word.
"""
from __future__ import annotations

from typing import Optional

import torch

from ..configs import load_unet_config

TEXT_LENGTH = 77
BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def _byte_characters():
    """The printable stand-ins byte-level BPE uses for the 256 byte values (GPT-2 / CLIP)."""
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    codes, extra = [], 0
    for byte in range(256):
        if byte in printable:
            codes.append(byte)
        else:
            codes.append(256 + extra)
            extra += 1
    return [chr(c) for c in codes]


def character_tokenizer():
    """A CLIPTokenizer over byte-level characters (no merges), max length 77."""
    from transformers import CLIPTokenizer

    chars = _byte_characters()
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    vocab[BOS] = len(vocab)
    vocab[EOS] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=TEXT_LENGTH)


def _text_encoder(tokenizer, hidden: int, projection: Optional[int] = None):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
        num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=TEXT_LENGTH,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, projection_dim=projection or hidden)
    model = CLIPTextModelWithProjection(config) if projection else CLIPTextModel(config)
    return model.eval()


def _vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32),
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        layers_per_block=1, norm_num_groups=8).eval()


def _scheduler():
    from diffusers import DDIMScheduler

    return DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                         clip_sample=False, set_alpha_to_one=False, steps_offset=1)


def tiny_unet_config(sdxl: bool = False) -> dict:
    """A two-level UNet (32 and 64 channels, head_dim 16 so that Triton's tl.dot applies):
    cross-attention at the latent resolution and at half of it."""
    config = dict(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 64), norm_num_groups=16,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        attention_head_dim=(2, 4), cross_attention_dim=32)
    if sdxl:
        # SDXL's conditioning: two text encoders concatenated, pooled text + time ids added.
        config.update(
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 2), use_linear_projection=True,
            cross_attention_dim=64, addition_embed_type="text_time", addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=6 * 8 + 32)
    return config


def tiny_sd_pipeline(seed: int = 0, dtype: torch.dtype = torch.float32):
    """A StableDiffusionPipeline with tiny random-weight components (VAE factor 2)."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    torch.manual_seed(seed)
    tokenizer = character_tokenizer()
    pipe = StableDiffusionPipeline(
        vae=_vae(), text_encoder=_text_encoder(tokenizer, 32), tokenizer=tokenizer,
        unet=UNet2DConditionModel(**tiny_unet_config()).eval(), scheduler=_scheduler(),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    return _finish(pipe, dtype)


def tiny_sdxl_pipeline(seed: int = 0, dtype: torch.dtype = torch.float32):
    """A StableDiffusionXLPipeline with tiny random-weight components: two text encoders,
    added time/text conditions, transformer blocks of depth 2 at the lower level."""
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel

    torch.manual_seed(seed)
    tokenizer = character_tokenizer()
    pipe = StableDiffusionXLPipeline(
        vae=_vae(), text_encoder=_text_encoder(tokenizer, 32), tokenizer=tokenizer,
        text_encoder_2=_text_encoder(tokenizer, 32, projection=32), tokenizer_2=character_tokenizer(),
        unet=UNet2DConditionModel(**tiny_unet_config(sdxl=True)).eval(), scheduler=_scheduler())
    return _finish(pipe, dtype)


def _finish(pipe, dtype):
    if dtype != torch.float32:  # the components are built in fp32
        pipe.to(dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def published_unet(name: str, dtype: torch.dtype = torch.float32, seed: int = 0):
    """UNet2DConditionModel with the published architecture ``name`` ("sd15_unet" or
    "sdxl_unet", see attnctl.configs) and random weights.

    Weights are drawn uniformly with standard deviation 0.02 in place of diffusers'
    per-layer initialisation: the architecture is what matters here, and one pass over
    the memory is several times faster at 2.6B weights.
    """
    from diffusers import UNet2DConditionModel

    config = load_unet_config(name)
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(config)
    unet = unet.to_empty(device="cpu")
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in unet.parameters():
            param.uniform_(-0.02 * 3 ** 0.5, 0.02 * 3 ** 0.5, generator=generator)
        for module in unet.modules():
            if isinstance(module, (torch.nn.GroupNorm, torch.nn.LayerNorm)) and module.weight is not None:
                module.weight.fill_(1.0)
    if dtype != torch.float32:
        unet = unet.to(dtype)
    return unet.eval()


def _vae_factor_8():
    """A tiny VAE with four block levels, so vae_scale_factor is 8 as in SD1.5 and SDXL:
    512² images give 64² latents and 1024² give 128². Channels are tiny because
    benchmarks ask for latents only and never decode."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8,) * 4,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=1, norm_num_groups=8).eval()


def published_sd15_pipeline(dtype: torch.dtype = torch.float32, seed: int = 0):
    """A StableDiffusionPipeline around the published SD1.5 UNet (random weights, see
    :func:`published_unet`): a small random CLIP text encoder of SD1.5's width (768) and a
    tiny VAE with SD's factor 8, so images of 512² run the UNet at its 64² latent."""
    from diffusers import StableDiffusionPipeline

    unet = published_unet("sd15_unet", seed=seed)
    torch.manual_seed(seed)
    tokenizer = character_tokenizer()
    pipe = StableDiffusionPipeline(
        vae=_vae_factor_8(), text_encoder=_text_encoder(tokenizer, unet.config.cross_attention_dim),
        tokenizer=tokenizer, unet=unet, scheduler=_scheduler(),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    return _finish(pipe, dtype)


SDXL_FIRST_TEXT_WIDTH = 768   # SDXL's first text encoder is CLIP ViT-L; the second fills the rest
SDXL_TIME_IDS = 6             # original size, crop top-left, target size


def published_sdxl_pipeline(dtype: torch.dtype = torch.float32, seed: int = 0):
    """A StableDiffusionXLPipeline around the published SDXL UNet (random weights): small
    random CLIP text encoders of SDXL's widths (768 and 1280, concatenated to the UNet's
    2048), the second with a projection giving the pooled text embedding that, with the
    six time ids, fills the UNet's added-condition input; a tiny VAE with factor 8, so
    images of 1024² run the UNet at its 128² latent."""
    from diffusers import StableDiffusionXLPipeline

    unet = published_unet("sdxl_unet", seed=seed)
    config = unet.config
    second_width = config.cross_attention_dim - SDXL_FIRST_TEXT_WIDTH
    pooled_width = config.projection_class_embeddings_input_dim - SDXL_TIME_IDS * config.addition_time_embed_dim
    torch.manual_seed(seed)
    tokenizer = character_tokenizer()
    pipe = StableDiffusionXLPipeline(
        vae=_vae_factor_8(), text_encoder=_text_encoder(tokenizer, SDXL_FIRST_TEXT_WIDTH), tokenizer=tokenizer,
        text_encoder_2=_text_encoder(tokenizer, second_width, projection=pooled_width),
        tokenizer_2=character_tokenizer(), unet=unet, scheduler=_scheduler())
    return _finish(pipe, dtype)
