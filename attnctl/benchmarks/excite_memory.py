"""Attend-and-Excite's activation memory, counted on the CPU: the bytes autograd saves for
backward in one A&E latent-update step, through attnctl's fused path and through the
materialising path the A&E ports use.

    python -m attnctl.benchmarks.excite_memory [--json PATH]

One step is what :mod:`attnctl.tools.attend_excite` runs per image and iteration: the
published UNet (random architecture, no weights) on one latent with its conditional text,
gradients on, the cross-attention maps at the map resolution, the token-max loss, and the
gradient of the loss with respect to the latent. Three paths:

* ``fused``: attnctl installed with :class:`~attnctl.tools.excite_maps.MeanMaps` and
  backend "triton": every attention call is the op's differentiable path (the autograd
  registration in :mod:`attnctl.autograd` saves q, k, v, out, the row LSE and, at the map
  layers, the per-head map columns; no (M, N) tensor).
* ``materialising``: diffusers' ``AttendExciteAttnProcessor`` on every layer with its
  ``AttentionStore`` (diffusers' StableDiffusionAttendAndExcitePipeline and the SDXL
  ports): softmax(QKᵀ) materialised, so autograd keeps every layer's P.
* ``attend_excite``: the fused path as :func:`attnctl.tools.attend_excite.attend_and_excite`
  runs it, the forward ended after the last map layer (the original runs the whole UNet
  and drops its output; the blocks after the last map layer cannot reach the loss).

Everything runs on meta tensors: shapes and dtypes only, nothing allocated, no kernel
launched (the op runs its registered fake implementations there), so the count is the
same on any machine. It is the sum over the distinct storages that autograd saved (a view
counts once; the UNet's parameters, saved by its linear layers and convolutions on both
paths alike, are left out). It is not a GPU's peak memory, which adds the weights, the
allocator's caching and the backward's transient buffers.

Both paths read their maps with attnctl's readout (:func:`~attnctl.tools.attend_excite.
max_attention_per_token`: the original's softmax ×100 and smoothing) and take the loss
max over the tokens of 1 − max with tensor operations (the original picks the worst token
with Python comparisons, which need values that meta tensors do not have); the readout
saves a few maps of h·w·T elements, in fp32 on attnctl's maps and in the model's dtype on
diffusers'.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import sys
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterator, List, NamedTuple, Optional, Sequence, Tuple

import torch

from ..configs import load_unet_config
from ..diffusers.install import install
from ..diffusers.unet_layers import AttentionLayer, attention_layers
from ..tools.attend_excite import ends_after_maps, max_attention_per_token
from ..tools.excite_maps import MeanMaps

TEXT_TOKENS = 77
TOKENS = (2, 5)      # text positions of the two subjects whose maps the loss reads
TIMESTEP = 500
PATHS = ("fused", "materialising", "attend_excite")


class Setting(NamedTuple):
    config: str                  # attnctl.configs UNet name
    latent: int                  # latent side (image side / 8)
    attn_res: Tuple[int, int]    # the maps' grid: A&E's 16² on SD1.x, the SDXL ports' 32²


SETTINGS = {
    "sdxl-1024": Setting("sdxl_unet", 128, (32, 32)),
    "sd15-512": Setting("sd15_unet", 64, (16, 16)),
}


@dataclass
class SavedStorage:
    """One storage autograd saved: the attention layer whose forward saved it first (None:
    outside every attention layer), the phase of the step ("unet": the UNet forward,
    "readout": the maps and the loss after it), the shape of that first tensor and the
    storage's bytes."""
    layer: Optional[str]
    phase: str
    shape: Tuple[int, ...]
    nbytes: int


@dataclass
class SavedTensors:
    """What autograd saved during a step: every distinct storage (parameters left out) and,
    per attention layer, the shape of every tensor saved inside it (views included).
    ``phase`` names the part of the step that is running (set by the caller)."""
    storages: List[SavedStorage] = field(default_factory=list)
    shapes_by_layer: Dict[str, List[Tuple[int, ...]]] = field(default_factory=dict)
    phase: str = "unet"

    def nbytes(self, phase: Optional[str] = None, in_attention: Optional[bool] = None) -> int:
        """Bytes of the storages saved in ``phase`` (None: any), inside attention layers
        (True), outside them (False) or anywhere (None)."""
        return sum(s.nbytes for s in self.storages if (phase is None or s.phase == phase)
                   and (in_attention is None or (s.layer is not None) == in_attention))


@contextlib.contextmanager
def count_saved_tensors(model: torch.nn.Module) -> Iterator[SavedTensors]:
    """Record what autograd saves for backward while the block runs
    (torch.autograd.graph.saved_tensors_hooks), attributing each tensor to the diffusers
    Attention module running when it was saved."""
    from diffusers.models.attention_processor import Attention

    result = SavedTensors()
    parameters = {p.untyped_storage()._cdata for p in model.parameters()}
    seen: Dict[int, torch.UntypedStorage] = {}  # kept alive so that no address is reused
    active: List[str] = []

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        key = storage._cdata
        if key in parameters:
            return tensor
        # (a forward ended by attend_and_excite's stop leaves its last layer on the stack)
        layer = active[-1] if active and result.phase == "unet" else None
        if layer is not None:
            result.shapes_by_layer.setdefault(layer, []).append(tuple(tensor.shape))
        if key not in seen:
            seen[key] = storage
            result.storages.append(SavedStorage(layer, result.phase, tuple(tensor.shape), storage.nbytes()))
        return tensor

    def leave(module, args, output) -> None:  # a forward hook's return value would replace the output
        active.pop()

    handles = []
    for name, module in model.named_modules():
        if isinstance(module, Attention):
            handles.append(module.register_forward_pre_hook(lambda m, a, name=name: active.append(name)))
            handles.append(module.register_forward_hook(leave))
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            yield result
    finally:
        for handle in handles:
            handle.remove()


def meta_unet(config: str, dtype: torch.dtype = torch.float16):
    """The published UNet ``config`` on the meta device (no memory for its weights)."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(load_unet_config(config))
    return unet.to(dtype).eval()


def step_inputs(unet, latent: int) -> Tuple[torch.Tensor, dict]:
    """(latent, UNet keyword arguments) of one image with its conditional text, random, on the
    UNet's device and in its dtype; SDXL's added conditions (pooled text, six time ids)
    where the UNet takes them."""
    config = unet.config
    like = dict(device=unet.device, dtype=unet.dtype)
    sample = torch.randn(1, config.in_channels, latent, latent, **like)
    kwargs = {"encoder_hidden_states": torch.randn(1, TEXT_TOKENS, config.cross_attention_dim, **like)}
    if config.addition_embed_type == "text_time":
        pooled = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
        kwargs["added_cond_kwargs"] = {"text_embeds": torch.randn(1, pooled, **like),
                                       "time_ids": torch.randn(1, 6, **like)}
    return sample, kwargs


@contextlib.contextmanager
def fused_path(unet, setting: Setting) -> Iterator[Tuple[Callable[[], torch.Tensor], Callable]]:
    """attnctl installed with A&E's maps; yields the maps reader and the whole UNet's forward."""
    controller = MeanMaps(setting.attn_res)
    with install(unet, controller, backend="triton"):
        yield controller.maps, unet


@contextlib.contextmanager
def attend_excite_path(unet, setting: Setting) -> Iterator[Tuple[Callable[[], torch.Tensor], Callable]]:
    """The fused path as attnctl.tools.attend_excite runs it: the forward ends after the
    last map layer (nothing after it reaches the loss)."""
    controller = MeanMaps(setting.attn_res)
    with install(unet, controller, backend="triton"):
        with ends_after_maps(unet, controller, (setting.latent,) * 2, TEXT_TOKENS) as forward:
            yield controller.maps, forward


@contextlib.contextmanager
def materialising_path(unet, setting: Setting) -> Iterator[Tuple[Callable[[], torch.Tensor], Callable]]:
    """diffusers' AttendExciteAttnProcessor on every layer (as the A&E pipeline registers
    it); yields the maps reader in MeanMaps' layout (columns 1 … N−2, the original's
    ``[:, :, 1:-1]``) and the whole UNet's forward."""
    from diffusers.pipelines.deprecated.stable_diffusion_attend_and_excite.\
        pipeline_stable_diffusion_attend_and_excite import AttendExciteAttnProcessor, AttentionStore

    store = AttentionStore(setting.attn_res)
    previous = unet.attn_processors
    processors = {name: AttendExciteAttnProcessor(store, name.split("_")[0]) for name in previous}
    store.num_att_layers = len(processors)
    unet.set_attn_processor(processors)
    try:
        yield lambda: store.aggregate_attention(("up", "down", "mid"))[None, ..., 1:-1], unet
    finally:
        unet.set_attn_processor(previous)


PATH_CONTEXTS = {"fused": fused_path, "materialising": materialising_path, "attend_excite": attend_excite_path}


def measure(unet, setting: Setting, path: str, tokens: Sequence[int] = TOKENS) -> SavedTensors:
    """What autograd saves in one A&E step on ``unet`` through ``path``: the UNet forward
    with gradients on, the maps' readout and loss; then the latent's gradient. On a meta
    UNet nothing runs but shapes; a real one runs (Triton: on CUDA or the interpreter)."""
    sample, kwargs = step_inputs(unet, setting.latent)
    latent = sample.detach().clone().requires_grad_(True)
    with PATH_CONTEXTS[path](unet, setting) as (read_maps, forward):
        with count_saved_tensors(unet) as saved:
            forward(latent, TIMESTEP, **kwargs)
            saved.phase = "readout"
            loss = torch.stack([1.0 - m for m in max_attention_per_token(read_maps(), tokens)]).max()
        grad = torch.autograd.grad(loss, [latent])[0]
    if grad.shape != sample.shape:
        raise RuntimeError(f"{path}: the latent's gradient has shape {tuple(grad.shape)}, expected "
                           f"{tuple(sample.shape)}")
    return saved


def probability_bytes(layers: Sequence[AttentionLayer], element_size: int, batch: int = 1) -> int:
    """Bytes of every layer's P, B·H·M·N elements: what the materialising path keeps for backward."""
    return sum(batch * l.heads * l.queries * l.keys for l in layers) * element_size


# Columns of a result row: what each path saved, in all and by part of the step.
PARTS = {"saved_": {}, "unet_forward_": {"phase": "unet"}, "attention_layers_": {"in_attention": True},
         "readout_": {"phase": "readout"}}


def run(name: str) -> dict:
    """The result row of one model in SETTINGS: both paths' saved bytes, in all and by part."""
    setting = SETTINGS[name]
    unet = meta_unet(setting.config)
    layers = attention_layers(unet, (setting.latent, setting.latent), TEXT_TOKENS)
    saved = {path: measure(unet, setting, path) for path in PATHS}
    element = torch.finfo(unet.dtype).bits // 8
    largest_self = max((l for l in layers if not l.is_cross), key=lambda l: l.heads * l.queries * l.keys)
    return {
        "model": name, "unet": setting.config, "image": setting.latent * 8, "latent": setting.latent,
        "maps": list(setting.attn_res), "dtype": str(unet.dtype).replace("torch.", ""), "batch": 1,
        "attention_layers": len(layers), "self_attention_layers": sum(not l.is_cross for l in layers),
        **{f"{path}_{part}bytes": saved[path].nbytes(**where) for path in PATHS for part, where in PARTS.items()},
        **{f"{path}_storages": len(saved[path].storages) for path in PATHS},
        "ratio": saved["materialising"].nbytes() / saved["fused"].nbytes(),
        "attend_excite_ratio": saved["materialising"].nbytes() / saved["attend_excite"].nbytes(),
        "attention_ratio": saved["materialising"].nbytes(in_attention=True) / saved["fused"].nbytes(in_attention=True),
        "probability_bytes": probability_bytes(layers, element),
        "largest_self_attention_probability_bytes": largest_self.heads * largest_self.queries ** 2 * element,
        "parameter_bytes_left_out": sum(p.numel() for p in unet.parameters()) * element,
    }


def _gib(n: int) -> str:
    return f"{n / 2 ** 30:.2f} GiB"


def main(argv: Optional[Sequence[str]] = None) -> int:
    from .runner import environment

    parser = argparse.ArgumentParser(prog="python -m attnctl.benchmarks.excite_memory",
                                     description=__doc__.split("\n\n")[0])
    stamp = datetime.date.today().strftime("%Y%m%d")
    parser.add_argument("--json", metavar="PATH", default=f"bench/results/cpu/excite-memory-{stamp}.json",
                        help="where to write the results (default: %(default)s)")
    parser.add_argument("--model", action="append", choices=tuple(SETTINGS), help="default: every model")
    args = parser.parse_args(argv)
    import diffusers

    env = {**environment("cpu"), "command": " ".join([parser.prog, *(argv if argv is not None else sys.argv[1:])]),
           "device": "meta",
           "device_name": "meta tensors on the CPU: saved-for-backward bytes counted, not GPU peak memory",
           "diffusers": diffusers.__version__}
    rows = [run(name) for name in args.model or SETTINGS]
    for row in rows:
        print(f"{row['model']} ({row['unet']}, {row['image']}² image, {row['latent']}² latent, {row['dtype']}, "
              f"batch 1, maps {row['maps'][0]}²): A&E step saves fused {_gib(row['fused_saved_bytes'])}, "
              f"materialising {_gib(row['materialising_saved_bytes'])} (×{row['ratio']:.2f}; "
              f"attention layers ×{row['attention_ratio']:.2f}); as attend_and_excite runs it (ended after "
              f"the last map layer) {_gib(row['attend_excite_saved_bytes'])} (×{row['attend_excite_ratio']:.2f}); "
              f"the materialising path's P alone: {_gib(row['probability_bytes'])}")
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump({"environment": env, "excite_memory": rows}, f, indent=1)
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
