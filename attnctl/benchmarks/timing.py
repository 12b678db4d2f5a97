"""Timing and device ceilings. On CUDA: triton.testing.do_bench (CUDA events, L2 flush,
warm-up, many repetitions, median). On CPU: a few wall-clock repetitions, smoke only."""
from __future__ import annotations

import statistics
import time
from typing import Callable, Dict

import torch


def time_call(fn: Callable[[], object], device: str, *, warmup_ms: int = 25, rep_ms: int = 200,
              cpu_reps: int = 3) -> Dict[str, float]:
    """Median and 20th/80th percentile time of ``fn`` in milliseconds."""
    if device == "cuda":
        from triton.testing import do_bench
        p50, p20, p80 = do_bench(fn, warmup=warmup_ms, rep=rep_ms, quantiles=[0.5, 0.2, 0.8])
        return {"median_ms": p50, "p20_ms": p20, "p80_ms": p80}
    fn()  # warm-up (and Triton interpreter set-up)
    times = []
    for _ in range(cpu_reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    return {"median_ms": statistics.median(times), "p20_ms": times[0], "p80_ms": times[-1]}


def peak_memory_mb(fn: Callable[[], object], device: str) -> float | None:
    """Memory one call allocates above what was live before it (CUDA only)."""
    if device != "cuda":
        return None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def measure_ceilings(device: str) -> Dict[str, float]:
    """The device's measured copy bandwidth (GB/s) and bf16 matmul rate (TFLOP/s): the
    rooflines that memory-bound cross-attention and compute-bound self-attention are judged by."""
    if device != "cuda":
        return {}
    n = 256 * 2**20  # 512 MiB of bf16 each way: far beyond L2
    src = torch.empty(n, dtype=torch.bfloat16, device="cuda")
    dst = torch.empty_like(src)
    copy_ms = time_call(lambda: dst.copy_(src), device)["median_ms"]
    size = 8192
    a = torch.randn(size, size, dtype=torch.bfloat16, device="cuda")
    b = torch.randn(size, size, dtype=torch.bfloat16, device="cuda")
    mm_ms = time_call(lambda: a @ b, device)["median_ms"]
    del src, dst, a, b
    return {"copy_gbps": 2 * n * 2 / copy_ms / 1e6, "bf16_matmul_tflops": 2 * size**3 / mm_ms / 1e9}
