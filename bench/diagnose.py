"""Where a GPU attention call's time goes: the measurements that explain a benchmark row.

The first H200 run (bench/results/NOTES.md) showed attnctl 3-15x slower than SDPA at the
small cross-attention shapes and 1.6-3.5x at self-attention. A benchmark row's time (CUDA
events around one call) mixes three things, which this script separates, per shape and
contender:

  host_us     CPU time of one call, launches queued without waiting (back-to-back calls);
              above the kernel time, the GPU idles and the call is launch-bound
  launch_us   for the Triton contenders: the Triton launcher alone (kernel[grid](...)) with
              the arguments prepared once, so host_us - launch_us is attnctl's own Python
  kernel_us   device time of the call's kernels, from torch.profiler (CUDA activity)

then, in this order (the budget may stop it anywhere): kernel time of each capture kind
alone at N = 77 and of all of them on one key block of 128 (single pass) instead of two
of 64; one SD1.5 UNet step (CFG batch) stock / attnctl / attnctl+trace as the e2e
benchmark runs them — host time, device time and the ten largest kernels: where the
trace's extra time per step goes (the first run: +7.5 ms of 23.7); last, the Triton
kernel's tile configuration (BLOCK_M, BLOCK_N, stages) at the self-attention shapes
(configurations that do not compile are listed as such).

    python bench/diagnose.py --json PATH [--budget S]      # on a GPU; rewritten after every row
    TRITON_INTERPRET=1 python bench/diagnose.py --smoke --json PATH   # CPU: code paths only

The JSON holds the environment, the rows and the sweep; bench/gpu_session.py runs it as its
"diagnose" step.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Callable, Dict, List, Optional

import torch

from attnctl import Capture, attention
from attnctl.backends import triton_backend
from attnctl.benchmarks.contenders import Inputs
from attnctl.benchmarks.runner import environment
from attnctl.benchmarks.shapes import AttnShape, catalog

HOST_CALLS = 200          # back-to-back calls per host-time reading
PROFILED_CALLS = 20
QUICK_MODELS = ("sd15-512", "sdxl-1024")
SWEEP_SHAPES = ("sd15-512/64x64/self/B2/N4096/D40", "sdxl-1024/64x64/self/B2/N4096/D64")
CAPTURE_SHAPES = ("sd15-512/64x64/cross/B2/N77/D40", "sdxl-1024/64x64/cross/B2/N77/D64")
SWEEP = [dict(BLOCK_M=bm, BLOCK_N=bn, num_warps=8 if bm == 128 else 4, num_stages=s)
         for bm in (64, 128) for bn in (64, 128) for s in (2, 3)]


def quick_shapes(smoke: bool) -> List[AttnShape]:
    if smoke:
        return [AttnShape("smoke", "4x4", kind, 1, 2, 16, 16 if kind == "self" else 7, 16)
                for kind in ("cross", "self")]
    # the rows of `attnctl bench --quick`
    return [s for s in catalog(batches=(2,), models=QUICK_MODELS)
            if s.level in ("64x64", "32x32", "16x16") and not (s.model == "sd15-512" and s.level == "32x32")]


def contenders(x: Inputs, cuda_built: bool) -> Dict[str, Callable[[], object]]:
    cap = x.full_capture()
    found = {"sdpa": lambda: torch.nn.functional.scaled_dot_product_attention(x.q, x.k, x.v),
             "triton": lambda: attention(x.q, x.k, x.v, backend="triton"),
             "triton+capture": lambda: attention(x.q, x.k, x.v, capture=cap, backend="triton")}
    if cuda_built and x.q.dtype != torch.float32:
        found["cuda"] = lambda: attention(x.q, x.k, x.v, backend="cuda")
        found["cuda+capture"] = lambda: attention(x.q, x.k, x.v, capture=cap, backend="cuda")
    return found


def host_us(fn: Callable[[], object], calls: int, rounds: int) -> float:
    """Median over ``rounds`` of the CPU time per call, ``calls`` calls queued back to back."""
    times = []
    for _ in range(rounds):
        sync()
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        times.append((time.perf_counter() - start) / calls * 1e6)
        sync()
    return sorted(times)[len(times) // 2]


def kernel_us(fn: Callable[[], object], calls: int) -> Optional[float]:
    """Device time of the call's kernels per call (torch.profiler's CUDA activity)."""
    if not torch.cuda.is_available():
        return None
    from torch.profiler import ProfilerActivity, profile
    fn()
    sync()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        sync()
    total = sum(e.self_device_time_total for e in prof.key_averages())
    return total / calls


def triton_launch_only(x: Inputs, with_capture: bool) -> Callable[[], object]:
    """The Triton launcher alone: the launch's arguments built once, as attention_triton builds them."""
    out = torch.empty_like(x.q)
    cap = x.full_capture() if with_capture else None
    grid, args, meta = triton_backend.kernel_arguments(x.q, x.k, x.v, out, scale=x.q.shape[-1] ** -0.5,
                                                       bias=None, prob_mult=None, capture=cap)
    kernel = triton_backend.attention_fwd_kernel
    return lambda: kernel[grid](*args, **meta)


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


class Report:
    def __init__(self, path: str, env: dict):
        self.path, self.data = path, {"environment": env, "rows": [], "sweep": [], "unet": [], "complete": False}

    def add(self, key: str, row: dict) -> None:
        self.data[key].append(row)
        print(json.dumps(row), flush=True)
        self.write()

    def write(self) -> None:
        with open(self.path + ".tmp", "w") as f:
            json.dump(self.data, f, indent=1)
        os.replace(self.path + ".tmp", self.path)


def with_config(config: Optional[dict]):
    """Force the Triton launch configuration (None: the shipped launch_config)."""
    shipped = triton_backend.launch_config

    class Forced:
        def __enter__(self):
            if config is not None:
                def forced(head_dim, value_dim, num_keys, num_tokens, *args, **kwargs):
                    cfg = shipped(head_dim, value_dim, num_keys, num_tokens, *args, **kwargs)
                    return {**cfg, **config}
                triton_backend.launch_config = forced

        def __exit__(self, *exc):
            triton_backend.launch_config = shipped
    return Forced()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--json", required=True, help="where the results go (rewritten after every row)")
    p.add_argument("--budget", type=float, default=150.0, help="seconds; parts past it are skipped")
    p.add_argument("--dtype", default="fp16", choices=["fp16", "bf16"])
    p.add_argument("--smoke", action="store_true", help="tiny shapes, two configurations (CPU interpreter)")
    args = p.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and not args.smoke:
        p.error("no GPU: run with --smoke (and TRITON_INTERPRET=1)")
    deadline = time.monotonic() + args.budget
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    report = Report(args.json, {**environment(device), "dtype": args.dtype})
    from attnctl.backends.cuda_backend import cuda_unavailable_reason
    cuda_built = device == "cuda" and not cuda_unavailable_reason()
    calls, rounds = (1, 1) if args.smoke else (HOST_CALLS, 5)
    profiled = 1 if args.smoke else PROFILED_CALLS
    shapes = quick_shapes(args.smoke)

    for shape in shapes:
        x = Inputs.make(shape, dtype, device)
        for contender, fn in contenders(x, cuda_built).items():
            if time.monotonic() > deadline:
                break
            row = {"shape": shape.name, "contender": contender}
            try:
                fn()
                row.update(host_us=host_us(fn, calls, rounds), kernel_us=kernel_us(fn, profiled))
                if contender.startswith("triton"):
                    launch = triton_launch_only(x, contender.endswith("capture"))
                    row["launch_us"] = host_us(launch, calls, rounds)
                row["status"] = "ok"
            except Exception as exc:  # recorded; the other rows still run
                row["status"] = failure(exc)
            report.add("rows", row)

    by_name = {s.name: s for s in catalog(batches=(2,), models=QUICK_MODELS)}
    capture_shapes = [s for s in shapes if s.kind == "cross"] if args.smoke else [by_name[n] for n in CAPTURE_SHAPES]
    for shape in capture_shapes:
        x = Inputs.make(shape, dtype, device)
        full = x.full_capture()
        # Each capture kind alone (shipped tiles): which one costs (maps are summed over heads
        # with fp32 atomics from one program per head; head maps, token mass and LSE are not
        # contended), then everything with one key block of 128 (single pass) against the
        # shipped two blocks of 64 at d <= 64.
        kinds = [({kind: getattr(full, kind)}, None, kind) for kind in ("token_mass", "lse", "head_maps", "maps")]
        kinds.append(({kind: getattr(full, kind) for kind in ("token_mass", "maps", "head_maps", "lse")},
                      {"BLOCK_N": 128}, "all"))
        for buffers, config, label in kinds:
            if time.monotonic() > deadline:
                break
            needs_tokens = "maps" in buffers or "head_maps" in buffers
            cap = Capture(**buffers, tokens=full.tokens if needs_tokens else None)
            row = sweep_row(shape, "triton+capture", config,
                            lambda: attention(x.q, x.k, x.v, capture=cap, backend="triton"),
                            profiled, x.q.element_size(), full.tokens.shape[-1])
            report.add("sweep", {**row, "captured": label})
    unet_steps(report, "tiny" if args.smoke else "sd15-512", device, dtype, profiled, deadline)
    sweep = [s for s in shapes if s.kind == "self"] if args.smoke else [by_name[n] for n in SWEEP_SHAPES]
    configs = SWEEP[:2] if args.smoke else SWEEP
    for shape in sweep:
        x = Inputs.make(shape, dtype, device)
        for config in [None, *configs]:
            if time.monotonic() > deadline:
                break
            report.add("sweep", sweep_row(shape, "triton", config,
                                          lambda: attention(x.q, x.k, x.v, backend="triton"), profiled,
                                          x.q.element_size(), 0))
    report.data["complete"] = time.monotonic() <= deadline
    report.write()
    print(f"wrote {report.path}")
    return 0


def unet_steps(report: Report, model: str, device: str, dtype: torch.dtype, calls: int, deadline: float) -> None:
    """Host and device time of one UNet step per e2e contender, with the largest kernels."""
    from contextlib import ExitStack
    from attnctl.benchmarks.e2e import CONTENDERS, build_unet, unet_inputs
    if time.monotonic() > deadline:
        return
    unet = build_unet(model, dtype if device == "cuda" else torch.float32, device)
    inputs = unet_inputs(model, unet, 1, unet.dtype, device)
    original = dict(unet.attn_processors)
    for name in ("diffusers-sdpa", "attnctl", "attnctl+trace"):
        if time.monotonic() > deadline:
            break
        row = {"unet": model, "contender": name}
        try:
            with ExitStack() as stack, torch.no_grad():
                CONTENDERS[name](stack, unet)
                step = lambda: unet(timestep=torch.tensor(500, device=device), **inputs)  # noqa: E731
                row["host_us"] = host_us(step, 1, 3 if device == "cuda" else 1)
                row["kernel_us"] = kernel_us(step, calls)
                row["top_kernels"] = top_kernels(step) if device == "cuda" else []
            row["status"] = "ok"
        except Exception as exc:
            row["status"] = failure(exc)
        finally:
            unet.set_attn_processor(dict(original))
        report.add("unet", row)


def top_kernels(fn: Callable[[], object], count: int = 10) -> List[dict]:
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        sync()
    events = sorted(prof.key_averages(), key=lambda e: e.self_device_time_total, reverse=True)
    return [{"name": e.key[:120], "calls": e.count, "us": e.self_device_time_total} for e in events[:count]]


def sweep_row(shape: AttnShape, contender: str, config: Optional[dict], fn, calls: int,
              elem_size: int, tokens: int) -> dict:
    """Kernel time of ``fn`` under ``config`` (None: the shipped launch_config, recorded)."""
    shipped = triton_backend.launch_config(shape.D, shape.D, shape.N, tokens, contender.endswith("capture"),
                                           elem_size)
    used = {**shipped, **(config or {})}
    row = {"shape": shape.name, "contender": contender, "shipped": config is None,
           "config": {k: used[k] for k in ("BLOCK_M", "BLOCK_N", "num_warps", "num_stages")}}
    try:
        with with_config(config):
            fn()
            sync()
            row["kernel_us"] = kernel_us(fn, calls)
        row["status"] = "ok"
    except Exception as exc:  # a configuration that does not compile or launch is a result
        row["status"] = failure(exc)
    return row


def failure(exc: Exception) -> str:
    first = str(exc).splitlines()[0][:200] if str(exc) else ""
    return f"{type(exc).__name__}: {first}"


if __name__ == "__main__":
    sys.exit(main())
