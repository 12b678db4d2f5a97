"""Paint-with-words on Flux and SD3 joint attention (attnctl.tools.paint.PaintWithWords)
against a materialising reference written here like the original (cloneofsimo/
paint-with-words-sd ``inj_forward``: scores = QKᵀ, + w·log(1+σ)·max(QKᵀ)·A on the
conditional pass, then softmax(scores · scale)), mapped onto the joint logits: the term
goes to the image query rows × the phrase's text key columns, max(QKᵀ) is that block's
over all heads. Tiny offline pipelines, 2 steps, non-square; tolerance from the
reference's own fp32 error (an fp64 run)."""
import math

import pytest
import torch
import torch.nn.functional as F

import attnctl
from attnctl.diffusers.joint import JOINT
from attnctl.diffusers.offline_mmdit import tiny_flux_pipeline, tiny_sd3_pipeline
from attnctl.tools.paint import PaintWithWords
from diffusion_helpers import reference_tolerance, weights_in
from sdpa_replay import sdpa_replay

pytestmark = pytest.mark.filterwarnings("ignore:divide by zero:RuntimeWarning")
HEIGHT, WIDTH, TEXT = 16, 24, 16      # image 16 x 24 -> 4 x 6 image tokens (Flux and SD3)
GRID = (4, 6)
CLIP_TOKENS = 77
PROMPTS = ["a cat and a cat on a car", "a photo of a dog on the car"]   # "a" several times in each


def _masks():
    """One mask at the image size, one at the image token grid, neither aligned to it."""
    car = torch.zeros(HEIGHT, WIDTH)
    car[5:15, 9:22] = 1.0
    a = torch.zeros(GRID)
    a[:3, :2] = 1.0
    a[3, 4] = 0.5
    return car, a


def _columns(tokenizer, prompt, phrase, length):
    """Text columns of every occurrence of the phrase's pieces in the prompt's ids (the
    original's ``tokenized_prompt[idx : idx + len(v_as_tokens)] == v_as_tokens``)."""
    ids = tokenizer(prompt, truncation=True, max_length=length).input_ids
    piece_ids = tokenizer.convert_tokens_to_ids(tokenizer.tokenize(phrase))
    n = len(piece_ids)
    return [c for s in range(len(ids) - n + 1) if ids[s:s + n] == piece_ids for c in range(s, s + n)]


def _areas(segments, prompts, regions):
    """A per conditional image (images, image tokens, text columns): Σ strength · mask on
    the token grid (bilinear, align_corners=True, as the original's
    ``_img_importance_flatten``) at the phrase's columns in each (tokenizer, first
    column, length) segment."""
    text_len = max(start + length for _, start, length in segments)
    out = torch.zeros(len(prompts), GRID[0] * GRID[1], text_len, dtype=torch.float64)
    for i, prompt in enumerate(prompts):
        for phrase, mask, strength in regions:
            on_grid = F.interpolate(mask[None, None].double(), size=GRID, mode="bilinear", align_corners=True)
            columns = sorted({start + c for tokenizer, start, length in segments
                              for c in _columns(tokenizer, prompt, phrase, length)})
            assert columns, (phrase, prompt)
            out[i][:, columns] += strength * on_grid.reshape(-1, 1)
    return out


def painted_sdpa(pipe, areas, text_first, weight, layers=None):
    """Stock processors; their SDPA call on the ``layers`` (all: None) becomes the
    original's attention on the joint sequence: the (unscaled) logits' image-row ×
    text-column block of each conditional row (the last ``len(areas)`` rows) gets
    w·log(1+σ)·max(block)·A, σ = scheduler.sigmas[step]; then softmax(· scale)·v."""
    images, _, text_len = areas.shape

    def explicit(call, query, key, value, attn_mask):
        scores = query @ key.transpose(-1, -2)
        if layers is None or call.layer in layers:
            L = key.shape[2]
            image = slice(text_len, L) if text_first else slice(0, L - text_len)
            text = slice(0, text_len) if text_first else slice(L - text_len, L)
            sigma = float(pipe.scheduler.sigmas[call.forward])
            for i in range(images):
                row = query.shape[0] - images + i
                block = scores[row, :, image, text]
                scores[row, :, image, text] = block + weight * math.log(1 + sigma) * block.max() * areas[i].to(
                    scores.dtype)
        return torch.softmax(scores * query.shape[-1] ** -0.5, dim=-1) @ value

    return sdpa_replay(pipe.transformer, explicit)


def _latents(pipe, images, flux):
    h, w = HEIGHT // pipe.vae_scale_factor, WIDTH // pipe.vae_scale_factor
    channels = pipe.vae.config.latent_channels
    shape = (images, h * w // 4, 4 * channels) if flux else (images, channels, h, w)
    return torch.randn(shape, generator=torch.Generator().manual_seed(0))


def _compare(pipe, prompts, controller, reference, backend, **options):
    """attnctl with ``controller`` against ``reference(dtype)`` (a context) run in fp64,
    within twice the reference's own fp32 error; returns the plans the controller gave."""
    latents = options.pop("latents")
    options = dict(height=HEIGHT, width=WIDTH, num_inference_steps=2, output_type="latent",
                   max_sequence_length=TEXT, **options)

    def run(dtype):
        with weights_in(pipe, dtype), reference():
            return pipe(prompts, **options, latents=latents.to(dtype)).images

    fp64 = run(torch.float64)
    fp32 = run(torch.float32)
    tolerance = reference_tolerance(fp32, fp64)
    plans, plan = [], controller.plan
    controller.plan = lambda call: plans.append(plan(call)) or plans[-1]
    with attnctl.install(pipe, controller, backend=backend):
        got = pipe(prompts, **options, latents=latents).images
    assert attnctl.last_dispatch().backend == backend
    plain = pipe(prompts, **options, latents=latents).images
    assert (plain.double() - fp64).abs().max() > 100 * tolerance   # the painting matters
    assert (got.double() - fp64).abs().max() <= tolerance
    return plans


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_flux_paint_equals_the_reference_batch_of_two_prompts(backend):
    """Flux (text first, T5 only): double- and single-stream blocks, two different prompts
    (the phrases at different columns, "a" painted at every occurrence), the default w."""
    pipe = tiny_flux_pipeline()
    car, a = _masks()
    regions = [("car", car, 4.0), ("a", a, 2.0)]
    areas = _areas([(pipe.tokenizer_2, 0, TEXT)], PROMPTS, regions)
    plans = _compare(pipe, PROMPTS, PaintWithWords(regions),
                     lambda: painted_sdpa(pipe, areas, text_first=True, weight=0.1), backend,
                     latents=_latents(pipe, 2, flux=True))
    # Every joint layer (1 double + 1 single block) x 2 steps painted, through one bias buffer.
    assert len(plans) == 4 and len({p.bias.data_ptr() for p in plans}) == 1
    assert plans[0].bias.shape == (2, 1, TEXT + 24, TEXT + 24)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_sd3_paint_with_cfg_equals_the_reference(backend):
    """SD3 (image first; 77 CLIP columns then T5) with CFG: every occurrence in both text
    segments painted on the conditional rows, the unconditional rows untouched."""
    pipe = tiny_sd3_pipeline()
    car, a = _masks()
    regions = [("car", car, 3.0), ("a", a, 1.5)]
    segments = [(pipe.tokenizer, 0, CLIP_TOKENS), (pipe.tokenizer_3, CLIP_TOKENS, TEXT)]
    areas = _areas(segments, PROMPTS, regions)
    _compare(pipe, PROMPTS, PaintWithWords(regions, weight=0.3),
             lambda: painted_sdpa(pipe, areas, text_first=False, weight=0.3), backend,
             latents=_latents(pipe, 2, flux=False), guidance_scale=4.0)


def test_sd3_paint_t5_segment_and_block_filter():
    """``text="t5"`` paints the T5 columns only; ``blocks`` limits it to the joint blocks
    (the last block, context_pre_only, is left alone)."""
    pipe = tiny_sd3_pipeline()
    car, _ = _masks()
    regions = [("car", car, 6.0)]
    areas = _areas([(pipe.tokenizer_3, CLIP_TOKENS, TEXT)], PROMPTS[:1], regions)
    controller = PaintWithWords(regions, text="t5", blocks=lambda layout: layout.block == JOINT)
    plans = _compare(pipe, PROMPTS[:1], controller,
                     lambda: painted_sdpa(pipe, areas, text_first=False, weight=0.1,
                                          layers={"transformer_blocks.0.attn"}),
                     "torch", latents=_latents(pipe, 1, flux=False), guidance_scale=4.0)
    assert sum(p is not None for p in plans) == 2     # one painted layer x 2 steps


def test_flux_paints_the_t5_prompt_2():
    """Flux's T5 encodes ``prompt_2`` when given (CLIP, which gives only a pooled vector,
    gets ``prompt``): the phrases are found there."""
    pipe = tiny_flux_pipeline()
    car, _ = _masks()
    regions = [("photo", car, 5.0)]
    areas = _areas([(pipe.tokenizer_2, 0, TEXT)], ["a photo of a dog"], regions)
    _compare(pipe, ["a cat"], PaintWithWords(regions), lambda: painted_sdpa(pipe, areas, text_first=True, weight=0.1),
             "torch", latents=_latents(pipe, 1, flux=True), prompt_2="a photo of a dog")


def test_sd35_image_only_attention_is_left_alone():
    pipe = tiny_sd3_pipeline(sd35=True)
    controller = PaintWithWords({"car": _masks()[0]})
    painted, plan = {}, controller.plan

    def recorded(call):
        painted[call.layer] = plan(call)
        return painted[call.layer]

    controller.plan = recorded
    with attnctl.install(pipe, controller, backend="torch"):
        pipe("a car", height=HEIGHT, width=WIDTH, num_inference_steps=1, output_type="latent",
             max_sequence_length=TEXT)
    assert {layer: plan is not None for layer, plan in painted.items()} == {
        "transformer_blocks.0.attn": True, "transformer_blocks.0.attn2": False, "transformer_blocks.1.attn": True}


def test_paint_joint_bad_input():
    flux = tiny_flux_pipeline()
    car, a = _masks()
    options = dict(height=HEIGHT, width=WIDTH, num_inference_steps=1, output_type="latent",
                   max_sequence_length=TEXT)
    cases = [
        (PaintWithWords({"zebra": car}), r"regions: phrase 'zebra' is not in the prompt's tokens of any selected "
                                         r"text segment \(t5 'a cat on a car'\)"),
        (PaintWithWords({"car": torch.ones(5, 7)}), r"regions\[0\] \('car'\) mask: expected the image size "
                                                    r"\(16, 24\) or the latent size \(4, 6\)"),
        (PaintWithWords({"car": car}, text="clip"), r"text: this pipeline's text columns hold \['t5'\] tokens, "
                                                    r"got text='clip'"),
        (PaintWithWords({"cat": car}, occurrence=1), r"occurrence: 'cat' appears 1 time\(s\) in the prompt"),
    ]
    for controller, message in cases:
        with pytest.raises(ValueError, match=message):
            with attnctl.install(flux, controller):
                flux("a cat on a car", **options)
    with attnctl.install(flux.transformer, PaintWithWords({"car": car})) as installation:
        installation.start_generation(["a cat on a car"], tokenizer=flux.tokenizer_2)   # no text segments
        with pytest.raises(ValueError, match="PaintWithWords: transformer_blocks.0.attn is MM-DiT joint attention, "
                                             "but the generation did not say which text encoder's tokens"):
            flux("a cat on a car", **options)
    with pytest.raises(ValueError, match=r"text: expected None \(every text segment\) or one of \('t5', 'clip'\), "
                                         r"got 'T5'"):
        PaintWithWords({"car": car}, text="T5")
    with pytest.raises(TypeError, match="blocks: expected a predicate on a JointLayout, got str"):
        PaintWithWords({"car": car}, blocks="single")


def test_paint_segment_options_refused_on_a_unet():
    from diffusion_helpers import sd_pipe

    pipe = sd_pipe()
    with pytest.raises(ValueError, match="text: selects a text segment of a Flux / SD3 pipeline's prompt"):
        with attnctl.install(pipe, PaintWithWords({"cat": torch.ones(8, 12)}, text="t5")):
            pipe("a cat", height=16, width=24, num_inference_steps=1, output_type="latent")
