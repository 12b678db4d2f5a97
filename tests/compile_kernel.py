"""Compile the Triton kernel for a real NVIDIA target without a GPU (Triton's own LLVM and
ptxas), so CI catches what the CPU interpreter cannot: type errors in the compiled
dialect, unsupported ops, shared-memory overflow. Prints ptxas's resource use as JSON.

    python tests/compile_kernel.py CASE ARCH     (run with TRITON_INTERPRET unset)
"""
import json
import os
import re
import subprocess
import sys
import tempfile

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from attnctl.backends._layout import empty_output
from attnctl.backends.triton_backend import kernel_arguments, logit_max_arguments
from attnctl.capture import Capture
from attnctl.injection import OwnTerm
from attnctl.kernels.attention import attention_fwd_kernel, logit_max_kernel
from attnctl.regions import Regions

TRITON_TYPES = {torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float32: "*fp32",
                torch.int32: "*i32", torch.int64: "*i64"}


CASES = {  # name: (dtype, head dim, keys)
    "all-fp16-d40-n300": (torch.float16, 40, 300),
    "all-bf16-d64-n77": (torch.bfloat16, 64, 77),
    "all-fp16-d160-n77": (torch.float16, 160, 77),
    "plain-bf16-d40-n77": (torch.bfloat16, 40, 77),
    "plain-fp16-d64-n4096": (torch.float16, 64, 4096),
    "plain-fp16-d80-n1024": (torch.float16, 80, 1024),
    "all-fp32-d40-n77": (torch.float32, 40, 77),
    # every control and capture plus region labels and auxiliary-key probes (C probe keys:
    # 40 fits one probe block, 100 takes the two-pass path)
    "ext-fp16-d64-n77": (torch.float16, 64, 77),
    "ext-bf16-d160-n300": (torch.bfloat16, 160, 300),
    "logitmax-fp16-d64-n4096": (torch.float16, 64, 4096),
    # injection (prompt-to-prompt): q/k/bias of item source[b], with token-mass capture
    "inject-fp16-d40-n300": (torch.float16, 40, 300),
    # the two-source form (Refine / Reweight) with LocalBlend-style map captures of both terms
    "twosource-fp16-d40-n77": (torch.float16, 40, 77),
    "twosource-bf16-d160-n77": (torch.bfloat16, 160, 77),
    # self-attention injection fanned out: 4 destinations at d40, 2 at d80
    "fanout-fp16-d40-n4096": (torch.float16, 40, 4096),
    "fanout-bf16-d80-n1024": (torch.bfloat16, 80, 1024),
}
PROBE_KEYS = {"ext-fp16-d64-n77": 40, "ext-bf16-d160-n300": 100}


def case(name: str):
    """Inputs for a named case: which features, dtype and shape."""
    dtype, D, N = CASES[name]
    B, H, M = 2, 8, 256
    q, k, v = (torch.zeros(B, H, n, D, dtype=dtype) for n in (M, N, N))
    if name.startswith("inject"):
        capture = Capture.zeros(q, k, token_mass=True)
        return q, k, v, dict(bias=torch.zeros(B, 1, M, N, dtype=dtype), prob_mult=torch.zeros(1, 1, 1, N),
                             capture=capture, source=torch.zeros(B, dtype=torch.int64))
    if name.startswith("twosource"):
        tokens = list(range(N))
        return q, k, v, dict(bias=None, prob_mult=None, source=torch.zeros(B, dtype=torch.int64),
                             capture=Capture.zeros(q, k, tokens=tokens, maps=True),
                             own=OwnTerm(v, torch.zeros(B, 1, 1, N), Capture.zeros(q, k, tokens=tokens, maps=True)))
    if name.startswith("fanout"):
        width = 4 if D <= 64 else 2
        return q, k, v, dict(bias=None, prob_mult=None, capture=None,
                             fanout=torch.zeros(B, 1 + width, dtype=torch.int32))
    if not name.startswith(("all", "ext")):
        return q, k, v, dict(bias=None, prob_mult=None, capture=None)
    probe_keys = torch.zeros(1, H, PROBE_KEYS[name], D, dtype=dtype) if name in PROBE_KEYS else None
    capture = Capture.zeros(q, k, token_mass=True, tokens=list(range(20)), maps=True,
                            head_maps=True, lse=True, head_weights=torch.ones(H), probe_keys=probe_keys)
    extras = dict(bias=torch.zeros(1, H, 1, N), prob_mult=torch.zeros(B, 1, M, N, dtype=dtype),
                  capture=capture)
    if name.startswith("ext"):
        extras["regions"] = Regions(torch.zeros(B, M, dtype=torch.int32),
                                    torch.zeros(1, N, dtype=torch.int32), 0.5)
    return q, k, v, extras


def compile_case(name: str, arch: int) -> dict:
    q, k, v, extras = case(name)
    if name.startswith("logitmax"):
        kernel = logit_max_kernel
        _, args, meta = logit_max_arguments(q, k, torch.zeros(q.shape[0] * q.shape[1], 4))
    else:
        kernel = attention_fwd_kernel
        _, args, meta = kernel_arguments(q, k, v, empty_output(q, v.shape[3]), scale=0.1, **extras)
    options = {key: meta.pop(key) for key in ("num_warps", "num_stages")}
    params = kernel.arg_names
    signature, constexprs = {}, {}
    for i, pname in enumerate(params):
        if pname in meta:
            signature[pname] = "constexpr"
            constexprs[(i,)] = meta[pname]
        else:
            value = args[i]
            signature[pname] = (TRITON_TYPES[value.dtype] if isinstance(value, torch.Tensor)
                                else "fp32" if isinstance(value, float) else "i32")
    src = ASTSource(fn=kernel, signature=signature, constexprs=constexprs)
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
    return {"case": name, "arch": arch, "shared_bytes": compiled.metadata.shared,
            **cubin_resources(compiled.asm["cubin"])}


def cubin_resources(cubin: bytes) -> dict:
    """Registers and spills of the cubin Triton built, read with its bundled cuobjdump."""
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        log = subprocess.run([tool, "--dump-resource-usage", path], capture_output=True, text=True).stdout
    regs = re.search(r"REG:(\d+)", log)
    stack = re.search(r"STACK:(\d+)", log)
    return {"registers": int(regs.group(1)) if regs else None,
            "stack_bytes": int(stack.group(1)) if stack else None}


if __name__ == "__main__":
    print(json.dumps(compile_case(sys.argv[1], int(sys.argv[2]))))
