"""pytest-benchmark suite: `pytest bench/ --benchmark-only` (add --benchmark-json=PATH to keep it).

On a GPU it times the SD1.5/SDXL target shapes in fp16; on a CPU, the smoke shapes
(meaningless for speed). Each timed call ends with a device synchronisation so the
benchmark measures kernel time, not launch time.
"""
import pytest
import torch

from attnctl.benchmarks.contenders import Inputs, select
from attnctl.benchmarks.shapes import quick_catalog, smoke_catalog

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SHAPES = quick_catalog() if DEVICE == "cuda" else smoke_catalog()
DTYPE = torch.float16 if DEVICE == "cuda" else torch.float32
CONTENDERS = select(["sdpa", "materialised+capture", "triton", "triton+capture"], DEVICE)


@pytest.mark.parametrize("contender", CONTENDERS, ids=lambda c: c.name)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: s.name)
def test_attention(benchmark, shape, contender):
    fn = contender.build(Inputs.make(shape, DTYPE, DEVICE))

    def call():
        fn()
        if DEVICE == "cuda":
            torch.cuda.synchronize()

    benchmark.extra_info.update(shape.as_dict(), dtype=str(DTYPE), contender=contender.name,
                                device=torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu (smoke)")
    rounds = 100 if DEVICE == "cuda" else 2
    benchmark.pedantic(call, warmup_rounds=10 if DEVICE == "cuda" else 1, rounds=rounds)
