"""What a benchmark compares: each contender turns inputs into a zero-argument callable."""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F

from attnctl.capture import Capture
from attnctl.injection import OwnTerm
from attnctl.op import attention
from attnctl.reference import attention_reference, softmax_with_empty_rows
from attnctl.regions import Regions

from .shapes import AttnShape

# Self-attention maps over every key would be (B, M, M) per layer; tools keep a few columns.
SELF_ATTENTION_CAPTURED_KEYS = 16


@dataclass
class Inputs:
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    shape: AttnShape

    @classmethod
    def make(cls, shape: AttnShape, dtype: torch.dtype, device: str) -> "Inputs":
        """q, k, v as diffusers passes them: (B, H, seq, D) views of (B, seq, H, D) memory."""
        s = shape
        def view(seq):
            return torch.randn(s.B, seq, s.H, s.D, dtype=dtype, device=device).transpose(1, 2)
        return cls(view(s.M), view(s.N), view(s.N), s)

    def full_capture(self) -> Capture:
        """Every statistic the op can emit; maps of all text tokens (a subset for self-attention)."""
        N = self.shape.N
        if self.shape.kind == "cross":
            tokens = list(range(N))
        else:
            tokens = torch.linspace(0, N - 1, min(N, SELF_ATTENTION_CAPTURED_KEYS)).long().tolist()
        return Capture.zeros(self.q, self.k, token_mass=True, tokens=tokens, maps=True,
                             head_maps=True, lse=True)


@dataclass
class Contender:
    name: str
    captures: bool
    build: Callable[[Inputs], Callable[[], object]]
    cuda_only: bool = False
    kinds: Optional[Tuple[str, ...]] = None  # the shape kinds it applies to (None: every kind)


def _sdpa(backend_name: Optional[str]):
    def build(x: Inputs):
        if backend_name is None:
            ctx = nullcontext
        else:
            from torch.nn.attention import SDPBackend, sdpa_kernel
            backend = getattr(SDPBackend, backend_name)
            ctx = lambda: sdpa_kernel(backend)  # noqa: E731
        def run():
            with ctx():
                return F.scaled_dot_product_attention(x.q, x.k, x.v)
        return run
    return build


def _materialised(x: Inputs):
    # QKᵀ -> softmax -> keep maps -> PV in the inputs' precision, as DAAM and prompt-to-prompt do.
    cap = x.full_capture()
    scale = x.q.shape[-1] ** -0.5
    return lambda: attention_reference(x.q, x.k, x.v, scale=scale, capture=cap, compute_dtype=x.q.dtype)


def _attnctl(backend: str, with_capture: bool):
    def build(x: Inputs):
        cap = x.full_capture() if with_capture else None
        return lambda: attention(x.q, x.k, x.v, capture=cap, backend=backend)
    return build


def _p2p_operands(x: Inputs):
    """Prompt-to-prompt's attention edit at this shape: batch rows in (source, target)
    pairs, each target taking its source's P. Cross-attention: the two-source form (Refine:
    a random 77×77 token map W on the injected term, a per-token factor on the target's own
    term); self-attention: injection alone (P_tgt ← P_src)."""
    B, N = x.shape.B, x.shape.N
    source = torch.arange(B, device=x.q.device) // 2 * 2
    if x.shape.kind == "self":
        return source, None, None
    gen = torch.Generator(device=x.q.device).manual_seed(0)
    W = torch.rand(B, N, N, device=x.q.device, generator=gen, dtype=x.q.dtype)
    own = torch.rand(B, 1, 1, N, device=x.q.device, generator=gen)
    return source, W, own


def _attnctl_p2p(x: Inputs):
    source, W, own = _p2p_operands(x)
    if W is None:
        return lambda: attention(x.q, x.k, x.v, source=source, backend="triton")
    return lambda: attention(x.q, x.k, torch.matmul(W[:, None], x.v), source=source, backend="triton",
                             own=OwnTerm(x.v, own))


def _materialised_p2p(x: Inputs):
    # The original's way: every P explicit in the inputs' precision, the target's replaced
    # by (an edit of) the source's, then PV.
    source, W, own = _p2p_operands(x)
    scale = x.q.shape[-1] ** -0.5

    def run():
        p, _ = softmax_with_empty_rows(torch.matmul(x.q, x.k.transpose(-1, -2)) * scale)
        edited = p[source] if W is None else torch.matmul(p[source], W[:, None]) + p * own.to(p.dtype)
        return torch.matmul(edited, x.v)
    return run


def _backward_operands(x: Inputs):
    """Leaf copies of q, k, v requiring grad, upstream gradients of the output and of the
    maps at the columns an Attend-and-Excite step reads (the subject tokens of a prompt;
    a subset of keys for self-attention), and those columns."""
    q, k, v = (t.detach().clone().requires_grad_(True) for t in (x.q, x.k, x.v))
    B, M = x.shape.B, x.shape.M
    tokens = [2, 5] if x.shape.kind == "cross" else torch.linspace(
        0, x.shape.N - 1, SELF_ATTENTION_CAPTURED_KEYS).long().tolist()
    d_out = torch.randn_like(x.q)
    d_maps = torch.randn(B, M, len(tokens), device=x.q.device)
    return q, k, v, tokens, d_out, d_maps


def _sdpa_backward(x: Inputs):
    q, k, v, _, d_out, _ = _backward_operands(x)
    return lambda: torch.autograd.grad(F.scaled_dot_product_attention(q, k, v), (q, k, v), d_out)


def _triton_maps_backward(x: Inputs):
    # Forward with differentiable maps, then dq, dk, dv through output and maps: no (M, N) tensor.
    from attnctl.attention_maps import attention_with_maps
    q, k, v, tokens, d_out, d_maps = _backward_operands(x)

    def run():
        out, maps = attention_with_maps(q, k, v, tokens, backend="triton")
        return torch.autograd.grad((out, maps), (q, k, v), (d_out, d_maps))
    return run


def _materialised_maps_backward(x: Inputs):
    # As Attend-and-Excite ports do: P explicit in the inputs' precision, maps read from it,
    # autograd through softmax(QKᵀ) (it keeps P, and the backward builds dP and dS, all (M, N)).
    q, k, v, tokens, d_out, d_maps = _backward_operands(x)
    scale = x.q.shape[-1] ** -0.5

    def run():
        p = torch.softmax(torch.matmul(q, k.transpose(-1, -2)) * scale, dim=-1)
        maps = p[..., tokens].float().sum(dim=1)
        return torch.autograd.grad((torch.matmul(p, v), maps), (q, k, v), (d_out, d_maps))
    return run


# ConceptAttention at a joint shape: C concepts (the original README's example has four).
CONCEPTS = 4


def _concept_operands(x: Inputs):
    """Concept q, k, v (B, H, C, D) in the joint inputs' layout, and the image rows (Flux's
    order, text first: the image is the sequence's tail)."""
    B, H, D = x.shape.B, x.shape.H, x.shape.D
    gen = torch.Generator(device=x.q.device).manual_seed(0)  # the same concepts for every contender
    concept = [torch.randn(B, CONCEPTS, H, D, device=x.q.device, generator=gen).to(x.q.dtype).transpose(1, 2)
               for _ in range(3)]
    return concept, slice(x.shape.M - x.shape.image_tokens, x.shape.M)


def _concept_original(x: Inputs):
    # The original (concept_attention/flux/dit_block.py): the joint attention, then a second
    # full attention of C + P queries over [concepts; image], the image rows' output dropped,
    # the (B, C, P) scores and (with its default cache_vectors=True) both output vectors
    # copied to the host every block.
    (cq, ck, cv), image = _concept_operands(x)

    def run():
        joint = F.scaled_dot_product_attention(x.q, x.k, x.v)
        q, k, v = (torch.cat([c, t[:, :, image]], dim=2) for c, t in zip((cq, ck, cv), (x.q, x.k, x.v)))
        concept = F.scaled_dot_product_attention(q, k, v)[:, :, :CONCEPTS].transpose(1, 2).flatten(2)
        image_out = joint[:, :, image].transpose(1, 2).flatten(2)
        scores = torch.einsum("bcd,bpd->bcp", concept, image_out)
        return scores.cpu(), concept.cpu(), image_out.cpu()
    return run


def _concept_fused(x: Inputs):
    # attnctl.concept_attention per block: the joint call, one call of the C concept rows over
    # [concepts; image], products and their softmax over concepts added into a device buffer.
    (cq, ck, cv), image = _concept_operands(x)
    maps = torch.zeros(x.shape.B, CONCEPTS, x.shape.image_tokens, device=x.q.device)

    def run():
        joint = attention(x.q, x.k, x.v, backend="triton")
        keys, values = (torch.cat([c, t[:, :, image]], dim=2) for c, t in zip((ck, cv), (x.k, x.v)))
        concept = attention(cq, keys, values, backend="triton").transpose(1, 2).flatten(2)
        scores = torch.bmm(concept, joint.transpose(1, 2)[:, image].flatten(2).transpose(1, 2))
        maps.add_(scores.float().softmax(dim=1))
        return maps
    return run


def regional_regions(x: Inputs) -> Regions:
    """Regional prompting at a joint shape, as attnctl.tools.regional builds it: text first
    (Flux's order) in two prompt segments, the image in a left and a right region that
    overlap in a middle strip (so every label rule is exercised), the original's
    image-to-image rule."""
    from attnctl.diffusers.joint import DOUBLE, JointLayout
    from attnctl.tools.regional import region_labels

    s = x.shape
    if s.kind != "joint":
        raise ValueError(f"regional contenders need a joint shape, got kind {s.kind!r}")
    h, w = (int(v) for v in s.level.split("x"))
    text = s.M - h * w
    layout = JointLayout(range(0, text), range(text, s.M), (h, w), DOUBLE, 0)
    column = torch.arange(h * w) % w
    masks = torch.stack([column < 0.6 * w, column >= 0.4 * w])
    labels, allowed = region_labels(layout, [range(0, text // 2), range(text // 2, text)], masks)
    labels = labels[None].to(x.q.device)
    return Regions(labels, labels, allowed=allowed.to(x.q.device))


def _sdpa_dense_mask(x: Inputs):
    # The usual way: the (L, L) boolean mask built once, handed to SDPA on every call.
    keep = regional_regions(x).keep(x.shape.B, x.shape.M, x.shape.N)
    return lambda: F.scaled_dot_product_attention(x.q, x.k, x.v, attn_mask=keep)


def _attnctl_regions(x: Inputs):
    regions = regional_regions(x)
    return lambda: attention(x.q, x.k, x.v, regions=regions, backend="triton")


CONTENDERS: Dict[str, Contender] = {c.name: c for c in [
    Contender("sdpa", False, _sdpa(None)),
    Contender("sdpa-flash", False, _sdpa("FLASH_ATTENTION"), cuda_only=True),
    Contender("sdpa-efficient", False, _sdpa("EFFICIENT_ATTENTION"), cuda_only=True),
    Contender("sdpa-cudnn", False, _sdpa("CUDNN_ATTENTION"), cuda_only=True),
    Contender("sdpa-math", False, _sdpa("MATH")),
    Contender("materialised+capture", True, _materialised),
    Contender("triton", False, _attnctl("triton", False)),
    Contender("triton+capture", True, _attnctl("triton", True)),
    Contender("cuda", False, _attnctl("cuda", False), cuda_only=True),
    Contender("cuda+capture", True, _attnctl("cuda", True), cuda_only=True),
    Contender("triton+p2p", False, _attnctl_p2p, kinds=("cross", "self")),
    Contender("materialised+p2p", False, _materialised_p2p, kinds=("cross", "self")),
    # regional prompting on joint attention: the dense (L, L) mask vs label regions
    Contender("sdpa+dense-mask", False, _sdpa_dense_mask, kinds=("joint",)),
    Contender("triton+regions", False, _attnctl_regions, kinds=("joint",)),
    # forward + backward (Attend-and-Excite's step): the times include both passes
    Contender("sdpa+backward", False, _sdpa_backward),
    Contender("triton+maps+backward", True, _triton_maps_backward),
    Contender("materialised+maps+backward", True, _materialised_maps_backward),
    # ConceptAttention on joint (MM-DiT) shapes: the block's attention with the concept
    # stream's, original-style against fused
    Contender("concept-original", True, _concept_original, kinds=("joint",)),
    Contender("triton+concept", True, _concept_fused, kinds=("joint",)),
]}


def select(names: Optional[List[str]], device: str) -> List[Contender]:
    chosen = list(CONTENDERS) if not names else names
    unknown = [n for n in chosen if n not in CONTENDERS]
    if unknown:
        raise ValueError(f"contenders: unknown {unknown}; expected some of {list(CONTENDERS)}")
    return [CONTENDERS[n] for n in chosen if device == "cuda" or not CONTENDERS[n].cuda_only]
