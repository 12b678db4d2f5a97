"""Argument checks for attnctl.attention, run before any kernel launch.

Every error names the argument, what was expected and what was received.
"""
from __future__ import annotations

import math
import weakref
from typing import Optional, Sequence

import torch

from .capture import Capture
from .injection import OwnTerm
from .regions import MAX_MASK_LABELS, Regions

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 256


def _shape(t: torch.Tensor) -> tuple:
    return tuple(t.shape)


def check_qkv(q, k, v) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{name}: expected dtype float16, bfloat16 or float32, got {t.dtype}")
        if t.dim() != 4:
            raise ValueError(f"{name}: expected 4 dims (B, H, seq, head_dim), got shape {_shape(t)}")
        if 0 in t.shape:
            raise ValueError(f"{name}: every dim must be >= 1, got shape {_shape(t)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v: expected one dtype, got q {q.dtype}, k {k.dtype}, v {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v: expected one device, got q {q.device}, k {k.device}, v {v.device}")
    (B, H, M, D), (Bk, Hk, N, Dk), (Bv, Hv, Nv, Dv) = q.shape, k.shape, v.shape
    if not (B == Bk == Bv):
        raise ValueError(f"batch (dim 0): expected q, k, v to agree, got q {B}, k {Bk}, v {Bv}")
    if not (H == Hk == Hv):
        raise ValueError(f"heads (dim 1): expected q, k, v to agree, got q {H}, k {Hk}, v {Hv}")
    if N != Nv:
        raise ValueError(f"v: expected {N} keys (dim 2) like k {_shape(k)}, got v {_shape(v)}")
    if D != Dk:
        raise ValueError(f"k: expected head_dim {D} (dim 3) like q {_shape(q)}, got k {_shape(k)}")
    for name, d in (("q/k head_dim", D), ("v head_dim", Dv)):
        if d % 8 != 0 or d > MAX_HEAD_DIM:
            raise ValueError(f"{name}: expected a multiple of 8 up to {MAX_HEAD_DIM}, got {d}")


def resolve_scale(scale, head_dim: int) -> float:
    if scale is None:
        return 1.0 / math.sqrt(head_dim)
    if isinstance(scale, torch.Tensor):
        if scale.numel() != 1:
            raise ValueError(f"scale: expected a number, got a tensor of shape {_shape(scale)}")
        scale = scale.item()
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale: expected a float, got {type(scale).__name__}")
    if not math.isfinite(scale):
        raise ValueError(f"scale: expected a finite number, got {scale}")
    return float(scale)


def check_broadcastable(name: str, t, target: Sequence[int], device: torch.device) -> None:
    """``t`` must broadcast to ``target`` (B, H, M, N) without being expanded."""
    if t is None:
        return
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor or None, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name}: expected dtype float16, bfloat16 or float32, got {t.dtype}")
    if t.device != device:
        raise ValueError(f"{name}: expected device {device} (that of q), got {t.device}")
    shape = _shape(t)
    ok = len(shape) <= 4 and all(s in (1, g) for s, g in zip(reversed(shape), reversed(target)))
    if not ok:
        raise ValueError(
            f"{name}: expected a shape broadcastable to (B, H, M, N) = {tuple(target)}, got {shape}"
        )


def check_bias_values(bias) -> None:
    """``bias`` may hold -inf (a masked key) but never +inf or NaN: a +inf logit has no
    softmax (inf - inf), so outputs, maps and LSE would all be NaN.

    Reading the values syncs the device, so each (tensor, version) is checked once:
    controllers that keep one bias tensor across calls pay for it once.
    """
    if bias is None or any(t is bias and ver == bias._version for t, ver in _checked_biases):
        return
    bad = torch.isposinf(bias) | torch.isnan(bias)
    if bool(bad.any()):
        where = tuple(int(i) for i in bad.nonzero()[0])
        kinds = " and ".join(name for name, hit in (("+inf", bool(torch.isposinf(bias).any())),
                                                   ("NaN", bool(torch.isnan(bias).any()))) if hit)
        raise ValueError(f"bias: expected finite values or -inf (a masked key), got {kinds} "
                         f"({int(bad.sum())} entries, first at index {where} of shape {_shape(bias)})")
    _checked_biases[:] = _checked_biases[-15:] + [(bias, bias._version)]


_checked_biases: list = []


def check_factor_values(name: str, factor) -> None:
    """A post-softmax factor (``prob_mult``, ``own.prob_mult``) must be finite: NaN or ±inf
    would turn the output rows it touches into NaN or inf, with no error.

    Reading the values syncs the device, so each (tensor, version) is checked once, the
    tensor remembered by identity for as long as it lives (not by a bounded list): the
    controllers' factors, built once per layer shape (or per layer) and reused at every
    step, cost one sync each per generation, not one per call. A factor made anew on every
    call (several controllers' prob_mult multiplied by compose) is checked on each call.
    """
    if factor is None:
        return
    entry = _checked_factors.get(id(factor))
    if entry is not None and entry[0]() is factor and entry[1] == factor._version:
        return
    bad = ~torch.isfinite(factor)
    if bool(bad.any()):
        kinds = " and ".join(kind for kind, hit in (("NaN", bool(torch.isnan(factor).any())),
                                                   ("inf", bool(torch.isinf(factor).any()))) if hit)
        where = tuple(int(i) for i in bad.nonzero()[0])
        raise ValueError(f"{name}: expected finite values, got {kinds} ({int(bad.sum())} entries, first at index "
                         f"{where} of shape {_shape(factor)})")
    key = id(factor)
    _checked_factors[key] = (weakref.ref(factor, lambda _, key=key: _checked_factors.pop(key, None)),
                             factor._version)


_checked_factors: dict = {}   # id -> (weak reference, version checked)


def check_capture(capture, B: int, H: int, M: int, N: int, device: torch.device,
                  check_token_values: bool, dtype: Optional[torch.dtype] = None,
                  head_dim: Optional[int] = None, name: str = "capture") -> None:
    """``name``: how errors call the argument ("capture", or "own.capture")."""
    if capture is None:
        return
    if not isinstance(capture, Capture):
        raise TypeError(f"{name}: expected attnctl.Capture or None, got {type(capture).__name__}")
    _check_rows(capture.rows, B, name)
    expected = {"token_mass": (B, H, N), "lse": (B, H, M)}
    if capture.wants_probes:
        expected["probe_mass"] = _check_probe_keys(capture, B, H, device, dtype, head_dim)
    if capture.wants_token_columns:
        tokens = capture.tokens
        if tokens is None:
            raise ValueError(f"{name}.tokens: maps and head_maps need token indices, got None")
        _check_tokens(tokens, B, N, device, capture if check_token_values else None, name)
        T = tokens.shape[-1]
        expected["maps"] = (B, M, T)
        expected["head_maps"] = (B, H, M, T)
    for field_name, buf in capture.buffers().items():
        if not isinstance(buf, torch.Tensor):
            raise TypeError(f"{name}.{field_name}: expected a torch.Tensor, got {type(buf).__name__}")
        if buf.dtype != torch.float32:
            raise TypeError(f"{name}.{field_name}: expected dtype float32, got {buf.dtype}")
        if buf.device != device:
            raise ValueError(f"{name}.{field_name}: expected device {device} (that of q), got {buf.device}")
        if _shape(buf) != expected[field_name]:
            raise ValueError(f"{name}.{field_name}: expected shape {expected[field_name]}, got {_shape(buf)}")
    w = capture.head_weights
    if w is not None:
        if capture.maps is None:
            raise ValueError(f"{name}.head_weights: given without {name}.maps, which is what they weight")
        if not isinstance(w, torch.Tensor) or w.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{name}.head_weights: expected a float tensor, got {getattr(w, 'dtype', type(w).__name__)}")
        if w.device != device:
            raise ValueError(f"{name}.head_weights: expected device {device} (that of q), got {w.device}")
        if _shape(w) not in ((H,), (B, H)):
            raise ValueError(f"{name}.head_weights: expected shape ({H},) or ({B}, {H}), got {_shape(w)}")


def _check_rows(rows, B: int, name: str) -> None:
    """``rows``: None or a non-empty range of batch items in [0, B) with step 1."""
    if rows is None:
        return
    if not isinstance(rows, range):
        raise TypeError(f"{name}.rows: expected a range of batch items (e.g. range({B // 2}, {B})) or None, "
                        f"got {type(rows).__name__}")
    if rows.step != 1 or not 0 <= rows.start < rows.stop <= B:
        raise ValueError(f"{name}.rows: expected a non-empty range with step 1 inside [0, {B}) (B = batch), "
                         f"got {rows}")


def _check_probe_keys(capture: Capture, B: int, H: int, device: torch.device,
                      dtype: Optional[torch.dtype], head_dim: Optional[int]) -> tuple:
    """Check capture.probe_keys; return the shape capture.probe_mass must have."""
    keys = capture.probe_keys
    if keys is None:
        raise ValueError("capture.probe_mass: given without capture.probe_keys, the key set it sums over")
    if not isinstance(keys, torch.Tensor):
        raise TypeError(f"capture.probe_keys: expected a torch.Tensor, got {type(keys).__name__}")
    if keys.dim() != 4:
        raise ValueError(f"capture.probe_keys: expected 4 dims (B or 1, H, C, D), got shape {_shape(keys)}")
    if keys.shape[0] not in (1, B) or keys.shape[1] != H or keys.shape[2] < 1 or (
            head_dim is not None and keys.shape[3] != head_dim):
        D = head_dim if head_dim is not None else "D"
        raise ValueError(f"capture.probe_keys: expected shape (1 or {B}, {H}, C >= 1, {D}), got {_shape(keys)}")
    if dtype is not None and keys.dtype != dtype:
        raise TypeError(f"capture.probe_keys: expected dtype {dtype} (that of q), got {keys.dtype}")
    if keys.device != device:
        raise ValueError(f"capture.probe_keys: expected device {device} (that of q), got {keys.device}")
    if capture.probe_mass is None:
        raise ValueError("capture.probe_mass: capture.probe_keys needs a (B, H, C) float32 buffer to add "
                         "into, got None (Capture.zeros(q, k, probe_keys=...) allocates it)")
    return (B, H, keys.shape[2])


def _check_index_tensor(name: str, t, device: torch.device, what: str) -> None:
    """An int32/int64 tensor on q's device (token columns, region labels, sources)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected {what}, got {type(t).__name__}")
    if t.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{name}: expected dtype int32 or int64, got {t.dtype}")
    if t.device != device:
        raise ValueError(f"{name}: expected device {device} (that of q), got {t.device}")


def check_regions(regions, B: int, M: int, N: int, device: torch.device, check_values: bool = True) -> None:
    if regions is None:
        return
    if not isinstance(regions, Regions):
        raise TypeError(f"regions: expected attnctl.Regions or None, got {type(regions).__name__}")
    for name, t, length, what in (("regions.labels_q", regions.labels_q, M, "M"),
                                  ("regions.labels_k", regions.labels_k, N, "N")):
        _check_index_tensor(name, t, device, "an integer torch.Tensor")
        if t.dim() != 2 or t.shape[0] not in (1, B) or t.shape[1] != length:
            raise ValueError(f"{name}: expected shape (1 or {B}, {what} = {length}), got {_shape(t)}")
    s = regions.strength
    if isinstance(s, torch.Tensor) and s.numel() == 1:
        s = s.item()
    if isinstance(s, bool) or not isinstance(s, (int, float)) or not math.isfinite(s):
        raise ValueError(f"regions.strength: expected a finite number, got {s!r}")
    if regions.allowed is not None:
        _check_region_mask(regions, device, check_values)


def _check_region_mask(regions: Regions, device: torch.device, check_values: bool) -> None:
    """Mask mode: ``allowed`` a (Rq, Rk) bool tensor, Rk <= MAX_MASK_LABELS, labels below
    Rq (queries) and Rk (keys); no strength."""
    allowed = regions.allowed
    if not isinstance(allowed, torch.Tensor):
        raise TypeError(f"regions.allowed: expected a bool torch.Tensor or None, got {type(allowed).__name__}")
    if allowed.dtype != torch.bool:
        raise TypeError(f"regions.allowed: expected dtype torch.bool, got {allowed.dtype}")
    if allowed.dim() != 2 or 0 in allowed.shape or allowed.shape[1] > MAX_MASK_LABELS:
        raise ValueError(f"regions.allowed: expected shape (query labels >= 1, key labels in [1, "
                         f"{MAX_MASK_LABELS}]), got {_shape(allowed)}")
    if allowed.device != device:
        raise ValueError(f"regions.allowed: expected device {device} (that of q), got {allowed.device}")
    if float(regions.strength) != 1.0:
        raise ValueError(f"regions.strength: a mask (regions.allowed given) has no strength; expected 1.0, "
                         f"got {regions.strength!r}")
    # The label range check syncs the device: once per (labels, version).
    versions = (regions.labels_q._version, regions.labels_k._version, allowed._version)
    if not check_values or any(r is regions and v == versions for r, v in _checked_masks):
        return
    for name, labels, count, side in (("regions.labels_q", regions.labels_q, allowed.shape[0], "rows"),
                                      ("regions.labels_k", regions.labels_k, allowed.shape[1], "columns")):
        hi = int(labels.max())
        if hi >= count:
            raise ValueError(f"{name}: expected labels below {count} (regions.allowed has {count} {side}) or "
                             f"negative (unlabelled), got {hi}")
    _checked_masks[:] = _checked_masks[-15:] + [(regions, versions)]


_checked_masks: list = []


def check_region_mask_use(regions, source) -> None:
    """What a region mask is not combined with (yet): injection, whose logits come from
    another item."""
    if regions is None or regions.allowed is None:
        return
    if source is not None:
        raise ValueError("regions: a mask (regions.allowed) cannot be combined with source= (injection): the "
                         "injected logits are another item's; use scale-mode regions or no injection")


def _check_tokens(tokens, B: int, N: int, device: torch.device, memo: Optional[Capture],
                  name: str = "capture") -> None:
    _check_index_tensor(f"{name}.tokens", tokens, device, "a tensor (use Capture.zeros to build one)")
    if tokens.dim() not in (1, 2) or tokens.shape[-1] == 0 or (tokens.dim() == 2 and tokens.shape[0] != B):
        raise ValueError(f"{name}.tokens: expected a non-empty shape (T,) or ({B}, T), got {_shape(tokens)}")
    if memo is None:
        return
    # The memo holds the tensor itself: an id() could be reused by a new tensor.
    if any(t is tokens and version == tokens._version and n == N
           for t, version, n in memo._checked_tokens):
        return
    lo, hi = int(tokens.min()), int(tokens.max())
    if lo < 0 or hi >= N:
        raise ValueError(f"{name}.tokens: expected indices in [0, {N}) (N = number of keys), got range [{lo}, {hi}]")
    memo._checked_tokens = memo._checked_tokens[-7:] + [(tokens, tokens._version, N)]


def check_source(source, B: int, device: torch.device, check_values: bool = True) -> None:
    """``source``: (B,) int32/int64 batch indices in [0, B) (injection)."""
    if source is None:
        return
    _check_index_tensor("source", source, device, f"an integer torch.Tensor of shape ({B},) or None")
    if source.dim() != 1 or source.shape[0] != B:
        raise ValueError(f"source: expected shape ({B},) (one source item per batch item), got {_shape(source)}")
    # The range check syncs the device: done once per (tensor, version), as controllers
    # reuse one source tensor across calls.
    if check_values and not any(t is source and ver == source._version and b == B for t, ver, b in _checked_sources):
        lo, hi = int(source.min()), int(source.max())
        if lo < 0 or hi >= B:
            raise ValueError(f"source: expected batch indices in [0, {B}), got range [{lo}, {hi}]")
        _checked_sources[:] = _checked_sources[-15:] + [(source, source._version, B)]


_checked_sources: list = []


def check_own(own, q, k, v, source, check_token_values: bool = True) -> None:
    """``own``: the two-source form's second term (needs ``source``)."""
    if own is None:
        return
    if not isinstance(own, OwnTerm):
        raise TypeError(f"own: expected attnctl.OwnTerm or None, got {type(own).__name__}")
    if source is None:
        raise ValueError("own: the two-source form needs source= (the item whose logits give the first term); "
                         "without injection both terms would share one P")
    values = own.values
    if not isinstance(values, torch.Tensor):
        raise TypeError(f"own.values: expected a torch.Tensor, got {type(values).__name__}")
    if values.dtype != v.dtype:
        raise TypeError(f"own.values: expected dtype {v.dtype} (that of v), got {values.dtype}")
    if values.device != v.device:
        raise ValueError(f"own.values: expected device {v.device} (that of v), got {values.device}")
    if values.shape != v.shape:
        raise ValueError(f"own.values: expected shape {_shape(v)} (that of v), got {_shape(values)}")
    B, H, M, D = q.shape
    N = k.shape[2]
    check_broadcastable("own.prob_mult", own.prob_mult, (B, H, M, N), q.device)
    if check_token_values:
        check_factor_values("own.prob_mult", own.prob_mult)
    if own.capture is not None and isinstance(own.capture, Capture) and own.capture.wants_probes:
        raise ValueError("own.capture: probe keys are not captured from the own term; put them in capture")
    check_capture(own.capture, B, H, M, N, q.device, check_token_values, dtype=q.dtype, head_dim=D,
                  name="own.capture")


def values_readable(q: torch.Tensor) -> bool:
    """Whether the checks that read values (token and source index ranges, bias +inf/NaN)
    can run on this call: not while torch.compile traces it (the values do not exist yet)
    and not on meta tensors (they have none: the op runs there on shapes alone, through
    its registered fake implementations, as saved-tensor memory accounting does). The
    shape, dtype and device checks run either way."""
    return not torch.compiler.is_compiling() and q.device.type != "meta"


def validate(q, k, v, scale, bias, prob_mult, capture, check_token_values: bool = True,
             regions=None, source=None, own=None) -> float:
    """Check every argument; return the resolved softmax scale."""
    check_qkv(q, k, v)
    B, H, M, D = q.shape
    N = k.shape[2]
    scale = resolve_scale(scale, D)
    check_broadcastable("bias", bias, (B, H, M, N), q.device)
    if check_token_values:
        check_bias_values(bias)
    check_broadcastable("prob_mult", prob_mult, (B, H, M, N), q.device)
    if check_token_values:
        check_factor_values("prob_mult", prob_mult)
    check_capture(capture, B, H, M, N, q.device, check_token_values, dtype=q.dtype, head_dim=D)
    check_regions(regions, B, M, N, q.device, check_token_values)
    check_region_mask_use(regions, source)
    check_source(source, B, q.device, check_token_values)
    check_own(own, q, k, v, source, check_token_values)
    return scale


def validate_logit_max(q, k) -> None:
    """Arguments of attnctl.logit_max: q (B, H, M, D), k (B, H, N, D), one float dtype."""
    for name, t in (("q", q), ("k", k)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{name}: expected dtype float16, bfloat16 or float32, got {t.dtype}")
        if t.dim() != 4 or 0 in t.shape:
            raise ValueError(f"{name}: expected 4 non-empty dims (B, H, seq, head_dim), got shape {_shape(t)}")
    if q.dtype != k.dtype:
        raise TypeError(f"q, k: expected one dtype, got q {q.dtype}, k {k.dtype}")
    if q.device != k.device:
        raise ValueError(f"q, k: expected one device, got q {q.device}, k {k.device}")
    if q.shape[:2] != k.shape[:2] or q.shape[3] != k.shape[3]:
        raise ValueError(f"k: expected (B, H, N, D) = ({q.shape[0]}, {q.shape[1]}, N, {q.shape[3]}) "
                         f"like q {_shape(q)}, got {_shape(k)}")
    D = q.shape[3]
    if D % 8 != 0 or D > MAX_HEAD_DIM:
        raise ValueError(f"q/k head_dim: expected a multiple of 8 up to {MAX_HEAD_DIM}, got {D}")
