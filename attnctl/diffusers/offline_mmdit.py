"""Flux and SD3 pipelines built offline: tiny transformer configs, random weights, a tiny
T5 encoder and a T5 tokenizer made in memory (no sentencepiece, no model hub). Used by the
tests of the MM-DiT integration.

The T5 tokenizer is a real ``T5TokenizerFast`` around a ``tokenizers`` Unigram model
whose pieces are ``▁`` + a few whole words, single characters and ``▁`` + character: a
word outside the list splits into several pieces (``▁r``, ``e``, ``d``), which exercises
word -> sub-token merging; ``</s>`` ends every sequence and ``<pad>`` fills it.
"""
from __future__ import annotations

import string

import torch

from .offline import _finish, _text_encoder, _vae, character_tokenizer

T5_WORDS = ("a", "cat", "dog", "on", "the", "car", "photo", "of", "sitting", "and")


def t5_tokenizer(model_max_length: int = 512):
    """A T5TokenizerFast over a tiny in-memory Unigram vocabulary (see the module doc)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    chars = list(string.ascii_lowercase + string.digits + ",.'-!?")
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    pieces += [(c, -3.0) for c in chars] + [("▁" + c, -3.0) for c in chars]
    pieces += [("▁" + w, -1.0) for w in T5_WORDS]
    model = Tokenizer(models.Unigram(pieces, unk_id=2, byte_fallback=False))
    model.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    model.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    model.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return T5TokenizerFast(tokenizer_object=model, eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
                           extra_ids=0, model_max_length=model_max_length)


def _t5_encoder(tokenizer, width: int):
    from transformers import T5Config, T5EncoderModel

    config = T5Config(vocab_size=len(tokenizer), d_model=width, d_kv=8, d_ff=2 * width, num_layers=1,
                      num_heads=2, relative_attention_num_buckets=8, pad_token_id=tokenizer.pad_token_id,
                      eos_token_id=tokenizer.eos_token_id, decoder_start_token_id=tokenizer.pad_token_id)
    return T5EncoderModel(config).eval()


def _flow_vae():
    """The tiny VAE with the ``shift_factor`` that Flux's and SD3's pipelines add when they
    decode (their VAEs have one; a plain AutoencoderKL's is None)."""
    vae = _vae()
    vae.register_to_config(shift_factor=0.0)
    return vae


def _flow_scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler()


def tiny_flux_transformer_config() -> dict:
    """One double-stream and one single-stream block, 2 heads of 16 (Triton's tl.dot needs
    dims >= 16), RoPE axes summing to the head dim; 16 input channels = a 4-channel latent
    packed 2x2."""
    return dict(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
                num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
                guidance_embeds=False, axes_dims_rope=(4, 6, 6))


def tiny_flux_pipeline(seed: int = 0, dtype: torch.dtype = torch.float32):
    """A FluxPipeline with tiny random-weight components (VAE factor 2, so an image side
    must divide by 4: the latent is packed 2x2)."""
    from diffusers import FluxPipeline, FluxTransformer2DModel

    torch.manual_seed(seed)
    clip = character_tokenizer()
    t5 = t5_tokenizer()
    pipe = FluxPipeline(
        scheduler=_flow_scheduler(), vae=_flow_vae(), text_encoder=_text_encoder(clip, 32), tokenizer=clip,
        text_encoder_2=_t5_encoder(t5, 32), tokenizer_2=t5,
        transformer=FluxTransformer2DModel(**tiny_flux_transformer_config()).eval())
    return _finish(pipe, dtype)


def tiny_sd3_transformer_config(sd35: bool = False) -> dict:
    """Two joint blocks (the last context_pre_only), 2 heads of 16, patch 2; ``sd35``: the
    SD3.5-medium form (RMS qk-norm, an image-only ``attn2`` in block 0)."""
    config = dict(sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=2,
                  attention_head_dim=16, num_attention_heads=2, joint_attention_dim=64,
                  caption_projection_dim=32, pooled_projection_dim=64, pos_embed_max_size=16)
    if sd35:
        config.update(dual_attention_layers=(0,), qk_norm="rms_norm")
    return config


def tiny_sd3_pipeline(seed: int = 0, dtype: torch.dtype = torch.float32, sd35: bool = False):
    """A StableDiffusion3Pipeline with tiny random-weight components: two CLIP encoders of
    width 32 (their states concatenated to 64 = the T5 width, pooled 32 + 32), a T5 of
    width 64, VAE factor 2 with 4 latent channels."""
    from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline

    torch.manual_seed(seed)
    clip = character_tokenizer()
    t5 = t5_tokenizer()
    pipe = StableDiffusion3Pipeline(
        transformer=SD3Transformer2DModel(**tiny_sd3_transformer_config(sd35)).eval(),
        scheduler=_flow_scheduler(), vae=_flow_vae(),
        text_encoder=_text_encoder(clip, 32, projection=32), tokenizer=clip,
        text_encoder_2=_text_encoder(clip, 32, projection=32), tokenizer_2=character_tokenizer(),
        text_encoder_3=_t5_encoder(t5, 64), tokenizer_3=t5)
    return _finish(pipe, dtype)


def published_transformer(name: str, dtype: torch.dtype, device: str, seed: int = 0):
    """The published transformer ``name`` (attnctl.configs.TRANSFORMER_CONFIGS) with random
    weights, built on ``device`` without a CPU copy: created on the meta device, allocated
    on ``device``, every parameter and floating buffer (SD3's position table too) drawn
    uniformly with standard deviation 0.02 there. For shape checks and benchmarks."""
    import diffusers

    from attnctl.configs import load_transformer_config

    config = load_transformer_config(name)
    with torch.device("meta"):
        model = getattr(diffusers, config["_class_name"]).from_config(config)
    model = model.to_empty(device=device).to(dtype)
    generator = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for tensor in (*model.parameters(), *(b for b in model.buffers() if b.is_floating_point())):
            tensor.uniform_(-0.02 * 3 ** 0.5, 0.02 * 3 ** 0.5, generator=generator)
    return model.eval()
