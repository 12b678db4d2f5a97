"""The backward kernels compile for sm_80 and sm_90 (Triton's LLVM and ptxas, no GPU needed)
and fit each architecture's shared memory; registers and spills are printed."""
import json
import os
import subprocess
import sys

import pytest
import torch

import test_kernel_compiles as forward_compiles

HERE = os.path.dirname(__file__)


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the kernels run for real")
@pytest.mark.parametrize("case,arch", [("bwd-fp16-d40-n77", 90), ("bwd-fp16-d160-n77", 80),
                                       ("bwd-regions-bf16-d80-n1024", 80)])
def test_backward_kernels_compile_for_nvidia(case, arch):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, os.path.join(HERE, "compile_backward.py"), case, str(arch)],
                         capture_output=True, text=True, env=env, timeout=600, cwd=HERE)
    assert out.returncode == 0, out.stderr[-3000:]
    kernels = [json.loads(line) for line in out.stdout.strip().splitlines()]
    assert {k["kernel"] for k in kernels} == {"attention_bwd_dkdv_kernel", "attention_bwd_dq_kernel"}
    for info in kernels:
        assert info["shared_bytes"] <= forward_compiles.SHARED_MEMORY_LIMIT[arch], info
        print(info)
