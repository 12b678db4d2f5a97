"""End to end for the diffusion transformers: time per denoising step of the published
transformer (random weights, built on the device; text states random tensors of the text
encoder's shape, so no text encoder runs), peak device memory and the host memory a
materialising capture keeps per step — stock diffusers, attnctl, attnctl's trace, and the
attention-map-diffusers way of getting maps (explicit softmax in the layers that see the
text, each layer's per-head image-query × text-key slice of P, on the (frames, h, w) token
grid, copied to the host at every step).

One runner serves every transformer; what differs between them is data (FAMILIES, MODELS):

* MM-DiT joint attention: FLUX.1-dev (text first in the joint sequence; its single-stream
  blocks left out of the materialised maps, as attention-map-diffusers does) and SD3.5
  large (image first, CFG as one batch of 2).
* A cross-attention layer per block: PixArt-Σ (T5 with its mask, CFG as one batch of 2)
  and Wan 2.1 (umT5; WanPipeline runs CFG's halves as two transformer calls per step, the
  conditional first). On Wan the trace and the materialised capture take the conditional
  call, the one whose maps show the prompt (attention-map-diffusers has no Wan support; a
  port keying its maps by (timestep, layer) as it does would keep one call's maps per step
  too); the unconditional call runs stock attention.

The materialised capture checks the host's available memory before each copy and raises
MemoryError (recorded as "host OOM", like a device OOM) rather than let the kernel's OOM
killer end the run.
"""
from __future__ import annotations

import contextlib
import functools
import logging
import os
import re
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F

from ..diffusers import offline_dit, offline_mmdit
from .e2e import run_contenders, time_steps

PROMPT = "a photo of a cat sitting on the car"
# The materialised capture leaves at least this fraction of the host's memory free (_check_host_room).
HOST_RESERVE_FRACTION = 0.05


@dataclass(frozen=True)
class Family:
    """What a transformer family's benchmark needs to know about it."""

    model_class: str                     # the diffusers class
    tiny_config: Callable[[], dict]      # the tiny offline config (CPU smoke)
    inputs: Callable                     # (spec, config, prompt tokens, make) -> [inputs of each call in a step]
    mapped: str                          # regex (full match): the attention modules whose maps the tools keep
    text_first: Optional[bool]           # joint attention: text before the image in the keys; None: keys = text
    cfg_calls: int = 1                   # transformer calls per step with CFG (2: the halves apart)


@dataclass(frozen=True)
class DitModel:
    config: Optional[str]       # attnctl.configs name; None: the tiny offline config (CPU smoke)
    family: str                 # a FAMILIES key
    latent: Tuple[int, int]     # latent (h, w): image side / 8
    text: int                   # text tokens (T5 / umT5; SD3 adds 77 CLIP tokens in front of them)
    cfg: bool                   # classifier-free guidance (Flux dev is guidance-distilled: no)
    steps: int                  # the run's default length (`attnctl bench --steps` overrides it)
    frames: int = 1             # latent frames (Wan)

    @property
    def kind(self) -> Family:
        return FAMILIES[self.family]

    @property
    def rows(self) -> int:
        """Batch rows per transformer call."""
        return 2 if self.cfg and self.kind.cfg_calls == 1 else 1

    @property
    def calls(self) -> int:
        """Transformer calls per denoising step."""
        return self.kind.cfg_calls if self.cfg else 1

    @property
    def token_grid(self) -> Tuple[int, int, int]:
        """(frames, h, w) of the image tokens: every model here patchifies (or packs) 2×2."""
        return self.frames, self.latent[0] // 2, self.latent[1] // 2


def _flux_inputs(spec: DitModel, config, prompt_tokens: int, make: dict) -> List[dict]:
    """Flux packs the latent 2×2 into tokens with their (0, y, x) ids."""
    device = make["device"]
    _, h, w = spec.token_grid
    ids = torch.zeros(h * w, 3, device=device)
    ids[:, 1] = torch.arange(h, device=device).repeat_interleave(w)
    ids[:, 2] = torch.arange(w, device=device).repeat(h)
    inputs = dict(hidden_states=torch.randn(spec.rows, h * w, config.in_channels, **make),
                  encoder_hidden_states=torch.randn(spec.rows, spec.text, config.joint_attention_dim, **make),
                  pooled_projections=torch.randn(spec.rows, config.pooled_projection_dim, **make),
                  img_ids=ids, txt_ids=torch.zeros(spec.text, 3, device=device))
    if config.guidance_embeds:
        inputs["guidance"] = torch.full((spec.rows,), 3.5, **make)
    return [inputs]


def _sd3_inputs(spec: DitModel, config, prompt_tokens: int, make: dict) -> List[dict]:
    """SD3 takes the latent, 77 CLIP + the T5 states and the pooled CLIP vectors."""
    return [dict(hidden_states=torch.randn(spec.rows, config.in_channels, *spec.latent, **make),
                 encoder_hidden_states=torch.randn(spec.rows, 77 + spec.text, config.joint_attention_dim, **make),
                 pooled_projections=torch.randn(spec.rows, config.pooled_projection_dim, **make))]


def _pixart_inputs(spec: DitModel, config, prompt_tokens: int, make: dict) -> List[dict]:
    """PixArtSigmaPipeline's call: the latent, T5 states with their mask (the prompt's
    tokens; the transformer turns the rest into a -10000 bias), no micro-conditions."""
    mask = torch.zeros(spec.rows, spec.text, **make)
    mask[:, :prompt_tokens] = 1
    return [dict(hidden_states=torch.randn(spec.rows, config.in_channels, *spec.latent, **make),
                 encoder_hidden_states=torch.randn(spec.rows, spec.text, config.caption_channels, **make),
                 encoder_attention_mask=mask, added_cond_kwargs={"resolution": None, "aspect_ratio": None})]


def _wan_inputs(spec: DitModel, config, prompt_tokens: int, make: dict) -> List[dict]:
    """WanPipeline's calls: the video latent with the prompt's umT5 states, then (CFG) with
    the negative prompt's; states past the prompt are zero, as the pipeline makes them."""
    latent = torch.randn(spec.rows, config.in_channels, spec.frames, *spec.latent, **make)
    calls = []
    for _ in range(spec.calls):
        text = torch.randn(spec.rows, spec.text, config.text_dim, **make)
        text[:, prompt_tokens:] = 0
        calls.append(dict(hidden_states=latent, encoder_hidden_states=text))
    return calls


FAMILIES: Dict[str, Family] = {
    "flux": Family("FluxTransformer2DModel", offline_mmdit.tiny_flux_transformer_config, _flux_inputs,
                   r"transformer_blocks\.\d+\.attn", text_first=True),
    "sd3": Family("SD3Transformer2DModel", offline_mmdit.tiny_sd3_transformer_config, _sd3_inputs,
                  r"transformer_blocks\.\d+\.attn", text_first=False),
    "pixart": Family("PixArtTransformer2DModel", offline_dit.tiny_pixart_transformer_config, _pixart_inputs,
                     r"transformer_blocks\.\d+\.attn2", text_first=None),
    "wan": Family("WanTransformer3DModel", offline_dit.tiny_wan_transformer_config, _wan_inputs,
                  r"blocks\.\d+\.attn2", text_first=None, cfg_calls=2),
}

MODELS: Dict[str, DitModel] = {
    "flux-1024": DitModel("flux1_dev_transformer", "flux", (128, 128), 512, cfg=False, steps=4),
    "sd35l-1024": DitModel("sd35_large_transformer", "sd3", (128, 128), 256, cfg=True, steps=4),
    "pixart-1024": DitModel("pixart_sigma_transformer", "pixart", (128, 128), 300, cfg=True, steps=20),
    # 480×832, 81 frames: latent 21×60×104, 21×30×52 = 32760 tokens after the 1×2×2 patchify
    "wan-480p": DitModel("wan21_t2v_1_3b_transformer", "wan", (60, 104), 512, cfg=True, steps=3, frames=21),
    "flux-tiny": DitModel(None, "flux", (8, 8), 16, cfg=False, steps=2),
    "sd3-tiny": DitModel(None, "sd3", (8, 8), 16, cfg=True, steps=2),
    "pixart-tiny": DitModel(None, "pixart", (8, 8), 16, cfg=True, steps=2),
    "wan-tiny": DitModel(None, "wan", (4, 6), 16, cfg=True, steps=2, frames=2),
}
SMOKE = {"flux-1024": "flux-tiny", "sd35l-1024": "sd3-tiny", "pixart-1024": "pixart-tiny", "wan-480p": "wan-tiny"}


def build_transformer(spec: DitModel, dtype: torch.dtype, device: str):
    if spec.config is not None:
        return offline_mmdit.published_transformer(spec.config, dtype, device)
    import diffusers
    torch.manual_seed(0)
    model = getattr(diffusers, spec.kind.model_class)(**spec.kind.tiny_config())
    return model.to(device=device, dtype=dtype).eval()


def tokenizer(spec: DitModel):
    """The in-memory T5 tokenizer, at the model's text length."""
    return offline_mmdit.t5_tokenizer(model_max_length=spec.text)


def prompt_tokens(spec: DitModel) -> int:
    """PROMPT's T5 tokens (its pieces and </s>), at most the text length."""
    return min(len(tokenizer(spec)(PROMPT).input_ids), spec.text)


def transformer_inputs(spec: DitModel, model, dtype: torch.dtype, device: str) -> List[dict]:
    """The inputs of each transformer call of one step (without the timestep)."""
    return spec.kind.inputs(spec, model.config, prompt_tokens(spec), dict(dtype=dtype, device=device))


def text_tokens(spec: DitModel) -> int:
    """Text keys of an attention call that sees the text (SD3: 77 CLIP + T5)."""
    return 77 + spec.text if spec.family == "sd3" else spec.text


def host_available() -> Optional[int]:
    """Bytes the host can still give (MemAvailable), or None where /proc/meminfo is absent."""
    try:
        with open("/proc/meminfo") as f:
            fields = dict(line.split(":", 1) for line in f)
    except OSError:
        return None
    return int(fields["MemAvailable"].split()[0]) * 1024


def _host_total() -> Optional[int]:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


@functools.lru_cache(maxsize=None)
def _no_host_guard() -> None:
    logging.getLogger(__name__).warning(
        "materialised capture: the host's available memory is unknown here (no /proc/meminfo), so a host "
        "running out of memory ends the run instead of being recorded as host OOM")


def _check_host_room(nbytes: int) -> None:
    available, total = host_available(), _host_total()
    if available is None or total is None:
        _no_host_guard()
        return
    if nbytes > available - HOST_RESERVE_FRACTION * total:
        raise MemoryError(f"host memory: the next map ({nbytes / 2**20:.0f} MiB) would leave less than "
                          f"{HOST_RESERVE_FRACTION:.0%} of {total / 2**30:.0f} GiB free "
                          f"({available / 2**30:.1f} GiB available)")


def _map_slices(spec: DitModel, sequence: int) -> Tuple[slice, slice]:
    """(image query rows, text key columns) of P in an attention call that sees the text."""
    text_first = spec.kind.text_first
    if text_first is None:            # cross-attention: every query is an image token, every key text
        return slice(None), slice(None)
    T = text_tokens(spec)
    return (slice(T, sequence), slice(0, T)) if text_first else (slice(0, sequence - T), slice(sequence - T, sequence))


@contextlib.contextmanager
def materialised_capture(model, spec: DitModel):
    """Explicit softmax(q·kᵀ/√d + mask) in every layer of ``spec.kind.mapped`` (in the
    conditional call of a step whose CFG halves are separate calls), the per-head image-query
    × text-key slice of P, on the (frames, h, w) token grid, copied to the host per call;
    yields the list of host tensors. attention-map-diffusers' explicit attention also adds a
    zero (queries × keys) bias it builds on the CPU at every call; that cost is left out."""
    mapped = [module for name, module in model.named_modules() if re.fullmatch(spec.kind.mapped, name)]
    kept: List[torch.Tensor] = []
    state = {"calls": 0, "inside": False}

    def count_call(module, args):
        state["calls"] += 1

    def enter(module, args):
        state["inside"] = (state["calls"] - 1) % spec.calls == 0   # the step's first (conditional) call

    def leave(module, args, output):
        state["inside"] = False

    hooks = [model.register_forward_pre_hook(count_call)]
    hooks += [m.register_forward_pre_hook(enter) for m in mapped]
    hooks += [m.register_forward_hook(leave) for m in mapped]
    sdpa = F.scaled_dot_product_attention

    def explicit(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        if not state["inside"]:   # Flux's single-stream blocks, self-attention, Wan's unconditional call
            return sdpa(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                        scale=scale, enable_gqa=enable_gqa)
        if dropout_p or is_causal or enable_gqa or (attn_mask is not None and attn_mask.dtype == torch.bool):
            raise NotImplementedError("materialised capture: dropout, causal or boolean masks and GQA are not "
                                      "replayed (no transformer benchmarked here uses them)")
        scores = (query @ key.transpose(-1, -2)) * (scale or query.shape[-1] ** -0.5)
        if attn_mask is not None:   # PixArt's T5 mask, as the additive bias the transformer makes of it
            scores = scores + attn_mask
        # in the inputs' dtype, as attention-map-diffusers' scaled_dot_product_attention does (torch's
        # softmax accumulates 16-bit rows in fp32 and writes them back in 16 bits)
        probs = torch.softmax(scores, dim=-1)
        image, text = _map_slices(spec, query.shape[2])
        maps = probs[:, :, image, text].unflatten(2, spec.token_grid)
        _check_host_room(maps.numel() * maps.element_size())
        kept.append(maps.to("cpu"))
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
    tc = stack.enter_context(attnctl.trace(model, layers="*"))
    tc.installation.start_generation([PROMPT], cfg=spec.cfg, tokenizer=tokenizer(spec))


CONTENDERS: Dict[str, Callable[[contextlib.ExitStack, object, DitModel], object]] = {
    "diffusers-sdpa": lambda stack, model, spec: None,
    "attnctl": _install,
    "attnctl+trace": _trace,
    "materialised": lambda stack, model, spec: stack.enter_context(materialised_capture(model, spec)),
}


def run_e2e_dit(model_name: str, contenders: List[str], *, steps: Optional[int] = None,
                dtype: torch.dtype = torch.bfloat16, device: str = "cuda", progress=None) -> List[dict]:
    """One record per contender; ``steps`` defaults to the model's (MODELS)."""
    spec = MODELS[model_name]
    steps = spec.steps if steps is None else steps
    model = build_transformer(spec, dtype, device)
    calls = transformer_inputs(spec, model, dtype, device)
    original = dict(model.attn_processors)
    kept: List[List[torch.Tensor]] = []

    def setup(name, stack):
        result = CONTENDERS[name](stack, model, spec)
        kept[:] = [result] if name == "materialised" else []

    def measure():
        def step(i):
            timestep = torch.full((spec.rows,), 1000.0 - i * 1000.0 / max(steps + 2, 1), dtype=dtype, device=device)
            for inputs in calls:
                out = model(timestep=timestep, **inputs, return_dict=False)[0]
            return out
        measured = time_steps(step, steps, device)
        host = sum(t.numel() * t.element_size() for t in kept[0]) if kept else 0
        measured["host_mb_per_step"] = host / 2**20 / (steps + 2)   # time_steps runs 2 warm-up steps
        kept.clear()
        return measured

    record = {"model": model_name, "steps": steps, "images": 1, "dtype": str(dtype).replace("torch.", ""),
              "calls_per_step": spec.calls, "rows_per_call": spec.rows}
    def restore():
        model.set_attn_processor(dict(original))
        kept.clear()   # a contender stopped by an OOM leaves its host maps here

    return run_contenders(contenders, record, setup=setup, measure=measure, restore=restore, device=device,
                          progress=progress)
