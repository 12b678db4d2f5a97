"""Regional prompting on Flux and SD3 joint attention and on the cross-attention
transformers (PixArt-α/Σ, Sana, Wan 2.1), with a label mask in the kernel.

Each region of the image gets its own prompt. The prompts are encoded one by one and
concatenated on the text axis (each segment one encoder sequence long), and attention is
restricted by the mask rule of Chen et al. 2024, "Training-free Regional Prompting for
Diffusion Transformers" (instantX-research/Regional-Prompting-FLUX,
``pipeline_flux_regional.py``), which diffusers#10025 / #10044 asked diffusers to pass:

* a text token of segment i attends to segment i and to the image tokens of region i;
* an image token attends to the segments of the regions that contain it (a token in no
  region to no segment);
* image tokens (``image_rule="region"``, the original's rule) attend to the image tokens
  that share a region with them, and tokens in no region to each other; with
  ``image_rule="all"`` every image token attends to every image token (InvokeAI's
  unrestricted image self-attention).

On the cross-attention transformers the original's (L, L) mask falls apart into the
layers that exist there: the image→text block masks each cross-attention layer (queries:
image tokens, keys: the concatenated segments) and, with ``image_rule="region"``, the
image→image block masks each self-attention layer; the text is never a query, so the
text rows have no layer. An image token in no region then has no key left in a
cross-attention layer: its row of P is 0 and the layer adds nothing there (the op's rule
for a fully masked row), as the original gives it no text. Sana's self-attention is
linear (no softmax), so there only ``image_rule="all"`` exists. Wan's queries are the
latent frames one after the other (query ``(f·h + y)·w + x``): a 2-D mask applies to
every frame, a (frames, h, w) tensor gives each latent frame its own; the CLIP
image-context tokens of Wan I2V layers are no prompt segment and stay unmasked.

Masks are resized to the image token grid with ``nearest-exact``, as the original does; a
non-zero value is inside. Flux/SD3 take them at any size; the cross-attention
transformers at the image size or the token-grid size (a mask of another size is refused,
as paint-with-words on them does).

Instead of the original's (L, L) boolean mask, every token gets a label (text segment i:
label i; image tokens: one label per distinct set of regions they lie in) and the
kernel reads :class:`attnctl.Regions` in mask mode: the labels and a small table of which
label may attend which (see attnctl.regions). Rows of the unconditional half (CFG) are
left unmasked by default, as InvokeAI does for negative passes.

Deviations from the original, by design: its base-prompt blend (``base_ratio``: a second,
unmasked attention pass with the base prompt, mixed into the image output) and its switch
to the base prompt alone after ``mask_inject_steps`` are not reproduced; ``steps`` and
``blocks`` choose where the mask applies (default: every step and block; the original
masks every block of its first ``mask_inject_steps`` steps).
"""
from __future__ import annotations

import inspect
import re
from typing import Callable, Dict, Optional, Sequence, Tuple

import torch

from ..diffusers.controller import AttentionCall, Controller, Plan
from ..diffusers.dit import FAMILIES as CROSS_ATTENTION_FAMILIES
from ..diffusers.dit import SANA, WAN, WAN_TEXT_TOKENS, dit_family
from ..diffusers.attach import Attachment
from ..diffusers.install import Generation, find_model
from ..diffusers.joint import JointLayout
from ..regions import MAX_MASK_LABELS, Regions
from ._masks import as_mask, check_mask_size, mask_on_grid, mask_values

IMAGE_RULES = ("region", "all")


def region_table(masks: torch.Tensor, image_rule: str = "region") -> Tuple[torch.Tensor, torch.Tensor]:
    """The labels of image tokens and the (K, K) table of which label may attend which, for
    ``masks`` (R, P) bool over P image tokens. Labels 0..R-1 are the text segments (one per
    region); image tokens get R + one label per distinct set of regions they lie in."""
    R = masks.shape[0]
    membership = (masks.long() << torch.arange(R)[:, None]).sum(0)              # (P,): a bit per region
    sets, inverse = torch.unique(membership, return_inverse=True)
    if R + len(sets) > MAX_MASK_LABELS:
        raise ValueError(f"masks: {R} regions overlap in {len(sets)} distinct ways, which needs "
                         f"{R + len(sets)} labels; at most {MAX_MASK_LABELS} fit")
    inside = ((sets[:, None] >> torch.arange(R)[None, :]) & 1).bool()            # (S, R): set s holds region r
    K = R + len(sets)
    allowed = torch.zeros(K, K, dtype=torch.bool)
    allowed[:R, :R] = torch.eye(R, dtype=torch.bool)                             # text i -> text i
    allowed[:R, R:] = inside.T                                                   # text i -> image in region i
    allowed[R:, :R] = inside                                                     # image -> its regions' text
    if image_rule == "all":
        allowed[R:, R:] = True
    else:
        shared = (inside.long() @ inside.long().T) > 0                          # the sets share a region
        outside = sets == 0
        allowed[R:, R:] = shared | (outside[:, None] & outside[None, :])
    return R + inverse, allowed


def region_labels(layout: JointLayout, segments: Sequence[range], masks: torch.Tensor,
                  image_rule: str = "region") -> Tuple[torch.Tensor, torch.Tensor]:
    """Labels of the joint sequence (L,) int64 and the (K, K) table of which label may
    attend which, for text ``segments`` (ranges inside ``layout.text``, one per region)
    and ``masks`` (R, h*w) bool on the image token grid."""
    labels = torch.full((len(layout.text) + len(layout.image),), -1, dtype=torch.int64)
    for i, segment in enumerate(segments):
        labels[segment.start:segment.stop] = i
    image_labels, allowed = region_table(masks, image_rule)
    labels[layout.image.start:layout.image.stop] = image_labels
    return labels, allowed


def _region_mask(mask, name: str) -> torch.Tensor:
    """A 2-D (height, width) mask (tensor, array or image), or a 3-D torch tensor read as
    (frames, height, width): one mask per latent frame of a video. Values as
    attnctl.tools._masks.as_mask takes them; a mask with no non-zero value is no region."""
    if isinstance(mask, torch.Tensor) and mask.dim() == 3:
        if 0 in mask.shape or mask.is_complex():
            raise ValueError(f"{name}: expected a real (frames, height, width) mask with no empty side, got "
                             f"shape {tuple(mask.shape)}, dtype {mask.dtype}")
        mask = mask_values(mask, name)
    else:
        mask = as_mask(mask, name)
    if not bool(mask.any()):
        raise ValueError(f"{name}: expected a region (some non-zero value), got an all-zero mask of shape "
                         f"{tuple(mask.shape)}")
    return mask


def _block_index(layer: str) -> int:
    """The block of a cross-attention transformer's layer ("transformer_blocks.3.attn2",
    Wan "blocks.3.attn1" → 3)."""
    return int(re.search(r"\.(\d+)\.", layer).group(1))


class RegionalPrompting(Controller):
    """The regional mask on every attention call of the chosen steps and blocks: joint
    attention on Flux / SD3, cross-attention (and, with ``image_rule="region"``,
    self-attention) on PixArt, Sana and Wan.

    Args:
        masks: one mask per region (tensor, array or image; non-zero = inside), resized to
            the image token grid with ``nearest-exact``: any size on Flux / SD3, the image
            or token-grid size on PixArt / Sana / Wan. On Wan a 3-D tensor is one mask per
            latent frame, (frames, height, width) (a 2-D mask applies to every frame).
        segment_length: text tokens per region in the text (each region's prompt encoded
            to one encoder sequence: Flux ``max_sequence_length``, SD3 77 + that, PixArt /
            Sana / Wan ``max_sequence_length``). The text must be
            ``len(masks) * segment_length`` long.
        image_rule: "region" (the original's image-to-image rule; on PixArt and Wan it masks
            the self-attention layers) or "all" (Sana: only "all", its self-attention is
            linear).
        steps: a predicate on the step index (None: every step).
        blocks: a predicate on the JointLayout on Flux / SD3 (block kind and index), on the
            block index on PixArt / Sana / Wan (None: every block).
        uncond: "unmasked" (default) leaves the unconditional CFG rows unmasked (Wan: its
            unconditional call); "masked" masks them like the conditional rows.
    """

    def __init__(self, masks: Sequence, segment_length: int, *, image_rule: str = "region",
                 steps: Optional[Callable[[int], bool]] = None, blocks: Optional[Callable] = None,
                 uncond: str = "unmasked"):
        if len(masks) == 0:
            raise ValueError("masks: expected at least one region mask, got none")
        if image_rule not in IMAGE_RULES:
            raise ValueError(f"image_rule: expected one of {IMAGE_RULES}, got {image_rule!r}")
        if uncond not in ("unmasked", "masked"):
            raise ValueError(f"uncond: expected 'unmasked' or 'masked', got {uncond!r}")
        if isinstance(segment_length, bool) or not isinstance(segment_length, int) or segment_length < 1:
            raise ValueError(f"segment_length: expected a positive int, got {segment_length!r}")
        self.masks = [_region_mask(m, f"masks[{i}]") for i, m in enumerate(masks)]
        self.segment_length = segment_length
        self.image_rule = image_rule
        self.steps = steps
        self.blocks = blocks
        self.uncond = uncond
        self._image_scale = 1
        self._cache: Dict[tuple, Regions] = {}

    def on_generation_start(self, generation: Generation) -> None:
        self._image_scale = generation.image_scale

    def plan(self, call: AttentionCall) -> Optional[Plan]:
        joint = call.joint
        if joint is None and call.family not in CROSS_ATTENTION_FAMILIES:
            raise ValueError(f"RegionalPrompting: {call.layer} is {call.family or 'UNet'} attention; the tool is for "
                             "Flux and SD3 (joint attention) and PixArt, Sana and Wan (cross-attention) pipelines")
        if joint is None and call.family == SANA and self.image_rule == "region":
            raise ValueError("image_rule: 'region' masks image-to-image attention, and Sana's self-attention is "
                             "linear (no softmax; attnctl leaves it to diffusers): pass image_rule='all'")
        if self.steps is not None and not self.steps(call.step.index):
            return None
        unmasked = call.layout.uncond_rows if self.uncond == "unmasked" else range(0)
        if joint is None:
            return self._cross_attention_plan(call, unmasked)
        if self.blocks is not None and not self.blocks(joint):
            return None
        return Plan(regions=self.regions_for(joint, unmasked, call.batch, call.device))

    def regions_for(self, layout: JointLayout, unmasked_rows: range, batch: int, device) -> Regions:
        """The Regions of one joint layout (cached: one per layout, batch and device)."""
        key = (layout.text, layout.image, layout.grid, unmasked_rows, batch, device)
        regions = self._cache.get(key)
        if regions is None:
            text = len(layout.text)
            expected = len(self.masks) * self.segment_length
            if text not in (0, expected):
                raise ValueError(f"segment_length: {len(self.masks)} regions x {self.segment_length} tokens = "
                                 f"{expected} text tokens expected in the joint sequence, got {text}")
            segments = [range(layout.text.start + i * self.segment_length,
                              layout.text.start + (i + 1) * self.segment_length)
                        for i in range(len(self.masks))] if text else []
            for i, mask in enumerate(self.masks):
                if mask.dim() != 2:
                    raise ValueError(f"masks[{i}]: per-frame (frames, height, width) masks are for Wan; joint "
                                     f"attention takes a 2-D mask, got shape {tuple(mask.shape)}")
            masks = torch.stack([mask_on_grid(m, layout.grid, "nearest-exact") != 0 for m in self.masks])
            labels, allowed = region_labels(layout, segments, masks, self.image_rule)
            regions = self._cache[key] = _regions(labels, labels, allowed, unmasked_rows, batch, device)
        return regions

    def _cross_attention_plan(self, call: AttentionCall, unmasked: range) -> Optional[Plan]:
        """PixArt / Sana / Wan: the image→text block on cross-attention, the image→image
        block on self-attention (``image_rule="region"``); nothing on Wan I2V's
        image-context call or on rows that all stay unmasked."""
        if self.blocks is not None and not self.blocks(_block_index(call.layer)):
            return None
        if call.context != "text" or (not call.is_cross and self.image_rule == "all") or len(unmasked) == call.batch:
            return None
        key = (call.is_cross, call.grid, call.frames, call.keys, unmasked, call.batch, call.device)
        regions = self._cache.get(key)
        if regions is None:
            image_labels, allowed = region_table(self._token_masks(call.grid, call.frames), self.image_rule)
            keys = image_labels
            if call.is_cross:
                expected = len(self.masks) * self.segment_length
                if call.keys != expected:
                    raise ValueError(f"segment_length: {len(self.masks)} regions x {self.segment_length} tokens = "
                                     f"{expected} text tokens expected in {call.layer}'s keys, got {call.keys}")
                keys = torch.arange(call.keys) // self.segment_length
            regions = self._cache[key] = _regions(image_labels, keys, allowed, unmasked, call.batch, call.device)
        return Plan(regions=regions)

    def _token_masks(self, grid: Tuple[int, int], frames: int) -> torch.Tensor:
        """(R, frames·h·w) bool: each region's mask on the token grid, frame after frame."""
        out = []
        for i, mask in enumerate(self.masks):
            name = f"masks[{i}]"
            per_frame = mask if mask.dim() == 3 else mask[None]
            if per_frame.shape[0] not in (1, frames):
                expected = f"1 or {frames} frames (the video's latent frames after patchify)" if frames > 1 else (
                    "1 frame (the model makes images)")
                raise ValueError(f"{name}: expected {expected}, got {per_frame.shape[0]} (mask shape "
                                 f"{tuple(mask.shape)})")
            check_mask_size(per_frame[0], name, grid, self._image_scale)
            on_grid = torch.stack([mask_on_grid(m, grid, "nearest-exact") != 0 for m in per_frame])
            out.append(on_grid.expand(frames, -1).reshape(-1))
        return torch.stack(out)


def _regions(labels_q: torch.Tensor, labels_k: torch.Tensor, allowed: torch.Tensor, unmasked_rows: range,
             batch: int, device) -> Regions:
    """Mask-mode Regions with the query labels of ``unmasked_rows`` cleared (-1: unmasked)."""
    labels = labels_q[None].expand(batch, -1).clone()
    labels[unmasked_rows.start:unmasked_rows.stop] = -1
    if len(unmasked_rows) == 0:
        labels = labels[:1]
    return Regions(labels.to(device, non_blocking=True), labels_k[None].to(device, non_blocking=True),
                   allowed=allowed.to(device, non_blocking=True))


def _call_defaults(pipe, names: Sequence[str], given: dict) -> dict:
    """The pipeline's own values of its encode_prompt options ``names``: given ones, else
    the defaults of its ``__call__`` (which may differ from encode_prompt's)."""
    encode = inspect.signature(pipe.encode_prompt).parameters
    call = inspect.signature(pipe.__call__).parameters
    return {n: given.get(n, call[n].default) for n in names if n in encode and n in call}


def _cross_attention_embeds(pipe, family: str, prompts: Sequence[str], negative_prompt: str, cfg: bool,
                            options: dict) -> Tuple[dict, int]:
    """PixArt / Sana / Wan: each regional prompt (and, with CFG, the negative prompt once per
    region) encoded as the pipeline encodes a prompt, concatenated on the text axis (with
    PixArt's and Sana's attention masks)."""
    device = pipe._execution_device
    encode = _call_defaults(pipe, ("max_sequence_length", "clean_caption", "complex_human_instruction"), options)
    if family == WAN and pipe.transformer.config.added_kv_proj_dim is not None:
        # I2V layers split their keys at 512 tokens from the end (diffusers hard-codes it):
        # the concatenated segments must be exactly that long.
        if len(prompts) * encode["max_sequence_length"] != WAN_TEXT_TOKENS:
            raise ValueError(f"max_sequence_length: Wan I2V layers take the last {WAN_TEXT_TOKENS} tokens of their "
                             f"keys as the text, so {len(prompts)} regional prompts need "
                             f"{WAN_TEXT_TOKENS} / {len(prompts)} tokens each, got {encode['max_sequence_length']}")
    with torch.no_grad():
        parts = [pipe.encode_prompt(p, negative_prompt=negative_prompt, do_classifier_free_guidance=cfg,
                                    device=device, **encode) for p in prompts]
    names = (("prompt_embeds", "negative_prompt_embeds") if family == WAN else
             ("prompt_embeds", "prompt_attention_mask", "negative_prompt_embeds", "negative_prompt_attention_mask"))
    kwargs = {name: torch.cat([p[i] for p in parts], dim=1) for i, name in enumerate(names)
              if cfg or not name.startswith("negative")}
    if cfg:   # the pipelines refuse a negative prompt (PixArt's and Sana's default "") with its embeddings
        kwargs["negative_prompt"] = None
    return kwargs, parts[0][0].shape[1]


def regional_prompt_embeds(pipe, prompts: Sequence[str], base_prompt: Optional[str], *, negative_prompt: str = "",
                           max_sequence_length: Optional[int] = None, cfg: bool = True,
                           **encode_options) -> Tuple[dict, int]:
    """Pipeline keyword arguments with the regional prompts' embeddings concatenated on
    the text axis, and the tokens per prompt (the RegionalPrompting ``segment_length``).

    The pooled vector comes from ``base_prompt`` (the original's). SD3 (``cfg``): the
    negative prompt is encoded once per region, so both halves have the same length.
    PixArt, Sana and Wan have no pooled vector (``base_prompt`` must be None); their
    prompts are encoded with the pipeline's own ``max_sequence_length``,
    ``clean_caption`` and (Sana) ``complex_human_instruction`` unless given in
    ``encode_options``, the negative prompt once per region with CFG."""
    device = pipe._execution_device
    family = type(pipe).__name__
    options = {} if max_sequence_length is None else dict(max_sequence_length=max_sequence_length)
    transformer = getattr(pipe, "transformer", None)
    cross = dit_family(transformer) if transformer is not None else None
    if cross is not None:
        if base_prompt is not None:
            raise ValueError(f"base_prompt: {family} has no pooled text vector (the base prompt's only use on "
                             "Flux / SD3): pass None")
        return _cross_attention_embeds(pipe, cross, prompts, negative_prompt, cfg, {**encode_options, **options})
    if encode_options:
        raise TypeError(f"regional_prompt_embeds: unexpected options {sorted(encode_options)} for {family} "
                        "(they are for PixArt, Sana and Wan)")
    if family.startswith("Flux"):
        def encode(text):
            embeds, pooled, _ = pipe.encode_prompt(prompt=text, prompt_2=text, device=device, **options)
            return embeds, pooled
        parts = [encode(p)[0] for p in prompts]
        kwargs = dict(prompt_embeds=torch.cat(parts, dim=1), pooled_prompt_embeds=encode(base_prompt)[1])
    elif family.startswith("StableDiffusion3"):
        def encode(text, negative):
            embeds, neg, pooled, neg_pooled = pipe.encode_prompt(
                prompt=text, prompt_2=text, prompt_3=text, device=device, do_classifier_free_guidance=cfg,
                negative_prompt=negative, negative_prompt_2=negative, negative_prompt_3=negative, **options)
            return embeds, neg, pooled, neg_pooled
        parts = [encode(p, negative_prompt) for p in prompts]
        base = encode(base_prompt, negative_prompt)
        kwargs = dict(prompt_embeds=torch.cat([p[0] for p in parts], dim=1), pooled_prompt_embeds=base[2])
        if cfg:
            kwargs.update(negative_prompt_embeds=torch.cat([p[1] for p in parts], dim=1),
                          negative_pooled_prompt_embeds=base[3])
    else:
        raise TypeError(f"pipe: expected a Flux, SD3, PixArt, Sana or Wan pipeline, got {family}")
    return kwargs, parts[0][0].shape[1] if family.startswith("StableDiffusion3") else parts[0].shape[1]


def _mask_prompt_pairs(regions) -> Tuple[Tuple[torch.Tensor, ...], Tuple[str, ...]]:
    """(masks, prompts) of regional_generate's ``regions``, every mask checked (before any
    prompt is encoded)."""
    if isinstance(regions, (str, bytes)) or not isinstance(regions, Sequence) or not regions:
        raise ValueError(f"regions: expected a non-empty list of (mask, prompt) pairs, got {regions!r:.200}")
    masks, prompts = [], []
    for i, region in enumerate(regions):
        if not isinstance(region, (tuple, list)) or len(region) != 2:
            what = f"a {type(region).__name__}" + (f" of {len(region)}" if isinstance(region, (tuple, list)) else "")
            raise ValueError(f"regions[{i}]: expected a (mask, prompt) pair, got {what}")
        mask, prompt = region
        if not isinstance(prompt, str):
            raise TypeError(f"regions[{i}] prompt: expected a str, got {type(prompt).__name__}")
        masks.append(_region_mask(mask, f"regions[{i}] mask"))
        prompts.append(prompt)
    return tuple(masks), tuple(prompts)


def regional_generate(pipe, base_prompt: Optional[str], regions: Sequence[Tuple[object, str]], *,
                      image_rule: str = "region", steps=None, blocks=None, negative_prompt: str = "",
                      max_sequence_length: Optional[int] = None, **pipe_kwargs):
    """Generate with one prompt per image region: ``regions`` is a list of (mask, prompt)
    (``base_prompt``: Flux / SD3's pooled vector; None on PixArt, Sana and Wan).

    Installs attnctl on the pipeline for the call if it is not installed (and uninstalls
    after), adds a :class:`RegionalPrompting` controller for the call only, and returns
    the pipeline's output."""
    find_model(pipe)   # a clear error for what is no supported pipeline
    masks, prompts = _mask_prompt_pairs(regions)
    guidance = inspect.signature(pipe.__call__).parameters.get("guidance_scale")
    cfg = pipe_kwargs.get("guidance_scale", guidance.default if guidance is not None else 7.0) > 1.0
    encode = {k: pipe_kwargs[k] for k in ("clean_caption", "complex_human_instruction") if k in pipe_kwargs}
    # Attached before the prompts are encoded: encoding through an installation's
    # encode_prompt starts a generation, which a failed call takes back.
    with Attachment(pipe) as attached:
        kwargs, segment = regional_prompt_embeds(pipe, prompts, base_prompt, negative_prompt=negative_prompt,
                                                 max_sequence_length=max_sequence_length, cfg=cfg, **encode)
        if max_sequence_length is not None:
            kwargs["max_sequence_length"] = max_sequence_length
        attached.add(RegionalPrompting(masks, segment, image_rule=image_rule, steps=steps, blocks=blocks))
        return pipe(**kwargs, **pipe_kwargs)
