"""Compile the backward kernels for a real NVIDIA target without a GPU (Triton's LLVM and
ptxas) and print each kernel's registers, stack (spills) and shared memory as JSON lines.

    python tests/compile_backward.py CASE ARCH     (run with TRITON_INTERPRET unset)
"""
import json
import sys

import torch
from triton.backends.compiler import GPUTarget

from attnctl.backends.triton_backward import SavedForward, backward_launches
from attnctl.regions import Regions
from compile_kernel import compile_as_jit, cubin_resources

CASES = {  # name: (dtype, head dim, keys); every case has bias (grad), prob_mult and map gradients
    "bwd-fp16-d40-n77": (torch.float16, 40, 77),      # SD1.5 64² cross-attention
    "bwd-bf16-d64-n77": (torch.bfloat16, 64, 77),     # SDXL cross-attention
    "bwd-fp16-d160-n77": (torch.float16, 160, 77),    # SD1.5 16²/8² cross-attention
    "bwd-fp16-d64-n4096": (torch.float16, 64, 4096),  # self-attention, several key blocks
    "bwd-fp32-d80-n300": (torch.float32, 80, 300),
    "bwd-regions-bf16-d80-n1024": (torch.bfloat16, 80, 1024),
}


def launches(name: str):
    dtype, D, N = CASES[name]
    B, H, M, T = 2, 8, 256, 4
    q, k, v = (torch.zeros(B, H, n, D, dtype=dtype) for n in (M, N, N))
    saved = SavedForward(torch.zeros_like(q), torch.zeros(B, H, M), torch.zeros(B, H, M, T))
    regions = (Regions(torch.zeros(B, M, dtype=torch.int32), torch.zeros(1, N, dtype=torch.int32), 0.5)
               if "regions" in name else None)
    found, _ = backward_launches(torch.zeros_like(q), torch.zeros(B, H, M, T), q, k, v, saved, scale=0.1,
                                 bias=torch.zeros(1, H, M, N, dtype=dtype), prob_mult=torch.zeros(B, 1, 1, N),
                                 regions=regions, tokens=torch.zeros(T, dtype=torch.int32), bias_grad=True)
    return found


def compile_launch(launch, arch: int) -> dict:
    """Compile as the JIT would on a GPU of ``arch`` (its own argument specialisation)."""
    compiled = compile_as_jit(launch.kernel, launch.args, launch.meta, GPUTarget("cuda", arch, 32))
    options = {key: launch.meta[key] for key in ("num_warps", "num_stages") if key in launch.meta}
    return {"kernel": launch.kernel.fn.__name__, "arch": arch, "shared_bytes": compiled.metadata.shared,
            **options, **cubin_resources(compiled.asm["cubin"])}


if __name__ == "__main__":
    for launch in launches(sys.argv[1]):
        print(json.dumps({"case": sys.argv[1], **compile_launch(launch, int(sys.argv[2]))}))
