"""Test set-up: Triton runs under its CPU interpreter when there is no GPU.

TRITON_INTERPRET must be set before triton.jit decorates the kernels, so before any
attnctl.kernels import.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
