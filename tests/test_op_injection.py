"""Injection (the op's ``source`` argument): item b's P from item source[b]'s q, k and
bias, applied to b's values; the two-source form (``own``); the Triton kernel's fan-out.
Checked against a float64 oracle written here, on the reference and the Triton kernel
(interpreter on CPU)."""
import pytest
import torch

import attnctl
from attnctl import Capture, OwnTerm, Regions
from attnctl.op import op_arguments

from op_cases import DEVICE, interpreter_bf16_dot_fixed, make_qkv, randn

pytestmark = pytest.mark.filterwarnings("ignore:divide by zero:RuntimeWarning")


@pytest.fixture(scope="module", autouse=True)
def _bf16_dot():
    with interpreter_bf16_dot_fixed():
        yield


def oracle(q, k, v, scale, source, bias=None, prob_mult=None, region_factor=None):
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
    if region_factor is not None:
        f = f * region_factor
    return (p * f) @ v64, p


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("N,layout,dtype,D", [(77, "contiguous", torch.float32, 16), (150, "bmhd", torch.float32, 72),
                                              (77, "strided", torch.float16, 40)])
def test_injection_matches_oracle(backend, N, layout, dtype, D):
    B, H, M = 4, 2, 40
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


def test_injection_opcheck():
    q, k, v = make_qkv(2, 1, 8, 8, 16)
    source = torch.tensor([1, 1], device=DEVICE)
    args = op_arguments(q, k, v, 0.25, backend="torch", source=source)
    torch.library.opcheck(torch.ops.attnctl.attention.default, args)
    out = torch.ops.attnctl.attention(*args)
    torch.testing.assert_close(out.double().cpu(), oracle(q, k, v, 0.25, source)[0], rtol=1e-5, atol=1e-6)


def _regions_and_factor(B, M, N, gen):
    labels_q = torch.randint(-1, 3, (B, M), generator=gen)
    labels_k = torch.randint(-1, 3, (1, N), generator=gen)
    lq, lk = labels_q[:, None, :, None], labels_k[:, None, None, :]
    differ = (lq >= 0) & (lk >= 0) & (lq != lk)
    return Regions(labels_q.to(DEVICE), labels_k.to(DEVICE), 0.7), 1.0 - 0.7 * differ.double()


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("N,layout,dtype,D", [(77, "contiguous", torch.float32, 72), (150, "bmhd", torch.float32, 16),
                                              (77, "strided", torch.float16, 40)])
def test_two_source_form_matches_oracle(backend, N, layout, dtype, D):
    """O_b = (P_src·f)·V + (P_b·f_own)·V_own, separate normalisers, regions on both terms,
    captures of each term in its own buffers; N = 150 spans several key blocks."""
    B, H, M = 3, 2, 45
    gen = torch.Generator().manual_seed(N + 1)
    q, k, v = make_qkv(B, H, M, N, D, dtype=dtype, layout=layout, gen=gen)
    own_values = randn(B, H, N, D, gen=gen, dtype=dtype)
    source = torch.tensor([0, 0, 1], dtype=torch.int32, device=DEVICE)
    bias = randn(B, 1, M, N, gen=gen)
    prob_mult, own_pm = randn(B, H, 1, N, gen=gen), randn(B, 1, 1, N, gen=gen)
    regions, region_factor = _regions_and_factor(B, M, N, gen)
    cap = Capture.zeros(q, k, token_mass=True, tokens=[2, 9], maps=True, lse=True)
    own_cap = Capture.zeros(q, k, token_mass=True, tokens=[[1, 4, 7]] * B, head_maps=True, maps=True,
                            head_weights=randn(H, gen=gen), lse=True)
    out = attnctl.attention(q, k, v, scale=0.3, bias=bias, prob_mult=prob_mult, capture=cap, backend=backend,
                            regions=regions, source=source, own=OwnTerm(own_values, own_pm, own_cap))
    ref1, p_src = oracle(q, k, v, 0.3, source, bias, prob_mult, region_factor)
    ref2, p_own = oracle(q, k, own_values, 0.3, range(B), bias, own_pm, region_factor)
    tol = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(out.double().cpu(), ref1 + ref2, **tol)
    torch.testing.assert_close(cap.token_mass.double().cpu(), p_src.sum(2), **tol)
    torch.testing.assert_close(cap.maps.double().cpu(), p_src[..., [2, 9]].sum(1), **tol)
    torch.testing.assert_close(own_cap.token_mass.double().cpu(), p_own.sum(2), **tol)
    torch.testing.assert_close(own_cap.head_maps.double().cpu(), p_own[..., [1, 4, 7]], **tol)
    w = own_cap.head_weights.double().cpu()
    torch.testing.assert_close(own_cap.maps.double().cpu(), torch.einsum("h,bhmt->bmt", w, p_own[..., [1, 4, 7]]),
                               **tol)
    s_own = 0.3 * q.double().cpu() @ k.double().cpu().transpose(-1, -2) + bias.double().cpu()
    torch.testing.assert_close(own_cap.lse.double().cpu(), torch.logsumexp(s_own, -1), **tol)
    torch.testing.assert_close(cap.lse.double().cpu(), torch.logsumexp(s_own, -1)[source.long().cpu()], **tol)


@pytest.mark.parametrize("source,Dv,D", [([0, 1, 2, 2], 16, 16), ([3, 3, 3, 3, 1, 5], 40, 72),
                                         ([0, 0, 0, 0, 0], 64, 40), ([1, 1, 0, 0, 2], 80, 16), ([0, 0, 1], 160, 80),
                                         ([1, 1, 1, 0], 72, 16)])
def test_fanout_matches_oracle(source, Dv, D):
    """Injection with no per-item work: the kernel takes each logit item's P once for up to
    4 destinations (2 for head dim 80, none for 160), padded slots skipped."""
    from attnctl.backends.triton_backend import fanout_table

    B, H, M, N = len(source), 2, 70, 150
    gen = torch.Generator().manual_seed(Dv)
    q, k, v = make_qkv(B, H, M, N, D, Dv, layout="bmhd", gen=gen)
    src = torch.tensor(source, device=DEVICE)
    bias = randn(B, 1, M, N, gen=gen)
    out = attnctl.attention(q, k, v, scale=0.3, bias=bias, backend="triton", source=src)
    torch.testing.assert_close(out.double().cpu(), oracle(q, k, v, 0.3, source, bias)[0], rtol=1e-4, atol=1e-5)
    table = fanout_table(src, Dv)
    if Dv == 160:
        assert table is None
        return
    rows = table.tolist()
    width = len(rows[0]) - 1
    assert width == {16: 2, 40: 4, 64: 4, 72: 2, 80: 2}[Dv]
    covered = sorted(b for row in rows for b in row[1:] if b >= 0)
    assert covered == list(range(B))                       # every item written exactly once
    assert all(source[b] == row[0] for row in rows for b in row[1:] if b >= 0)
    assert len(rows) < B                                   # fewer QKᵀ passes than items


def test_two_source_bad_input():
    q, k, v = make_qkv(2, 1, 8, 8, 16)
    src = torch.tensor([0, 0], device=DEVICE)
    with pytest.raises(ValueError, match="own: the two-source form needs source="):
        attnctl.attention(q, k, v, own=OwnTerm(v))
    with pytest.raises(TypeError, match="own: expected attnctl.OwnTerm or None, got Tensor"):
        attnctl.attention(q, k, v, source=src, own=v)
    with pytest.raises(ValueError, match=r"own.values: expected shape \(2, 1, 8, 16\) \(that of v\), "
                                         r"got \(2, 1, 8, 32\)"):
        attnctl.attention(q, k, v, source=src, own=OwnTerm(randn(2, 1, 8, 32)))
    with pytest.raises(TypeError, match="own.values: expected dtype torch.float32 \\(that of v\\), got torch.float16"):
        attnctl.attention(q, k, v, source=src, own=OwnTerm(v.half()))
    with pytest.raises(ValueError, match=r"own.prob_mult: expected a shape broadcastable to"):
        attnctl.attention(q, k, v, source=src, own=OwnTerm(v, prob_mult=randn(2, 1, 8, 5)))
    bad = Capture(token_mass=torch.zeros(2, 1, 9, device=DEVICE))
    with pytest.raises(ValueError, match=r"own.capture.token_mass: expected shape \(2, 1, 8\), got \(2, 1, 9\)"):
        attnctl.attention(q, k, v, source=src, own=OwnTerm(v, capture=bad))
    # The CUDA backend takes the two-source form: what stops it here is the device or dtype.
    with pytest.raises((RuntimeError, ValueError), match=r"the CUDA backend cannot run|'cuda' needs float16"):
        attnctl.attention(q, k, v, source=src, own=OwnTerm(v), backend="cuda")


def test_two_source_opcheck():
    q, k, v = make_qkv(2, 1, 8, 8, 16)
    source = torch.tensor([1, 1], device=DEVICE)
    own_values, own_mass = randn(2, 1, 8, 16), torch.zeros(2, 1, 8, device=DEVICE)
    args = op_arguments(q, k, v, 0.25, backend="torch", source=source,
                        own=OwnTerm(own_values, None, Capture(token_mass=own_mass)))
    torch.library.opcheck(torch.ops.attnctl.attention.default, args)
    own_mass.zero_()
    out = torch.ops.attnctl.attention(*args)
    expected = oracle(q, k, v, 0.25, source)[0] + oracle(q, k, own_values, 0.25, [0, 1])[0]
    torch.testing.assert_close(out.double().cpu(), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(own_mass.double().cpu(), oracle(q, k, own_values, 0.25, [0, 1])[1].sum(2))
