"""Attention shapes of real text-to-image models (see design.md, "Shapes that matter")."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Iterable, List


@dataclass(frozen=True)
class AttnShape:
    model: str      # e.g. "sd15-512"
    level: str      # latent grid of the layer, e.g. "64x64"
    kind: str       # "cross", "self" or "joint" (MM-DiT: text and image in one sequence, M = N)
    B: int
    H: int
    M: int          # queries
    N: int          # keys
    D: int          # head dim (= value dim)

    @property
    def name(self) -> str:
        return f"{self.model}/{self.level}/{self.kind}/B{self.B}/N{self.N}/D{self.D}"

    @property
    def image_tokens(self) -> int:
        """Joint shapes: the image tokens of the sequence (the level's grid); the rest is text."""
        h, w = (int(x) for x in self.level.split("x"))
        return h * w

    @property
    def flops(self) -> float:
        """Multiply-adds of QKᵀ and PV, counted as 2 FLOPs each."""
        return 4.0 * self.B * self.H * self.M * self.N * self.D

    def io_bytes(self, elem: int) -> float:
        """Least traffic of plain attention: read q, k, v and write o once."""
        return float(elem * self.B * self.H * (2 * self.M * self.D + 2 * self.N * self.D))

    def as_dict(self) -> dict:
        return asdict(self)


# (model, [(level, M, heads, head_dim)], text tokens)
_MODELS = {
    "sd15-512": ([("64x64", 4096, 8, 40), ("32x32", 1024, 8, 80), ("16x16", 256, 8, 160),
                  ("8x8", 64, 8, 160)], 77),
    "sd2-768": ([("96x96", 9216, 5, 64), ("48x48", 2304, 10, 64), ("24x24", 576, 20, 64),
                 ("12x12", 144, 20, 64)], 77),
    "sdxl-1024": ([("64x64", 4096, 10, 64), ("32x32", 1024, 20, 64)], 77),
    # Long text contexts (T5 encoders: N = 333 as in DeepFloyd/PixArt-style prompts, 512 max).
    "t5ctx-333": ([("64x64", 4096, 24, 64)], 333),
    "t5ctx-512": ([("64x64", 4096, 24, 64)], 512),
    # Cross-attention transformers (published configs in ../shared/configs): PixArt-Σ 1024²
    # (128² latent, patch 2; T5 300), Sana 1600M 1024² (DC-AE f32, patch 1; Gemma-2 300;
    # its self-attention is linear, no softmax), Wan 2.1 480x832x81 (latent 21x60x104,
    # patch 1x2x2; umT5 512).
    "pixart-1024": ([("64x64", 4096, 16, 72)], 300),
    "sana-1024": ([("32x32", 1024, 20, 112)], 300),
    "wan1.3b-480p": ([("21x30x52", 32760, 12, 128)], 512),
    "wan14b-480p": ([("21x30x52", 32760, 40, 128)], 512),
}
# Models with no softmax self-attention row: text-context probes, Sana's linear attention.
_NO_SELF = ("t5ctx-333", "t5ctx-512", "sana-1024")


# MM-DiT joint attention at 1024² (model: (image grid, image tokens, text tokens, heads,
# head dim, batch)): Flux dev (T5 512, no CFG), SD3.5 large (77 CLIP + 256 T5, CFG).
_JOINT_MODELS = {
    "flux-1024": ("64x64", 4096, 512, 24, 128, 1),
    "sd35l-1024": ("64x64", 4096, 333, 38, 64, 2),
}


def catalog(batches: Iterable[int] = (2, 8), kinds: Iterable[str] = ("cross", "self", "joint"),
            models: Iterable[str] | None = None) -> List[AttnShape]:
    """Every (model, level, kind, batch) shape; self-attention only for the image models;
    the joint (MM-DiT) shapes at their models' own batch (``batches`` is for the UNets)."""
    shapes = []
    if "joint" in kinds:
        for model, (level, image, text, H, D, B) in _JOINT_MODELS.items():
            if models is None or model in models:
                shapes.append(AttnShape(model, level, "joint", B, H, image + text, image + text, D))
    for model, (levels, text_len) in _MODELS.items():
        if models is not None and model not in models:
            continue
        for level, M, H, D in levels:
            for kind in kinds:
                if kind == "joint" or (kind == "self" and model in _NO_SELF):
                    continue
                N = text_len if kind == "cross" else M
                shapes.extend(AttnShape(model, level, kind, B, H, M, N, D) for B in batches)
    return shapes


def quick_catalog() -> List[AttnShape]:
    """A handful of the shapes that decide the targets: SD1.5 and SDXL, B = 2."""
    wanted = {("sd15-512", "64x64"), ("sd15-512", "16x16"), ("sdxl-1024", "64x64"),
              ("sdxl-1024", "32x32")}
    return [s for s in catalog(batches=(2,)) if (s.model, s.level) in wanted]


def smoke_catalog() -> List[AttnShape]:
    """Tiny shapes for CPU smoke runs (speed meaningless)."""
    return [AttnShape("smoke", "8x8", "cross", 1, 2, 64, 77, 40),
            AttnShape("smoke", "8x8", "self", 1, 2, 64, 64, 64),
            AttnShape("smoke", "4x4", "joint", 1, 2, 16 + 8, 16 + 8, 64)]


MODELS = tuple(_JOINT_MODELS) + tuple(_MODELS)
