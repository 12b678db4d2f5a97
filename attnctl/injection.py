"""The second term of the op's two-source form (prompt-to-prompt Refine and Reweight).

With ``source`` (injection) and ``own=OwnTerm(values, prob_mult, capture)`` the op returns,
for every batch item b,

    O_b = Σ_n P_src[b] · f · v        +  Σ_n P_b · own.prob_mult · own.values
          (item source[b]'s logits)      (item b's own logits)

Each P is its own softmax (its own normaliser); ``f`` is the call's ``prob_mult``. Region
labels, when given, multiply both numerators. The call's ``capture`` records P_src[b] (as
with plain injection), ``own.capture`` records P_b. Prompt-to-prompt's Refine
``R[n] = P_src[mapper[n]]·a_n + P_tgt[n]·(1 - a_n)`` is this form with values W·V (W the
alignment gather, see attnctl.tools.p2p) and own.prob_mult = 1 - a: one kernel pass, no
(M, N) tensor.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from .capture import Capture


@dataclass(frozen=True, eq=False)
class OwnTerm:
    """``values`` (B, H, N, Dv) like the call's v; ``prob_mult`` broadcastable to
    (B, H, M, N) (None: 1); ``capture`` an attnctl.Capture of P_b (no probe keys)."""

    values: torch.Tensor
    prob_mult: Optional[torch.Tensor] = None
    capture: Optional[Capture] = None
