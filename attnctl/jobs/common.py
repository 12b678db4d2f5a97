"""What the job commands share: their common options, the model (a local directory or a
Hugging Face hub id) and the per-item seeds."""
from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch

from ..op import BACKENDS

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def add_common_options(p: argparse.ArgumentParser, *, model_required: bool = True) -> None:
    p.add_argument("--model", metavar="DIR|ID", required=model_required,
                   help="diffusers model: a local directory, or a hub id that is cached or reachable")
    p.add_argument("--out", metavar="DIR", required=True,
                   help="output directory (a rerun with the same job resumes it)")
    p.add_argument("--batch-size", type=int, default=4, help="items per pipeline call (default %(default)s)")
    p.add_argument("--steps", type=int, default=50, help="denoising steps (default %(default)s)")
    p.add_argument("--guidance", type=float, default=7.5, help="CFG scale (default %(default)s)")
    p.add_argument("--height", type=int, help="image height in pixels (default: the model's)")
    p.add_argument("--width", type=int, help="image width in pixels (default: the model's)")
    p.add_argument("--seed", type=int, default=0, help="base seed (default %(default)s; see the command's help)")
    p.add_argument("--dtype", choices=tuple(DTYPES), help="default fp16 on CUDA, fp32 on CPU")
    p.add_argument("--backend", choices=BACKENDS, default="auto")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def check_common(args, command: str) -> None:
    for name in ("batch_size", "steps"):
        value = getattr(args, name)
        if value < 1:
            raise SystemExit(f"attnctl {command}: --{name.replace('_', '-')}: expected a positive integer, got {value}")
    for name in ("height", "width"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise SystemExit(f"attnctl {command}: --{name}: expected a positive integer, got {value}")
    if args.seed < 0:
        raise SystemExit(f"attnctl {command}: --seed: expected a non-negative integer, got {args.seed}")


def resolve_model(model: str, command: str) -> str:
    """The local directory holding ``--model``: the directory itself, or the hub id's
    snapshot (from the cache, else downloaded where the hub is reachable; HF_HUB_OFFLINE=1
    keeps to the cache). Errors name ``--model`` and what was given."""
    if os.path.isdir(model):
        return model
    expected = "expected a local diffusers model directory or a Hugging Face hub id (org/name) that is cached or reachable"
    if os.path.exists(model):
        raise SystemExit(f"attnctl {command}: --model: {expected}; got {model!r}, a file")
    from diffusers import DiffusionPipeline
    from huggingface_hub import constants

    try:
        return DiffusionPipeline.download(model)
    except Exception as exc:  # hub ids fail in many ways (invalid id, offline, not found, gated)
        if constants.HF_HUB_OFFLINE:
            reason = "HF_HUB_OFFLINE is set and the id is not in the cache"
        else:
            first = (str(exc).strip().splitlines() or [""])[0]
            reason = f"{type(exc).__name__}: {first[:200]}{'...' if len(first) > 200 else ''}"
    raise SystemExit(f"attnctl {command}: --model: {expected}; got {model!r}, which is neither a local directory "
                     f"nor a hub id that resolves ({reason})")


def model_identity(model: str) -> str:
    """A job's model: a local directory's absolute path, a hub id as given."""
    return str(Path(model).resolve()) if os.path.isdir(model) else model


def job_options(args) -> dict:
    """The options that change what a job computes: part of its identity."""
    return {"model": model_identity(args.model), "batch_size": args.batch_size, "steps": args.steps,
            "guidance": args.guidance, "height": args.height, "width": args.width, "seed": args.seed,
            "dtype": args.dtype, "backend": args.backend}


def resolve_dtype(args, device: str) -> torch.dtype:
    return DTYPES[args.dtype] if args.dtype else (torch.float16 if device.startswith("cuda") else torch.float32)


def load_pipeline(model: str, device: str, dtype: torch.dtype):
    """The pipeline of ``model`` (a local directory, or a hub id :func:`resolve_model` has
    put in the cache) on ``device``, progress bars off, no safety checker (it would blank
    images; the maps are the point)."""
    from diffusers import DiffusionPipeline
    import diffusers.utils.deprecation_utils as deprecation

    # diffusers renamed torch_dtype to dtype (the old name warns where the new exists).
    dtype_arg = "dtype" if hasattr(deprecation, "_resolve_dtype") else "torch_dtype"
    pipe = DiffusionPipeline.from_pretrained(model, local_files_only=True, **{dtype_arg: dtype})
    if getattr(pipe, "safety_checker", None) is not None:
        pipe.safety_checker = None
    pipe = pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def image_size(args) -> dict:
    return {k: v for k, v in (("height", args.height), ("width", args.width)) if v is not None}


def item_seed(item, index: int, base: int) -> int:
    """An item's own seed, else base + its index in the file."""
    return item.seed if item.seed is not None else base + index
