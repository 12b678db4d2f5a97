"""Prompt-to-prompt benchmark: one two-prompt edit (a source and one target, CFG) through a
whole pipeline call, for stock diffusers (no edit: the floor), attnctl's fused edit and a
materialising edit written the way the original prompt-to-prompt code does it.

The materialising edit (:class:`MaterialisedEdit`) is benchmark code, not a library
feature. Like the original's ``AttentionControlEdit`` it computes P = softmax(QKᵀ·scale)
explicitly in the model's dtype on every attention call (diffusers' classic
``AttnProcessor``) and edits the conditional half of P in place before P·V:

* cross-attention, per target, with the word weights α_t of the step:
  P_tgt ← R·α_t + P_tgt·(1 - α_t), where R is the edited source map, taken from the
  controller's terms: R = P_src·W0 + P_tgt·g0 (Replace: W0 is the mapper, g0 = 0; Refine:
  W0 gathers the aligned source columns with weights a, g0 = 1 - a; Reweight: both times
  the equalizer);
* self-attention in the self window: P_tgt ← P_src, at every resolution (the original
  stops at 16² for memory; the fused path has no such limit, so neither has this).

Steps and windows come from the same controller, so both paths make the same edit and
their latents agree (tests/test_p2p_bench.py).
"""
from __future__ import annotations

import statistics
import time
from contextlib import ExitStack
from functools import partial
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from ..p2p import Edit, Replace
from .baselines import MaterialisingProcessor, attention_modules

SOURCE = "a photo of a cat riding a bike"
TARGET = "a photo of a dog riding a bike"
CROSS_STEPS, SELF_STEPS = 0.8, 0.4   # the original's example settings
GUIDANCE = 7.5
MAX_STEPS = 50


# ---- the materialising edit ----------------------------------------------------------------

class MaterialisedEdit:
    """Context manager: every attention layer of ``pipe`` materialises P and applies
    ``controller``'s prompt-to-prompt edit to it (see the module docstring). One image per
    prompt; with or without CFG. Call :meth:`generate` inside the ``with``."""

    def __init__(self, pipe, controller: Edit):
        if not isinstance(controller, Edit):
            raise TypeError(f"controller: expected attnctl.p2p.Replace, Refine or Reweight, "
                            f"got {type(controller).__name__}")
        if controller.local_blend is not None or controller.strengthen or controller.self_max_queries is not None:
            raise ValueError("controller: the materialising baseline does not implement LocalBlend, strengthen "
                             "or self_max_queries; pass a controller without them")
        self.pipe, self.controller = pipe, controller
        self._original = None
        self._hook = None
        self._prompts: Tuple[str, ...] = ()
        self._step = -1
        self._steps = 0
        self._factors: Dict[Tuple, Optional[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]] = {}

    def __enter__(self) -> "MaterialisedEdit":
        unet = self.pipe.unet
        self._original = unet.attn_processors
        unet.set_attn_processor({f"{name}.processor": MaterialisingProcessor(
            partial(self.apply, heads=m.heads, is_cross=m.is_cross_attention))
            for name, m in attention_modules(unet).items()})
        self._hook = unet.register_forward_pre_hook(self._count_step)
        return self

    def __exit__(self, *exc) -> None:
        self.pipe.unet.set_attn_processor(dict(self._original))   # diffusers empties the dict it gets
        self._hook.remove()
        self._hook = None

    def generate(self, source: str, targets: Sequence[str], **pipe_kwargs):
        """The pipeline's output for [source, *targets] with the edit applied."""
        if self._hook is None:
            raise RuntimeError("MaterialisedEdit.generate: use it inside `with MaterialisedEdit(...)`")
        self._prompts = (source, *targets)
        tokenizer = getattr(self.pipe, "tokenizer", None) or self.pipe.tokenizer_2
        self.controller._start(self._prompts, tokenizer)
        self._step, self._steps, self._factors = -1, 0, {}
        return self.pipe(list(self._prompts), **pipe_kwargs)

    def _count_step(self, module, args) -> None:
        # One UNet call per denoising step; the scheduler knows the count once the loop runs.
        self._step += 1
        if not self._steps:
            self._steps = self.controller.num_steps or self.pipe.scheduler.num_inference_steps

    def apply(self, probs: torch.Tensor, heads: int, is_cross: bool) -> None:
        """Edit the target rows of the conditional half of ``probs`` (B*H, M, N), as diffusers'
        materialising processor computes it, in place before it multiplies by V."""
        probs = probs.unflatten(0, (-1, heads))
        prompts = len(self._prompts)
        rows = probs.shape[0]
        if rows not in (prompts, 2 * prompts):
            raise ValueError(f"MaterialisedEdit: expected one image per prompt ({prompts} or {2 * prompts} "
                             f"batch rows), got {rows}")
        cond = probs[rows - prompts:]   # [uncond; cond] with CFG, all rows without
        source = cond[0]
        for target in range(1, prompts):
            if is_cross:
                self._edit_cross(cond, source, target)
            elif self._in_self_window():
                cond[target] = source

    def _edit_cross(self, cond: torch.Tensor, source: torch.Tensor, target: int) -> None:
        factors = self._cross_factors(target, cond.shape[-1], cond.device, cond.dtype)
        if factors is None:
            return
        W0, g0, alpha = factors
        own = cond[target]
        edited = source @ W0 + own * g0            # R, the edited source map
        cond[target] = edited * alpha + own * (1 - alpha)

    def _cross_factors(self, target: int, keys: int, device, dtype):
        """(W0, g0, α_t) of ``target`` at this step on the device, or None outside every
        word's window; cached per step so that each attention call only reads them."""
        key = (target, self._step, keys, device, dtype)
        if key not in self._factors:
            alpha = self.controller._alpha(target, self._step, self._steps, keys)
            if alpha.any():
                W0, g0 = self.controller.terms(target, keys)
                self._factors[key] = tuple(x.to(device=device, dtype=dtype) for x in (W0, g0, alpha))
            else:
                self._factors[key] = None
        return self._factors[key]

    def _in_self_window(self) -> bool:
        start, end = self.controller.self_window
        return int(start * self._steps) <= self._step < int(end * self._steps)


# ---- the benchmark -------------------------------------------------------------------------

def _tiny(dtype):
    from ..diffusers.offline import tiny_sd_pipeline
    return tiny_sd_pipeline(dtype=dtype)


def _sd15(dtype):
    from ..diffusers.offline import published_sd15_pipeline
    return published_sd15_pipeline(dtype=dtype)


def _sdxl(dtype):
    from ..diffusers.offline import published_sdxl_pipeline
    return published_sdxl_pipeline(dtype=dtype)


# name: (pipeline builder, image side in pixels)
MODELS: Dict[str, Tuple[Callable[[torch.dtype], object], int]] = {
    "sd15-512": (_sd15, 512),
    "sdxl-1024": (_sdxl, 1024),
    "tiny": (_tiny, 32),   # CPU smoke: the offline tiny pipeline (VAE factor 2, 16² latent)
}


def _plain(stack: ExitStack, pipe, controller: Edit):
    return lambda **kw: pipe([SOURCE, TARGET], **kw)


def _fused(stack: ExitStack, pipe, controller: Edit):
    import attnctl
    from ..p2p import edit

    stack.callback(attnctl.uninstall, pipe)   # edit() leaves attnctl installed for the next call
    return lambda **kw: edit(pipe, SOURCE, [TARGET], controller, **kw)


def _materialised(stack: ExitStack, pipe, controller: Edit):
    baseline = stack.enter_context(MaterialisedEdit(pipe, controller))
    return lambda **kw: baseline.generate(SOURCE, [TARGET], **kw)


# name: set up on the stack, return a function that runs one generation
CONTENDERS = {
    "diffusers-sdpa": _plain,
    "attnctl-p2p": _fused,
    "materialised-p2p": _materialised,
}
BASELINE, MATERIALISED = "diffusers-sdpa", "materialised-p2p"


def check_steps(steps: int) -> None:
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= MAX_STEPS:
        raise ValueError(f"steps: the prompt-to-prompt benchmark runs 1 to {MAX_STEPS} denoising steps, got {steps!r}")


def run_p2p_edit(model: str, *, steps: int = 20, dtype: torch.dtype = torch.float16, device: str = "cuda",
                 contenders: Optional[List[str]] = None, repeats: int = 3, progress=None) -> List[dict]:
    """Time one two-prompt edit generation of ``model`` (a key of MODELS) per contender:
    median wall time of ``repeats`` pipeline calls after a warm-up call, and peak memory.
    Returns one record per contender; an out-of-memory contender is recorded, not raised."""
    if model not in MODELS:
        raise ValueError(f"model: expected one of {', '.join(MODELS)}, got {model!r}")
    check_steps(steps)
    names = list(CONTENDERS) if contenders is None else list(contenders)
    unknown = [n for n in names if n not in CONTENDERS]
    if unknown:
        raise ValueError(f"contenders: unknown {', '.join(unknown)}; expected some of {', '.join(CONTENDERS)}")
    build, side = MODELS[model]
    pipe = build(dtype).to(device)
    controller = Replace(cross_steps=CROSS_STEPS, self_steps=SELF_STEPS)
    rows, latents = [], {}
    for name in names:
        rec = {"model": model, "contender": name, "steps": steps, "dtype": str(dtype).replace("torch.", ""),
               "height": side, "width": side, "prompts": [SOURCE, TARGET],
               "edit": f"Replace(cross_steps={CROSS_STEPS}, self_steps={SELF_STEPS})", "repeats": repeats}
        try:
            with ExitStack() as stack, torch.no_grad():
                generate = CONTENDERS[name](stack, pipe, controller)
                measured, latents[name] = _measure(generate, pipe, steps, side, device, repeats)
            rec.update(measured, status="ok")
        except torch.cuda.OutOfMemoryError as exc:
            rec["status"] = f"OOM: {str(exc).splitlines()[0][:160]}"
        finally:
            if device == "cuda":
                torch.cuda.empty_cache()
        rows.append(rec)
        if progress:
            progress(rec)
    _add_comparisons(rows, latents)
    return rows


def _pipe_kwargs(pipe, steps: int, side: int, device: str) -> dict:
    # Every run (and every contender) starts from the same noise: prompt-to-prompt's one
    # latent shared by the two prompts (what edit() draws by default), from a fresh generator.
    from ..tools.p2p import shared_latents

    scale = pipe.vae_scale_factor
    latents = shared_latents(pipe, pipe.unet, (side // scale, side // scale), 2, 1,
                             torch.Generator(device).manual_seed(0))
    return dict(num_inference_steps=steps, height=side, width=side, guidance_scale=GUIDANCE,
                output_type="latent", latents=latents)


def _measure(generate, pipe, steps: int, side: int, device: str, repeats: int) -> Tuple[dict, torch.Tensor]:
    """Median wall time of whole pipeline calls, and the peak memory above what was
    allocated before the warm-up (what a contender keeps between calls counts)."""
    cuda = device == "cuda"
    if cuda:
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
    generate(**_pipe_kwargs(pipe, steps, side, device))   # warm-up: Triton compiles, SDPA picks kernels
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        latents = generate(**_pipe_kwargs(pipe, steps, side, device)).images
        if cuda:
            torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    median = statistics.median(times)
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20 if cuda else None
    return {"median_ms": median, "step_ms": median / steps, "peak_mem_mb": peak}, latents.float().cpu()


def _add_comparisons(rows: List[dict], latents: Dict[str, torch.Tensor]) -> None:
    """Ratios to stock diffusers and to the materialising edit, and how far each edit's
    latents are from the materialising edit's (the two should make the same edit)."""
    ok = {r["contender"]: r for r in rows if r["status"] == "ok"}
    base, materialised = ok.get(BASELINE), ok.get(MATERIALISED)
    for r in ok.values():
        if base:
            r["time_vs_sdpa"] = r["median_ms"] / base["median_ms"]
        if materialised:
            r["time_vs_materialised"] = r["median_ms"] / materialised["median_ms"]
            if r["peak_mem_mb"] is not None and materialised["peak_mem_mb"]:
                r["peak_vs_materialised"] = r["peak_mem_mb"] / materialised["peak_mem_mb"]
            if r["contender"] != BASELINE:
                r["latent_diff_vs_materialised"] = float(
                    (latents[r["contender"]] - latents[MATERIALISED]).abs().amax())
