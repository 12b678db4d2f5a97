"""Launcher for the CUDA C++ kernels (csrc/, built by setup.py into attnctl._attnctl_cuda).

The extension's interface is raw device pointers, sizes, strides in elements, dtype codes
and the CUDA stream, all as Python ints: it never sees a torch.Tensor, so it links against
no torch library and a torch upgrade cannot leave it with undefined symbols. This launcher
does the torch side: it allocates the output (in q's memory order), turns tensors into
pointers and strides (stride 0 on broadcast dims, so bias and prob_mult are never
expanded) and passes torch's current stream. Arguments are assumed checked by
attnctl.validation; the extension checks them again before any launch and raises
ValueError naming the argument.
"""
from __future__ import annotations

from typing import Optional

import torch

from attnctl.capture import Capture
from attnctl.injection import OwnTerm
from ._layout import broadcast_strides, empty_output

# The ABI this launcher speaks; the extension reports its own (bumped with any signature change).
ABI_VERSION = 3
MODULE = "attnctl._attnctl_cuda"
DTYPES = (torch.float16, torch.bfloat16)

try:
    from attnctl import _attnctl_cuda as _C
    _import_error: Optional[BaseException] = None
except ImportError as exc:  # not built (no nvcc at install time), or built for another Python
    _C = None
    _import_error = exc


def _module_problem() -> Optional[str]:
    if _C is None:
        if isinstance(_import_error, ModuleNotFoundError) and _import_error.name == MODULE:
            return (f"the CUDA extension {MODULE} is not built: reinstall attnctl with nvcc on PATH "
                    "(ATTNCTL_BUILD_CUDA=1 makes a failed build an install error)")
        return f"the CUDA extension {MODULE} failed to import ({type(_import_error).__name__}: {_import_error})"
    if getattr(_C, "ABI_VERSION", None) != ABI_VERSION:
        return (f"the CUDA extension {MODULE} has ABI version {getattr(_C, 'ABI_VERSION', None)}, this "
                f"launcher expects {ABI_VERSION}: rebuild it (pip install -e .)")
    return None


def cuda_unavailable_reason() -> Optional[str]:
    """None when the CUDA backend can run here, else a sentence naming why not."""
    problem = _module_problem()
    if problem:
        return problem
    if not torch.cuda.is_available():
        if torch.version.cuda is None:
            return f"no CUDA device: torch {torch.__version__} is a CPU-only build"
        return "no CUDA device: torch.cuda.is_available() is False (no NVIDIA GPU or driver)"
    return None


def _code(t: Optional[torch.Tensor]) -> int:
    # Absent operands get code 0; the kernel never reads them (their pointer is null).
    if t is None:
        return 0
    code = _dtype_codes.get(t.dtype)
    if code is None:  # built once per dtype: this runs on every launch
        code = _dtype_codes[t.dtype] = _C.dtype_codes[str(t.dtype).replace("torch.", "")]
    return code


_dtype_codes: dict = {}


def _ptr(t: Optional[torch.Tensor]) -> int:
    return 0 if t is None else t.data_ptr()


def _strides(t: Optional[torch.Tensor], ndim: int) -> tuple:
    return tuple(t.stride()) if t is not None else (0,) * ndim


_no_capture: dict = {}   # prefix -> the keywords of a call without that capture


def _capture_arguments(capture: Optional[Capture], prefix: str) -> dict:
    """The extension's keywords for one term's capture, named with ``prefix`` ("" or "own_")."""
    if capture is None or capture.empty:
        if prefix not in _no_capture:  # the same for every call without a capture
            _no_capture[prefix] = _capture_fields(Capture(), prefix)
        return _no_capture[prefix]
    return _capture_fields(capture, prefix)


def _capture_fields(cap: Capture, prefix: str) -> dict:
    tokens = cap.tokens if cap.wants_token_columns else None
    head_weights = cap.head_weights if cap.maps is not None else None
    args = dict(
        token_mass=_ptr(cap.token_mass), maps=_ptr(cap.maps), head_maps=_ptr(cap.head_maps), lse=_ptr(cap.lse),
        tokens=_ptr(tokens), head_weights=_ptr(head_weights),
        token_mass_stride=_strides(cap.token_mass, 3), maps_stride=_strides(cap.maps, 3),
        head_maps_stride=_strides(cap.head_maps, 4), lse_stride=_strides(cap.lse, 3),
        tokens_stride=broadcast_strides(tokens, 2), head_weights_stride=broadcast_strides(head_weights, 2),
        T=tokens.shape[-1] if tokens is not None else 0,
        tokens_dtype=_code(tokens), head_weights_dtype=_code(head_weights),
    )
    return {prefix + name: value for name, value in args.items()}



def launch_arguments(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, *, scale: float,
                     bias: Optional[torch.Tensor], prob_mult: Optional[torch.Tensor],
                     capture: Optional[Capture], source: Optional[torch.Tensor] = None,
                     own: Optional[OwnTerm] = None) -> dict:
    """Keyword arguments of the extension's attention_forward for one call, but device and
    stream. Reads no tensor data, so host tests can check it on CPU tensors."""
    B, H, M, D = q.shape
    N, Dv = k.shape[2], v.shape[3]
    own_values = own.values if own is not None else None
    own_prob_mult = own.prob_mult if own is not None else None
    return dict(
        q=q.data_ptr(), k=k.data_ptr(), v=v.data_ptr(), out=out.data_ptr(),
        bias=_ptr(bias), prob_mult=_ptr(prob_mult), source=_ptr(source),
        own_values=_ptr(own_values), own_prob_mult=_ptr(own_prob_mult),
        q_stride=q.stride(), k_stride=k.stride(), v_stride=v.stride(), out_stride=out.stride(),
        bias_stride=broadcast_strides(bias, 4), prob_mult_stride=broadcast_strides(prob_mult, 4),
        source_stride=source.stride(0) if source is not None else 0,
        own_values_stride=_strides(own_values, 4), own_prob_mult_stride=broadcast_strides(own_prob_mult, 4),
        B=B, H=H, M=M, N=N, D=D, Dv=Dv,
        scale=float(scale),
        dtype=_code(q), bias_dtype=_code(bias), prob_mult_dtype=_code(prob_mult), source_dtype=_code(source),
        own_prob_mult_dtype=_code(own_prob_mult),
        **_capture_arguments(capture, ""),
        **_capture_arguments(own.capture if own is not None else None, "own_"),
    )


def attention_cuda(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float,
                   bias: Optional[torch.Tensor], prob_mult: Optional[torch.Tensor],
                   capture: Optional[Capture], source: Optional[torch.Tensor] = None,
                   own: Optional[OwnTerm] = None) -> torch.Tensor:
    """The op on the CUDA C++ kernels; same contract and arguments as attention_triton
    (``source``: (B,) int32/int64 injection indices on q's device, any stride; ``own``: the
    two-source form's second term, see attnctl.injection).

    Raises RuntimeError (with cuda_unavailable_reason()) where the backend cannot run, and
    ValueError for float32 inputs (the kernels take float16 and bfloat16) or CPU tensors.
    """
    reason = cuda_unavailable_reason()
    if reason:
        raise RuntimeError(f"attnctl CUDA backend unavailable: {reason}")
    if not q.is_cuda:
        raise ValueError(f"attnctl CUDA backend: expected CUDA tensors, got q on {q.device}")
    if q.dtype not in DTYPES:
        raise ValueError(f"attnctl CUDA backend: q, k, v must be float16 or bfloat16, got {q.dtype} "
                         "(backend='triton' or 'torch' take float32)")
    out = empty_output(q, v.shape[3])
    _C.attention_forward(
        **launch_arguments(q, k, v, out, scale=scale, bias=bias, prob_mult=prob_mult, capture=capture,
                           source=source, own=own),
        device=q.device.index, stream=torch.cuda.current_stream(q.device).cuda_stream,
    )
    return out
