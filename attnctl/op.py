"""attnctl.attention: validate, choose a backend, run.

Backend policy for ``backend="auto"`` (the ``ATTNCTL_BACKEND`` environment variable, when
set, replaces "auto" by a fixed backend for every call):

* no bias, no prob_mult, no capture -> ``"sdpa"`` (torch.nn.functional.scaled_dot_product_
  attention). For plain attention torch's FlashAttention/cuDNN kernels are the tuned path
  and attnctl has nothing to add; the fused kernel is used where it does work SDPA cannot.
* CUDA tensors -> ``"triton"``; if Triton cannot be imported -> ``"torch"`` with a warning.
  Inputs that require grad run the differentiable Triton path (attnctl.autograd: the
  forward saves the row LSE, a Triton backward recomputes P per tile) unless the call has
  something that path does not differentiate (captures, a prob_mult requiring grad): then
  ``"torch"`` with a warning. The CUDA C++ backend (``"cuda"``, no backward)
  is chosen only explicitly until GPU benchmarks show where it is faster.
* CPU tensors -> ``"torch"``, the reference.

``last_dispatch()`` tells which backend ran last and why; the ``attnctl`` logger prints
the same at DEBUG level.
"""
from __future__ import annotations

import logging
import os
from typing import List, NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F

from .autograd import differentiable_output
from .backends._layout import empty_output
from .capture import BUFFER_FIELDS, Capture
from .injection import OwnTerm
from .reference import attention_reference, logit_max_reference
from .regions import Regions
from .validation import (check_bias_values, check_capture, check_own, check_regions, check_source, validate,
                         validate_logit_max, values_readable)

logger = logging.getLogger("attnctl")

BACKENDS = ("auto", "torch", "triton", "cuda", "sdpa")
ENV_BACKEND = "ATTNCTL_BACKEND"


class Dispatch(NamedTuple):
    backend: str
    reason: str
    slow_fallback: bool = False  # a faster backend was wanted but could not run


_last_dispatch = Dispatch("none", "no attention call yet")
_triton_import_error: Optional[str] = None
_warned: set = set()


def last_dispatch() -> Dispatch:
    """The backend the most recent attnctl.attention call ran on, and why."""
    return _last_dispatch


def _triton_available() -> Optional[str]:
    """None if the Triton backend can be imported, else the reason it cannot."""
    global _triton_import_error
    if _triton_import_error is None:
        try:
            from .backends import triton_backend  # noqa: F401
            _triton_import_error = ""
        except Exception as exc:  # ImportError, or a Triton that fails to initialise
            _triton_import_error = f"{type(exc).__name__}: {exc}"
    return _triton_import_error or None


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _require_triton(source: str, q: torch.Tensor) -> None:
    """Raise unless the Triton backend can run on q (importable; CUDA or the interpreter)."""
    err = _triton_available()
    if err:
        raise RuntimeError(f"{source}: the Triton backend cannot be imported ({err})")
    if not q.is_cuda and not q.is_meta and not _interpreting():
        raise ValueError(f"{source}: 'triton' needs CUDA tensors (or TRITON_INTERPRET=1 "
                         f"for the CPU interpreter, or meta tensors: shapes only); got q on {q.device}")


def _check_backend_name(name, source: str) -> None:
    if name not in BACKENDS:
        raise ValueError(f"{source}: expected one of {', '.join(BACKENDS)}, got {name!r}")


def choose_backend(requested: str, q: torch.Tensor, has_work: bool, needs_grad: bool = False,
                   cuda_unsupported: Tuple[str, ...] = (), grad_unsupported: Tuple[str, ...] = (),
                   work: str = "bias, prob_mult or capture") -> Dispatch:
    """``cuda_unsupported``: the features of this call the CUDA backend does not implement
    (asking for 'cuda' with any of them is an error naming them). ``grad_unsupported``: the
    features the Triton backward does not differentiate (with ``needs_grad``, 'triton' is
    then an error naming them and 'auto' runs the reference). ``work``: what the call asks
    beyond plain attention, as the 'sdpa' error names it."""
    _check_backend_name(requested, "backend")
    source = "backend argument"
    if requested == "auto" and os.environ.get(ENV_BACKEND, "auto") != "auto":
        requested = os.environ[ENV_BACKEND]
        _check_backend_name(requested, ENV_BACKEND)
        source = f"{ENV_BACKEND}={requested}"
    if requested == "cuda" and cuda_unsupported:
        raise ValueError(f"{source}: the CUDA backend does not support {', '.join(cuda_unsupported)}; "
                         "expected backend 'triton', 'torch' or 'auto' for this call")

    if requested == "sdpa" and has_work:
        able = "'torch' or 'triton'" if cuda_unsupported else "'torch', 'triton' or 'cuda'"
        raise ValueError(f"{source}: 'sdpa' computes plain attention only; this call has {work}, which need {able}")
    if requested == "cuda":
        from .backends.cuda_backend import cuda_unavailable_reason
        reason = cuda_unavailable_reason()
        if reason:
            raise RuntimeError(f"{source}: the CUDA backend cannot run ({reason})")
        if not q.is_cuda or q.dtype not in (torch.float16, torch.bfloat16):
            raise ValueError(f"{source}: 'cuda' needs float16 or bfloat16 CUDA tensors; "
                             f"got q {q.dtype} on {q.device}")
    if requested == "triton":
        _require_triton(source, q)
    if requested == "cuda" and needs_grad:
        raise NotImplementedError(f"{source}: the cuda kernel has no backward; inputs require grad. "
                                  "Use backend='triton' or 'torch', or run under torch.no_grad() for inference")
    if requested == "triton" and needs_grad and grad_unsupported:
        raise NotImplementedError(f"{source}: the Triton backward does not support {', '.join(grad_unsupported)}; "
                                  "inputs require grad. Use backend='torch', or run under torch.no_grad()")
    if requested == "triton" and needs_grad:
        return Dispatch("triton", f"requested by {source}; inputs require grad, so the differentiable Triton "
                        "path runs (forward saves the row LSE, Triton backward)")
    if requested != "auto":
        return Dispatch(requested, f"requested by {source}")

    if not has_work:
        return Dispatch("sdpa", "auto: no bias, prob_mult or capture, so torch SDPA runs plain attention")
    if not q.is_cuda:
        return Dispatch("torch", f"auto: tensors on {q.device}, so the PyTorch reference runs")
    if needs_grad and grad_unsupported:
        return Dispatch("torch", f"auto: inputs require grad and the Triton backward does not support "
                        f"{', '.join(grad_unsupported)}; the reference materialises P", True)
    err = _triton_available()
    if err:
        return Dispatch("torch", f"auto: Triton unavailable ({err}); the reference materialises P", True)
    if needs_grad:
        return Dispatch("triton", "auto: CUDA tensors requiring grad with controls, so the differentiable "
                        "Triton path runs (forward saves the row LSE, Triton backward)")
    return Dispatch("triton", "auto: CUDA tensors with controls or captures, so the fused Triton kernel runs")


def _note(dispatch: Dispatch) -> None:
    global _last_dispatch
    if torch.compiler.is_compiling():
        return  # a traced call (differentiable path) dispatches at trace time: no runtime record
    _last_dispatch = dispatch
    if logger.isEnabledFor(logging.DEBUG):
        logger.debug("attnctl.attention -> %s (%s)", dispatch.backend, dispatch.reason)
    if dispatch.slow_fallback and dispatch.reason not in _warned:
        _warned.add(dispatch.reason)
        logger.warning("attnctl: falling back to the slow reference path: %s", dispatch.reason)


def _run(q, k, v, scale, bias, prob_mult, capture, backend, regions=None, source=None, own=None) -> torch.Tensor:
    probes = capture is not None and capture.probe_keys is not None
    has_work = (bias is not None or prob_mult is not None or regions is not None or source is not None
                or (capture is not None and not capture.empty))
    needs_grad = _needs_grad(q, k, v, bias, prob_mult, own)
    rows = ((capture is not None and capture.rows is not None)
            or (own is not None and own.capture is not None and own.capture.rows is not None))
    unsupported = tuple(name for name, used in (("regions", regions is not None),
                                                ("capture.probe_keys", probes),
                                                ("capture.rows", rows)) if used)
    dispatch = choose_backend(backend, q, has_work, needs_grad, cuda_unsupported=unsupported,
                              grad_unsupported=_grad_unsupported(prob_mult, capture, own, regions))
    _note(dispatch)
    if dispatch.backend == "triton" and needs_grad:
        return _in_q_order(differentiable_output(q, k, v, scale=scale, bias=bias, prob_mult=prob_mult,
                                                 regions=regions, source=source, own=own), q)
    if dispatch.backend == "triton":
        from .backends.triton_backend import attention_triton
        return attention_triton(q, k, v, scale=scale, bias=bias, prob_mult=prob_mult, capture=capture,
                                regions=regions, source=source, own=own)
    if dispatch.backend == "cuda":
        from .backends.cuda_backend import attention_cuda
        return attention_cuda(q, k, v, scale=scale, bias=bias, prob_mult=prob_mult, capture=capture,
                              source=source, own=own)
    if dispatch.backend == "sdpa":
        out = F.scaled_dot_product_attention(q, k, v, scale=scale)
    else:
        out = attention_reference(q, k, v, scale=scale, bias=bias, prob_mult=prob_mult, capture=capture,
                                  regions=regions, source=source, own=own)
    return _in_q_order(out, q)


def _needs_grad(q, k, v, bias, prob_mult, own) -> bool:
    operands = (q, k, v, bias, prob_mult) + ((own.values,) if own is not None else ())
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in operands)


def _grad_unsupported(prob_mult, capture, own, regions=None) -> Tuple[str, ...]:
    """What the differentiable Triton path (attnctl.autograd) does not cover in this call."""
    return tuple(name for name, used in (
        ("capture", capture is not None and not capture.empty),
        ("regions.allowed (a region mask)", regions is not None and regions.is_mask),
        ("prob_mult requiring grad", prob_mult is not None and prob_mult.requires_grad),
        ("own.prob_mult requiring grad", own is not None and own.prob_mult is not None
         and own.prob_mult.requires_grad)) if used)


def _in_q_order(out: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Every backend returns q's memory order (see empty_output); copy only where the
    backend's own layout differs (always the reference; SDPA's CPU math path)."""
    expected = empty_output(q, out.shape[-1])
    if out.stride() == expected.stride():
        return out
    return expected.copy_(out)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: Optional[float] = None,
    bias: Optional[torch.Tensor] = None,
    prob_mult: Optional[torch.Tensor] = None,
    capture: Optional[Capture] = None,
    backend: str = "auto",
    regions: Optional[Regions] = None,
    source: Optional[torch.Tensor] = None,
    own: Optional[OwnTerm] = None,
) -> torch.Tensor:
    """Attention with controls and captures in one pass.

    Args:
        q, k, v: (B, H, M, D), (B, H, N, D), (B, H, N, Dv); fp16, bf16 or fp32; any strides.
            D and Dv are multiples of 8 up to 256.
        scale: softmax scale; default 1/sqrt(D).
        bias: additive pre-softmax logits, broadcastable to (B, H, M, N); -inf masks a key;
            +inf and NaN are rejected (ValueError: they have no softmax).
        prob_mult: factor on the normalised probabilities in the numerator only
            (O = Σ_n P·f·v, no renormalisation), broadcastable to (B, H, M, N).
        capture: an attnctl.Capture whose fp32 buffers receive statistics of P (before
            prob_mult), added to what they hold; with ``probe_keys`` also the
            auxiliary-key probe mass Σ_m softmax over the probe keys.
        regions: an attnctl.Regions: numerator factor 1 - s·[r_q != r_k] (both labelled)
            computed from per-query and per-key labels; multiplies with prob_mult. With
            ``regions.allowed`` a pre-softmax mask instead (see attnctl.regions).
        source: injection, a (B,) int32/int64 tensor of batch indices: item b's logits (and
            so its P) are computed from q, k and bias of item source[b] and applied to b's
            values (with b's prob_mult and regions); b's captures record that P. Identity
            entries (source[b] = b) are plain attention. Where several items take one item's
            P and nothing differs per item (no prob_mult, regions or capture), the Triton
            kernel computes that P once for all of them (fan-out).
        own: with ``source``, an attnctl.OwnTerm(values, prob_mult, capture): the two-source
            form O_b = Σ P_src[b]·f·g·v + Σ P_b·own.prob_mult·g·own.values (g: the regions
            factor, on both terms), each P with its own normaliser, in one pass (see
            attnctl.injection).
        backend: "auto", "torch" (reference), "triton", "cuda" (CUDA C++, fp16/bf16) or
            "sdpa" (plain attention only).

    Returns:
        (B, H, M, Dv) in q's dtype, laid out in q's memory order.
    """
    compiling = torch.compiler.is_compiling()
    scale = validate(q, k, v, scale, bias, prob_mult, capture, check_token_values=values_readable(q),
                     regions=regions, source=source, own=own)
    # Meta tensors (shapes only, e.g. counting what autograd saves) take the traced route:
    # the registered ops' fake implementations run and no kernel is launched.
    shapes_only = compiling or q.is_meta
    if shapes_only and _needs_grad(q, k, v, bias, prob_mult, own):
        # The mutating op attnctl::attention has no backward: trace the dispatch instead, to
        # the differentiable op attnctl::attention_differentiable or the reference.
        return _run(q, k, v, scale, bias, prob_mult, capture, backend, regions, source, own)
    if shapes_only:
        return torch.ops.attnctl.attention(*op_arguments(q, k, v, scale, bias, prob_mult, capture, backend,
                                                         regions, source, own))
    return _run(q, k, v, scale, bias, prob_mult, capture, backend, regions, source, own)


def op_arguments(q, k, v, scale: float, bias=None, prob_mult=None, capture: Optional[Capture] = None,
                 backend: str = "auto", regions: Optional[Regions] = None, source=None,
                 own: Optional[OwnTerm] = None) -> tuple:
    """The positional arguments of attnctl::attention for one call, every schema argument
    given: the call torch.compile traces (and opcheck tests). Absent capture buffers travel
    as empty tensors: Inductor cannot lower a custom op whose mutated Optional argument is
    None, and torch 2.11's ADInplaceOrView kernel indexes every mutated argument by
    position, so none may be left to its default."""
    cap = capture if capture is not None else Capture()
    own_cap = own.capture if own is not None and own.capture is not None else Capture()

    def buffers(c: Capture, fields):
        return [getattr(c, name) if getattr(c, name) is not None else q.new_empty(0, dtype=torch.float32)
                for name in fields]

    return (q, k, v, scale, bias, prob_mult, *buffers(cap, BUFFER_FIELDS), cap.tokens, cap.head_weights, backend,
            cap.probe_keys, *buffers(cap, ("probe_mass",)),
            regions.labels_q if regions is not None else None,
            regions.labels_k if regions is not None else None,
            float(regions.strength) if regions is not None else 0.0, source,
            own.values if own is not None else None, own.prob_mult if own is not None else None,
            *buffers(own_cap, BUFFER_FIELDS), own_cap.tokens, own_cap.head_weights,
            _row_list(cap), _row_list(own_cap), regions.allowed if regions is not None else None)


def _row_list(capture: Capture) -> Optional[List[int]]:
    """capture.rows as the op schema carries it: [start, stop] or None."""
    return None if capture.rows is None else [capture.rows.start, capture.rows.stop]


def logit_max(q: torch.Tensor, k: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
    """max over (m, n) of the unscaled logits q[b, h, m] · k[b, h, n], per (b, h).

    Returns a (B, H) float32 tensor on q's device (no device sync). The Triton backend
    reduces it in a kernel without storing QKᵀ; the reference ("torch") computes QKᵀ.
    Paint-with-words (eDiff-I) takes the max over the whole layer of one image: reduce
    this over heads, ``logit_max(q, k).amax(dim=1)``.

    ``backend``: "auto" (Triton for CUDA tensors when it can be imported, else the
    reference), "torch" or "triton". "cuda" and "sdpa" do not compute it.
    """
    validate_logit_max(q, k)
    if torch.compiler.is_compiling():
        return torch.ops.attnctl.logit_max(q, k, backend)
    return _logit_max(q, k, backend)


def _logit_max(q, k, backend: str) -> torch.Tensor:
    _check_backend_name(backend, "backend")
    source = "backend argument"
    if backend == "auto" and os.environ.get(ENV_BACKEND, "auto") not in ("auto", "cuda", "sdpa"):
        backend, source = os.environ[ENV_BACKEND], f"{ENV_BACKEND}={os.environ[ENV_BACKEND]}"
    if backend in ("cuda", "sdpa"):
        raise ValueError(f"{source}: logit_max is computed by 'triton' or 'torch' (or 'auto'), "
                         f"got {backend!r}")
    if backend == "auto":
        backend = "triton" if q.is_cuda and _triton_available() is None else "torch"
    elif backend == "triton":
        _require_triton(source, q)
    if backend == "triton":
        from .backends.triton_backend import logit_max_triton
        return logit_max_triton(q, k)
    return logit_max_reference(q, k)


# ---- torch.library registration, so torch.compile traces through without a graph break ----

@torch.library.custom_op("attnctl::attention",
                         mutates_args=("token_mass", "maps", "head_maps", "lse", "probe_mass", "own_token_mass",
                                       "own_maps", "own_head_maps", "own_lse"))
def _attention_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
    bias: Optional[torch.Tensor], prob_mult: Optional[torch.Tensor],
    token_mass: torch.Tensor, maps: torch.Tensor, head_maps: torch.Tensor, lse: torch.Tensor,
    tokens: Optional[torch.Tensor], head_weights: Optional[torch.Tensor], backend: str,
    probe_keys: Optional[torch.Tensor] = None, probe_mass: Optional[torch.Tensor] = None,
    labels_q: Optional[torch.Tensor] = None, labels_k: Optional[torch.Tensor] = None,
    region_strength: float = 0.0, source: Optional[torch.Tensor] = None,
    own_values: Optional[torch.Tensor] = None, own_prob_mult: Optional[torch.Tensor] = None,
    own_token_mass: Optional[torch.Tensor] = None, own_maps: Optional[torch.Tensor] = None,
    own_head_maps: Optional[torch.Tensor] = None, own_lse: Optional[torch.Tensor] = None,
    own_tokens: Optional[torch.Tensor] = None, own_head_weights: Optional[torch.Tensor] = None,
    capture_rows: Optional[List[int]] = None, own_capture_rows: Optional[List[int]] = None,
    region_allowed: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """The op as torch.compile sees it; an empty buffer means "not captured"; rows travel
    as [start, stop]."""
    def present(buf):
        return buf if buf is not None and buf.numel() else None

    capture = Capture(*map(present, (token_mass, maps, head_maps, lse)), tokens=tokens, head_weights=head_weights,
                      probe_keys=probe_keys, probe_mass=present(probe_mass),
                      rows=range(*capture_rows) if capture_rows is not None else None)
    B, H, M, D = q.shape
    # The checks that read values sync the device, which a CUDA graph capture forbids
    # (torch.compile mode="reduce-overhead"): they run in its eager warm-up calls instead.
    values = not (q.is_cuda and torch.cuda.is_current_stream_capturing())
    check_capture(capture, B, H, M, k.shape[2], q.device, check_token_values=values,
                  dtype=q.dtype, head_dim=D)
    regions = None
    if labels_q is not None or labels_k is not None:
        regions = Regions(labels_q, labels_k, region_strength, region_allowed)
        check_regions(regions, B, M, k.shape[2], q.device, values)
    check_source(source, B, q.device, values)
    if values:
        check_bias_values(bias)
    own = None
    if own_values is not None:
        own_capture = Capture(*map(present, (own_token_mass, own_maps, own_head_maps, own_lse)),
                              tokens=own_tokens, head_weights=own_head_weights,
                              rows=range(*own_capture_rows) if own_capture_rows is not None else None)
        own = OwnTerm(own_values, own_prob_mult, None if own_capture.empty else own_capture)
        check_own(own, q, k, v, source, values)
    return _run(q, k, v, scale, bias, prob_mult, capture, backend, regions, source, own)


@_attention_op.register_fake
def _attention_fake(q, k, v, scale, bias, prob_mult, token_mass, maps, head_maps, lse,
                    tokens, head_weights, backend, probe_keys=None, probe_mass=None,
                    labels_q=None, labels_k=None, region_strength=0.0, source=None, *own_arguments):
    return empty_output(q, v.shape[-1])


@torch.library.custom_op("attnctl::logit_max", mutates_args=())
def _logit_max_op(q: torch.Tensor, k: torch.Tensor, backend: str) -> torch.Tensor:
    return _logit_max(q, k, backend)


@_logit_max_op.register_fake
def _logit_max_fake(q, k, backend):
    return q.new_empty(q.shape[:2], dtype=torch.float32)
