"""Injection (the op's ``source`` argument): item b's P from item source[b]'s q, k and
bias, applied to b's values; checked against a float64 oracle written here, on the
reference and the Triton kernel (interpreter on CPU)."""
import pytest
import torch

import attnctl
from attnctl import Capture

from op_cases import DEVICE, compare, interpreter_bf16_dot_fixed, make_qkv, randn

pytestmark = pytest.mark.filterwarnings("ignore:divide by zero:RuntimeWarning")


@pytest.fixture(scope="module", autouse=True)
def _bf16_dot():
    with interpreter_bf16_dot_fixed():
        yield


def oracle(q, k, v, scale, source, bias=None, prob_mult=None):
    """float64, materialised: (output, P applied per item)."""
    q64, k64, v64 = (t.double().cpu() for t in (q, k, v))
    B, H, M, _ = q.shape
    N = k.shape[2]
    s = scale * q64 @ k64.transpose(-1, -2)
    if bias is not None:
        s = s + bias.double().cpu().expand(B, H, M, N)
    p = torch.softmax(s, dim=-1)
    p = torch.stack([p[int(source[b])] for b in range(B)])
    f = prob_mult.double().cpu() if prob_mult is not None else 1.0
    return (p * f) @ v64, p


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("N,layout,dtype", [(77, "contiguous", torch.float32), (150, "bmhd", torch.float32),
                                            (77, "strided", torch.float16)])
def test_injection_matches_oracle(backend, N, layout, dtype):
    B, H, M, D = 4, 2, 40, 16
    gen = torch.Generator().manual_seed(N)
    q, k, v = make_qkv(B, H, M, N, D, dtype=dtype, layout=layout, gen=gen)
    source = torch.tensor([0, 0, 2, 1], dtype=torch.int64, device=DEVICE)
    bias = randn(B, 1, M, N, gen=gen)
    prob_mult = randn(B, H, 1, N, gen=gen)
    cap = Capture.zeros(q, k, token_mass=True, tokens=[1, 5, 7], maps=True, head_maps=True, lse=False)
    out = attnctl.attention(q, k, v, scale=0.3, bias=bias, prob_mult=prob_mult, capture=cap, backend=backend,
                            source=source)
    ref, p = oracle(q, k, v, 0.3, source, bias, prob_mult)
    tol = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(out.double().cpu(), ref, **tol)
    # Captures record the P applied to b (the source's), before prob_mult.
    torch.testing.assert_close(cap.token_mass.double().cpu(), p.sum(2), **tol)
    torch.testing.assert_close(cap.head_maps.double().cpu(), p[..., [1, 5, 7]], **tol)
    # identity rows are plain attention
    plain = attnctl.attention(q, k, v, scale=0.3, bias=bias, prob_mult=prob_mult, backend=backend)
    torch.testing.assert_close(out[[0, 2]], plain[[0, 2]], **tol)
    assert not torch.allclose(out[[1, 3]].float(), plain[[1, 3]].float(), atol=1e-3)


def test_injection_bad_input():
    q, k, v = make_qkv(2, 1, 8, 8, 16)
    with pytest.raises(ValueError, match=r"source: expected shape \(2,\) \(one source item per batch item\), "
                                         r"got \(3,\)"):
        attnctl.attention(q, k, v, source=torch.zeros(3, dtype=torch.int64, device=DEVICE))
    with pytest.raises(TypeError, match="source: expected dtype int32 or int64, got torch.float32"):
        attnctl.attention(q, k, v, source=torch.zeros(2, device=DEVICE))
    with pytest.raises(ValueError, match=r"source: expected batch indices in \[0, 2\), got range \[0, 2\]"):
        attnctl.attention(q, k, v, source=torch.tensor([0, 2], device=DEVICE))
    with pytest.raises(ValueError, match=r"the CUDA backend does not support source \(injection\)"):
        attnctl.attention(q, k, v, source=torch.tensor([0, 0], device=DEVICE), backend="cuda")


def test_injection_opcheck():
    q, k, v = make_qkv(2, 1, 8, 8, 16)
    empty = q.new_empty(0, dtype=torch.float32)
    source = torch.tensor([1, 1], device=DEVICE)
    args = (q, k, v, 0.25, None, None, empty, empty, empty, empty, None, None, "torch", None, None, None, None,
            0.0, source)
    torch.library.opcheck(torch.ops.attnctl.attention.default, args)
    out = torch.ops.attnctl.attention(*args)
    torch.testing.assert_close(out.double(), oracle(q, k, v, 0.25, source)[0], rtol=1e-5, atol=1e-6)
