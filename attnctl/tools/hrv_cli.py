"""``attnctl hrv``: build head relevance vectors for a few concepts and plot the
head × concept matrix.

Without ``--model`` it builds a small SD pipeline offline (random weights: the vectors
are real HRVs of that network, not of a trained model). With ``--model DIR`` it loads a
diffusers SD 1.x / 2.x / SDXL model: a local directory, or a hub id that is cached or
reachable. Writes ``hrv.safetensors`` (reload with
``attnctl.tools.hrv.HeadRelevance.load``), ``hrv.png`` and ``hrv.json`` (a summary) to
``--out``.
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch

from ..op import BACKENDS

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
DEFAULT_CONCEPTS = ["cat", "dog", "red", "blue"]
DEFAULT_PROMPTS = ["a cat on a red car", "a blue dog in a park", "a red bird", "a dog and a cat"]


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "hrv", help="build head relevance vectors for concepts and plot the head x concept matrix",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", metavar="DIR|ID", help="diffusers model: a local directory, or a hub id that is cached "
                   "or reachable (default: a small offline SD)")
    p.add_argument("--offline-arch", choices=("sd", "sdxl"), default="sd")
    p.add_argument("--concepts", nargs="+", default=DEFAULT_CONCEPTS, metavar="CONCEPT",
                   help="concepts; NAME=word1,word2 gives a concept several words (default: %(default)s)")
    p.add_argument("--prompts", nargs="+", default=DEFAULT_PROMPTS, metavar="PROMPT",
                   help="prompts, or one prompt file (.txt or .jsonl): then a resumable job that shards "
                        "under accelerate launch (see attnctl.jobs.hrv)")
    p.add_argument("--steps", type=int, help="denoising steps (default 50 with --model, 4 offline)")
    p.add_argument("--height", type=int)
    p.add_argument("--width", type=int)
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--per-step", action="store_true", help="also keep each step's HRVs")
    p.add_argument("--seed", type=int, default=0, help="seed of the latents and of the probe's word draws")
    p.add_argument("--probe-words", choices=("sample", "all"), default="sample",
                   help="sample: one word per concept drawn at every call (official); all: every word at once")
    p.add_argument("--no-probe-sot", action="store_true",
                   help="leave the start-of-text token out of the probe softmax (the official keeps it)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=tuple(DTYPES), help="default fp16 on CUDA, fp32 on CPU")
    p.add_argument("--backend", choices=BACKENDS, default="auto")
    p.add_argument("--out", default="attnctl-hrv", help="output directory (default attnctl-hrv)")
    p.add_argument("--no-progress", action="store_true", help="prompt file: no progress bar")
    p.set_defaults(func=main)
    return p


def parse_concepts(items):
    concepts = {}
    for item in items:
        name, _, words = item.partition("=")
        if not name.strip() or (_ and not words.strip()):
            raise SystemExit(f"attnctl hrv: --concepts: expected NAME or NAME=word1,word2, got {item!r}")
        concepts[name.strip()] = [w.strip() for w in words.split(",") if w.strip()] if _ else [name.strip()]
    return concepts


def main(args) -> int:
    from .hrv import build_hrv

    device = args.device
    dtype = DTYPES[args.dtype] if args.dtype else (torch.float16 if device.startswith("cuda") else torch.float32)
    concepts = parse_concepts(args.concepts)
    if len(args.prompts) == 1 and (os.path.isfile(args.prompts[0]) or args.prompts[0].endswith((".txt", ".jsonl"))):
        from ..jobs.hrv import main as run_prompt_file

        return run_prompt_file(args, concepts)
    if args.model:
        from ..jobs.common import load_pipeline, resolve_model

        resolve_model(args.model, "hrv")
        pipe = load_pipeline(args.model, device, dtype)
        steps, size, model_id = args.steps or 50, {}, args.model
    else:
        from ..diffusers.offline import tiny_sd_pipeline, tiny_sdxl_pipeline

        pipe = (tiny_sdxl_pipeline if args.offline_arch == "sdxl" else tiny_sd_pipeline)(dtype=dtype)
        steps, size, model_id = args.steps or 4, dict(height=32, width=32), f"attnctl-offline-{args.offline_arch}"
    pipe = pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    if args.height:
        size["height"] = args.height
    if args.width:
        size["width"] = args.width
    result = build_hrv(pipe, concepts, args.prompts, steps=steps, guidance_scale=args.guidance,
                       seed=args.seed, batch_size=args.batch_size, per_step=args.per_step,
                       model_id=model_id, backend=args.backend, probe_words=args.probe_words,
                       probe_sot=not args.no_probe_sot, **size)
    write_result(result, Path(args.out), model_id, args.prompts, steps)
    return 0


def write_result(result, out: Path, model_id: str, prompts, steps: int) -> None:
    """hrv.safetensors, hrv.png and hrv.json (a summary) in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    result.save(str(out / "hrv.safetensors"))
    result.plot(str(out / "hrv.png"))
    summary = {"model_id": model_id, "concepts": result.concepts, "words": result.words,
               "heads": result.num_heads, "layers": len(result.layers), "prompts": list(prompts),
               "steps": steps, "never_selected": result.never_selected,
               "top_heads": {c: [f"{result.layer_heads()[i][0]}#{result.layer_heads()[i][1]}"
                                 for i in result.ranked_heads(c, min(5, result.num_heads)).tolist()]
                             for c in result.concepts}}
    (out / "hrv.json").write_text(json.dumps(summary, indent=2))
    print(f"[attnctl hrv] {len(result.concepts)} concepts x {result.num_heads} heads "
          f"({len(result.layers)} layers) -> {out / 'hrv.safetensors'}, {out / 'hrv.png'}", flush=True)
