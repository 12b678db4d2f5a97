"""Paint-with-words and inside-outside attention against materialising references written
here (explicit QKᵀ, explicit masks), on the reference and Triton-interpreter backends."""
import math

import pytest
import torch
import torch.nn.functional as F

import attnctl
from attnctl.tools.inside_outside import InsideOutside
from attnctl.tools.paint import PaintWithWords
from control_reference import ReferenceState, generate_latents, run_reference, sigma_of, word_columns
from diffusion_helpers import sd_pipe

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


def _grid(latent, M):
    h, w = latent
    while h * w > M:
        h, w = (h + 1) // 2, (w + 1) // 2
    return h, w


def _on_grid(mask, grid):
    return F.interpolate(mask[None, None], size=grid, mode="nearest")[0, 0].reshape(-1)


def _compare(pipe, state, controller, backend, prompt=PROMPT, **kwargs):
    expected = run_reference(pipe, state, prompt, steps=2, **SIZE, **kwargs)
    with attnctl.install(pipe, controller, backend=backend):
        got = generate_latents(pipe, prompt, steps=2, **SIZE, **kwargs)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    plain = generate_latents(pipe, prompt, steps=2, **SIZE, **kwargs)
    assert not torch.allclose(got, plain, atol=1e-4)   # the control acts


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_paint_with_words_equals_reference(backend):
    pipe = sd_pipe()
    cat_mask, car_mask = _mask(16, 24), _mask(8, 12, top_left=False)   # image size, latent size
    regions = {"cat": (cat_mask, 2.0), "car": (car_mask, 0.5)}
    weight = 3.0
    tok = pipe.tokenizer

    class Paint(ReferenceState):
        def bias(self, info):
            if not info.is_cross:
                return None
            B, H, M, _ = info.q.shape
            N = info.k.shape[2]
            grid = _grid(info.latent, M)
            area = torch.zeros(M, N)
            area[:, word_columns(tok, PROMPT[0], "cat")] += 2.0 * _on_grid(cat_mask, grid)[:, None]
            area[:, word_columns(tok, PROMPT[0], "car")] += 0.5 * _on_grid(car_mask, grid)[:, None]
            qk = info.q @ info.k.transpose(-1, -2)                        # unscaled, materialised
            bias = torch.zeros(B, 1, M, N)
            for row in range(B // 2, B):
                top = qk[row].max()
                bias[row, 0] = info.scale * weight * math.log(1 + sigma_of(pipe, info.timestep)) * top * area
            return bias

    _compare(pipe, Paint(), PaintWithWords(regions, weight=weight), backend)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_inside_outside_equals_reference(backend):
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
            inside = _on_grid(mask, _grid(info.latent, M)) > 0.5                  # (M,)
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
                               self_strength=s_self)
    _compare(pipe, InOut(), controller, backend)


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
        with pytest.raises(ValueError, match=r"regions\['cat'\] mask: expected the image size \(16, 24\) or the "
                                             r"latent size \(8, 12\) \(height, width\), got \(10, 10\)"):
            generate_latents(pipe, PROMPT, steps=1, **SIZE)
    with attnctl.install(pipe, PaintWithWords({"dog": torch.ones(8, 12)}), backend="torch"):
        with pytest.raises(ValueError, match="word: 'dog' is not in the prompt 'a cat on a red car'"):
            generate_latents(pipe, PROMPT, steps=1, **SIZE)
    with attnctl.install(pipe, InsideOutside(torch.ones(4, 4), inside="cat"), backend="torch"):
        with pytest.raises(ValueError, match=r"mask: expected the image size \(16, 24\) .* got \(4, 4\)"):
            generate_latents(pipe, PROMPT, steps=1, **SIZE)
    with pytest.raises(ValueError, match="regions\\['cat'\\] mask: expected a 2-D"):
        PaintWithWords({"cat": torch.ones(2, 3, 4, 5)})
    with pytest.raises(ValueError, match="cross_strength: expected a finite number or None, got nan"):
        InsideOutside(torch.ones(8, 12), inside="cat", cross_strength=float("nan"))
    with pytest.raises(ValueError, match="weight: expected a finite number"):
        PaintWithWords({"cat": torch.ones(8, 12)}, weight=float("inf"))
