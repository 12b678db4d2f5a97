"""Benchmarks of the dataset-scale jobs (:mod:`attnctl.jobs`).

``run_throughput``: images/s of batched generation on one device, with and without
capture: stock diffusers, attnctl installed with no controller, ``attnctl.trace`` (the
maps kept in memory) and the whole ``attnctl maps`` batch (trace, word heat maps, token
mass, files written). On a GPU: the published SD1.5 (512²) and SDXL (1024²) UNets with
random weights (small random text encoders, a tiny VAE of factor 8; see
:mod:`attnctl.diffusers.offline`) at a realistic batch; on a CPU the tiny offline
pipeline (times mean nothing for speed).

``run_scaling``: ``attnctl maps`` over the same prompt file on 1, 2, ... processes
(accelerate's launcher; on a CPU, one thread per process): wall time of the command, time
of the batch loop, and what is left (start-up, merge), to show that sharding, writing and
merging add no serial part beyond start-up.
"""
from __future__ import annotations

import argparse
import json
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

PROMPT = "a photo of a cat riding a bike in a park"
CONTENDERS = ("diffusers", "attnctl", "attnctl+trace", "maps-job")


def _tiny(dtype):
    from ..diffusers.offline import tiny_sd_pipeline
    return tiny_sd_pipeline(dtype=dtype)


def _sd15(dtype):
    from ..diffusers.offline import published_sd15_pipeline
    return published_sd15_pipeline(dtype=dtype)


def _sdxl(dtype):
    from ..diffusers.offline import published_sdxl_pipeline
    return published_sdxl_pipeline(dtype=dtype)


# name: (pipeline builder, image side in pixels, realistic batch of prompts)
MODELS: Dict[str, Tuple[Callable[[torch.dtype], object], int, int]] = {
    "sd15-512": (_sd15, 512, 8),
    "sdxl-1024": (_sdxl, 1024, 4),
    "tiny": (_tiny, 80, 2),   # CPU smoke: 40² latent, where DAAM's layer selection keeps both levels
}


def _job_args(steps: int, side: int, backend: str) -> argparse.Namespace:
    return argparse.Namespace(seed=0, steps=steps, guidance=7.5, height=side, width=side, backend=backend,
                              overlays=False, per_head=False, layers=None, prompts="<benchmark>")


def run_throughput(model: str, *, batch: Optional[int] = None, steps: int = 20, repeats: int = 3,
                   dtype: torch.dtype = torch.float16, device: str = "cuda", backend: str = "auto",
                   contenders: Sequence[str] = CONTENDERS, side: Optional[int] = None) -> List[dict]:
    """One row per contender: images/s over ``repeats`` batches after one warm-up batch
    (``side``: the image side in pixels, default the model's)."""
    import attnctl
    from ..jobs.inputs import PromptItem
    from ..jobs.maps import MapsWork, validate_words
    from ..jobs.store import JobDir

    build, default_side, default_batch = MODELS[model]
    side = side or default_side
    batch = batch or default_batch
    pipe = build(dtype).to(device)
    pipe.set_progress_bar_config(disable=True)
    items = [PromptItem(i + 1, PROMPT) for i in range(batch)]
    args = _job_args(steps, side, backend)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        store = JobDir(tmp, {"command": "benchmark"})

        def generate(contender: str, repeat: int):
            if contender == "maps-job":
                return work.run(repeat, items, 0, store)   # the same prompts, files rewritten
            generators = [torch.Generator("cpu").manual_seed(repeat * batch + i) for i in range(batch)]
            with ExitStack() as stack, torch.no_grad():
                if contender == "attnctl":
                    stack.enter_context(attnctl.install(pipe, backend=backend))
                trace = None
                if contender == "attnctl+trace":
                    trace = stack.enter_context(attnctl.trace(pipe, backend=backend))
                images = pipe([item.prompt for item in items], num_inference_steps=steps, height=side, width=side,
                              generator=generators).images
                if trace is not None:
                    trace.maps()
                return images

        work = MapsWork(pipe, args, validate_words(pipe.tokenizer, items, args.prompts))
        for contender in contenders:
            generate(contender, 0)                       # warm-up: Triton compiles, SDPA picks kernels
            times = []
            for repeat in range(1, repeats + 1):
                if device == "cuda":
                    torch.cuda.synchronize()
                start = time.perf_counter()
                generate(contender, repeat)
                if device == "cuda":
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - start)
            seconds = statistics.median(times)
            rows.append({"model": model, "contender": contender, "batch": batch, "steps": steps, "side": side,
                         "dtype": str(dtype).replace("torch.", ""), "device": device, "median_batch_s": seconds,
                         "images_per_s": batch / seconds, "times_s": times})
    base = next((r["images_per_s"] for r in rows if r["contender"] == "diffusers"), None)
    for row in rows:
        row["x_diffusers_time"] = base / row["images_per_s"] if base else None
    return rows


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_command(processes: int, args: Sequence[str]) -> List[str]:
    """``attnctl ARGS`` on ``processes`` processes: accelerate's torchrun launcher (on a
    machine without GPUs its processes join a gloo CPU group)."""
    if processes == 1:
        return [sys.executable, "-m", "attnctl.cli", *args]
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
            "--num_cpu_threads_per_process", "1", "--main_process_port", str(_free_port()),
            "-m", "attnctl.cli", *args]


def run_scaling(processes: Sequence[int] = (1, 2), *, prompts: int = 8, batch: int = 1, steps: int = 4,
                side: int = 80, env: Optional[dict] = None) -> List[dict]:
    """``attnctl maps`` on the tiny offline model over ``prompts`` prompts, once per entry
    of ``processes``, each into a fresh directory."""
    import os

    from ..diffusers.offline import tiny_sd_pipeline

    env = dict(os.environ if env is None else env, OMP_NUM_THREADS="1")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        tiny_sd_pipeline().save_pretrained(str(root / "model"))
        words = ["cat", "dog", "bird", "car", "tree", "boat", "horse", "house"]
        (root / "prompts.txt").write_text("".join(f"a {words[i % 8]} next to a red {words[(i + 3) % 8]}\n"
                                                  for i in range(prompts)))
        for n in processes:
            out = root / f"out-{n}"
            args = ["maps", "--prompts", str(root / "prompts.txt"), "--model", str(root / "model"), "--out", str(out),
                    "--batch-size", str(batch), "--steps", str(steps), "--height", str(side), "--width", str(side),
                    "--no-progress"]
            start = time.perf_counter()
            done = subprocess.run(launch_command(n, args), env=env, capture_output=True, text=True)
            wall = time.perf_counter() - start
            if done.returncode != 0:
                raise RuntimeError(f"attnctl maps on {n} processes failed:\n{done.stderr[-3000:]}")
            summary = json.loads((out / "summary.json").read_text())
            rows.append({"processes": n, "prompts": prompts, "batch": batch, "steps": steps, "side": side,
                         "wall_s": wall, "loop_s": summary["seconds"], "outside_loop_s": wall - summary["seconds"],
                         "merge_s": summary["merge_seconds"],
                         "images_per_s": summary["images_per_second"],
                         "per_process_loop_s": [s["seconds"] for s in summary["per_process"]]})
    one = next((r for r in rows if r["processes"] == 1), None)
    for row in rows:
        row["loop_speedup"] = one["loop_s"] / row["loop_s"] if one else None
    return rows


def main(argv: Optional[Sequence[str]] = None) -> int:
    from .report import ResultFile
    from .runner import environment

    p = argparse.ArgumentParser(prog="bench_jobs.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    cuda = torch.cuda.is_available()
    p.add_argument("--models", nargs="*", choices=tuple(MODELS), help="models to time (none: scaling only)",
                   default=["sd15-512", "sdxl-1024"] if cuda else ["tiny"])
    p.add_argument("--batch", type=int, help="prompts per batch (default: the model's realistic batch)")
    p.add_argument("--steps", type=int, default=20 if cuda else 2)
    p.add_argument("--repeats", type=int, default=3 if cuda else 1)
    p.add_argument("--dtype", choices=("fp16", "bf16", "fp32"), default="fp16" if cuda else "fp32")
    p.add_argument("--scaling", nargs="*", type=int, default=None if cuda else [1, 2], metavar="PROCESSES",
                   help="also time attnctl maps on these process counts (default on a CPU: 1 2)")
    p.add_argument("--json", help="result file (default bench/results/jobs-<device>-<date>.json)")
    args = p.parse_args(argv)
    device = "cuda" if cuda else "cpu"
    path = args.json or default_json_path()
    result = ResultFile(path, environment(device))
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    for model in args.models:
        rows = run_throughput(model, batch=args.batch, steps=args.steps, repeats=args.repeats, dtype=dtype,
                              device=device)
        result.add("jobs_throughput", rows)
        for row in rows:
            print(f"{row['model']:<10} {row['contender']:<14} batch {row['batch']:>2}  "
                  f"{row['images_per_s']:8.3f} images/s  x{row['x_diffusers_time']:.2f} diffusers' time", flush=True)
    if args.scaling:
        rows = run_scaling(args.scaling)
        result.add("jobs_scaling", rows)
        for row in rows:
            print(f"maps on {row['processes']} process(es): wall {row['wall_s']:.1f} s, loop {row['loop_s']:.1f} s "
                  f"(x{row['loop_speedup']:.2f}), merge {row['merge_s']:.2f} s, outside the loop (start-up, merge) "
                  f"{row['outside_loop_s']:.1f} s", flush=True)
    result.finish()
    print(f"wrote {path}")
    return 0


def default_json_path() -> str:
    import datetime
    import re

    name = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    root = Path(__file__).resolve().parents[2] / "bench" / "results"
    return str(root / f"jobs-{slug}-{stamp}.json")
