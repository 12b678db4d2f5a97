"""Region labels: per-query and per-key labels that the kernel turns into a control.

Two modes, one label pair ``labels_q`` (B or 1, M) and ``labels_k`` (B or 1, N), integer
(int32 or int64). A negative label means "no region": that query or key is never
affected.

**Scale** (``allowed`` None): a post-softmax factor on the numerator (like ``prob_mult``,
after the softmax, no renormalisation)

    f[b, h, m, n] = 1 - s · [r_q(b, m) >= 0  and  r_k(b, n) >= 0  and  r_q(b, m) != r_k(b, n)]

With s = ``strength`` = 1 a query attends only to keys of its own region (and to
unlabelled keys); s = 0 changes nothing. With ``prob_mult`` also given the two factors
multiply. Captures are of P before f.

**Mask** (``allowed`` a (Rq, Rk) bool tensor, Rk <= 31): a pre-softmax mask. Query m may
attend key n unless both are labelled and ``allowed[r_q(m), r_k(n)]`` is False; masked
logits are -inf, so P is renormalised over the allowed keys (a row with no allowed key
has P = 0, output 0, as the op contract says). ``strength`` plays no part (it must stay
1). This is regional prompting's attention mask without the (M, N) mask: the kernel reads
a bit set per query (the key labels it may attend, :attr:`mask_bits`) and one bit per key,
and skips every key block in which no query of the program's block may attend any key.

In both modes the kernel computes the control from the two label vectors, so no (M, N)
tensor exists in memory.

Uses: inside-outside attention (Shape-Guided Diffusion, scale mode) — self-attention with
the per-pixel inside/outside labels on both sides, and cross-attention with pixel labels
against token labels; regional prompting on Flux/SD3 joint attention (mask mode,
attnctl.tools.regional).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch

# Key labels of a mask: bits 0..30 of an int32; bit 31 marks an unlabelled key, which
# every query may attend.
MAX_MASK_LABELS = 31
_UNLABELLED_KEY_BIT = -(2 ** 31)


@dataclass(frozen=True, eq=False)
class Regions:
    labels_q: torch.Tensor
    labels_k: torch.Tensor
    strength: float = 1.0
    allowed: Optional[torch.Tensor] = None

    @property
    def is_mask(self) -> bool:
        return self.allowed is not None

    def factor(self, B: int, M: int, N: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Scale mode's factor f materialised as a (B, 1, M, N) tensor (for the reference only)."""
        lq = self.labels_q.long().expand(B, M)[:, :, None]
        lk = self.labels_k.long().expand(B, N)[:, None, :]
        differ = (lq >= 0) & (lk >= 0) & (lq != lk)
        f = 1.0 - float(self.strength) * differ.to(dtype)
        return f[:, None]

    def keep(self, B: int, M: int, N: int) -> torch.Tensor:
        """Mask mode's mask materialised as a (B, 1, M, N) bool tensor, True where query m
        may attend key n (for the reference and the dense-mask baselines only)."""
        lq = self.labels_q.long().expand(B, M)[:, :, None]
        lk = self.labels_k.long().expand(B, N)[:, None, :]
        allowed = self.allowed.to(lq.device)[lq.clamp(min=0), lk.clamp(min=0)]
        return ((lq < 0) | (lk < 0) | allowed)[:, None]

    @property
    def mask_bits(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """The mask as the kernel reads it: (query bits (B or 1, M), key bits (B or 1, N)),
        int32, with query m allowed to attend key n iff ``query_bits[m] & key_bits[n] != 0``.

        Key label c is bit c; an unlabelled key is bit 31, which every query holds; an
        unlabelled query holds every bit. Computed once per Regions object and version of
        its tensors (controllers reuse one per layer)."""
        if self.allowed is None:
            raise ValueError("regions.mask_bits: scale-mode regions (allowed=None) have no mask")
        versions = (self.labels_q._version, self.labels_k._version, self.allowed._version)
        cached = self.__dict__.get("_mask_bits")
        if cached is None or cached[0] != versions:
            cached = (versions, self._pack_bits())
            self.__dict__["_mask_bits"] = cached  # a cache, not state: the dataclass stays frozen
        return cached[1]

    def _pack_bits(self) -> Tuple[torch.Tensor, torch.Tensor]:
        rk = self.allowed.shape[1]
        columns = torch.arange(rk, device=self.allowed.device)
        rows = (self.allowed.long() << columns).sum(dim=1) | (1 << 31)   # in [2^31, 2^32)
        rows = (rows - 2 ** 32).to(torch.int32).to(self.labels_q.device)  # the same bits as int32
        lq = self.labels_q.long()
        query_bits = torch.where(lq < 0, torch.full_like(rows[:1], -1), rows[lq.clamp(min=0)])
        lk = self.labels_k.long()
        key_bits = torch.where(lk < 0, torch.full_like(lk, _UNLABELLED_KEY_BIT),
                               torch.ones_like(lk) << lk.clamp(min=0)).to(torch.int32)
        return query_bits.to(torch.int32), key_bits
