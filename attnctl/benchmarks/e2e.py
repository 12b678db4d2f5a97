"""End to end: a UNet denoising loop (CFG, random weights, real SD1.5/SDXL architecture),
time per step and peak memory for stock diffusers and for each way of getting maps."""
from __future__ import annotations

import statistics
import time
from contextlib import ExitStack
from typing import Callable, Dict, List

import torch

from .baselines import install_daam_style, install_p2p_self_store

# name: (UNet config, latent (h, w), SDXL added conditions)
MODELS = {
    "sd15-512": ("sd15_unet", (64, 64), False),
    "sdxl-1024": ("sdxl_unet", (128, 128), True),
    "tiny": (None, (16, 16), False),  # CPU smoke: the offline tiny UNet
}


def _attnctl(stack: ExitStack, unet) -> None:
    import attnctl
    stack.enter_context(attnctl.install(unet))


def _attnctl_trace(stack: ExitStack, unet) -> None:
    import attnctl
    # The same work as the DAAM-style baseline: every cross-attention layer, heads summed.
    stack.enter_context(attnctl.trace(unet, layers="*", per_head=False))


def _daam(stack: ExitStack, unet) -> None:
    install_daam_style(unet)


def _p2p(stack: ExitStack, unet) -> None:
    install_p2p_self_store(unet)


CONTENDERS: Dict[str, Callable[[ExitStack, object], None]] = {
    "diffusers-sdpa": lambda stack, unet: None,
    "attnctl": _attnctl,
    "attnctl+trace": _attnctl_trace,
    "daam-materialised": _daam,
    "p2p-self-store": _p2p,
}


def build_unet(model: str, dtype: torch.dtype, device: str):
    from attnctl.diffusers.offline import published_unet, tiny_unet_config
    config_name = MODELS[model][0]
    if config_name is None:
        from diffusers import UNet2DConditionModel
        torch.manual_seed(0)
        unet = UNet2DConditionModel.from_config(tiny_unet_config()).eval()
    else:
        unet = published_unet(config_name, dtype=dtype)
    return unet.to(device=device, dtype=dtype)


def unet_inputs(model: str, unet, images: int, dtype: torch.dtype, device: str) -> dict:
    """A CFG batch ([uncond; cond]) of random latents and text embeddings."""
    _, (h, w), sdxl = MODELS[model]
    width = unet.config.cross_attention_dim
    B = 2 * images
    kw = dict(encoder_hidden_states=torch.randn(B, 77, width, dtype=dtype, device=device))
    if sdxl:
        kw["added_cond_kwargs"] = {"text_embeds": torch.randn(B, 1280, dtype=dtype, device=device),
                                   "time_ids": torch.randn(B, 6, dtype=dtype, device=device)}
    kw["sample"] = torch.randn(B, unet.config.in_channels, h, w, dtype=dtype, device=device)
    return kw


def run_e2e(model: str, contenders: List[str], *, steps: int = 20, images: int = 1,
            dtype: torch.dtype = torch.float16, device: str = "cuda", progress=None) -> List[dict]:
    unet = build_unet(model, dtype, device)
    inputs = unet_inputs(model, unet, images, dtype, device)
    original = dict(unet.attn_processors)
    record = {"model": model, "steps": steps, "images": images, "dtype": str(dtype).replace("torch.", "")}
    return run_contenders(
        contenders, record, setup=lambda name, stack: CONTENDERS[name](stack, unet),
        measure=lambda: _denoise(unet, inputs, steps, device),
        restore=lambda: unet.set_attn_processor(dict(original)),  # diffusers empties the dict it is given
        device=device, progress=progress)


def run_contenders(contenders: List[str], record: dict, *, setup: Callable[[str, ExitStack], None],
                   measure: Callable[[], dict], restore: Callable[[], None], device: str,
                   progress=None) -> List[dict]:
    """One record per contender: ``setup(name, stack)`` installs it inside an ExitStack
    (under no_grad), ``measure()`` times the loop, ``restore()`` puts the model back; an
    out-of-memory contender (device or host) is a result. Adds each one's ratio to stock diffusers."""
    rows = []
    for name in contenders:
        rec = {**record, "contender": name}
        try:
            with ExitStack() as stack, torch.no_grad():
                setup(name, stack)
                rec.update(measure())
            rec["status"] = "ok"
        except torch.cuda.OutOfMemoryError as exc:
            rec["status"] = f"OOM: {str(exc).splitlines()[0][:160]}"
        except MemoryError as exc:   # the host's memory (maps a contender copies there)
            rec["status"] = f"host OOM: {str(exc).splitlines()[0][:160]}"
        finally:
            restore()
            if device == "cuda":
                torch.cuda.empty_cache()
        rows.append(rec)
        if progress:
            progress(rec)
    base = next((r for r in rows if r["contender"] == "diffusers-sdpa" and r["status"] == "ok"), None)
    for r in rows:
        if base and r["status"] == "ok":
            r["step_vs_sdpa"] = r["step_ms"] / base["step_ms"]
    return rows


def _denoise(unet, inputs: dict, steps: int, device: str) -> dict:
    def step(i):
        t = torch.tensor(999 - i * (999 // max(steps, 1)), device=device)
        return unet(timestep=t, **inputs).sample

    return time_steps(step, steps, device)


def time_steps(step: Callable[[int], object], steps: int, device: str) -> dict:
    """Median time of one denoising step ``step(i)`` (after two warm-up steps) and peak
    device memory above what was allocated before the first step."""
    if device == "cuda":  # before warm-up: the maps a contender keeps count as its memory
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    for i in range(2):
        step(i)
    times = []
    for i in range(steps):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step(i)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            step(i)
            times.append((time.perf_counter() - t0) * 1e3)
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20 if device == "cuda" else None
    return {"step_ms": statistics.median(times), "peak_mem_mb": peak}
