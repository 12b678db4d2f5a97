"""End to end for the MM-DiT transformers (FLUX.1-dev, SD3.5 large): time per denoising
step of the published transformer (random weights, built on the device), peak device
memory and the host memory a materialising capture keeps per step — stock diffusers, attnctl,
attnctl's trace of every block, and the attention-map-diffusers way of getting maps
(explicit softmax in the joint blocks, each block's per-head image→text slice copied to the
host at every step; Flux's single-stream blocks left out, as that tool does)."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F

from .e2e import run_contenders, time_steps

PROMPT = "a photo of a cat sitting on the car"


@dataclass(frozen=True)
class DitModel:
    config: Optional[str]   # attnctl.configs name; None: the tiny offline config (CPU smoke)
    family: str             # "flux" (text first in the joint sequence) or "sd3" (image first)
    latent: int             # latent side (image side / 8)
    text: int               # T5 tokens (SD3 adds 77 CLIP tokens in front of them)
    rows: int               # batch rows per step: Flux 1 (guidance distilled), SD3 2 (CFG)


MODELS: Dict[str, DitModel] = {
    "flux-1024": DitModel("flux1_dev_transformer", "flux", 128, 512, 1),
    "sd35l-1024": DitModel("sd35_large_transformer", "sd3", 128, 256, 2),
    "flux-tiny": DitModel(None, "flux", 8, 8, 1),
    "sd3-tiny": DitModel(None, "sd3", 8, 8, 2),
}
SMOKE = {"flux-1024": "flux-tiny", "sd35l-1024": "sd3-tiny"}


def build_transformer(spec: DitModel, dtype: torch.dtype, device: str):
    from attnctl.diffusers import offline_mmdit
    if spec.config is not None:
        return offline_mmdit.published_transformer(spec.config, dtype, device)
    import diffusers
    torch.manual_seed(0)
    if spec.family == "flux":
        model = diffusers.FluxTransformer2DModel(**offline_mmdit.tiny_flux_transformer_config())
    else:
        model = diffusers.SD3Transformer2DModel(**offline_mmdit.tiny_sd3_transformer_config())
    return model.to(device=device, dtype=dtype).eval()


def transformer_inputs(spec: DitModel, model, dtype: torch.dtype, device: str) -> dict:
    """One step's inputs: Flux packs the latent 2x2 into tokens with their (0, y, x) ids;
    SD3 takes the latent and CLIP + T5 states."""
    config = model.config
    make = dict(dtype=dtype, device=device)
    rows = spec.rows
    if spec.family == "flux":
        side = spec.latent // 2
        ids = torch.zeros(side * side, 3, device=device)
        ids[:, 1] = torch.arange(side, device=device).repeat_interleave(side)
        ids[:, 2] = torch.arange(side, device=device).repeat(side)
        inputs = dict(hidden_states=torch.randn(rows, side * side, config.in_channels, **make),
                      encoder_hidden_states=torch.randn(rows, spec.text, config.joint_attention_dim, **make),
                      pooled_projections=torch.randn(rows, config.pooled_projection_dim, **make),
                      img_ids=ids, txt_ids=torch.zeros(spec.text, 3, device=device))
        if config.guidance_embeds:
            inputs["guidance"] = torch.full((rows,), 3.5, **make)
        return inputs
    return dict(hidden_states=torch.randn(rows, config.in_channels, spec.latent, spec.latent, **make),
                encoder_hidden_states=torch.randn(rows, 77 + spec.text, config.joint_attention_dim, **make),
                pooled_projections=torch.randn(rows, config.pooled_projection_dim, **make))


def text_tokens(spec: DitModel) -> int:
    return spec.text if spec.family == "flux" else 77 + spec.text


@contextlib.contextmanager
def materialised_joint_capture(model, spec: DitModel):
    """Explicit softmax(q·kᵀ/√d) in every joint block (Flux: the double-stream ones), the
    per-head image-query × text-key slice of P copied to the host per call; yields the list
    of host tensors."""
    joint = [module for name, module in model.named_modules()
             if name.startswith("transformer_blocks.") and name.endswith(".attn")]
    kept: List[torch.Tensor] = []
    current: List[bool] = []
    hooks = [m.register_forward_pre_hook(lambda m, a: current.append(True)) for m in joint]
    hooks += [m.register_forward_hook(lambda m, a, o: current.clear()) for m in joint]
    sdpa = F.scaled_dot_product_attention
    T = text_tokens(spec)

    def explicit(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        if not current:   # Flux's single-stream blocks, SD3.5's image-only attn2
            return sdpa(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                        scale=scale, enable_gqa=enable_gqa)
        scores = (query @ key.transpose(-1, -2)) * (scale or query.shape[-1] ** -0.5)
        # softmax in fp32 for 16-bit inputs, as attention-map-diffusers' unfused attention does
        probs = torch.softmax(scores.float() if scores.element_size() < 4 else scores, dim=-1).to(query.dtype)
        S = query.shape[2]
        image, text = (slice(T, S), slice(0, T)) if spec.family == "flux" else (slice(0, S - T), slice(S - T, S))
        kept.append(probs[:, :, image, text].to("cpu"))
        return probs @ value

    F.scaled_dot_product_attention = explicit
    try:
        yield kept
    finally:
        F.scaled_dot_product_attention = sdpa
        for hook in hooks:
            hook.remove()


def _install(stack: contextlib.ExitStack, model, spec: DitModel) -> None:
    import attnctl
    stack.enter_context(attnctl.install(model))


def _trace(stack: contextlib.ExitStack, model, spec: DitModel) -> None:
    import attnctl
    from attnctl.diffusers.offline_mmdit import t5_tokenizer
    tc = stack.enter_context(attnctl.trace(model, layers="*"))
    tc.installation.start_generation([PROMPT], cfg=spec.rows == 2, tokenizer=t5_tokenizer())


CONTENDERS: Dict[str, Callable[[contextlib.ExitStack, object, DitModel], object]] = {
    "diffusers-sdpa": lambda stack, model, spec: None,
    "attnctl": _install,
    "attnctl+trace": _trace,
    "materialised": lambda stack, model, spec: stack.enter_context(materialised_joint_capture(model, spec)),
}


def run_e2e_dit(model_name: str, contenders: List[str], *, steps: int = 4, dtype: torch.dtype = torch.bfloat16,
                device: str = "cuda", progress=None) -> List[dict]:
    spec = MODELS[model_name]
    model = build_transformer(spec, dtype, device)
    inputs = transformer_inputs(spec, model, dtype, device)
    original = dict(model.attn_processors)
    kept: List[List[torch.Tensor]] = []

    def setup(name, stack):
        result = CONTENDERS[name](stack, model, spec)
        kept[:] = [result] if name == "materialised" else []

    def measure():
        def step(i):
            timestep = torch.full((spec.rows,), 1000.0 - i * 1000.0 / max(steps + 2, 1), dtype=dtype, device=device)
            return model(timestep=timestep, **inputs, return_dict=False)[0]
        measured = time_steps(step, steps, device)
        host = sum(t.numel() * t.element_size() for t in kept[0]) if kept else 0
        measured["host_mb_per_step"] = host / 2**20 / (steps + 2)   # time_steps runs 2 warm-up steps
        kept.clear()
        return measured

    record = {"model": model_name, "steps": steps, "images": 1, "dtype": str(dtype).replace("torch.", "")}
    return run_contenders(contenders, record, setup=setup, measure=measure,
                          restore=lambda: model.set_attn_processor(dict(original)), device=device,
                          progress=progress)
