"""Run contenders over shapes and dtypes; one JSON-able record per (shape, dtype, contender)."""
from __future__ import annotations

import datetime
import platform
import subprocess
import sys
from typing import Iterable, List, Optional

import torch

from .contenders import Contender, Inputs
from .shapes import AttnShape
from .timing import peak_memory_mb, time_call

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
BASELINE = "sdpa"


def environment(device: str) -> dict:
    """Where and with what a result was taken."""
    env = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(sys.argv),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "host": platform.node(),
        "device": device,
        "device_name": "cpu (smoke run: times mean nothing for speed)" if device != "cuda"
        else torch.cuda.get_device_name(),
    }
    try:
        import triton
        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    if device == "cuda":
        env["cuda"] = torch.version.cuda
        try:
            env["driver"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True, text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            env["driver"] = None
    return env


def _record(shape: AttnShape, dtype_name: str, contender: Contender, inputs: Inputs,
            device: str, ceilings: dict) -> dict:
    rec = {**shape.as_dict(), "shape": shape.name, "dtype": dtype_name, "contender": contender.name,
           "captures": contender.captures}
    try:
        fn = contender.build(inputs)
        rec.update(time_call(fn, device))
        rec["peak_mem_mb"] = peak_memory_mb(fn, device)
    except Exception as exc:  # a contender that cannot run this shape is reported, not fatal
        rec["status"] = f"error: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
        return rec
    rec["status"] = "ok"
    seconds = rec["median_ms"] / 1e3
    rec["tflops"] = shape.flops / seconds / 1e12
    rec["gbps"] = shape.io_bytes(inputs.q.element_size()) / seconds / 1e9
    if ceilings:
        if shape.kind == "cross":
            rec["roofline_fraction"] = rec["gbps"] / ceilings["copy_gbps"]
        else:
            rec["roofline_fraction"] = rec["tflops"] / ceilings["bf16_matmul_tflops"]
    return rec


def run(shapes: Iterable[AttnShape], dtypes: Iterable[str], contenders: List[Contender],
        device: str, ceilings: dict, progress=None) -> List[dict]:
    """One record per (shape, dtype, contender), judged against ``ceilings`` (see
    timing.measure_ceilings). ``progress(group)`` gets the records of each (shape, dtype)
    as soon as they are measured, so that a caller can show and save them before the end."""
    rows = []
    for shape in shapes:
        for dtype_name in dtypes:
            inputs = Inputs.make(shape, DTYPES[dtype_name], device)
            group = [_record(shape, dtype_name, c, inputs, device, ceilings) for c in contenders
                     if shape.kind in c.kinds]
            _add_ratios(group)
            rows.extend(group)
            if progress:
                progress(group)
            del inputs
            if device == "cuda":
                torch.cuda.empty_cache()
    return rows


def _add_ratios(group: List[dict]) -> None:
    """Time relative to SDPA measured on the same inputs in the same run (>1 = slower)."""
    base: Optional[dict] = next((r for r in group if r["contender"] == BASELINE and r["status"] == "ok"), None)
    for r in group:
        if base is not None and r["status"] == "ok":
            r["time_vs_sdpa"] = r["median_ms"] / base["median_ms"]
