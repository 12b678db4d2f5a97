"""PixArt-Σ, Sana and Wan 2.1 (text- and image-to-video) pipelines built offline: tiny
transformer configs, random weights, a tiny T5 encoder and the in-memory T5 tokenizer of
attnctl.diffusers.offline_mmdit (no sentencepiece, no model hub). Used by the tests and the demo of the cross-attention
transformers (attnctl.diffusers.dit).

Heads are 16 wide (Triton's tl.dot needs dims >= 16). The Wan VAE keeps Wan's factors
(8 in space, 4 in time: ``num_frames`` = 4·(latent frames − 1) + 1) with 3 base channels.
"""
from __future__ import annotations

import torch

from .offline import _finish, _vae
from .offline_mmdit import _flow_scheduler, _t5_encoder, t5_tokenizer


def tiny_pixart_transformer_config() -> dict:
    """Two blocks (self + cross each), 2 heads of 16, patch 2, learned sigma (8 output
    channels for a 4-channel latent, as PixArt-Σ)."""
    return dict(sample_size=8, num_layers=2, patch_size=2, attention_head_dim=16, num_attention_heads=2,
                caption_channels=32, in_channels=4, out_channels=8, cross_attention_dim=32, attention_bias=True,
                activation_fn="gelu-approximate", num_embeds_ada_norm=1000, norm_type="ada_norm_single",
                norm_elementwise_affine=False, norm_eps=1e-6, use_additional_conditions=False)


def tiny_pixart_pipeline(seed: int = 0, dtype: torch.dtype = torch.float32):
    """A PixArtSigmaPipeline with tiny random-weight components (VAE factor 2, so an image
    side must divide by 4: the latent is patchified 2x2)."""
    from diffusers import DPMSolverMultistepScheduler, PixArtSigmaPipeline, PixArtTransformer2DModel

    torch.manual_seed(seed)
    tokenizer = t5_tokenizer(model_max_length=300)
    pipe = PixArtSigmaPipeline(
        tokenizer=tokenizer, text_encoder=_t5_encoder(tokenizer, 32), vae=_vae(),
        transformer=PixArtTransformer2DModel(**tiny_pixart_transformer_config()).eval(),
        scheduler=DPMSolverMultistepScheduler())
    return _finish(pipe, dtype)


def tiny_wan_transformer_config() -> dict:
    """Two blocks (self with RoPE + cross each), 2 heads of 16 (RoPE axes 8 + 4 + 4), patch
    (1, 2, 2), Wan's RMS q/k norms across heads."""
    return dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=16,
                out_channels=16, text_dim=32, freq_dim=32, ffn_dim=32, num_layers=2, cross_attn_norm=True,
                qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=32)


def _wan_vae():
    from diffusers import AutoencoderKLWan

    return AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                            temperal_downsample=[False, True, True]).eval()


def tiny_wan_pipeline(seed: int = 0, dtype: torch.dtype = torch.float32):
    """A WanPipeline (text to video) with tiny random-weight components."""
    from diffusers import WanPipeline, WanTransformer3DModel

    torch.manual_seed(seed)
    tokenizer = t5_tokenizer()
    pipe = WanPipeline(
        tokenizer=tokenizer, text_encoder=_t5_encoder(tokenizer, 32), vae=_wan_vae(),
        transformer=WanTransformer3DModel(**tiny_wan_transformer_config()).eval(), scheduler=_flow_scheduler())
    return _finish(pipe, dtype)


# Wan I2V: CLIP image-context tokens of a tiny vision tower (8x8 crop, patch 2: 16 patches
# and the class token) of width 24.
I2V_IMAGE_SIZE, I2V_IMAGE_DIM = 8, 24


def tiny_wan_i2v_transformer_config() -> dict:
    """The tiny Wan as Wan 2.1 I2V builds it: 36 input channels (the noise latent, the
    4-channel first-frame mask and the conditioning video's latent), ``image_dim`` (the
    CLIP hidden states the condition embedder projects to the model width) and
    ``added_kv_proj_dim`` = the model width (every cross-attention's add_k/v_proj over the
    image-context tokens)."""
    config = tiny_wan_transformer_config()
    width = config["num_attention_heads"] * config["attention_head_dim"]
    return dict(config, in_channels=36, image_dim=I2V_IMAGE_DIM, added_kv_proj_dim=width)


def tiny_wan_i2v_pipeline(seed: int = 0, dtype: torch.dtype = torch.float32):
    """A WanImageToVideoPipeline (Wan 2.1 I2V) with tiny random-weight components: the I2V
    transformer, a tiny CLIP vision tower (its second-to-last hidden states are the image
    context, 17 tokens) with its image processor, the tiny T5 and the tiny Wan VAE.

    diffusers' WanAttnProcessor takes the last 512 tokens of an I2V cross-attention's keys
    as the text, so ``max_sequence_length`` must stay 512 (the pipeline's default)."""
    from diffusers import WanImageToVideoPipeline, WanTransformer3DModel
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(seed)
    tokenizer = t5_tokenizer()
    vision = CLIPVisionConfig(hidden_size=I2V_IMAGE_DIM, projection_dim=I2V_IMAGE_DIM, intermediate_size=32,
                              num_hidden_layers=2, num_attention_heads=2, image_size=I2V_IMAGE_SIZE, patch_size=2)
    pipe = WanImageToVideoPipeline(
        tokenizer=tokenizer, text_encoder=_t5_encoder(tokenizer, 32), vae=_wan_vae(), scheduler=_flow_scheduler(),
        image_processor=CLIPImageProcessor(size={"shortest_edge": I2V_IMAGE_SIZE},
                                           crop_size={"height": I2V_IMAGE_SIZE, "width": I2V_IMAGE_SIZE}),
        image_encoder=CLIPVisionModelWithProjection(vision).eval(),
        transformer=WanTransformer3DModel(**tiny_wan_i2v_transformer_config()).eval())
    return _finish(pipe, dtype)


def tiny_sana_transformer_config() -> dict:
    """One block: linear self-attention (2 heads of 16) + softmax cross-attention (2 heads
    of 16), patch 1, a 4-channel latent."""
    return dict(patch_size=1, in_channels=4, out_channels=4, num_layers=1, num_attention_heads=2,
                attention_head_dim=16, num_cross_attention_heads=2, cross_attention_head_dim=16,
                cross_attention_dim=32, caption_channels=32, sample_size=8)


def _dc_ae():
    """A tiny DC-AE with factor 4 (three block levels)."""
    from diffusers import AutoencoderDC

    return AutoencoderDC(
        in_channels=3, latent_channels=4, attention_head_dim=2,
        encoder_block_types=("ResBlock", "ResBlock", "EfficientViTBlock"),
        decoder_block_types=("ResBlock", "ResBlock", "EfficientViTBlock"),
        encoder_block_out_channels=(8, 8, 8), decoder_block_out_channels=(8, 8, 8),
        encoder_qkv_multiscales=((), (), (5,)), decoder_qkv_multiscales=((), (), (5,)),
        encoder_layers_per_block=(1, 1, 1), decoder_layers_per_block=(1, 1, 1),
        downsample_block_type="conv", upsample_block_type="interpolate", decoder_norm_types="rms_norm",
        decoder_act_fns="silu", scaling_factor=0.41407).eval()


def tiny_sana_pipeline(seed: int = 0, dtype: torch.dtype = torch.float32):
    """A SanaPipeline with tiny random-weight components. Its text encoder is the tiny T5
    with the in-memory T5 tokenizer (Sana's is Gemma-2; the transformer sees hidden states
    and a mask either way). Sides must divide by 32 (the pipeline's check)."""
    from diffusers import SanaPipeline, SanaTransformer2DModel

    torch.manual_seed(seed)
    tokenizer = t5_tokenizer(model_max_length=300)
    pipe = SanaPipeline(
        tokenizer=tokenizer, text_encoder=_t5_encoder(tokenizer, 32), vae=_dc_ae(),
        transformer=SanaTransformer2DModel(**tiny_sana_transformer_config()).eval(), scheduler=_flow_scheduler())
    return _finish(pipe, dtype)
