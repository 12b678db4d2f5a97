"""Head-wise and token-wise scaling of the text columns of MM-DiT joint attention (Flux,
SD3): the prob_mult of the op contract, on joint layers.

``TextScaling(factors)`` multiplies the attention probabilities of every query row (image
and text) to text key t in head h by ``factors[h, t]`` — after the softmax, numerator
only, no renormalisation, as prob_mult always does — on the conditional rows (CFG: the
unconditional rows are left alone unless ``rows="all"``). ``factors`` broadcasts to
(heads, text tokens): (H, 1) scales whole heads, (T,) or (1, T) single tokens, (H, T)
both (e.g. a word's pieces in a few heads, as HRV's ordered weakening does on UNets).
Text token t is column ``layout.text.start + t`` of the joint sequence (Flux: the T5
tokens; SD3: the 77 CLIP-L‖G tokens, then T5), so the same factors fit Flux's text-first
and SD3's image-first order. Image key columns keep factor 1.

A (B, H, 1, L) factor is built once per layer shape and cached; per call the controller
only returns it (no allocation, no sync). Layers without text (SD3.5's image-only
``attn2``) are left alone; ``blocks`` / ``steps`` predicates choose where it applies.
"""
from __future__ import annotations

from typing import Callable, Dict, Optional

import torch

from ..diffusers.controller import AttentionCall, Controller, Plan
from ..diffusers.joint import JointLayout


class TextScaling(Controller):
    def __init__(self, factors, *, rows: str = "cond", steps: Optional[Callable[[int], bool]] = None,
                 blocks: Optional[Callable[[JointLayout], bool]] = None):
        factors = torch.as_tensor(factors, dtype=torch.float32)
        if factors.dim() == 1:
            factors = factors[None]
        if factors.dim() != 2 or 0 in factors.shape:
            raise ValueError(f"factors: expected a shape broadcastable to (heads, text tokens): (H, 1), (T,), "
                             f"(1, T) or (H, T), got {tuple(factors.shape)}")
        if not torch.isfinite(factors).all():
            raise ValueError("factors: expected finite values")
        if rows not in ("cond", "all"):
            raise ValueError(f"rows: expected 'cond' or 'all', got {rows!r}")
        self.factors = factors
        self.rows = rows
        self.steps = steps
        self.blocks = blocks
        self._cache: Dict[tuple, torch.Tensor] = {}

    def plan(self, call: AttentionCall) -> Optional[Plan]:
        joint = call.joint
        if joint is None:
            raise ValueError(f"TextScaling: {call.layer} is not MM-DiT joint attention; the controller is for "
                             "Flux and SD3 pipelines")
        if len(joint.text) == 0:
            return None
        if self.steps is not None and not self.steps(call.step.index):
            return None
        if self.blocks is not None and not self.blocks(joint):
            return None
        rows = call.layout.cond_rows if self.rows == "cond" else range(call.batch)
        key = (joint.text, call.keys, call.heads, call.batch, rows, call.device, call.dtype)
        factor = self._cache.get(key)
        if factor is None:
            factor = self._cache[key] = self._build(joint, call, rows)
        return Plan(prob_mult=factor)

    def _build(self, joint: JointLayout, call: AttentionCall, rows: range) -> torch.Tensor:
        H, T = call.heads, len(joint.text)
        fh, ft = self.factors.shape
        if fh not in (1, H) or ft not in (1, T):
            raise ValueError(f"factors: expected a shape broadcastable to (heads, text tokens) = ({H}, {T}) "
                             f"of {call.layer}, got {tuple(self.factors.shape)}")
        factor = torch.ones(call.batch, H, 1, call.keys)
        factor[rows.start:rows.stop, :, 0, joint.text.start:joint.text.stop] = self.factors.expand(H, T)
        if len(rows) == call.batch:
            factor = factor[:1]
        return factor.to(call.device, call.dtype)
