"""pytest-benchmark suite set-up: on a CPU, Triton runs under its interpreter (smoke only)."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
