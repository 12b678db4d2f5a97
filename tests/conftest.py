"""Test set-up: Triton runs under its CPU interpreter when there is no GPU.

TRITON_INTERPRET must be set before triton.jit decorates the kernels, so before any
attnctl.kernels import.
"""
import os
from collections import Counter

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"


def pytest_addoption(parser):
    parser.addoption("--first-per-module", type=int, default=0, metavar="N",
                     help="run only the first N tests of each module that are not property tests "
                          "(hypothesis runs many examples): a smoke selection that follows renames; "
                          "the device script's CPU dry run uses it")


def pytest_collection_modifyitems(config, items):
    keep = config.getoption("first_per_module")
    if keep <= 0:
        return
    seen = Counter()
    kept, deselected = [], []
    for item in items:
        module = item.nodeid.split("::", 1)[0]
        if seen[module] < keep and not getattr(getattr(item, "obj", None), "is_hypothesis_test", False):
            kept.append(item)
            seen[module] += 1
        else:
            deselected.append(item)
    config.hook.pytest_deselected(items=deselected)
    items[:] = kept


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
