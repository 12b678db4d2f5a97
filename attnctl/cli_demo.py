"""``attnctl demo``: word heat maps of a Stable Diffusion generation, and what fused capture
costs next to materialised capture.

Without ``--model`` it builds a small SD pipeline offline (random weights, so the image is
noise; the maps are real maps of that network). With ``--model`` it loads a diffusers
SD 1.x / 2.x / SDXL (or Flux / SD3) model: a local directory, or a hub id that is cached or
reachable.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import threading
import time
from pathlib import Path

import torch

from .op import BACKENDS, last_dispatch

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# Pixels; the offline VAE halves them into a 40 x 40 latent. The offline UNets' sample size
# gives DAAM's 96-side rule (attnctl.tools.daam), under which the 40² level (SD) and the
# 20² level (SDXL) count; at 64 px neither architecture would keep any layer.
OFFLINE_SIZE = 80


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "demo", help="generate with a trace: image, per-word heat maps, fused vs materialised capture",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", metavar="DIR|ID", help="diffusers model: a local directory, or a hub id that is cached "
                   "or reachable (default: build a small SD offline)")
    p.add_argument("--offline-arch", choices=("sd", "sdxl", "flux", "sd3", "pixart", "wan"), default="sd",
                   help="architecture of the offline pipeline (default sd; flux and sd3: MM-DiT joint attention, "
                        "attnctl.cli_demo_mmdit; pixart and wan: cross-attention transformers, attnctl.cli_demo_dit)")
    p.add_argument("--prompt", default="a cat sitting on a red car")
    p.add_argument("--words", nargs="+", metavar="WORD", help="words to map (default: every word of the prompt)")
    p.add_argument("--layers", nargs="+", metavar="PATTERN",
                   help="cross-attention layers to trace: globs or name substrings, '*' for all (default: "
                        "DAAM's layers at the image size; see attnctl.trace)")
    p.add_argument("--steps", type=int, help="denoising steps (default 25 with --model, 8 offline)")
    p.add_argument("--height", type=int, help="image height in pixels (default: the model's, 80 offline)")
    p.add_argument("--width", type=int, help="image width in pixels (default: the model's, 80 offline)")
    p.add_argument("--guidance", type=float, default=7.5, help="CFG scale; 1 runs without CFG")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=tuple(DTYPES), help="default fp16 on CUDA, fp32 on CPU")
    p.add_argument("--backend", choices=BACKENDS, default="auto",
                   help="attention backend under the trace (auto: fused Triton kernel on CUDA)")
    p.add_argument("--out", default="attnctl-out", help="output directory (default attnctl-out)")
    p.add_argument("--no-compare", action="store_true", help="skip the plain and materialised runs")
    p.add_argument("--concepts", nargs="+", metavar="WORD",
                   help="Flux: ConceptAttention concepts (default: the mapped words); with --excite and --hrv: "
                        "the HRV concept of each --excite word")
    from .cli_demo_concepts import add_arguments as add_multi_concept_arguments

    add_multi_concept_arguments(p)
    p.set_defaults(func=main)
    return p


def say(message: str) -> None:
    print(f"[attnctl demo] {message}", flush=True)


def load_pipeline(args, device: str, dtype: torch.dtype):
    if args.model:
        from .jobs.common import load_pipeline as load_model, resolve_model

        resolve_model(args.model, "demo")
        say(f"loading {args.model} ({dtype}) ...")
        pipe = load_model(args.model, device, dtype)
    elif args.offline_arch in ("flux", "sd3"):
        from .cli_demo_mmdit import offline_pipeline

        say(f"building a small {args.offline_arch.upper()} pipeline offline (random weights) ...")
        pipe = offline_pipeline(args.offline_arch, args.seed, dtype)
    else:
        from .diffusers.offline import tiny_sd_pipeline, tiny_sdxl_pipeline

        say(f"building a small {args.offline_arch.upper()} pipeline offline (random weights) ...")
        build = tiny_sdxl_pipeline if args.offline_arch == "sdxl" else tiny_sd_pipeline
        pipe = build(seed=args.seed, dtype=dtype)
    pipe = pipe.to(device)
    pipe.set_progress_bar_config(disable=False, leave=False)
    return pipe


class PeakMemory:
    """Peak memory above the starting point while the block runs: CUDA allocator statistics
    on a GPU; on a CPU the process's resident set, sampled every 2 ms."""

    def __init__(self, device: str):
        self.device = device
        self.peak = 0

    def __enter__(self):
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._start = torch.cuda.memory_allocated()
        else:
            self._start = _rss()
            self._max = self._start
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self):
        while not self._stop.wait(0.002):
            self._max = max(self._max, _rss())

    def __exit__(self, *exc):
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() - self._start
        else:
            self._stop.set()
            self._thread.join()
            self.peak = max(self._max, _rss()) - self._start


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def timed(run, device: str):
    with PeakMemory(device) as memory:
        start = time.perf_counter()
        result = run()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
    return result, seconds, memory.peak


def _slug(word: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", word).strip("_") or "word"


def word_summary(maps, heat, word: str) -> dict:
    """Numbers a person can check an overlay against."""
    hm = heat.word(word)
    value = hm.value
    flat = int(value.argmax())
    h, w = value.shape
    y, x = divmod(flat, w)
    image_h, image_w = maps.image_size
    positions = heat.columns(word)
    mass = maps.token_mass(0)
    word_columns = [p for _, pos in heat.text.words for p in pos]
    total = sum(float(m[:, word_columns].sum()) for m in mass.values())
    share = sum(float(m[:, positions].sum()) for m in mass.values()) / total if total else 0.0
    return {"token_positions": positions, "max": float(value.max()), "mean": float(value.mean()),
            "peak_pixel_yx": [y * image_h // h, x * image_w // w],
            "token_mass_share": share}


def write_heat_maps(args: argparse.Namespace, heat, maps, image, out: Path):
    """One overlay per word (``--words``, else every word of the heat map), their grid and
    the saved trace; returns (words, {kind: path(s)}, heat maps)."""
    from .tools.plot import overlay_grid

    words = args.words or [w for w, _ in heat.words()]
    files = {"image": str(out / "image.png"), "heatmaps": [], "grid": str(out / "heatmaps.png"),
             "trace": str(out / "trace.safetensors")}
    heat_maps = []
    for i, word in enumerate(words):
        try:
            hm = heat.word(word)
        except ValueError as exc:
            raise SystemExit(f"attnctl demo: --words: {exc}") from None
        path = out / "heatmaps" / f"{i:02d}_{_slug(word)}.png"
        hm.plot(image, str(path))
        files["heatmaps"].append(str(path))
        heat_maps.append(hm)
    overlay_grid(heat_maps, image, path=files["grid"])
    maps.save(files["trace"])
    say(f"wrote {len(words)} heat-map overlays to {out / 'heatmaps'}")
    return words, files, heat_maps


def check_before_generation(args, pipe, height, width) -> None:
    """The words are in the prompt and DAAM's layer rule (without ``--layers``) keeps a
    layer at the image size: said before the first generation, not after it."""
    from .tools.daam import daam_layer_problem
    from .tools.words import check_words

    try:
        check_words(pipe.tokenizer, args.prompt, args.words or ())
    except ValueError as exc:
        raise SystemExit(f"attnctl demo: --words: {exc}") from None
    if args.layers:
        return
    factor = pipe.vae_scale_factor
    height = height or pipe.unet.config.sample_size * factor
    width = width or pipe.unet.config.sample_size * factor
    problem = daam_layer_problem(pipe.unet, factor, (height // factor, width // factor))
    if problem:
        raise SystemExit(f"attnctl demo: --height/--width: {problem}; choose such a size, or --layers '*' "
                         "(every cross-attention layer) or layer names")


def main(args: argparse.Namespace) -> int:
    import attnctl
    from .tools.materialised import MaterialisedTrace

    device = args.device
    dtype = DTYPES[args.dtype] if args.dtype else (torch.float16 if device.startswith("cuda") else torch.float32)
    if args.offline_arch in ("pixart", "wan") and not args.model:
        from . import cli_demo_dit

        return cli_demo_dit.main(args, dtype)
    out = Path(args.out)
    (out / "heatmaps").mkdir(parents=True, exist_ok=True)
    pipe = load_pipeline(args, device, dtype)
    from . import cli_demo_mmdit

    if cli_demo_mmdit.is_mmdit(pipe):
        return cli_demo_mmdit.main(args, pipe, device, dtype, out, say, timed, format_table)
    steps = args.steps or (25 if args.model else 8)
    height = args.height or (None if args.model else OFFLINE_SIZE)
    width = args.width or (None if args.model else OFFLINE_SIZE)
    if args.excite:
        from . import cli_demo_concepts

        return cli_demo_concepts.run(args, pipe, out, steps, height, width, say)
    check_before_generation(args, pipe, height, width)
    if not device.startswith("cuda") and args.backend in ("auto", "torch"):
        say("no CUDA device: 'auto' runs the PyTorch reference (it materialises P); the fused "
            "kernel runs on CUDA, or here with --backend triton and TRITON_INTERPRET=1 (slow)")

    def run(num_steps):
        generator = torch.Generator(device="cpu").manual_seed(args.seed)
        return pipe(args.prompt, num_inference_steps=num_steps, guidance_scale=args.guidance,
                    height=height, width=width, generator=generator)

    compare = not args.no_compare
    if compare:
        say("warming up each variant with one step (compilation and first-use costs stay out of the table)")
        run(1)
        with attnctl.trace(pipe, layers=args.layers, backend=args.backend):
            run(1)
        with MaterialisedTrace(pipe):
            run(1)

    rows = []
    if compare:
        say(f"plain generation, {steps} steps ...")
        _, seconds, peak = timed(lambda: run(steps), device)
        rows.append(("no capture (diffusers AttnProcessor2_0)", seconds, peak))
    say(f"traced generation, {steps} steps ...")
    with attnctl.trace(pipe, layers=args.layers, backend=args.backend) as tc:
        result, seconds, peak = timed(lambda: run(steps), device)
        backend = last_dispatch().backend
    rows.append((f"attnctl.trace (fused capture, backend {backend})", seconds, peak))
    image = result.images[0]
    image.save(out / "image.png")

    maps = tc.maps()
    size = "daam"
    if maps.latent[0] != maps.latent[1]:
        size = "latent"
        say("non-square image: DAAM 0.2.0 handles square images only, so the heat maps are at the "
            "latent grid (size='latent') rather than at DAAM's fixed square side")
    heat = maps.heat_map(0, size=size)
    words, files, heat_maps = write_heat_maps(args, heat, maps, image, out)

    agreement = None
    if compare:
        say(f"materialised capture (explicit softmax(QK^T), DAAM-style), {steps} steps ...")
        with MaterialisedTrace(pipe) as mt:
            _, seconds, peak = timed(lambda: run(steps), device)
        rows.append(("materialised capture (explicit softmax, per-head maps)", seconds, peak))
        materialised = mt.maps(args.prompt, cfg=maps.layout.cfg, per_head=maps.per_head)
        # The same layers and key columns as the trace kept (it holds every layer and column).
        reference = materialised.heat_map(0, layers=[l.name for l in maps.layers], size=size).value
        reference = reference[:heat.value.shape[0]]
        agreement = float((heat.value - reference).abs().max() / reference.abs().max())

    print()
    print(format_table(rows, device))
    if agreement is not None:
        print(f"heat maps, fused vs materialised: max relative difference {agreement:.2e}")
    summary = {
        "prompt": args.prompt, "model": args.model or f"offline tiny {args.offline_arch} (random weights)",
        "device": device, "dtype": str(dtype).replace("torch.", ""), "backend": backend, "steps": steps,
        "image_size": list(image.size[::-1]), "latent": list(maps.latent), "cfg": maps.layout.cfg,
        "layers": [{"name": l.name, "grid": list(l.grid), "heads": l.heads} for l in maps.layers],
        "words": {w: word_summary(maps, heat, w) for w in words},
        "comparison": [{"variant": v, "seconds": s, "peak_memory_bytes": m} for v, s, m in rows],
        "heat_map_max_relative_difference": agreement, "files": files,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    say(f"wrote {out / 'image.png'}, {files['grid']}, {files['trace']} and {out / 'summary.json'}")
    return 0


def format_table(rows, device: str) -> str:
    """Time and memory per variant. On a GPU memory is the allocator's peak above the start;
    on a CPU it is the growth of the resident set, which stays 0 while the process reuses
    memory it already holds."""
    label = "peak memory" if device.startswith("cuda") else "RSS growth"
    head = f"{'variant':<58} {'time (s)':>9} {label:>12}"
    lines = [head, "-" * len(head)]
    for variant, seconds, peak in rows:
        lines.append(f"{variant:<58} {seconds:>9.3f} {peak / 2**20:>9.1f} MiB")
    return "\n".join(lines)
