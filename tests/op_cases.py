"""Shared helpers for the op tests: input builders, capture builders, the comparison rules.

Comparison rules (every kernel result is compared with an independently computed oracle):

* fp32 inputs: ``max|got - ref_fp32| <= FP32_ATOL + FP32_RTOL * max|ref_fp32|`` (1e-5 each,
  the rtol relative to the largest magnitude of the compared tensor, so capture buffers that
  sum many probabilities, or LSEs of size ~log N, get a proportional allowance).
* fp16 / bf16 inputs (FlashAttention's rule): the reference run in the same low precision
  (``attention_reference(..., compute_dtype=dtype)``) measures what the precision alone
  costs; the kernel may be at most twice as far from the fp32 oracle, plus a small floor::

      err_kernel <= 2 * err_ref_lowprec + LOWPREC_ATOL[dtype] * max(1, max|ref_fp32|)

  The floor is 2u at magnitude 1, u the unit roundoff (fp16 2^-11, bf16 2^-8): one ulp of a
  unit-sized value, i.e. the difference that rounding the *final* result alone can make
  between two implementations that both round correctly (the reference can by chance be
  exact where the kernel is one rounding off, e.g. N = 1 where P = 1 exactly). The same rule
  applies to capture buffers, which are fp32 in both runs.
* -inf / +inf positions must agree exactly (an all -inf row has LSE -inf), NaN never appears.
"""
from __future__ import annotations

import contextlib
import dataclasses
import itertools
import math
import os
import random
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import torch

import attnctl
from attnctl import Capture, attention_reference

FP32_ATOL = 1e-5
FP32_RTOL = 1e-5
# 2u at magnitude 1 (u = unit roundoff): fp16 2 * 2^-11 = 9.8e-4, bf16 2 * 2^-8 = 7.8e-3.
LOWPREC_ATOL = {torch.float16: 2 * 2.0 ** -11, torch.bfloat16: 2 * 2.0 ** -8}

CAPTURE_KINDS = ("token_mass", "maps", "head_maps", "lse")
ALL_CAPTURES = frozenset(CAPTURE_KINDS)

ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"


# ----------------------------------------------------------------------------------------
# Triton interpreter workaround (test infrastructure, not attnctl)
# ----------------------------------------------------------------------------------------

def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def interpreter_bf16_dot_is_broken() -> bool:
    """Triton 3.9's interpreter runs tl.dot as np.matmul on the raw storage, and stores
    bf16 as uint16: a bf16 dot multiplies bit patterns as integers (results ~1e10). Probe it
    with a 16x16 product."""
    if not _interpreting():
        return False
    import triton
    import triton.language as tl

    @triton.jit
    def _dot16(A, B, C):
        o = tl.arange(0, 16)
        a = tl.load(A + o[:, None] * 16 + o[None, :])
        b = tl.load(B + o[:, None] * 16 + o[None, :])
        tl.store(C + o[:, None] * 16 + o[None, :], tl.dot(a, b))

    gen = torch.Generator().manual_seed(0)
    a = torch.randn(16, 16, generator=gen).bfloat16()
    b = torch.randn(16, 16, generator=gen).bfloat16()
    c = torch.empty(16, 16)
    _dot16[(1,)](a, b, c)
    return not torch.allclose(c, a.float() @ b.float(), atol=1e-3, rtol=1e-3)


@contextlib.contextmanager
def interpreter_bf16_dot_fixed():
    """While active, the interpreter's tl.dot widens bf16 operands to fp32 first (exact: a
    bf16 x bf16 product fits fp32), as a GPU's bf16 MMA with fp32 accumulation does. Only
    patched when the probe shows the interpreter bug; a no-op on GPU."""
    if not interpreter_bf16_dot_is_broken():
        yield False
        return
    import triton.language as tl
    from triton.runtime.interpreter import InterpreterBuilder

    original = InterpreterBuilder.create_dot

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        if a.dtype.scalar == tl.bfloat16:
            a = self.cast_impl(a, tl.float32)
        if b.dtype.scalar == tl.bfloat16:
            b = self.cast_impl(b, tl.float32)
        return original(self, a, b, d, input_precision, max_num_imprecise_acc)

    InterpreterBuilder.create_dot = create_dot
    try:
        yield True
    finally:
        InterpreterBuilder.create_dot = original


# ----------------------------------------------------------------------------------------
# Inputs
# ----------------------------------------------------------------------------------------

def randn(*shape, gen=None, dtype=torch.float32, device=DEVICE) -> torch.Tensor:
    return torch.randn(shape, generator=gen, dtype=torch.float32).to(device=device, dtype=dtype)


def make_qkv(B, H, M, N, D, Dv=None, *, dtype=torch.float32, layout="contiguous", gen=None,
             device=DEVICE) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q (B,H,M,D), k (B,H,N,D), v (B,H,N,Dv) with the requested memory layout:

    * ``contiguous``: (B,H,seq,D) row-major.
    * ``bmhd``: transposed views of (B,seq,H,D) tensors, as diffusers produces.
    * ``strided``: q a slice of a wider last dim (stride 2 on D), k a column-major view
      (B,H,D,N).transpose, v a slice along the head axis of a bigger tensor.
    """
    Dv = D if Dv is None else Dv

    def mk(*shape):
        return randn(*shape, gen=gen, device="cpu").to(device=device, dtype=dtype)

    if layout == "contiguous":
        return mk(B, H, M, D), mk(B, H, N, D), mk(B, H, N, Dv)
    if layout == "bmhd":
        return (mk(B, M, H, D).transpose(1, 2), mk(B, N, H, D).transpose(1, 2),
                mk(B, N, H, Dv).transpose(1, 2))
    if layout == "strided":
        q = mk(B, H, M, 2 * D)[..., ::2]
        k = mk(B, H, D, N).transpose(-1, -2)
        v = mk(B, H + 1, N, Dv)[:, 1:]
        return q, k, v
    raise ValueError(layout)


def shape_of_form(form: str, B, H, M, N) -> Tuple[int, ...]:
    """Shapes that broadcast to (B, H, M, N), by name (see BROADCAST_FORMS)."""
    table = {
        "bhmn": (B, H, M, N), "1hmn": (1, H, M, N), "b1mn": (B, 1, M, N), "bh1n": (B, H, 1, N),
        "bhm1": (B, H, M, 1), "11mn": (1, 1, M, N), "111n": (1, 1, 1, N), "b11n": (B, 1, 1, N),
        "1h1n": (1, H, 1, N), "11m1": (1, 1, M, 1), "1111": (1, 1, 1, 1),
        "hmn": (H, M, N), "mn": (M, N), "n": (N,), "m1": (M, 1), "one": (1,), "scalar": (),
    }
    return table[form]


# Named forms, plus two layout forms: "expanded" is a stride-0 expand() of a (1,1,1,N)
# tensor to the full shape; "transposed" is a (B,H,N,M) tensor viewed as (B,H,M,N).
BROADCAST_FORMS = ("bhmn", "1hmn", "b1mn", "bh1n", "bhm1", "11mn", "111n", "b11n", "1h1n",
                   "11m1", "1111", "hmn", "mn", "n", "m1", "one", "scalar", "expanded",
                   "transposed")


def make_operand(form: str, B, H, M, N, *, kind="bias", gen=None, dtype=torch.float32,
                 device=DEVICE) -> torch.Tensor:
    """A bias (kind="bias": N(0,1) logits), prob_mult (kind="mult": U[0,2)) or signed
    prob_mult (kind="signed": N(0,1), about half negative) in the given broadcast form."""
    def values(*shape):
        if kind == "mult":
            t = 2 * torch.rand(shape, generator=gen)
        else:
            t = torch.randn(shape, generator=gen)
        return t.to(device=device, dtype=dtype)

    if form == "expanded":
        return values(1, 1, 1, N).expand(B, H, M, N)
    if form == "transposed":
        return values(B, H, N, M).transpose(-1, -2)
    return values(*shape_of_form(form, B, H, M, N))


def mask_bias(bias: torch.Tensor, *, gen=None, frac=0.3, rows=()) -> torch.Tensor:
    """-inf at a random fraction of entries, and at every key of the given query rows
    (bias must have the full (B,H,M,N) shape for ``rows``)."""
    bias = bias.clone()
    drop = torch.rand(bias.shape, generator=gen) < frac
    bias[drop.to(bias.device)] = float("-inf")
    for row in rows:
        bias[..., row, :] = float("-inf")
    return bias


def make_tokens(form: str, B: int, N: int, T: int, *, gen=None, dtype=torch.int32,
                device=DEVICE) -> torch.Tensor:
    """Token indices in [0, N): form "1d" -> (T,), "2d" -> (B, T) (different per item).
    Always includes N-1 (the last key) and, when T > 1, key 0; repeats allowed when T > N."""
    def row():
        base = torch.randint(0, N, (T,), generator=gen)
        base[0] = N - 1
        if T > 1:
            base[-1] = 0
        return base

    t = row() if form == "1d" else torch.stack([row() for _ in range(B)])
    return t.to(device=device, dtype=dtype)


def make_head_weights(form, B, H, *, gen=None, device=DEVICE) -> Optional[torch.Tensor]:
    if form is None:
        return None
    shape = (H,) if form == "h" else (B, H)
    # Signed weights: maps must weight, not just sum.
    return torch.randn(*shape, generator=gen).to(device)


def make_capture(q, k, kinds: Iterable[str], *, tokens=None, head_weights=None,
                 prefill=False, gen=None) -> Capture:
    """A Capture with the requested buffers; ``prefill`` puts random values in them so that
    a test sees the kernel *adds* (lse prefill stays finite)."""
    kinds = set(kinds)
    wants_cols = bool(kinds & {"maps", "head_maps"})
    cap = Capture.zeros(
        q, k,
        token_mass="token_mass" in kinds, maps="maps" in kinds,
        head_maps="head_maps" in kinds, lse="lse" in kinds,
        tokens=tokens if wants_cols else None,
        head_weights=head_weights if "maps" in kinds else None,
    )
    if wants_cols and isinstance(tokens, torch.Tensor):
        cap.tokens = tokens  # keep the caller's dtype (int64 is legal too)
    if prefill:
        for buf in cap.buffers().values():
            buf.copy_(torch.rand(buf.shape, generator=gen).to(buf.device))
    return cap


def clone_capture(cap: Optional[Capture]) -> Optional[Capture]:
    if cap is None:
        return None
    out = Capture(**{n: (getattr(cap, n).clone() if getattr(cap, n) is not None else None)
                     for n in CAPTURE_KINDS},
                  tokens=cap.tokens, head_weights=cap.head_weights, rows=cap.rows)
    return out


# ----------------------------------------------------------------------------------------
# Comparisons
# ----------------------------------------------------------------------------------------

def _max_abs(t: torch.Tensor) -> float:
    return float(t.abs().max()) if t.numel() else 0.0


def compare(name: str, got: torch.Tensor, ref32: torch.Tensor,
            ref_low: Optional[torch.Tensor] = None, dtype: torch.dtype = torch.float32) -> None:
    """Assert ``got`` matches the fp32 oracle by the rule for ``dtype`` (module docstring)."""
    assert got.shape == ref32.shape, f"{name}: shape {tuple(got.shape)} != {tuple(ref32.shape)}"
    got = got.detach().double().cpu()
    ref = ref32.detach().double().cpu()
    assert not torch.isnan(got).any(), f"{name}: NaN at {torch.isnan(got).nonzero()[:5].tolist()}"
    assert not torch.isnan(ref).any(), f"{name}: the oracle has NaN (test bug)"
    inf_got, inf_ref = torch.isinf(got), torch.isinf(ref)
    bad = (inf_got != inf_ref) | (inf_ref & (got != ref))
    assert not bad.any(), (f"{name}: infinities differ at {bad.nonzero()[:5].tolist()}: "
                           f"got {got[bad][:5].tolist()}, expected {ref[bad][:5].tolist()}")
    fin = ~inf_ref
    err = _max_abs((got - ref)[fin])
    scale = _max_abs(ref[fin])
    if dtype == torch.float32:
        tol = FP32_ATOL + FP32_RTOL * scale
        assert err <= tol, f"{name}: max|err| {err:.3g} > {tol:.3g} (fp32, max|ref| {scale:.3g})"
        return
    assert ref_low is not None, f"{name}: a low-precision comparison needs the low-precision reference"
    low = ref_low.detach().double().cpu()
    err_ref = _max_abs((low - ref)[fin & torch.isfinite(low)])
    tol = 2 * err_ref + LOWPREC_ATOL[dtype] * max(1.0, scale)
    assert err <= tol, (f"{name}: max|err| {err:.3g} > 2*{err_ref:.3g} (the {dtype} reference's "
                        f"error) + {LOWPREC_ATOL[dtype]:.3g}*max(1, {scale:.3g}) = {tol:.3g}")


def run_and_compare(q, k, v, *, scale=None, bias=None, prob_mult=None, capture=None,
                    backend="triton", calls: int = 1, extra_inputs: Sequence = ()) -> torch.Tensor:
    """Run ``attnctl.attention`` on ``backend`` and the fp32 reference (plus, for fp16/bf16,
    the same-precision reference) on copies of ``capture``; compare output and buffers.

    ``calls`` > 1 accumulates over several calls; ``extra_inputs`` gives the (q, k, v) of
    calls after the first (default: the same inputs again). Returns the last output.
    """
    dtype = q.dtype
    s = scale if scale is not None else 1.0 / math.sqrt(q.shape[-1])
    lowprec = dtype != torch.float32
    cap32 = clone_capture(capture)
    caplow = clone_capture(capture) if lowprec else None
    inputs = [(q, k, v)] + list(extra_inputs)
    inputs += [(q, k, v)] * (calls - len(inputs))
    for i, (qi, ki, vi) in enumerate(inputs):
        out = attnctl.attention(qi, ki, vi, scale=scale, bias=bias, prob_mult=prob_mult,
                                capture=capture, backend=backend)
        assert attnctl.last_dispatch().backend == backend
        ref = attention_reference(qi, ki, vi, scale=s, bias=bias, prob_mult=prob_mult, capture=cap32)
        low = None
        if lowprec:
            low = attention_reference(qi, ki, vi, scale=s, bias=bias, prob_mult=prob_mult,
                                      capture=caplow, compute_dtype=dtype)
        assert out.dtype == dtype, f"output dtype {out.dtype}, inputs {dtype}"
        assert out.shape == (qi.shape[0], qi.shape[1], qi.shape[2], vi.shape[3])
        compare(f"output (call {i + 1})", out, ref, low, dtype)
    if capture is not None:
        for name in CAPTURE_KINDS:
            buf = getattr(capture, name)
            if buf is None:
                continue
            compare(f"capture.{name}", buf, getattr(cap32, name),
                    getattr(caplow, name) if lowprec else None, dtype)
    return out


# ----------------------------------------------------------------------------------------
# A case description, for parametrised and pairwise tests
# ----------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Case:
    B: int = 2
    H: int = 2
    M: int = 33
    N: int = 77
    D: int = 16
    Dv: Optional[int] = None
    dtype: torch.dtype = torch.float32
    layout: str = "contiguous"
    bias: Optional[str] = None        # a BROADCAST_FORMS name, "masked" (full with -inf), or None
    prob_mult: Optional[str] = None   # a BROADCAST_FORMS name, "signed:<form>", or None
    captures: frozenset = frozenset()
    tokens: str = "1d"
    T: int = 5
    head_weights: Optional[str] = None  # None, "h", "bh"
    calls: int = 1                    # 2: accumulate a second call (different inputs)
    prefill: bool = False
    scale: Optional[float] = None
    seed: int = 0

    def id(self) -> str:
        dt = {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16"}[self.dtype]
        caps = "+".join(sorted(c.replace("token_mass", "tm").replace("head_maps", "hm")
                               for c in self.captures)) or "nocap"
        parts = [f"B{self.B}H{self.H}M{self.M}N{self.N}D{self.D}" + (f"Dv{self.Dv}" if self.Dv else ""),
                 dt, self.layout, f"bias-{self.bias}", f"pm-{self.prob_mult}", caps]
        if self.captures & {"maps", "head_maps"}:
            parts.append(f"tok{self.tokens}T{self.T}")
        if self.head_weights and "maps" in self.captures:
            parts.append(f"w{self.head_weights}")
        if self.calls > 1:
            parts.append(f"x{self.calls}")
        if self.prefill:
            parts.append("prefill")
        return "-".join(parts)


def build(case: Case, device=DEVICE) -> dict:
    gen = torch.Generator().manual_seed(case.seed)
    B, H, M, N = case.B, case.H, case.M, case.N
    q, k, v = make_qkv(B, H, M, N, case.D, case.Dv, dtype=case.dtype, layout=case.layout, gen=gen,
                       device=device)
    bias = None
    if case.bias == "masked":
        rows = sorted({0, M // 2, M - 1}) if M > 2 else [0]
        bias = mask_bias(make_operand("bhmn", B, H, M, N, gen=gen, device=device), gen=gen, rows=rows)
    elif case.bias is not None:
        bias = make_operand(case.bias, B, H, M, N, kind="bias", gen=gen, device=device)
    pm = None
    if case.prob_mult is not None:
        signed = case.prob_mult.startswith("signed:")
        form = case.prob_mult.split(":")[-1]
        pm = make_operand(form, B, H, M, N, kind="signed" if signed else "mult", gen=gen, device=device)
    capture = None
    if case.captures:
        tokens = make_tokens(case.tokens, B, N, case.T, gen=gen, device=device)
        hw = make_head_weights(case.head_weights, B, H, gen=gen, device=device)
        capture = make_capture(q, k, case.captures, tokens=tokens, head_weights=hw,
                               prefill=case.prefill, gen=gen)
    extra = []
    for _ in range(case.calls - 1):
        extra.append(make_qkv(B, H, M, N, case.D, case.Dv, dtype=case.dtype, layout=case.layout,
                              gen=gen, device=device))
    return dict(q=q, k=k, v=v, bias=bias, prob_mult=pm, capture=capture, extra_inputs=extra,
                scale=case.scale)


def check_case(case: Case, backend="triton", device=DEVICE) -> torch.Tensor:
    a = build(case, device)
    return run_and_compare(a["q"], a["k"], a["v"], scale=a["scale"], bias=a["bias"],
                           prob_mult=a["prob_mult"], capture=a["capture"], backend=backend,
                           calls=case.calls, extra_inputs=a["extra_inputs"])


# ----------------------------------------------------------------------------------------
# Pairwise (all-pairs) covering array, deterministic
# ----------------------------------------------------------------------------------------

def pairwise(factors: Dict[str, Sequence], seed: int = 0, candidates: int = 40) -> List[dict]:
    """Rows such that every pair of levels of every two factors occurs in some row.

    Greedy (AETG-style): each new row is the best of ``candidates`` random rows, each built
    level by level to cover the most still-uncovered pairs. Deterministic for a seed."""
    rng = random.Random(seed)
    names = list(factors)
    uncovered = set()
    for (i, a), (j, b) in itertools.combinations(enumerate(names), 2):
        for x in range(len(factors[a])):
            for y in range(len(factors[b])):
                uncovered.add((i, x, j, y))
    rows = []
    while uncovered:
        best, best_gain = None, -1
        for _ in range(candidates):
            order = list(range(len(names)))
            rng.shuffle(order)
            row = {}
            for i in order:
                levels = list(range(len(factors[names[i]])))
                rng.shuffle(levels)

                def gain(x):
                    g = 0
                    for j, y in row.items():
                        key = (i, x, j, y) if i < j else (j, y, i, x)
                        g += key in uncovered
                    return g
                row[i] = max(levels, key=gain)
            g = sum(((i, row[i], j, row[j]) in uncovered)
                    for i, j in itertools.combinations(range(len(names)), 2))
            if g > best_gain:
                best, best_gain = row, g
        for i, j in itertools.combinations(range(len(names)), 2):
            uncovered.discard((i, best[i], j, best[j]))
        rows.append({names[i]: factors[names[i]][best[i]] for i in range(len(names))})
    return rows


def independent_attention(q, k, v, *, scale, bias=None, prob_mult=None, tokens=None,
                          head_weights=None):
    """The contract written out with explicit loops over (b, h, m), in float64, using
    torch.softmax on rows with a finite logit and the definition (P = 0, LSE = -inf) on rows
    of all -inf. Independent of attnctl.reference. Returns (out, token_mass, maps,
    head_maps, lse); maps/head_maps are None without tokens."""
    B, H, M, _ = q.shape
    N, Dv = k.shape[2], v.shape[3]
    q64, k64, v64 = (t.detach().double().cpu() for t in (q, k, v))
    full = (B, H, M, N)
    bias64 = (bias.double().cpu().expand(full) if bias is not None else torch.zeros(full, dtype=torch.float64))
    f64 = (prob_mult.double().cpu().expand(full) if prob_mult is not None else torch.ones(full, dtype=torch.float64))
    out = torch.zeros(B, H, M, Dv, dtype=torch.float64)
    P = torch.zeros(full, dtype=torch.float64)
    lse = torch.zeros(B, H, M, dtype=torch.float64)
    for b in range(B):
        for h in range(H):
            for m in range(M):
                s = torch.stack([scale * torch.dot(q64[b, h, m], k64[b, h, n]) for n in range(N)])
                s = s + bias64[b, h, m]
                if torch.isneginf(s).all():
                    lse[b, h, m] = float("-inf")
                    continue  # P = 0, output 0
                p = torch.softmax(s, dim=0)
                P[b, h, m] = p
                lse[b, h, m] = torch.logsumexp(s, dim=0)
                for n in range(N):
                    out[b, h, m] += p[n] * f64[b, h, m, n] * v64[b, h, n]
    token_mass = P.sum(dim=2)
    maps = head_maps = None
    if tokens is not None:
        tok = tokens.long().cpu()
        tok = tok.expand(B, tok.shape[-1]) if tok.dim() == 1 else tok
        T = tok.shape[1]
        head_maps = torch.zeros(B, H, M, T, dtype=torch.float64)
        for b in range(B):
            for t in range(T):
                head_maps[b, :, :, t] = P[b, :, :, tok[b, t]]
        w = (torch.ones(B, H, dtype=torch.float64) if head_weights is None
             else head_weights.double().cpu().expand(B, H))
        maps = torch.zeros(B, M, T, dtype=torch.float64)
        for b in range(B):
            for h in range(H):
                maps[b] += w[b, h] * head_maps[b, h]
    return out, token_mass, maps, head_maps, lse
