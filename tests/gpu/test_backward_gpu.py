"""The Triton backward on a GPU (skipped without CUDA): gradients through output and maps at
the real SD1.5 / SDXL attention shapes against the float64 replay (the CPU tests' rule:
at most twice the error of the reference's autograd in the same precision), and the
memory promise: forward + backward of self-attention at 64² never holds an (M, N) tensor."""
import pytest
import torch

import attnctl
import test_op_backward as backward_cases
from op_cases import make_operand, make_qkv, make_tokens

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [
    (2, 8, 4096, 77, 40),    # SD1.5 64² cross-attention, CFG batch
    (2, 10, 4096, 77, 64),   # SDXL 64² cross-attention
    (1, 8, 256, 77, 160),    # SD1.5 16² cross-attention
    (1, 2, 1024, 1024, 80),  # SD1.5 32² self-attention (two heads: the float64 replay is (M, N))
], ids=lambda s: "x".join(map(str, s)))
def test_gradients_at_model_shapes(dtype, shape):
    B, H, M, N, D = shape
    q, k, v = make_qkv(B, H, M, N, D, dtype=dtype, layout="bmhd")
    backward_cases.check_gradients(q, k, v, bias=make_operand("b11n", B, H, M, N, dtype=dtype),
                                   prob_mult=make_operand("1h1n", B, H, M, N, kind="signed", dtype=dtype),
                                   tokens=make_tokens("1d", B, N, 2))


def test_self_attention_backward_never_holds_an_m_by_n_tensor():
    """SDXL 64² self-attention (B 2, 10 heads, M = N = 4096, fp16): one P would take
    2·10·4096²·2 B = 671 MB; forward + backward with maps must stay far below it."""
    B, H, M, D = 2, 10, 4096, 64
    q, k, v = (t.requires_grad_(True) for t in make_qkv(B, H, M, M, D, dtype=torch.float16, layout="bmhd"))
    one_p = B * H * M * M * 2
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out, maps = attnctl.attention_with_maps(q, k, v, list(range(0, M, 256)), bias=None, backend="triton",
                                            prob_mult=torch.ones(1, H, 1, M, device="cuda"))
    torch.autograd.grad((out, maps), (q, k, v), (torch.randn_like(out), torch.randn_like(maps)))
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    assert extra < one_p / 4, f"peak {extra / 2**20:.0f} MiB above the inputs; one P is {one_p / 2**20:.0f} MiB"
