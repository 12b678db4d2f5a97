"""The Triton kernel compiles for sm_80 and sm_90 (Triton's own LLVM and ptxas, no GPU
needed), fits each architecture's shared memory and spills no register, in every variant
that SD1.5, SDXL and SD3/Flux use (head dims 40, 64, 80, 128, 160; tests/compile_kernel.py
lists them). The interpreter can catch none of this. The SASS also has no GPU-scope fence
(an acq_rel atomic's MEMBAR: every capture sum is a relaxed reduction), and in diffusers'
(B, M, H, D) layout at d 40 / 64 / 80 plain attention and the trace's capture load q, k, v
with 16-byte vectors or asynchronous copies, never 16-bit scalar loads.

fp16 and bf16 get the same tiles, and compile to the same resources in the variants where
both were compared; sm_80 is checked with bf16 and sm_90 with fp16, so each dtype's code
path is compiled while the sweep stays a few minutes on two cores (one subprocess per
architecture, in parallel).
"""
import json
import os
import subprocess
import sys

import pytest
import torch

HERE = os.path.dirname(__file__)
sys.path.insert(0, HERE)
from compile_kernel import FEATURES, HEAD_DIMS, all_variants  # noqa: E402

SHARED_MEMORY_LIMIT = {80: 163 * 1024, 90: 227 * 1024}  # opt-in max per block, bytes
DTYPE_OF_ARCH = {80: "bf16", 90: "fp16"}
# Variants without a 16-bit control operand (a (B, 1, M, 77) prob_mult has 77-element rows,
# which no vector covers), at the head dims whose (B, M, H, D) views need the ALIGN hint.
VECTOR_LOAD_FEATURES = ("plain", "trace")
VECTOR_LOAD_HEAD_DIMS = ("d40", "d64", "d80")


def _sweep(arch: int, variants) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9's default, without its warning
    return subprocess.Popen([sys.executable, os.path.join(HERE, "compile_kernel.py"), *variants,
                             "--arch", str(arch)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the kernels run for real")
def test_no_variant_spills_or_overflows_shared_memory():
    listed = {arch: [v for v in all_variants(HEAD_DIMS, FEATURES) if f"-{dtype}-" in v] + [f"logitmax-{dtype}-d64-n4096"]
              for arch, dtype in DTYPE_OF_ARCH.items()}
    runs = {arch: _sweep(arch, variants) for arch, variants in listed.items()}
    problems = []
    for arch, proc in runs.items():
        out, err = proc.communicate(timeout=1200)
        assert proc.returncode == 0, err[-3000:]
        rows = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
        assert [r["variant"] for r in rows] == listed[arch]
        for row in rows:
            if row["stack_bytes"] or row["spill_stores"]:
                problems.append(f"spill: {row}")
            if row["shared_bytes"] > SHARED_MEMORY_LIMIT[arch]:
                problems.append(f"shared memory over sm_{arch}'s limit: {row}")
            if row["gpu_fences"]:
                problems.append(f"GPU-scope fence: {row}")
            feature, _, d, _ = row["variant"].split("-")
            if feature in VECTOR_LOAD_FEATURES and d in VECTOR_LOAD_HEAD_DIMS and (
                    row["loads_16"] or not (row["loads_128"] + row["async_copies_128"])):
                problems.append(f"16-bit scalar loads of q / k / v: {row}")
    assert not problems, "\n".join(problems)
