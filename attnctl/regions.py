"""Region labels: a post-softmax factor computed from per-query and per-key labels.

``Regions(labels_q, labels_k, strength)`` asks the op to multiply the numerator of the
attention (like ``prob_mult``, after the softmax, no renormalisation) by

    f[b, h, m, n] = 1 - s · [r_q(b, m) >= 0  and  r_k(b, n) >= 0  and  r_q(b, m) != r_k(b, n)]

``labels_q`` is (B or 1, M) and ``labels_k`` (B or 1, N), integer (int32 or int64). A
negative label means "no region": that query or key is never scaled. With s = 1 a query
attends only to keys of its own region (and to unlabelled keys); s = 0 changes nothing.
The kernel computes f from the two label vectors, so no (M, N) mask exists in memory;
with ``prob_mult`` also given the two factors multiply. Captures are of P before f.

Uses: inside-outside attention (Shape-Guided Diffusion) — self-attention with the
per-pixel inside/outside labels on both sides, and cross-attention with pixel labels
against token labels (object tokens inside, background tokens outside, others -1).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True, eq=False)
class Regions:
    labels_q: torch.Tensor
    labels_k: torch.Tensor
    strength: float = 1.0

    def factor(self, B: int, M: int, N: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The factor f materialised as a (B, 1, M, N) tensor (for the reference only)."""
        lq = self.labels_q.long().expand(B, M)[:, :, None]
        lk = self.labels_k.long().expand(B, N)[:, None, :]
        differ = (lq >= 0) & (lk >= 0) & (lq != lk)
        f = 1.0 - float(self.strength) * differ.to(dtype)
        return f[:, None]
