"""``attnctl edit``: prompt-to-prompt edits (:mod:`attnctl.p2p`) of every source/target
pair of a file, over any number of processes.

Pair files: ``source | target`` lines (.txt), or JSONL objects {"source", "target",
"seed"?, "edit"?, "cross_steps"?, "self_steps"?}. ``edit``: "replace" (word swap, same
number of words), "refine" (words added or removed) or "auto" (the default: replace when
both prompts have the same number of words, else refine; the choice is in the manifest).
``cross_steps`` / ``self_steps``: fractions of the steps (defaults 0.8 and 0.4, the
original notebook's). A pair's seed is its own, else ``--seed`` + its index in the file;
as in the original, source and target start from the same latent, drawn (1, C, h, w) from
a generator with that seed.

Each pair is one pipeline call (the source and its target in one batch); ``--batch-size``
pairs are committed together. Writes ``images/NNNNNN_source.png`` and
``images/NNNNNN_target.png``, ``edits/bNNNNNN.safetensors`` (per pair ``NNNNNN/source``
and ``NNNNNN/target``, (h, w, 3) uint8) and ``manifest.jsonl``.
"""
from __future__ import annotations

import argparse
from typing import List, Sequence

import numpy as np
import torch

from .common import (add_common_options, check_common, item_seed, job_options, load_pipeline, resolve_dtype,
                     resolve_model)
from .inputs import InputError, file_digest, read_pairs
from .ranks import Ranks
from .runner import Work, run_job
from .store import JobDir, JobDirError


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("edit", help="prompt-to-prompt edits of every source/target pair of a file "
                              "(resumable; shards under accelerate launch)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pairs", metavar="FILE", required=True, help="pair file: .txt ('source | target') or .jsonl")
    add_common_options(p)
    p.set_defaults(func=main)
    return p


def edit_mode(item) -> str:
    if item.mode != "auto":
        return item.mode
    return "replace" if len(item.source.split(" ")) == len(item.target.split(" ")) else "refine"


def validate_pairs(tokenizer, items, path: str) -> None:
    """Replace needs a word swap: checked for every pair before any generation."""
    from ..tools.p2p import replacement_mapper

    for item in items:
        if edit_mode(item) == "replace":
            try:
                replacement_mapper(tokenizer, item.source, item.target)
            except ValueError as exc:
                raise InputError(f"--pairs: {path} line {item.line}: {exc}") from None


class EditWork(Work):
    images_per_item = 2

    def __init__(self, pipe, args, items):
        self.pipe, self.args = pipe, args
        validate_pairs(pipe.tokenizer, items, args.pairs)
        unet, factor = pipe.unet.config, pipe.vae_scale_factor
        height = args.height or unet.sample_size * factor
        width = args.width or unet.sample_size * factor
        self.size = dict(height=height, width=width)
        self.latent_shape = (1, unet.in_channels, height // factor, width // factor)

    def run(self, batch: int, items: Sequence, first: int, store) -> List[dict]:
        from safetensors.torch import save_file

        from ..p2p import Refine, Replace, edit

        args, pipe = self.args, self.pipe
        tensors, records = {}, []
        for i, item in enumerate(items):
            index, seed, mode = first + i, item_seed(item, first + i, args.seed), edit_mode(item)
            windows = {k: v for k, v in (("cross_steps", item.cross_steps), ("self_steps", item.self_steps))
                       if v is not None}
            controller = (Replace if mode == "replace" else Refine)(**windows)
            latent = torch.randn(self.latent_shape, generator=torch.Generator(device="cpu").manual_seed(seed))
            latents = latent.expand(2, *self.latent_shape[1:]).to(pipe.device, pipe.unet.dtype)
            with torch.no_grad():
                images = edit(pipe, item.source, [item.target], controller, backend=args.backend,
                              num_inference_steps=args.steps, guidance_scale=args.guidance, latents=latents,
                              **self.size).images
            name = f"{index:06d}"
            files = {}
            for role, image in zip(("source", "target"), images):
                files[role] = store.write_with(f"images/{name}_{role}.png", lambda p: image.save(p, format="PNG"))
                tensors[f"{name}/{role}"] = torch.from_numpy(np.array(image.convert("RGB"), dtype=np.uint8))
            files["edits"] = f"edits/b{batch:06d}.safetensors"
            records.append({"index": index, "line": item.line, "source": item.source, "target": item.target,
                            "seed": seed, "edit": mode, **windows, "files": files,
                            "keys": {"source": f"{name}/source", "target": f"{name}/target"}})
        store.write_with(f"edits/b{batch:06d}.safetensors", lambda p: save_file(tensors, p))
        return records


def identity(args) -> dict:
    return {"command": "edit", "pairs_sha256": file_digest(args.pairs), **job_options(args)}


def main(args) -> int:
    check_common(args, "edit")
    try:
        items = read_pairs(args.pairs)
        ident = identity(args)
        JobDir(args.out, ident).check()  # before the model loads
        resolve_model(args.model, "edit")
        ranks = Ranks()
        pipe = load_pipeline(args.model, ranks.device, resolve_dtype(args, ranks.device))
        work = EditWork(pipe, args, items)
        run_job("edit", args.out, ident, items, args.batch_size, work, ranks, progress=not args.no_progress)
    except (InputError, JobDirError) as exc:
        raise SystemExit(f"attnctl edit: {exc}") from None
    return 0
