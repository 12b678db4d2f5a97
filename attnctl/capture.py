"""What an attention call emits besides its output: caller-owned fp32 buffers.

Every statistic is of P, the normalised attention probabilities *before* ``prob_mult``,
and is accumulated (``buffer += value``) so that a caller can sum over denoising steps,
layers or calls without allocating anything per call.

=============  ===========  ====================================================
field          shape        value added per call
=============  ===========  ====================================================
token_mass     (B, H, N)    Σ_m P[b, h, m, n]
maps           (B, M, T)    Σ_h w[b, h] · P[b, h, m, tokens[b, t]]
head_maps      (B, H, M, T) P[b, h, m, tokens[b, t]]
lse            (B, H, M)    log Σ_n exp(S[b, h, m, n])   (-inf for an all -inf row)
probe_mass     (B, H, C)    Σ_m softmax_c(scale · q[b, h, m] · probe_keys[b, h, c])
=============  ===========  ====================================================

A row whose logits are all -inf (every key masked) has P = 0 and LSE = log 0 = -inf, and
adding it makes that ``lse`` entry -inf for good: the buffer holds a sum of logs, i.e. the
log of a product of normalisers, and one zero normaliser makes the product zero. A caller
averaging LSE over calls of a layer whose mask can empty a row should test
``torch.isneginf(capture.lse)`` (rows fully masked in at least one call) or capture per call.

``tokens`` (int, shape (T,) or (B, T)) selects the key columns of ``maps`` and
``head_maps``; ``head_weights`` (shape (H,) or (B, H)) are the w of ``maps`` (1 when
omitted).

Auxiliary-key probes (head relevance vectors): ``probe_keys`` (shape (B, H, C, D) or
(1, H, C, D), any strides, q's dtype) is an extra key set that takes no part in the
attention itself. For every query row the op takes a separate softmax over the C probe
keys only (scaled like the attention logits; no bias, no V) and adds its sum over all M
rows to ``probe_mass``. Every batch row is probed; a caller wanting the CFG cond half
reads those rows of the buffer, or sets ``rows``.

Captured rows: ``rows`` (a ``range`` of batch items with step 1, e.g. ``range(B // 2, B)``
for the conditional half of a classifier-free-guidance batch [uncond; cond]; None: every
item) restricts every capture above to those items. The buffers keep their full B rows,
so ``buffer[b]`` is always batch item b; rows outside the range are left exactly as they
were, and the kernels do no capture work for them (no token mass, no map gather or
recompute, no probe softmax, no buffer access). The attention output is unaffected.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence, Union

import torch

Tokens = Union[torch.Tensor, Sequence[int], Sequence[Sequence[int]]]

BUFFER_FIELDS = ("token_mass", "maps", "head_maps", "lse")
# Buffers of the auxiliary-key probes, kept apart from BUFFER_FIELDS (whose order is the
# torch.library schema's) because they come with their own input, ``probe_keys``.
PROBE_FIELDS = ("probe_mass",)


@dataclass(eq=False)  # identity semantics: the buffers are mutable state
class Capture:
    token_mass: Optional[torch.Tensor] = None
    maps: Optional[torch.Tensor] = None
    head_maps: Optional[torch.Tensor] = None
    lse: Optional[torch.Tensor] = None
    tokens: Optional[torch.Tensor] = None
    head_weights: Optional[torch.Tensor] = None
    probe_keys: Optional[torch.Tensor] = None
    probe_mass: Optional[torch.Tensor] = None
    rows: Optional[range] = None
    # (tokens, tokens._version, N) already range-checked: checking costs a device sync, so
    # it runs once per tokens tensor, version and key length, not once per call.
    _checked_tokens: list = field(default_factory=list, init=False, repr=False, compare=False)

    @classmethod
    def zeros(
        cls,
        q: torch.Tensor,
        k: torch.Tensor,
        *,
        token_mass: bool = False,
        tokens: Optional[Tokens] = None,
        maps: bool = False,
        head_maps: bool = False,
        lse: bool = False,
        head_weights: Optional[torch.Tensor] = None,
        probe_keys: Optional[torch.Tensor] = None,
        rows: Optional[range] = None,
    ) -> "Capture":
        """Zeroed fp32 buffers shaped for ``attention(q, k, v, capture=...)``.

        ``maps`` and ``head_maps`` need ``tokens``; ``probe_keys`` (B or 1, H, C, D) adds a
        zeroed ``probe_mass`` (B, H, C); ``rows`` limits the captures to a range of batch
        items (buffers keep all B rows). The buffers live on q's device.
        """
        if q.dim() != 4 or k.dim() != 4:
            raise ValueError(
                f"Capture.zeros: q and k must be 4-D (B, H, M, D) / (B, H, N, D); "
                f"got q {tuple(q.shape)}, k {tuple(k.shape)}"
            )
        B, H, M, _ = q.shape
        N = k.shape[2]
        if (maps or head_maps) and tokens is None:
            raise ValueError("Capture.zeros: maps and head_maps need tokens (the key columns to keep)")
        token_tensor = as_token_tensor(tokens, q.device) if tokens is not None else None
        T = token_tensor.shape[-1] if token_tensor is not None else 0

        def buf(wanted: bool, *shape: int) -> Optional[torch.Tensor]:
            return torch.zeros(shape, dtype=torch.float32, device=q.device) if wanted else None

        return cls(
            token_mass=buf(token_mass, B, H, N),
            maps=buf(maps, B, M, T),
            head_maps=buf(head_maps, B, H, M, T),
            lse=buf(lse, B, H, M),
            tokens=token_tensor,
            head_weights=head_weights,
            probe_keys=probe_keys,
            probe_mass=(buf(True, B, H, probe_keys.shape[2])
                        if isinstance(probe_keys, torch.Tensor) and probe_keys.dim() == 4 else None),
            rows=rows,
        )

    def buffers(self) -> dict:
        """The requested buffers by name (absent ones left out)."""
        return {name: getattr(self, name) for name in BUFFER_FIELDS + PROBE_FIELDS
                if getattr(self, name) is not None}

    def zero_(self) -> "Capture":
        for buffer in self.buffers().values():
            buffer.zero_()
        return self

    def row_range(self, batch: int) -> tuple:
        """(start, stop) of the captured batch items (every item when ``rows`` is None)."""
        return (0, batch) if self.rows is None else (self.rows.start, self.rows.stop)

    @property
    def wants_token_columns(self) -> bool:
        return self.maps is not None or self.head_maps is not None

    @property
    def wants_probes(self) -> bool:
        return self.probe_keys is not None or self.probe_mass is not None

    @property
    def empty(self) -> bool:
        return not self.buffers()


def as_token_tensor(tokens: Tokens, device: torch.device) -> torch.Tensor:
    """Token indices as an int32 tensor of shape (T,) or (B, T) on ``device``."""
    if isinstance(tokens, torch.Tensor):
        t = tokens
    else:
        t = torch.as_tensor(tokens)
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise TypeError(f"tokens: expected integer indices, got dtype {t.dtype}")
    if t.dim() not in (1, 2) or t.shape[-1] == 0:
        raise ValueError(f"tokens: expected a non-empty shape (T,) or (B, T), got {tuple(t.shape)}")
    return t.to(device=device, dtype=torch.int32)


