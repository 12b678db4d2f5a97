"""Benchmark the dataset-scale jobs (attnctl maps / hrv / edit; see attnctl.benchmarks.jobs).

    python bench/bench_jobs.py                 # GPU: SD1.5 512² (batch 8), SDXL 1024² (batch 4), 20 steps
    python bench/bench_jobs.py --scaling 1 2   # CPU default: the tiny model, and maps on 1 vs 2 processes

Images/s of batched generation with and without capture (stock diffusers, attnctl, a trace,
the whole maps batch with its files). Writes bench/results/jobs-<device>-<date>.json unless
--json says otherwise.
"""
import os
import sys

import torch

if not torch.cuda.is_available():  # the Triton interpreter must be chosen before triton is imported
    os.environ.setdefault("TRITON_INTERPRET", "1")

from attnctl.benchmarks.jobs import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
