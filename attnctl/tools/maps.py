"""Captured cross-attention maps and the heat maps computed from them.

:class:`TraceMaps` holds, per traced layer, the maps the kernel accumulated (summed over
denoising steps, or per step) and the token mass per head, plus what is needed to read
them: grids, batch layout, prompts. Heat maps follow DAAM 0.2.0's aggregation: each
layer's and head's map (summed over the steps) is upsampled bicubically to DAAM's fixed
side (64, or 96 for SD 2.x at 768; ``size=`` picks another), clamped at 0, and averaged
over layers and heads. A trace with ``per_head=False`` summed the heads in the kernel, so
the clamp applies to their sum (identical unless bicubic undershoot differs in sign
between heads).

MM-DiT traces (Flux, SD3) capture every row of the joint query sequence; a layer's
``image_rows`` says which rows are image tokens, and heat maps read only those, on the
image token grid after patchify (``size="latent"``, their default: there is no DAAM
original to follow).

PixArt, Sana and Wan traces read maps on the token grid after patchify too. A Wan layer's
queries are its latent frames one after the other (``frames`` per layer): ``heat_map``
takes one frame (``frame=``) or their mean, and ``video_heat_map`` keeps every frame.
"""
from __future__ import annotations

import fnmatch
import json
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

from ..diffusers.controller import BatchLayout
from .words import PromptText

ALL_STEPS = -1  # step key of buffers summed over the traced steps
FORMAT = "attnctl-trace/2"


@dataclass
class LayerMaps:
    """One cross-attention layer's captures.

    ``maps[step]`` is (rows, H, M, T) — or (rows, M, T) when heads were summed — for T
    captured key columns, and ``token_mass[step]`` is (rows, H, N) (UNets only); ``step`` is a step
    index, or ALL_STEPS. M is h*w on a UNet; on MM-DiT joint attention M is the whole joint
    sequence and ``image_rows`` (start, stop) the image tokens' rows among them; on Wan M is
    frames*h*w, frame after frame.
    """

    name: str
    grid: Tuple[int, int]
    factor: int
    heads: int
    maps: Dict[int, torch.Tensor] = field(default_factory=dict)
    token_mass: Dict[int, torch.Tensor] = field(default_factory=dict)
    image_rows: Optional[Tuple[int, int]] = None
    frames: int = 1


def select_layers(names: Sequence[str], patterns) -> List[str]:
    """Names matching ``patterns``: a string or strings, each a glob (``*``, ``?``, ``[``)
    matched against the whole name or, without wildcards, a substring of it."""
    if patterns is None:
        return list(names)
    if isinstance(patterns, str):
        patterns = [patterns]

    def match(name, pattern):
        if any(c in pattern for c in "*?["):
            return fnmatch.fnmatchcase(name, pattern)
        return pattern in name

    chosen = [n for n in names if any(match(n, p) for p in patterns)]
    if not chosen:
        shown = ", ".join(names[:4]) + (", ..." if len(names) > 4 else "")
        raise ValueError(f"layers: {list(patterns)} match none of the {len(names)} cross-attention "
                         f"layers ({shown})")
    return chosen


def resolution_matches(resolutions, grid: Tuple[int, int], factor: int) -> bool:
    """``resolutions``: downsampling factors (ints, 1 = latent grid, as DAAM's ``factors``)
    and/or (h, w) grids."""
    return any(r == factor if isinstance(r, int) else tuple(r) == tuple(grid) for r in resolutions)


class HeatMap:
    """A (h, w) heat map of one word or token set, at the latent grid unless upsampled."""

    def __init__(self, value: torch.Tensor, label: str):
        self.value = value
        self.label = label

    def upsample(self, size: Tuple[int, int]) -> "HeatMap":
        """Bicubic to ``size`` (h, w), clamped at 0 (bicubic undershoots)."""
        v = F.interpolate(self.value[None, None].float(), size=tuple(size), mode="bicubic")
        return HeatMap(v[0, 0].clamp_min(0), self.label)

    def plot(self, image=None, path=None, ax=None, **kwargs):
        """Overlay on ``image`` (upsampled to its size); see attnctl.tools.plot.overlay."""
        from .plot import overlay

        return overlay(self, image, path=path, ax=ax, **kwargs)

    def __repr__(self) -> str:
        return f"HeatMap({self.label!r}, {tuple(self.value.shape)})"


class GlobalHeatMap:
    """Heat maps of the captured key columns (T, h, w) of one image, with its prompt's words."""

    def __init__(self, value: torch.Tensor, text: Optional[PromptText], tokenizer=None):
        self.value = value
        self.text = text
        self.tokenizer = tokenizer

    def _text(self) -> PromptText:
        if self.text is None:
            raise ValueError("word: this generation's prompt text is unknown (the pipeline got "
                             "prompt_embeds); pass prompt=... to heat_map(), or use token()")
        return self.text

    def _mean(self, columns: List[int], label: str) -> HeatMap:
        T = self.value.shape[0]
        if max(columns) >= T:
            raise ValueError(f"{label}: needs key columns up to {max(columns)}, but the trace captured "
                             f"columns [0, {T}); trace with tokens='all'")
        return HeatMap(self.value[columns].mean(0), label)

    def columns(self, word: str, occurrence: Optional[int] = None, match: str = "tokens") -> List[int]:
        """The key columns :meth:`word` averages.

        ``match="tokens"`` (DAAM): the word's tokens are found as a run anywhere in the
        prompt's tokens (end-of-word marks ignored, so also inside longer words);
        ``match="words"``: only whole words of the prompt. ``occurrence=None`` (DAAM)
        takes the columns of every appearance; an int takes that appearance (0 = first).
        """
        return self._text().positions(word, occurrence, self.tokenizer, match)

    def word(self, word: str, occurrence: Optional[int] = None, match: str = "tokens") -> HeatMap:
        """The mean map of the key columns of ``word`` (one or more words); see :meth:`columns`."""
        return self._mean(self.columns(word, occurrence, match), word)

    def token(self, index: Union[int, Sequence[int]]) -> HeatMap:
        """The mean map of explicit key columns (0 is BOS, 1 the first text token)."""
        idx = [index] if isinstance(index, int) else list(index)
        N = self.value.shape[0]
        bad = [i for i in idx if not 0 <= i < N]
        if not idx or bad:
            raise ValueError(f"index: expected token indices in [0, {N}), got {index}")
        return HeatMap(self.value[idx].mean(0), f"tokens {idx}")

    def words(self, match: str = "tokens") -> List[Tuple[str, HeatMap]]:
        """(word, ``self.word(word, match=match)``) for every distinct word of the prompt."""
        texts = dict.fromkeys(text for text, _ in self._text().words)
        return [(text, self.word(text, match=match)) for text in texts]

    def __repr__(self) -> str:
        return f"GlobalHeatMap({tuple(self.value.shape)})"


class TraceMaps:
    """What a trace captured in one generation; queries, save and load."""

    def __init__(self, layers: List[LayerMaps], layout: BatchLayout, latent: Tuple[int, int],
                 image_scale: int, prompts: Optional[List[PromptText]], per_head: bool,
                 per_step: bool, heads: Optional[List[int]], steps_run: int, tokenizer=None,
                 daam_side: Optional[int] = None, uncond: bool = True, joint: bool = False,
                 family: Optional[str] = None, frame_scale: int = 1):
        self.layers = layers
        self.layout = layout
        self.latent = tuple(latent)
        self.image_scale = image_scale
        self.prompts = prompts
        self.per_head = per_head
        self.per_step = per_step
        self.heads = heads
        self.steps_run = steps_run
        self.tokenizer = tokenizer
        self.daam_side = daam_side  # DAAM's output side for the pipeline (None: unknown)
        self.uncond = uncond  # whether CFG's unconditional rows were captured
        self.joint = joint          # an MM-DiT trace: maps on the image token grid by default
        self.family = family        # "pixart", "sana" or "wan" (maps on the token grid by default), else None
        self.frame_scale = frame_scale  # video frames per latent frame (Wan: 4)

    @property
    def frames(self) -> int:
        """Latent frames after patchify of the traced layers' queries (1 for images)."""
        return self.layers[0].frames if self.layers else 1

    @property
    def on_token_grid(self) -> bool:
        """Whether heat maps default to the token grid (every transformer; UNets: DAAM's side)."""
        return self.joint or self.family is not None

    @property
    def image_size(self) -> Tuple[int, int]:
        return (self.latent[0] * self.image_scale, self.latent[1] * self.image_scale)

    @property
    def steps(self) -> List[int]:
        """Step indices held separately (per_step traces), else []."""
        keys = {k for layer in self.layers for k in layer.maps if k != ALL_STEPS}
        return sorted(keys)

    # ---- queries -----------------------------------------------------------------------
    def _layers(self, layers, resolutions) -> List[LayerMaps]:
        chosen = set(select_layers([l.name for l in self.layers], layers))
        result = [l for l in self.layers if l.name in chosen]
        if resolutions is not None:
            result = [l for l in result if resolution_matches(resolutions, l.grid, l.factor)]
            if not result:
                grids = sorted({(l.factor, l.grid) for l in self.layers})
                raise ValueError(f"resolutions: {list(resolutions)} match no traced layer "
                                 f"(factor, grid) in {grids}")
        return result

    def _step_keys(self, steps) -> List[int]:
        if steps is None:
            return self.steps or [ALL_STEPS]
        if not self.per_step:
            raise ValueError("steps: this trace summed its steps while capturing; trace with "
                             "per_step=True to select steps afterwards (or steps=... to capture only those)")
        steps = [steps] if isinstance(steps, int) else list(steps)
        missing = [s for s in steps if s not in self.steps]
        if missing:
            raise ValueError(f"steps: {missing} were not captured; captured steps: {self.steps}")
        return steps

    def _heads(self, heads, layer: LayerMaps) -> Optional[List[int]]:
        if heads is None:
            heads = self.heads
        elif not self.per_head and list(heads) != list(self.heads or []):
            raise ValueError("heads: this trace summed its heads while capturing; trace with "
                             "per_head=True to select heads afterwards (or heads=... to capture only those)")
        if heads is None:
            return None
        chosen = [h for h in heads if 0 <= h < layer.heads]
        return chosen

    def _row(self, image: int, half: str) -> int:
        # (a layout of one CFG half per call, Wan's or Flux's true CFG: the other half's call was not traced)
        if half == "uncond" and not self.uncond and (self.layout.cfg or self.layout.half is not None):
            raise ValueError("half: 'uncond' was not captured; trace with uncond=True to keep CFG's "
                             "unconditional half")
        return self.layout.row(image, half)

    def _output_size(self, size) -> Tuple[int, int]:
        if size == "latent":
            return self.latent
        if size == "daam":
            if self.daam_side is None:
                raise ValueError("size: DAAM's output side (64 or 96, from the UNet's sample_size and "
                                 "the VAE factor) is unknown for this trace (a bare UNet, or a sample_size "
                                 "that is not one int); pass size='latent' or (h, w)")
            if self.latent[0] != self.latent[1]:
                raise ValueError(f"size: DAAM 0.2.0 handles square images only (it reads a layer's M "
                                 f"queries as a sqrt(M) x sqrt(M) grid); this latent is "
                                 f"{self.latent[0]}x{self.latent[1]}; pass size='latent' or (h, w)")
            return (self.daam_side, self.daam_side)
        if (isinstance(size, (tuple, list)) and len(size) == 2
                and all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in size)):
            return tuple(size)
        raise ValueError(f"size: expected 'daam', 'latent' or (h, w) positive ints, got {size!r}")

    def heat_map(self, image: int = 0, *, half: str = "cond", layers=None, resolutions=None,
                 heads: Optional[Iterable[int]] = None, steps=None, normalize: bool = False,
                 prompt: Optional[str] = None, size=None, frame: Optional[int] = None) -> GlobalHeatMap:
        """DAAM's global heat map of ``image``: (T, h, w) for the T captured key columns.

        Args:
            image: index of the image in the generated batch.
            half: "cond" (default) or "uncond" (CFG's unconditional half).
            layers: layer-name patterns (see select_layers); resolutions: factors or grids.
            heads: head indices (per_head traces); steps: step indices (per_step traces).
            normalize: divide every map by the sum over the prompt's tokens plus 1e-6 (DAAM).
            prompt: the prompt text, when the pipeline ran from prompt_embeds.
            size: "daam" (DAAM's fixed side, 64 or 96; square images only; the default
                on UNets), "latent" (the latent grid, any aspect ratio; on MM-DiT the image
                token grid after patchify, their default) or (h, w): where each map is
                upsampled to before the clamp.
            frame: a video trace's (Wan) latent frame; None: the mean of the frames'
                maps (taken on the token grid, before upsampling).
        """
        if frame is not None:
            self._check_frame(frame)
        value, text = self._global(image, half, layers, resolutions, heads, steps, normalize, prompt, size,
                                   frame)
        if frame is None and self.frames > 1:
            value = value.mean(1)
        return GlobalHeatMap(value, text, self.tokenizer)

    def video_heat_map(self, image: int = 0, *, half: str = "cond", layers=None, resolutions=None,
                       heads: Optional[Iterable[int]] = None, steps=None, prompt: Optional[str] = None, size=None):
        """A video trace's (Wan) heat maps of every latent frame: a
        :class:`attnctl.tools.video.VideoHeatMap` of (T, frames, h, w); the arguments as in
        :meth:`heat_map`."""
        from .video import VideoHeatMap

        value, text = self._global(image, half, layers, resolutions, heads, steps, False, prompt, size, None)
        if self.frames == 1:
            value = value[:, None]
        return VideoHeatMap(value, text, self.tokenizer, self.frame_scale)

    def _check_frame(self, frame) -> None:
        if isinstance(frame, bool) or not isinstance(frame, int) or not 0 <= frame < self.frames:
            raise ValueError(f"frame: expected a latent frame index in [0, {self.frames}) (the traced "
                             f"{'video' if self.frames > 1 else 'image'} has {self.frames}), got {frame!r}")

    def _global(self, image, half, layers, resolutions, heads, steps, normalize, prompt, size, frame):
        """(value, prompt text): (T, h, w) maps, or (T, frames, h, w) on a video trace
        without ``frame``."""
        out_size = self._output_size(size if size is not None else ("latent" if self.on_token_grid else "daam"))
        row = self._row(image, half)
        chosen = self._layers(layers, resolutions)
        keys = self._step_keys(steps)
        total, count = None, 0
        for layer in chosen:
            head_idx = self._heads(heads, layer)
            summed = sum(layer.maps[k][row] for k in keys)
            if layer.image_rows is not None:
                summed = summed[..., layer.image_rows[0]:layer.image_rows[1], :]
            if self.per_head:
                if head_idx is not None:
                    summed = summed[head_idx]
                stack, n = summed, summed.shape[0]          # (H', M, N)
            else:
                stack, n = summed[None], (len(head_idx) if head_idx is not None else layer.heads)
            if n == 0:
                continue
            h, w = layer.grid
            maps = stack.transpose(1, 2).reshape(stack.shape[0], -1, h, w).float()   # (n, T·frames, h, w)
            if frame is not None and layer.frames > 1:
                maps = maps.unflatten(1, (-1, layer.frames))[:, :, frame]
            up = F.interpolate(maps, size=out_size, mode="bicubic").clamp_min_(0).sum(0)
            total = up if total is None else total + up
            count += n
        if total is None:
            raise ValueError(f"heads: {list(heads) if heads is not None else self.heads} select no head "
                             "of the chosen layers")
        value = total / count
        if frame is None and self.frames > 1:
            value = value.unflatten(0, (-1, self.frames))   # (T, frames, h, w)
        text = self._prompt_text(image, prompt)
        if normalize:
            if text is None:
                raise ValueError("normalize: needs the prompt's word tokens; pass prompt=...")
            if self.on_token_grid:
                raise ValueError("normalize: DAAM's normalisation (rows between BOS and EOS) has no MM-DiT, "
                                 "PixArt, Sana or Wan form (their T5-style text has no BOS); got normalize=True "
                                 "on a transformer trace")
            end = len(text.tokens) - 1  # DAAM's rows 1..-2: the prompt's tokens, not BOS nor EOS
            if end > value.shape[0]:
                raise ValueError(f"normalize: the prompt has {end + 1} key columns, the trace captured "
                                 f"{value.shape[0]}; trace with tokens='all'")
            value = value / (value[1:end].sum(0, keepdim=True) + 1e-6)
        return value, text

    def _prompt_text(self, image: int, prompt: Optional[str]) -> Optional[PromptText]:
        if prompt is not None:
            if self.tokenizer is None:
                raise ValueError("prompt: tokenising a prompt needs the pipeline's tokenizer; "
                                 "load the trace with TraceMaps.load(path, tokenizer=...)")
            from .words import record_prompt

            return record_prompt(self.tokenizer, prompt)
        if self.prompts is None:
            return None
        return self.prompts[self.layout.prompt_of_image(image)]

    def word_heat_map(self, word: str, image: int = 0, *, occurrence: Optional[int] = None,
                      match: str = "tokens", **filters) -> HeatMap:
        """Shortcut: ``heat_map(image, **filters).word(word, occurrence, match)``."""
        return self.heat_map(image, **filters).word(word, occurrence, match)

    def token_mass(self, image: int = 0, *, half: str = "cond", steps=None) -> Dict[str, torch.Tensor]:
        """Σ_m P per head and text token, per layer: {layer: (H, N)}."""
        if self.joint:
            raise ValueError("token_mass: an MM-DiT trace does not capture token mass (over all joint keys "
                             "it would cost the kernel a second pass over QKᵀ)")
        row = self._row(image, half)
        keys = self._step_keys(steps)
        return {l.name: sum(l.token_mass[k][row] for k in keys) for l in self.layers}

    # ---- persistence ---------------------------------------------------------------------
    def save(self, path: str) -> None:
        """One safetensors file: tensors, plus the metadata as JSON in its header."""
        from safetensors.torch import save_file

        tensors, layers = {}, []
        for i, layer in enumerate(self.layers):
            for kind in ("maps", "token_mass"):
                for step, t in getattr(layer, kind).items():
                    tensors[f"layers.{i}.{kind}.{step}"] = t.detach().to("cpu").contiguous()
            layers.append({"name": layer.name, "grid": list(layer.grid), "factor": layer.factor,
                           "heads": layer.heads, "image_rows": layer.image_rows, "frames": layer.frames})
        meta = {
            "format": FORMAT, "layers": layers, "latent": list(self.latent),
            "image_scale": self.image_scale, "per_head": self.per_head, "per_step": self.per_step,
            "heads": self.heads, "steps_run": self.steps_run, "daam_side": self.daam_side,
            "uncond": self.uncond, "joint": self.joint, "family": self.family, "frame_scale": self.frame_scale,
            "layout": {"rows": self.layout.rows, "cfg": self.layout.cfg,
                       "images_per_prompt": self.layout.images_per_prompt},
            "prompts": [p.to_json() for p in self.prompts] if self.prompts is not None else None,
        }
        save_file(tensors, path, metadata={"attnctl": json.dumps(meta)})

    @classmethod
    def load(cls, path: str, tokenizer=None, device: str = "cpu") -> "TraceMaps":
        """A trace saved by ``save``; ``tokenizer`` enables ``prompt=`` and exact query
        normalisation (words are found without it)."""
        from safetensors import SafetensorError, safe_open

        def corrupt(what: str) -> ValueError:
            return ValueError(f"path: {path} is not a complete attnctl trace: {what}")

        try:
            with safe_open(path, framework="pt", device=device) as f:
                header = (f.metadata() or {}).get("attnctl")
                if header is None:
                    raise ValueError(f"path: {path} is a safetensors file but not an attnctl trace")
                try:
                    meta = json.loads(header)
                except json.JSONDecodeError as exc:
                    raise corrupt(f"its attnctl header is not JSON ({exc.msg})") from None
                if meta.get("format") != FORMAT:
                    raise ValueError(f"path: expected trace format {FORMAT}, got {meta.get('format')}")
                layers = [LayerMaps(d["name"], tuple(d["grid"]), d["factor"], d["heads"],
                                    image_rows=tuple(d["image_rows"]) if d.get("image_rows") else None,
                                    frames=d.get("frames", 1))
                          for d in meta["layers"]]
                for key in f.keys():
                    _, i, kind, step = key.split(".")
                    getattr(layers[int(i)], kind)[int(step)] = f.get_tensor(key)
        except FileNotFoundError:
            raise ValueError(f"path: expected a trace file (attnctl TraceMaps.save), got {path!r} (no such "
                             "file)") from None
        except ValueError as exc:
            if str(exc).startswith("path: "):
                raise
            raise corrupt(str(exc)) from None
        except (KeyError, IndexError, TypeError, AttributeError) as exc:
            raise corrupt(f"its header or tensor names do not describe a trace ({type(exc).__name__}: "
                          f"{exc})") from None
        except SafetensorError as exc:  # a cut or damaged file
            raise corrupt(f"truncated or damaged safetensors data ({exc})") from None
        prompts = meta["prompts"]
        return cls(layers, BatchLayout(**meta["layout"]), tuple(meta["latent"]), meta["image_scale"],
                   [PromptText.from_json(p) for p in prompts] if prompts is not None else None,
                   meta["per_head"], meta["per_step"], meta["heads"], meta["steps_run"], tokenizer,
                   daam_side=meta["daam_side"], uncond=meta.get("uncond", True), joint=meta.get("joint", False),
                   family=meta.get("family"), frame_scale=meta.get("frame_scale", 1))

    def __repr__(self) -> str:
        return (f"TraceMaps({len(self.layers)} layers, latent {self.latent}, images "
                f"{self.layout.images}, per_head={self.per_head}, per_step={self.per_step})")
