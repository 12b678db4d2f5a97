"""Maps and per-head maps (recomputed columns against the final normaliser) at key counts
on both sides of each key-block size against the reference: T from 1 past one token block,
duplicated tokens, (B, T) tokens, head weights, fp32 / fp16 / bf16. With captures the key
block is 128 keys for head dims above 64 and 64 keys up to 64 (launch_config), so the
(N, D) pairs cover one block (single-pass token mass) and several."""
import pytest
import torch

import attnctl
from op_cases import (DEVICE, compare, interpreter_bf16_dot_fixed, make_capture, make_operand, make_qkv,
                      randn, run_and_compare)

pytestmark = pytest.mark.filterwarnings("ignore:divide by zero:RuntimeWarning")


@pytest.fixture(scope="module", autouse=True)
def _bf16_dot():
    with interpreter_bf16_dot_fixed():
        yield


def tokens_for(form: str, B: int, N: int, T: int, gen: torch.Generator) -> torch.Tensor:
    """T token columns in [0, N), with repeats when T > N or form says so; (T,) or (B, T)."""
    shape = (B, T) if form.startswith("2d") else (T,)
    t = torch.randint(0, N, shape, generator=gen)
    if form.endswith("dup") and T > 1:
        t[..., -1] = t[..., 0]  # a duplicated column: each copy gets the same map
    return t.to(DEVICE, torch.int32)


@pytest.mark.parametrize("N,D", [(1, 16), (17, 16), (64, 16), (65, 16), (77, 80), (128, 72), (129, 80)])
@pytest.mark.parametrize("T,form", [(1, "1d"), (5, "2d-dup"), (77, "1d-dup")])
def test_token_columns_fp32(N, D, T, form):
    gen = torch.Generator().manual_seed(N * 100 + T)
    B, H, M = 2, 3, 33
    q, k, v = make_qkv(B, H, M, N, D, gen=gen)
    cap = make_capture(q, k, {"maps", "head_maps", "token_mass"}, tokens=tokens_for(form, B, N, T, gen),
                       head_weights=randn(B, H, gen=gen) if form.startswith("2d") else randn(H, gen=gen))
    run_and_compare(q, k, v, bias=make_operand("b1mn", B, H, M, N, gen=gen), capture=cap)
    if form.endswith("dup"):
        assert torch.equal(cap.head_maps[..., 0], cap.head_maps[..., -1])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("N,D", [(1, 40), (64, 40), (77, 80), (128, 80), (129, 80)])
def test_token_columns_low_precision(dtype, N, D):
    gen = torch.Generator().manual_seed(N)
    B, H, M = 2, 2, 40
    q, k, v = make_qkv(B, H, M, N, D, dtype=dtype, gen=gen)
    cap = make_capture(q, k, {"maps", "head_maps"}, tokens=tokens_for("2d-dup", B, N, 9, gen),
                       head_weights=randn(H, gen=gen))
    run_and_compare(q, k, v, bias=make_operand("bh1n", B, H, M, N, gen=gen), capture=cap)


def test_token_columns_of_masked_rows_and_keys():
    """Masked keys give 0 in their columns, fully masked rows give 0 everywhere."""
    B, H, M, N = 2, 2, 20, 77
    q, k, v = make_qkv(B, H, M, N, 80)
    bias = torch.zeros(B, 1, M, N, device=DEVICE)
    bias[..., 5] = float("-inf")
    bias[:, :, 3] = float("-inf")
    cap = make_capture(q, k, {"maps", "head_maps"}, tokens=torch.tensor([5, 6], device=DEVICE))
    run_and_compare(q, k, v, bias=bias, capture=cap)
    assert not cap.head_maps[..., 0].any() and not cap.head_maps[:, :, 3].any()


def test_one_key_block_and_several_agree():
    """The same inputs padded with masked keys past one key block (N 77 -> 200) give the
    same maps: the single-block and multi-block kernels agree."""
    B, H, M, N, D = 2, 2, 33, 77, 80
    q, k, v = make_qkv(B, H, M, N, D)
    pad = 200 - N
    k2 = torch.cat([k, randn(B, H, pad, D)], 2)
    v2 = torch.cat([v, randn(B, H, pad, D)], 2)
    bias2 = torch.zeros(1, 1, 1, 200, device=DEVICE)
    bias2[..., N:] = float("-inf")
    tokens = torch.tensor([0, 7, 76, 7], device=DEVICE)
    one, two = (make_capture(q, k, {"maps", "head_maps"}, tokens=tokens) for _ in range(2))
    attnctl.attention(q, k, v, capture=one, backend="triton")
    attnctl.attention(q, k2, v2, bias=bias2, capture=two, backend="triton")
    compare("maps: one key block vs several", one.maps, two.maps)
    compare("head maps: one key block vs several", one.head_maps, two.head_maps)

