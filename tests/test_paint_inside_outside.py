"""Paint-with-words and inside-outside attention against materialising replays of the
originals (tests/original_replay.py, written from their code) with the originals'
defaults, and against test-written references for attnctl's options; on the reference
and Triton-interpreter backends."""
import math

import numpy as np
import PIL.Image
import pytest
import torch
import torch.nn.functional as F

import attnctl
from attnctl.tools.inside_outside import InsideOutside
from attnctl.tools.paint import PaintWithWords
from control_reference import ReferenceState, generate_latents, run_reference, sigma_of, word_columns
from diffusion_helpers import sd_pipe
from original_replay import InsideOutsideOriginal, PaintWithWordsOriginal, layer_grid, pww_color_regions

pytestmark = pytest.mark.filterwarnings("ignore:divide by zero:RuntimeWarning")
SIZE = dict(height=16, width=24)      # latent 8 x 12
PROMPT = ["a cat on a red car"]


def _mask(h, w, top_left=True):
    m = torch.zeros(h, w)
    if top_left:
        m[: h // 2, : w // 2 + 1] = 1.0
    else:
        m[h // 3:, w // 3:] = 1.0
    return m


def _on_grid(mask, grid):
    return F.interpolate(mask[None, None], size=grid, mode="nearest")[0, 0].reshape(-1)


def _compare(pipe, state, controller, backend, prompt=PROMPT, **kwargs):
    expected = run_reference(pipe, state, prompt, steps=2, **SIZE, **kwargs)
    with attnctl.install(pipe, controller, backend=backend):
        got = generate_latents(pipe, prompt, steps=2, **SIZE, **kwargs)
    # fp32 rounding is relative to the latents' scale (k-diffusion schedulers multiply
    # them by σ_max ≈ 15): the absolute tolerance follows it.
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5 * float(expected.abs().max()))
    plain = generate_latents(pipe, prompt, steps=2, **SIZE, **kwargs)
    assert not torch.allclose(got, plain, atol=1e-4)   # the control acts


def _sigmas_pipe():
    """The tiny pipeline with a k-diffusion scheduler whose σ_t is sigmas[step], as the
    original's LMS scheduler (Euler has LMS's sigmas; LMS itself needs scipy)."""
    from diffusers import EulerDiscreteScheduler

    pipe = sd_pipe()
    return type(pipe)(**{**pipe.components, "scheduler": EulerDiscreteScheduler.from_config(pipe.scheduler.config)})


def _color_map():
    """16 x 24 RGB: a red block (cat) and a blue block (red car), off the 8 x 12 grid."""
    image = np.zeros((16, 24, 3), dtype=np.uint8)
    image[1:10, 2:11] = (255, 0, 0)
    image[7:15, 13:22] = (0, 0, 255)
    return image


PAINT_PROMPT = ["a cat and a cat on a red car"]   # "cat" twice: the original paints both


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_paint_with_words_color_map_equals_the_original(backend):
    pipe = _sigmas_pipe()
    colors = {(255, 0, 0): "cat,2.0", "#0000ff": "red car,0.5"}     # the original's form
    original = PaintWithWordsOriginal(pipe, PAINT_PROMPT[0], pww_color_regions(_color_map(), colors))
    controller = PaintWithWords.from_color_map(PIL.Image.fromarray(_color_map()),
                                               {(255, 0, 0): "cat,2.0", "#0000ff": ("red car", 0.5)})
    _compare(pipe, original, controller, backend, prompt=PAINT_PROMPT)


def test_paint_with_words_dict_form_equals_the_original():
    pipe = _sigmas_pipe()
    cat = _mask(16, 24) * 0.7 + 0.1
    original = PaintWithWordsOriginal(pipe, PAINT_PROMPT[0], [("cat", cat * 1.5), ("car", _mask(16, 24, False))])
    controller = PaintWithWords({"cat": (cat, 1.5), "car": _mask(16, 24, False)})
    _compare(pipe, original, controller, "torch", prompt=PAINT_PROMPT)


def test_paint_with_words_options_nearest_first_occurrence_weight():
    pipe = sd_pipe()
    cat_mask, car_mask = _mask(16, 24), _mask(8, 12, top_left=False)   # image size, latent size
    weight = 3.0
    tok = pipe.tokenizer

    class Paint(ReferenceState):
        def bias(self, info):
            if not info.is_cross:
                return None
            B, H, M, _ = info.q.shape
            N = info.k.shape[2]
            grid = layer_grid(info.latent, M)
            area = torch.zeros(M, N)
            area[:, word_columns(tok, PAINT_PROMPT[0], "cat")] += 2.0 * _on_grid(cat_mask, grid)[:, None]
            area[:, word_columns(tok, PAINT_PROMPT[0], "car")] += 0.5 * _on_grid(car_mask, grid)[:, None]
            qk = info.q @ info.k.transpose(-1, -2)                        # unscaled, materialised
            bias = torch.zeros(B, 1, M, N)
            for row in range(B // 2, B):
                top = qk[row].max()
                bias[row, 0] = info.scale * weight * math.log(1 + sigma_of(pipe, info.timestep)) * top * area
            return bias

    controller = PaintWithWords({"cat": (cat_mask, 2.0), "car": (car_mask, 0.5)}, weight=weight,
                                resize="nearest", occurrence=0)
    _compare(pipe, Paint(), controller, "torch", prompt=PAINT_PROMPT)


def _object_image():
    """A black-and-white 16 x 24 mask image (white = the object), off the layer grids."""
    image = np.zeros((16, 24), dtype=np.uint8)
    image[3:12, 5:17] = 255
    return PIL.Image.fromarray(image)


@pytest.mark.parametrize("backend, schedule", [("torch", 1.0), ("triton", 1.0), ("torch", "cosine")])
def test_inside_outside_equals_the_original(backend, schedule):
    pipe = sd_pipe()
    tok = pipe.tokenizer
    inside = word_columns(tok, PROMPT[0], "cat")
    red, car = word_columns(tok, PROMPT[0], "red"), word_columns(tok, PROMPT[0], "car")
    original = InsideOutsideOriginal(_object_image(), inside, red + car, [0], self_schedule=schedule,
                                     fixed=(None, red), progress_of_step=lambda step: step / 2)
    controller = InsideOutside(_object_image(), inside="cat", outside=["red", "car"], fixed="red",
                               self_strength=schedule)
    _compare(pipe, original, controller, backend, guidance_scale=7.5)


def test_inside_outside_key_columns_equal_words():
    pipe = sd_pipe()
    tok = pipe.tokenizer
    inside = word_columns(tok, PROMPT[0], "cat")
    outside = word_columns(tok, PROMPT[0], "car")
    original = InsideOutsideOriginal(_object_image(), inside, outside, [0])
    _compare(pipe, original, InsideOutside(_object_image(), inside, outside), "torch")


def test_inside_outside_attnctl_options_cond_half_no_boost():
    pipe = sd_pipe()
    mask = _mask(8, 12)
    tok = pipe.tokenizer
    inside_cols = word_columns(tok, PROMPT[0], "cat")
    outside_cols = word_columns(tok, PROMPT[0], "red") + word_columns(tok, PROMPT[0], "car")
    s_cross, s_self = 0.8, 0.6

    class InOut(ReferenceState):
        def mult(self, info):
            B, H, M, _ = info.q.shape
            N = info.k.shape[2]
            inside = _on_grid(mask, layer_grid(info.latent, M)) > 0.5                  # (M,)
            f = torch.ones(B, 1, M, N)
            for row in range(B // 2, B):
                for m in range(M):
                    if info.is_cross:
                        wrong = outside_cols if inside[m] else inside_cols
                        f[row, 0, m, wrong] = 1 - s_cross
                    else:
                        f[row, 0, m, inside != inside[m]] = 1 - s_self
            return f

    controller = InsideOutside(mask, inside="cat", outside=["red", "car"], cross_strength=s_cross,
                               self_strength=s_self, cross_boost=1.0, zeroed=(), halves="cond", resize="nearest")
    _compare(pipe, InOut(), controller, "torch")


def test_two_region_controllers_are_refused():
    pipe = sd_pipe()
    mask = _mask(8, 12)
    a = InsideOutside(mask, inside="cat", cross_strength=None)
    b = InsideOutside(mask, inside="car", cross_strength=None)
    with attnctl.install(pipe, a, b, backend="torch"):
        with pytest.raises(ValueError, match="regions: expected at most one controller's plan with regions"):
            generate_latents(pipe, PROMPT, steps=1, **SIZE)


def test_bad_input():
    pipe = sd_pipe()
    with attnctl.install(pipe, PaintWithWords({"cat": torch.ones(10, 10)}), backend="torch"):
        with pytest.raises(ValueError, match=r"regions\[0\] \('cat'\) mask: expected the image size \(16, 24\) or "
                                             r"the latent size \(8, 12\) \(height, width\), got \(10, 10\)"):
            generate_latents(pipe, PROMPT, steps=1, **SIZE)
    with attnctl.install(pipe, PaintWithWords({"dog": torch.ones(8, 12)}), backend="torch"):
        with pytest.raises(ValueError, match=r"regions: phrase 'dog' \(tokens .*\) is not in the prompt 'a cat on"):
            generate_latents(pipe, PROMPT, steps=1, **SIZE)
    with attnctl.install(pipe, PaintWithWords({"cat": torch.ones(8, 12)}, occurrence=1), backend="torch"):
        with pytest.raises(ValueError, match="occurrence: 'cat' appears 1 time"):
            generate_latents(pipe, PROMPT, steps=1, **SIZE)
    with attnctl.install(pipe, InsideOutside(torch.ones(4, 4), inside="cat"), backend="torch"):
        with pytest.raises(ValueError, match=r"mask: expected the image size \(16, 24\) .* got \(4, 4\)"):
            generate_latents(pipe, PROMPT, steps=1, **SIZE)
    with attnctl.install(pipe, InsideOutside(torch.ones(8, 12), inside=[80]), backend="torch"):
        with pytest.raises(ValueError, match="inside: key column 80 is beyond the 77 text tokens"):
            generate_latents(pipe, PROMPT, steps=1, **SIZE)
    with pytest.raises(ValueError, match="regions\\['cat'\\] mask: expected a 2-D"):
        PaintWithWords({"cat": torch.ones(2, 3, 4, 5)})
    with pytest.raises(ValueError, match="cross_strength: expected a finite number or None, got nan"):
        InsideOutside(torch.ones(8, 12), inside="cat", cross_strength=float("nan"))
    with pytest.raises(ValueError, match="self_strength: expected a number, None or one of 'linear'"):
        InsideOutside(torch.ones(8, 12), inside="cat", self_strength="cos")
    with pytest.raises(ValueError, match="resize: expected one of 'bilinear', 'nearest-exact', 'nearest', got 'area'"):
        InsideOutside(torch.ones(8, 12), inside="cat", resize="area")
    with pytest.raises(ValueError, match="weight: expected a finite number"):
        PaintWithWords({"cat": torch.ones(8, 12)}, weight=float("inf"))
    with pytest.raises(ValueError, match=r"color_map: expected an RGB image of shape \(height, width, 3\), got "
                                         r"shape \(16, 24, 4\)"):
        PaintWithWords.from_color_map(np.zeros((16, 24, 4), np.uint8), {(0, 0, 0): "cat"})
    with pytest.raises(ValueError, match=r"colors\[\(1, 2, 3\)\]: the colour \(1, 2, 3\) is not in color_map"):
        PaintWithWords.from_color_map(_color_map(), {(1, 2, 3): "cat"})
    with pytest.raises(ValueError, match="colors: expected a colour .* got '#12'"):
        PaintWithWords.from_color_map(_color_map(), {"#12": "cat"})


def test_masks_are_checked_by_name_when_the_controller_is_made():
    nan = torch.ones(8, 12)
    nan[2, 7] = float("nan")
    with pytest.raises(ValueError, match=r"regions\['car'\] mask: expected values in \[0, 1\], got NaN \(1 of 96 "
                                         r"entries, first at index \(2, 7\)\)"):
        PaintWithWords({"cat": torch.ones(8, 12), "car": nan})
    with pytest.raises(ValueError, match=r"regions\[1\] mask: expected values in \[0, 1\] \(or a uint8 mask in "
                                         r"0..255\), got range \[255, 255\] \(dtype torch.float32\)"):
        PaintWithWords([("cat", torch.ones(8, 12), 1.0), ("car", torch.ones(8, 12) * 255, 1.0)])
    with pytest.raises(ValueError, match=r"regions\[0\] mask: expected values in \[0, 1\] .* got range \[-1, -1\]"):
        PaintWithWords([("cat", -torch.ones(8, 12), 1.0)])
    with pytest.raises(ValueError, match=r"regions\['cat'\]: expected a mask or a \(mask, strength\) pair, got a "
                                         r"tuple of 3"):
        PaintWithWords({"cat": (torch.ones(8, 12), 1.0, 2.0)})
    with pytest.raises(ValueError, match=r"regions\[1\]: expected a \(phrase, mask, strength\) tuple, got a tuple "
                                         r"of 2"):
        PaintWithWords([("cat", torch.ones(8, 12), 1.0), ("car", torch.ones(8, 12))])
    with pytest.raises(ValueError, match=r"mask: expected values in \[0, 1\], got NaN"):
        InsideOutside(torch.full((8, 12), float("nan")), inside="cat")
    # uint8 (an 8-bit image, 0..255) is read as 0..1; bool and float in [0, 1] as they are
    image = torch.zeros(8, 12, dtype=torch.uint8)
    image[2:6, 3:9] = 255
    painted = PaintWithWords({"cat": image, "car": image.bool(), "red": image.float() / 255})
    assert all(torch.equal(mask, image.float() / 255) for _, mask, _ in painted.regions)
