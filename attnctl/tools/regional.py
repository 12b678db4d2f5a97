"""Regional prompting on Flux and SD3 joint attention, with a label mask in the kernel.

Each region of the image gets its own prompt. The prompts are encoded one by one and
concatenated on the text axis (each segment one encoder sequence long), and joint
attention is restricted by the mask rule of Chen et al. 2024, "Training-free Regional
Prompting for Diffusion Transformers" (instantX-research/Regional-Prompting-FLUX,
``pipeline_flux_regional.py``), which diffusers#10025 / #10044 asked diffusers to pass:

* a text token of segment i attends to segment i and to the image tokens of region i;
* an image token attends to the segments of the regions that contain it;
* image tokens (``image_rule="region"``, the original's rule) attend to the image tokens
  that share a region with them, and tokens in no region to each other; with
  ``image_rule="all"`` every image token attends to every image token (InvokeAI's
  unrestricted image self-attention).

Masks are given at image (or any) size and resized to the image token grid with
``nearest-exact``, as the original does; a non-zero value is inside.

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

from typing import Callable, Dict, Optional, Sequence, Tuple

import torch

from ..diffusers.controller import AttentionCall, Controller, Plan
from ..diffusers.install import install, installation_of
from ..diffusers.joint import JointLayout
from ..regions import MAX_MASK_LABELS, Regions
from ._masks import as_mask, mask_on_grid

IMAGE_RULES = ("region", "all")


def region_labels(layout: JointLayout, segments: Sequence[range], masks: torch.Tensor,
                  image_rule: str = "region") -> Tuple[torch.Tensor, torch.Tensor]:
    """Labels of the joint sequence (L,) int64 and the (K, K) table of which label may
    attend which, for text ``segments`` (ranges inside ``layout.text``, one per region)
    and ``masks`` (R, h*w) bool on the image token grid."""
    R = masks.shape[0]
    labels = torch.full((len(layout.text) + len(layout.image),), -1, dtype=torch.int64)
    for i, segment in enumerate(segments):
        labels[segment.start:segment.stop] = i
    # Image tokens: one label per distinct set of regions (a bit pattern over the regions).
    membership = (masks.long() << torch.arange(R)[:, None]).sum(0)              # (h*w,)
    sets, inverse = torch.unique(membership, return_inverse=True)
    if R + len(sets) > MAX_MASK_LABELS:
        raise ValueError(f"masks: {R} regions overlap in {len(sets)} distinct ways, which needs "
                         f"{R + len(sets)} labels; at most {MAX_MASK_LABELS} fit")
    labels[layout.image.start:layout.image.stop] = R + inverse
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
    return labels, allowed


class RegionalPrompting(Controller):
    """The regional mask on every joint attention call of the chosen steps and blocks.

    Args:
        masks: one 2-D mask per region (tensor, array or image; any size, resized to the
            image token grid with ``nearest-exact``; non-zero = inside).
        segment_length: text tokens per region in the joint text (each region's prompt
            encoded to one encoder sequence: Flux ``max_sequence_length``, SD3 77 + that).
            The joint text must be ``len(masks) * segment_length`` long.
        image_rule: "region" (the original's image-to-image rule) or "all".
        steps: a predicate on the step index (None: every step).
        blocks: a predicate on the JointLayout (block kind and index; None: every block).
        uncond: "unmasked" (default) leaves the unconditional CFG rows unmasked; "masked"
            masks them like the conditional rows.
    """

    def __init__(self, masks: Sequence, segment_length: int, *, image_rule: str = "region",
                 steps: Optional[Callable[[int], bool]] = None,
                 blocks: Optional[Callable[[JointLayout], bool]] = None, uncond: str = "unmasked"):
        if len(masks) == 0:
            raise ValueError("masks: expected at least one region mask, got none")
        if image_rule not in IMAGE_RULES:
            raise ValueError(f"image_rule: expected one of {IMAGE_RULES}, got {image_rule!r}")
        if uncond not in ("unmasked", "masked"):
            raise ValueError(f"uncond: expected 'unmasked' or 'masked', got {uncond!r}")
        if isinstance(segment_length, bool) or not isinstance(segment_length, int) or segment_length < 1:
            raise ValueError(f"segment_length: expected a positive int, got {segment_length!r}")
        self.masks = [as_mask(m, f"masks[{i}]") for i, m in enumerate(masks)]
        self.segment_length = segment_length
        self.image_rule = image_rule
        self.steps = steps
        self.blocks = blocks
        self.uncond = uncond
        self._cache: Dict[tuple, Regions] = {}

    def plan(self, call: AttentionCall) -> Optional[Plan]:
        joint = call.joint
        if joint is None:
            raise ValueError(f"RegionalPrompting: {call.layer} is not MM-DiT joint attention; the tool "
                             "is for Flux and SD3 pipelines")
        if self.steps is not None and not self.steps(call.step.index):
            return None
        if self.blocks is not None and not self.blocks(joint):
            return None
        return Plan(regions=self.regions_for(joint, call.layout.uncond_rows if self.uncond == "unmasked"
                                             else range(0), call.batch, call.device))

    def regions_for(self, layout: JointLayout, unmasked_rows: range, batch: int, device) -> Regions:
        """The Regions of one layout (cached: one per layout, batch and device)."""
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
            masks = torch.stack([mask_on_grid(m, layout.grid, "nearest-exact") != 0 for m in self.masks])
            labels, allowed = region_labels(layout, segments, masks, self.image_rule)
            labels = labels[None].expand(batch, -1).clone()
            labels[unmasked_rows.start:unmasked_rows.stop] = -1
            if len(unmasked_rows) == 0:
                labels = labels[:1]
            regions = Regions(labels.to(device), labels.to(device), allowed=allowed.to(device))
            self._cache[key] = regions
        return regions


def regional_prompt_embeds(pipe, prompts: Sequence[str], base_prompt: str, *, negative_prompt: str = "",
                           max_sequence_length: Optional[int] = None, cfg: bool = True) -> Tuple[dict, int]:
    """Pipeline keyword arguments with the regional prompts' embeddings concatenated on
    the text axis, and the tokens per prompt (the RegionalPrompting ``segment_length``).

    The pooled vector comes from ``base_prompt`` (the original's). SD3 (``cfg``): the
    negative prompt is encoded once per region, so both halves have the same length."""
    device = pipe._execution_device
    family = type(pipe).__name__
    options = {} if max_sequence_length is None else dict(max_sequence_length=max_sequence_length)
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
        raise TypeError(f"pipe: expected a FluxPipeline or StableDiffusion3Pipeline, got {family}")
    return kwargs, parts[0][0].shape[1] if family.startswith("StableDiffusion3") else parts[0].shape[1]


def regional_generate(pipe, base_prompt: str, regions: Sequence[Tuple[object, str]], *,
                      image_rule: str = "region", steps=None, blocks=None, negative_prompt: str = "",
                      max_sequence_length: Optional[int] = None, **pipe_kwargs):
    """Generate with one prompt per image region: ``regions`` is a list of (mask, prompt).

    Installs attnctl on the pipeline for the call if it is not installed (and uninstalls
    after), adds a :class:`RegionalPrompting` controller for the call only, and returns
    the pipeline's output."""
    if not regions:
        raise ValueError("regions: expected at least one (mask, prompt) pair, got none")
    masks, prompts = zip(*regions)
    cfg = pipe_kwargs.get("guidance_scale", getattr(pipe, "_guidance_scale", 7.0)) > 1.0
    kwargs, segment = regional_prompt_embeds(pipe, prompts, base_prompt, negative_prompt=negative_prompt,
                                             max_sequence_length=max_sequence_length, cfg=cfg)
    if max_sequence_length is not None:
        kwargs["max_sequence_length"] = max_sequence_length
    controller = RegionalPrompting(masks, segment, image_rule=image_rule, steps=steps, blocks=blocks)
    installation = installation_of(pipe)
    owned = installation is None
    if owned:
        installation = install(pipe)
    installation.add(controller)
    try:
        return pipe(**kwargs, **pipe_kwargs)
    finally:
        installation.remove(controller)
        if owned:
            installation.uninstall()
