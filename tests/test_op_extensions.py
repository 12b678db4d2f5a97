"""Op-contract extensions for head-level and spatial control: auxiliary-key probes
(capture.probe_keys / probe_mass), region labels (attnctl.Regions) and attnctl.logit_max.

Each is checked on the reference and the Triton kernel (interpreter on CPU) against a
materialising oracle written here in float64, independent of attnctl.reference."""
import math

import pytest
import torch

import attnctl
from attnctl import Capture, Regions
from attnctl.diffusers.compose import compose
from attnctl.diffusers.controller import Plan
from attnctl.op import op_arguments

from op_cases import DEVICE, compare, interpreter_bf16_dot_fixed, make_qkv, randn

pytestmark = pytest.mark.filterwarnings("ignore:divide by zero:RuntimeWarning")
BACKENDS = ["torch", "triton"]


@pytest.fixture(scope="module", autouse=True)
def _bf16_dot():
    with interpreter_bf16_dot_fixed():
        yield


def oracle(q, k, v, scale, *, prob_mult=None, labels_q=None, labels_k=None, strength=0.0,
           probe_keys=None):
    """Materialised float64: (output, probe mass)."""
    q64, k64, v64 = (t.double().cpu() for t in (q, k, v))
    B, H, M, _ = q.shape
    N = k.shape[2]
    p = torch.softmax(scale * q64 @ k64.transpose(-1, -2), dim=-1)
    f = torch.ones(B, H, M, N, dtype=torch.float64, device=DEVICE)
    if prob_mult is not None:
        f = f * prob_mult.double().cpu()
    if labels_q is not None:
        lq = labels_q.cpu().long().expand(B, M)[:, None, :, None]
        lk = labels_k.cpu().long().expand(B, N)[:, None, None, :]
        both = (lq >= 0) & (lk >= 0)
        f = torch.where(both & (lq != lk), f * (1.0 - strength), f)
    out = (p * f) @ v64
    mass = None
    if probe_keys is not None:
        pk = probe_keys.double().cpu().expand(B, H, -1, -1)
        mass = torch.softmax(scale * q64 @ pk.transpose(-1, -2), dim=-1).sum(dim=2)
    return out, mass


# ---- probes ----------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("C,N,pk_batch,layout,D", [
    (5, 77, 1, "contiguous", 72),  # one probe block, broadcast over the batch; a head-dim tail
    (100, 300, 2, "strided", 40),  # two-pass path (BLOCK_C = 64), per-item keys, strided
    (64, 1, 1, "bmhd", 16),        # exactly one full probe block, one key
])
def test_probe_mass(backend, C, N, pk_batch, layout, D):
    B, H, M = 2, 3, 33
    gen = torch.Generator().manual_seed(C)
    q, k, v = make_qkv(B, H, M, N, D, layout=layout, gen=gen)
    probe_keys = randn(pk_batch, H, D, C, gen=gen).transpose(-1, -2)  # any strides
    cap = Capture.zeros(q, k, probe_keys=probe_keys, token_mass=True)
    cap.probe_mass += 0.5  # prefilled: the op adds
    out = attnctl.attention(q, k, v, capture=cap, backend=backend)
    assert attnctl.last_dispatch().backend == backend
    ref_out, ref_mass = oracle(q, k, v, 1 / math.sqrt(D), probe_keys=probe_keys)
    compare("output", out, ref_out.float())
    compare("probe_mass", cap.probe_mass, ref_mass.float() + 0.5)
    # each row's probe softmax sums to one, so Σ_c probe_mass = M (+ the prefill)
    compare("Σ_c probe_mass", cap.probe_mass.sum(-1), torch.full((B, H), M + 0.5 * C, device=DEVICE))


def test_probe_mass_low_precision_and_independent_of_controls():
    """fp16: within the low-precision rule of the fp16 reference; bias and prob_mult change
    the output but not the probe softmax (it has its own key set)."""
    B, H, M, N, D, C = 2, 2, 65, 77, 32, 9
    q, k, v = make_qkv(B, H, M, N, D, dtype=torch.float16)
    pk = randn(1, H, C, D, dtype=torch.float16)
    caps = [Capture.zeros(q, k, probe_keys=pk) for _ in range(3)]
    attnctl.attention(q, k, v, capture=caps[0], backend="triton")
    attnctl.attention(q, k, v, capture=caps[1], bias=randn(B, 1, M, N), prob_mult=randn(1, H, 1, N),
                      backend="triton")
    attnctl.attention(q, k, v, capture=caps[2], backend="torch")
    low = Capture.zeros(q, k, probe_keys=pk)
    attnctl.attention_reference(q, k, v, scale=D ** -0.5, capture=low, compute_dtype=torch.float16)
    _, ref = oracle(q, k, v, D ** -0.5, probe_keys=pk)
    for i in range(3):
        compare(f"probe_mass {i}", caps[i].probe_mass, ref.float(), low.probe_mass, torch.float16)


# ---- regions ---------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("N,strength,with_pm,lq_batch,lk_batch,D", [
    (77, 1.0, False, 2, 1, 16),
    (300, 0.6, True, 1, 2, 80),     # several key blocks, combined with prob_mult
    (33, -0.5, True, 2, 2, 40),     # self-attention-like N = M, strength amplifies
])
def test_regions(backend, N, strength, with_pm, lq_batch, lk_batch, D):
    B, H, M = 2, 2, 33
    gen = torch.Generator().manual_seed(N)
    q, k, v = make_qkv(B, H, M, N, D, gen=gen)
    labels_q = torch.randint(-1, 3, (lq_batch, M), generator=gen).to(DEVICE)
    labels_k = torch.randint(-1, 3, (lk_batch, N), generator=gen).to(DEVICE, torch.int32)
    pm = (2 * torch.rand(B, 1, M, N, generator=gen)).to(DEVICE) if with_pm else None
    cap = Capture.zeros(q, k, token_mass=True, lse=True)
    plain = Capture.zeros(q, k, token_mass=True, lse=True)
    out = attnctl.attention(q, k, v, prob_mult=pm, regions=Regions(labels_q, labels_k, strength),
                            capture=cap, backend=backend)
    attnctl.attention(q, k, v, prob_mult=pm, capture=plain, backend=backend)
    ref, _ = oracle(q, k, v, D ** -0.5, prob_mult=pm, labels_q=labels_q, labels_k=labels_k,
                    strength=strength)
    compare("output", out, ref.float())
    compare("token_mass (P before the factor)", cap.token_mass, plain.token_mass)
    compare("lse", cap.lse, plain.lse)


def test_regions_unlabelled_or_zero_strength_change_nothing():
    q, k, v = make_qkv(1, 2, 33, 77, 16)
    base = attnctl.attention(q, k, v, bias=torch.zeros(1, device=DEVICE), backend="triton")
    for regions in (Regions(torch.full((1, 33), -1, device=DEVICE), torch.randint(0, 2, (1, 77), device=DEVICE), 1.0),
                    Regions(torch.randint(0, 2, (1, 33), device=DEVICE), torch.randint(0, 2, (1, 77), device=DEVICE), 0.0)):
        compare("unchanged", attnctl.attention(q, k, v, regions=regions, backend="triton"), base)


# ---- logit max -------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("M,N,dtype,layout,D", [(33, 77, torch.float32, "bmhd", 16),
                                                (130, 300, torch.float32, "strided", 72),
                                                (65, 20, torch.float16, "contiguous", 40)])
def test_logit_max(backend, M, N, dtype, layout, D):
    q, k, _ = make_qkv(2, 3, M, N, D, dtype=dtype, layout=layout)
    q = q * 3 - 1  # logits not centred on 0: the max is not a masked-row artefact
    got = attnctl.logit_max(q, k, backend=backend)
    expected = torch.einsum("bhmd,bhnd->bhmn", q.double(), k.double()).amax(dim=(-1, -2))
    assert got.shape == (2, 3) and got.dtype == torch.float32
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    assert float((got.double() - expected).abs().max()) <= tol * (1 + float(expected.abs().max()))


def test_logit_max_all_negative_logits():
    """Every logit negative: the max is negative (padding rows and keys must not add 0)."""
    q = torch.ones(1, 1, 20, 16, device=DEVICE)
    k = -torch.rand(1, 1, 10, 16, device=DEVICE) - 0.1
    expected = (q @ k.transpose(-1, -2)).amax()
    for backend in BACKENDS:
        got = attnctl.logit_max(q, k, backend=backend)
        assert float(got) < 0
        compare(f"logit_max {backend}", got.view(()), expected)


# ---- errors -----------------------------------------------------------------------------------

def _qkv():
    return make_qkv(2, 2, 9, 12, 16)


@pytest.mark.parametrize("what", ["regions", "probes"])
def test_cuda_backend_rejects_new_fields(what):
    q, k, v = _qkv()
    kwargs = {"regions": Regions(torch.zeros(1, 9, dtype=torch.long, device=DEVICE), torch.zeros(1, 12, dtype=torch.long, device=DEVICE))}
    if what == "probes":
        kwargs = {"capture": Capture.zeros(q, k, probe_keys=torch.randn(1, 2, 3, 16, device=DEVICE))}
    name = "regions" if what == "regions" else "capture.probe_keys"
    with pytest.raises(ValueError, match=rf"CUDA backend does not support {name}.*expected backend"):
        attnctl.attention(q, k, v, backend="cuda", **kwargs)


@pytest.mark.parametrize("backend", ["cuda", "sdpa"])
def test_logit_max_unsupported_backends(backend):
    q, k, _ = _qkv()
    with pytest.raises(ValueError, match=rf"logit_max is computed by 'triton' or 'torch'.*got '{backend}'"):
        attnctl.logit_max(q, k, backend=backend)


def test_logit_max_bad_input():
    q, k, _ = _qkv()
    with pytest.raises(ValueError, match=r"k: expected \(B, H, N, D\) = \(2, 2, N, 16\).*\(2, 3, 12, 16\)"):
        attnctl.logit_max(q, torch.randn(2, 3, 12, 16, device=DEVICE))
    with pytest.raises(TypeError, match="q, k: expected one dtype"):
        attnctl.logit_max(q, k.half())


@pytest.mark.parametrize("change,error,pattern", [
    (dict(probe_keys=torch.randn(1, 3, 4, 16, device=DEVICE)), ValueError, r"capture.probe_keys: expected shape \(1 or 2, 2, C >= 1, 16\), got \(1, 3, 4, 16\)"),
    (dict(probe_keys=torch.randn(2, 4, 16, device=DEVICE)), ValueError, r"capture.probe_keys: expected 4 dims"),
    (dict(probe_keys=torch.randn(1, 2, 4, 16, device=DEVICE).half()), TypeError, r"capture.probe_keys: expected dtype torch.float32 \(that of q\), got torch.float16"),
    (dict(probe_mass=torch.zeros(2, 2, 5, device=DEVICE)), ValueError, r"capture.probe_mass: expected shape \(2, 2, 4\), got \(2, 2, 5\)"),
    (dict(probe_keys=None), ValueError, r"capture.probe_mass: given without capture.probe_keys"),
    (dict(probe_mass=None), ValueError, r"capture.probe_mass: capture.probe_keys needs a \(B, H, C\) float32 buffer"),
])
def test_probe_validation(change, error, pattern):
    q, k, v = _qkv()
    cap = Capture.zeros(q, k, probe_keys=torch.randn(1, 2, 4, 16, device=DEVICE))
    for name, value in change.items():
        setattr(cap, name, value)
    with pytest.raises(error, match=pattern):
        attnctl.attention(q, k, v, capture=cap, backend="torch")


@pytest.mark.parametrize("regions,error,pattern", [
    (Regions(torch.zeros(1, 8, dtype=torch.long, device=DEVICE), torch.zeros(1, 12, dtype=torch.long, device=DEVICE)), ValueError,
     r"regions.labels_q: expected shape \(1 or 2, M = 9\), got \(1, 8\)"),
    (Regions(torch.zeros(1, 9, dtype=torch.long, device=DEVICE), torch.zeros(3, 12, dtype=torch.long, device=DEVICE)), ValueError,
     r"regions.labels_k: expected shape \(1 or 2, N = 12\), got \(3, 12\)"),
    (Regions(torch.zeros(1, 9, device=DEVICE), torch.zeros(1, 12, dtype=torch.long, device=DEVICE)), TypeError,
     r"regions.labels_q: expected dtype int32 or int64, got torch.float32"),
    (Regions(torch.zeros(1, 9, dtype=torch.long, device=DEVICE), torch.zeros(1, 12, dtype=torch.long, device=DEVICE), float("nan")),
     ValueError, r"regions.strength: expected a finite number, got nan"),
    ("labels", TypeError, r"regions: expected attnctl.Regions or None, got str"),
])
def test_regions_validation(regions, error, pattern):
    q, k, v = _qkv()
    with pytest.raises(error, match=pattern):
        attnctl.attention(q, k, v, regions=regions, backend="triton")


# ---- composition -----------------------------------------------------------------------------

def test_compose_regions_and_probes():
    q, k, v = _qkv()
    shape = (2, 2, 9, 12)
    regions = Regions(torch.zeros(1, 9, dtype=torch.long, device=DEVICE), torch.ones(1, 12, dtype=torch.long, device=DEVICE), 0.5)
    pm = torch.rand(1, 2, 1, 12, device=DEVICE)
    plan, route = compose([Plan(regions=regions), Plan(prob_mult=pm)], shape, q.device)
    assert plan.regions is regions and plan.prob_mult is pm and route is None
    with pytest.raises(ValueError, match="regions: expected at most one controller's plan with regions per call, got 2"):
        compose([Plan(regions=regions), Plan(regions=regions)], shape, q.device)
    probes = [Capture.zeros(q, k, probe_keys=torch.randn(1, 2, 3, 16, device=DEVICE)) for _ in range(2)]
    with pytest.raises(ValueError, match="capture.probe_keys: expected at most one capture with probe keys"):
        compose([Plan(capture=probes[0]), Plan(capture=probes[1])], shape, q.device)
    # a probe capture merged with another capture: the kernel adds into the owner's buffer
    other = Capture.zeros(q, k, token_mass=True)
    plan, route = compose([Plan(capture=probes[0]), Plan(capture=other, regions=regions)], shape, q.device)
    attnctl.attention(q, k, v, capture=plan.capture, regions=plan.regions, backend="triton")
    route()
    _, mass = oracle(q, k, v, 0.25, probe_keys=probes[0].probe_keys)
    compare("routed probe_mass", probes[0].probe_mass, mass.float())
    assert float(other.token_mass.sum()) == pytest.approx(2 * 2 * 9, rel=1e-5)


# ---- torch.compile ---------------------------------------------------------------------------

def test_compile_with_probes_and_regions():
    torch._dynamo.reset()
    q, k, v = make_qkv(2, 2, 33, 20, 16, layout="bmhd")
    pk = torch.randn(1, 2, 5, 16, device=DEVICE)
    regions = Regions(torch.randint(-1, 2, (2, 33), device=DEVICE), torch.randint(-1, 2, (1, 20), device=DEVICE), 0.75)

    def f(q, k, v, capture, regions):
        return attnctl.attention(q, k, v, capture=capture, regions=regions), attnctl.logit_max(q, k)

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    eager_cap, comp_cap = (Capture.zeros(q, k, probe_keys=pk, lse=True) for _ in range(2))
    for _ in range(2):
        e_out, e_max = f(q, k, v, eager_cap, regions)
        c_out, c_max = compiled(q, k, v, comp_cap, regions)
        compare("compiled output", c_out, e_out)
        compare("compiled logit_max", c_max, e_max)
    compare("compiled probe_mass", comp_cap.probe_mass, eager_cap.probe_mass)
    compare("compiled lse", comp_cap.lse, eager_cap.lse)


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck_with_probes_and_regions(backend):
    q, k, v = make_qkv(2, 2, 9, 12, 16)
    capture = Capture(lse=torch.rand(2, 2, 9, device=DEVICE), probe_keys=torch.randn(1, 2, 5, 16, device=DEVICE),
                      probe_mass=torch.rand(2, 2, 5, device=DEVICE))
    regions = Regions(torch.randint(-1, 2, (2, 9), device=DEVICE), torch.randint(-1, 2, (1, 12), device=DEVICE), 0.5)
    args = op_arguments(q, k, v, 0.3, None, torch.rand(1, 2, 1, 12, device=DEVICE), capture, backend, regions)
    torch.library.opcheck(torch.ops.attnctl.attention.default, args)
    torch.library.opcheck(torch.ops.attnctl.logit_max.default, (q, k, backend))
