"""Region masks (attnctl.Regions with ``allowed``): a pre-softmax mask from per-query and
per-key labels, never materialised by the kernel, which skips key blocks hidden from a
whole query block.

Oracles are independent of attnctl.reference: torch SDPA with the dense boolean mask
(float64), and a float64 materialised softmax for the captures."""
import pytest
import torch
import torch.nn.functional as F

import attnctl
from attnctl import Capture, Regions

from op_cases import DEVICE, compare, make_qkv

pytestmark = pytest.mark.filterwarnings("ignore:divide by zero:RuntimeWarning")
BACKENDS = ["torch", "triton"]


def dense_mask(labels_q, labels_k, allowed, B, M, N):
    """(B, 1, M, N) bool: True where query m may attend key n (unlabelled: always)."""
    lq = labels_q.cpu().long().expand(B, M)
    lk = labels_k.cpu().long().expand(B, N)
    keep = torch.ones(B, M, N, dtype=torch.bool)
    for a in range(allowed.shape[0]):
        for c in range(allowed.shape[1]):
            if not bool(allowed[a, c]):
                keep &= ~((lq == a)[:, :, None] & (lk == c)[:, None, :])
    return keep[:, None]


def sdpa_oracle(q, k, v, scale, keep, bias=None):
    """Dense-mask SDPA in float64 (the baseline a mask-free kernel replaces)."""
    q64, k64, v64 = (t.double().cpu() for t in (q, k, v))
    mask = torch.zeros(keep.shape, dtype=torch.float64).masked_fill(~keep, float("-inf"))
    if bias is not None:
        mask = mask + bias.double().cpu()
    return F.scaled_dot_product_attention(q64, k64, v64, attn_mask=mask, scale=scale)


def random_labels(gen, batch, length, count):
    return torch.randint(-1, count, (batch, length), generator=gen).to(DEVICE)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("M,N,lq_batch,lk_batch,with_bias", [
    (37, 150, 2, 1, False),   # three 64-key blocks, a partial query block
    (97, 97, 1, 2, True),     # joint-like M = N, with an additive bias
    (5, 1, 2, 2, False),      # one key
])
def test_region_mask_matches_dense_mask_sdpa(backend, M, N, lq_batch, lk_batch, with_bias):
    B, H, D = 2, 3, 32
    gen = torch.Generator().manual_seed(M * N)
    q, k, v = make_qkv(B, H, M, N, D, gen=gen)
    allowed = torch.rand(4, 3, generator=gen) > 0.5
    allowed[1] = False                          # queries labelled 1 see unlabelled keys only
    labels_q = random_labels(gen, lq_batch, M, 4)
    labels_q[:, :3] = 1
    labels_k = random_labels(gen, lk_batch, N, 3).to(torch.int32)
    labels_k[:, 0] = 2
    bias = torch.randn(1, H, M, N, generator=gen).to(DEVICE) if with_bias else None
    regions = Regions(labels_q.to(DEVICE), labels_k.to(DEVICE), allowed=allowed.to(DEVICE))
    out = attnctl.attention(q, k, v, bias=bias, regions=regions, backend=backend)
    assert attnctl.last_dispatch().backend == backend
    keep = dense_mask(labels_q, labels_k, allowed, B, M, N)
    expected = sdpa_oracle(q, k, v, D ** -0.5, keep, bias)
    compare("output", out, expected.float())
    empty = ~keep.any(dim=-1).expand(B, H, M)   # rows with no allowed key: P = 0, output 0
    assert empty.any() or N > 1                 # N = 1 has such rows (label 1 against label 2)
    assert (out.detach().cpu()[empty] == 0).all()


def test_fully_masked_rows_give_zero_output_and_minus_inf_lse():
    B, H, M, N, D = 1, 2, 70, 130, 16
    q, k, v = make_qkv(B, H, M, N, D)
    allowed = torch.tensor([[True, False], [False, False]], device=DEVICE)
    regions = Regions(torch.tensor([[0] * 35 + [1] * 35], device=DEVICE), torch.zeros(1, N, dtype=torch.int64, device=DEVICE),
                      allowed=allowed)
    for backend in BACKENDS:
        cap = Capture.zeros(q, k, lse=True, token_mass=True)
        out = attnctl.attention(q, k, v, regions=regions, capture=cap, backend=backend)
        assert (out[:, :, 35:] == 0).all(), backend
        assert torch.isneginf(cap.lse[:, :, 35:]).all() and torch.isfinite(cap.lse[:, :, :35]).all(), backend
        compare("token mass", cap.token_mass.sum(-1), torch.full((B, H), 35.0))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("N,D", [(77, 16), (200, 72)])   # one key block (single-pass mass); several (second pass)
def test_region_mask_captures_are_of_the_masked_softmax(backend, N, D):
    B, H, M = 2, 2, 45
    gen = torch.Generator().manual_seed(N)
    q, k, v = make_qkv(B, H, M, N, D, gen=gen)
    allowed = torch.tensor([[True, True, False], [False, True, True]], device=DEVICE)
    labels_q = random_labels(gen, B, M, 2)
    labels_k = random_labels(gen, 1, N, 3)
    tokens = torch.tensor([0, 5, 17, N - 1])
    cap = Capture.zeros(q, k, token_mass=True, tokens=tokens, maps=True, head_maps=True, lse=True,
                        head_weights=torch.tensor([0.25, 2.0], device=DEVICE))
    attnctl.attention(q, k, v, regions=Regions(labels_q, labels_k, allowed=allowed), capture=cap, backend=backend)
    keep = dense_mask(labels_q, labels_k, allowed, B, M, N)
    s = (q.double().cpu() @ k.double().cpu().transpose(-1, -2)) * D ** -0.5
    s = s.masked_fill(~keep, float("-inf"))
    p = torch.softmax(s, dim=-1)
    compare("token_mass", cap.token_mass, p.sum(2).float())
    compare("head_maps", cap.head_maps, p[..., tokens].float())
    compare("maps", cap.maps, torch.einsum("h,bhmt->bmt", torch.tensor([0.25, 2.0]).double(),
                                           p[..., tokens]).float())
    compare("lse", cap.lse, torch.logsumexp(s, dim=-1).float())


def test_key_blocks_hidden_from_every_query_are_skipped():
    """Values of a key block that no query may attend are never read: NaN there leaves the
    Triton output finite (a visited block would give 0·NaN = NaN)."""
    B, H, M, N, D = 1, 2, 128, 192, 32      # fp32: 64-row query blocks, 64-key blocks
    q, k, v = make_qkv(B, H, M, N, D)
    labels_q = torch.tensor([[0] * 64 + [1] * 64], device=DEVICE)
    labels_k = torch.tensor([[0] * 64 + [1] * 64 + [2] * 64], device=DEVICE)
    regions = Regions(labels_q, labels_k,
                      allowed=torch.tensor([[True, False, False], [True, True, False]], device=DEVICE))
    poisoned_v, poisoned_k = v.clone(), k.clone()
    poisoned_v[:, :, 128:] = float("nan")
    poisoned_k[:, :, 128:] = float("nan")
    out = attnctl.attention(q, poisoned_k, poisoned_v, regions=regions, backend="triton")
    keep = dense_mask(labels_q, labels_k, regions.allowed, B, M, N)
    compare("output", out, sdpa_oracle(q, k, v, D ** -0.5, keep).float())


def test_region_mask_half_precision():
    B, H, M, N, D = 2, 2, 50, 90, 64
    q, k, v = make_qkv(B, H, M, N, D, dtype=torch.float16)
    gen = torch.Generator().manual_seed(3)
    regions = Regions(random_labels(gen, 1, M, 3), random_labels(gen, B, N, 3),
                      allowed=torch.tensor([[True, False, True], [False, True, False], [True, True, True]],
                                           device=DEVICE))
    out = attnctl.attention(q, k, v, regions=regions, backend="triton")
    low = attnctl.attention_reference(q, k, v, scale=D ** -0.5, regions=regions, compute_dtype=torch.float16)
    keep = dense_mask(regions.labels_q, regions.labels_k, regions.allowed, B, M, N)
    compare("output", out, sdpa_oracle(q, k, v, D ** -0.5, keep).float(), low, torch.float16)


def test_mask_bits_encode_the_allowed_table():
    allowed = torch.zeros(3, 31, dtype=torch.bool)
    allowed[0, 30] = allowed[1, 0] = allowed[1, 7] = True
    regions = Regions(torch.tensor([[0, 1, 2, -1]]), torch.tensor([[30, 0, 7, -1, 3]]), allowed=allowed)
    qb, kb = regions.mask_bits
    pairs = (qb[0, :, None] & kb[0, None, :]) != 0
    assert torch.equal(pairs, dense_mask(regions.labels_q, regions.labels_k, allowed, 1, 4, 5)[0, 0])


def test_region_mask_errors_name_the_argument():
    q, k, v = make_qkv(2, 2, 10, 12, 16)
    allowed = torch.ones(2, 2, dtype=torch.bool, device=DEVICE)
    lq, lk = torch.zeros(1, 10, dtype=torch.int64, device=DEVICE), torch.zeros(1, 12, dtype=torch.int64, device=DEVICE)
    cases = [
        (Regions(torch.zeros(1, 9, dtype=torch.int64, device=DEVICE), lk, allowed=allowed), ValueError,
         r"regions.labels_q: expected shape \(1 or 2, M = 10\), got \(1, 9\)"),
        (Regions(lq, torch.zeros(3, 12, dtype=torch.int64, device=DEVICE), allowed=allowed), ValueError,
         r"regions.labels_k: expected shape \(1 or 2, N = 12\), got \(3, 12\)"),
        (Regions(lq, lk, allowed=torch.ones(2, 2, device=DEVICE)), TypeError, r"regions.allowed: expected dtype torch.bool"),
        (Regions(lq, lk, allowed=torch.ones(2, 32, dtype=torch.bool, device=DEVICE)), ValueError,
         r"regions.allowed: expected shape \(query labels >= 1, key labels in \[1, 31\]\), got \(2, 32\)"),
        (Regions(lq + 2, lk, allowed=allowed), ValueError,
         r"regions.labels_q: expected labels below 2 \(regions.allowed has 2 rows\).*got 2"),
        (Regions(lq, lk, strength=0.5, allowed=allowed), ValueError, r"regions.strength: a mask .* has no strength"),
    ]
    for regions, error, message in cases:
        with pytest.raises(error, match=message):
            attnctl.attention(q, k, v, regions=regions, backend="torch")
    regions = Regions(lq, lk, allowed=allowed)
    with pytest.raises(ValueError, match=r"regions: a mask .* cannot be combined with source="):
        attnctl.attention(q, k, v, regions=regions, source=torch.tensor([0, 0], device=DEVICE), backend="torch")
    with pytest.raises(ValueError, match=r"the CUDA backend does not support regions"):
        attnctl.attention(q, k, v, regions=regions, backend="cuda")
    qg = q.clone().requires_grad_(True)
    with pytest.raises(NotImplementedError, match=r"does not support regions.allowed \(a region mask\)"):
        attnctl.attention(qg, k, v, regions=regions, backend="triton")


def test_region_mask_gradients_run_on_the_reference():
    """Inputs requiring grad: 'auto' runs the reference (the Triton backward has no mask),
    whose gradients equal dense-mask SDPA's."""
    q, k, v = make_qkv(1, 2, 12, 20, 16)
    gen = torch.Generator().manual_seed(1)
    regions = Regions(random_labels(gen, 1, 12, 2), random_labels(gen, 1, 20, 2),
                      allowed=torch.tensor([[True, False], [True, True]], device=DEVICE))
    keep = dense_mask(regions.labels_q, regions.labels_k, regions.allowed, 1, 12, 20).to(DEVICE)
    grads = []
    for run in (lambda a, b, c: attnctl.attention(a, b, c, regions=regions),
                lambda a, b, c: F.scaled_dot_product_attention(a, b, c, attn_mask=keep)):
        leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
        run(*leaves).square().sum().backward()
        grads.append([t.grad for t in leaves])
    for got, expected in zip(*grads):
        compare("grad", got, expected)


def test_benchmark_pair_dense_mask_sdpa_vs_label_regions():
    """The benchmark's contender pair runs on the joint smoke shape (only there), and both
    compute the same attention; the catalog holds the Flux joint shape."""
    from attnctl.benchmarks import runner, shapes
    from attnctl.benchmarks.contenders import CONTENDERS, Inputs, select

    pair = select(["sdpa+dense-mask", "triton+regions"], "cpu")
    rows = runner.run(shapes.smoke_catalog(), ["fp32"], pair, "cpu", {})
    assert {(r["kind"], r["contender"]) for r in rows} == {("joint", c.name) for c in pair}
    assert all(r["status"] == "ok" for r in rows), [r["status"] for r in rows]
    joint = next(s for s in shapes.smoke_catalog() if s.kind == "joint")
    x = Inputs.make(joint, torch.float32, "cpu")
    compare("regions vs dense mask", CONTENDERS["triton+regions"].build(x)(),
            CONTENDERS["sdpa+dense-mask"].build(x)())
    flux = [s for s in shapes.catalog(kinds=("joint",)) if s.model == "flux-1024"]
    assert [(s.B, s.H, s.M, s.N, s.D) for s in flux] == [(1, 24, 4608, 4608, 128)]


def test_region_mask_under_torch_compile():
    """torch.compile (fullgraph) carries the mask table through the op: eager's output."""
    q, k, v = make_qkv(2, 2, 33, 40, 16)
    gen = torch.Generator().manual_seed(5)
    regions = Regions(random_labels(gen, 2, 33, 2), random_labels(gen, 1, 40, 3),
                      allowed=torch.tensor([[True, False, False], [False, True, True]], device=DEVICE))

    def f(q, k, v):
        return attnctl.attention(q, k, v, regions=regions, backend="torch") * 2

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    compare("compiled", compiled(q, k, v), f(q, k, v))
    assert not torch.equal(f(q, k, v), attnctl.attention(q, k, v, backend="torch") * 2)
