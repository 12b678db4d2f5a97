"""AttnctlProcessor against AttnProcessor2_0, install/uninstall, step/grid/layout bookkeeping."""
import types

import pytest
import torch
from diffusers.models.attention_processor import Attention, AttnProcessor, AttnProcessor2_0

import attnctl
from attnctl.diffusers import AttnctlProcessor, Controller, Plan
from attnctl.diffusers.install import query_grid
from control_reference import assert_within_reference_error, float64_pipe, initial_noise
from diffusion_helpers import HEIGHT, LATENT, WIDTH, generate, sd_pipe, sdxl_pipe

BACKENDS = ["torch", "triton"]


def _standalone(backend):
    # The processor reads only these three members of its installation.
    return types.SimpleNamespace(controllers=[], backend=backend, describe=None)


ATTENTION_VARIANTS = {
    "self_3d": dict(kw=dict(query_dim=32, heads=2, dim_head=16), cross=None, shape=(2, 24, 32)),
    "cross_mask_normcross": dict(
        kw=dict(query_dim=32, cross_attention_dim=24, heads=2, dim_head=16, cross_attention_norm="layer_norm"),
        cross=(2, 10, 24), shape=(2, 24, 32), mask=True),
    "spatial_4d_groupnorm_residual": dict(
        kw=dict(query_dim=32, heads=2, dim_head=16, norm_num_groups=8, residual_connection=True,
                rescale_output_factor=2.0, bias=True),
        cross=None, shape=(2, 32, 4, 6)),
    "qk_norm": dict(
        kw=dict(query_dim=32, heads=2, dim_head=16, qk_norm="layer_norm"),
        cross=(2, 10, 32), shape=(2, 24, 32)),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("variant", sorted(ATTENTION_VARIANTS))
def test_processor_matches_attnprocessor2_0_on_every_attention_feature(variant, backend):
    spec = ATTENTION_VARIANTS[variant]
    attn = Attention(**spec["kw"]).eval()
    x = torch.randn(spec["shape"])
    context = torch.randn(spec["cross"]) if spec["cross"] else None
    mask = None
    if spec.get("mask"):
        keep = torch.ones(2, 1, spec["cross"][1])
        keep[0, 0, -3:] = 0
        mask = (1 - keep) * -10000.0  # the UNet's additive form of encoder_attention_mask
    with torch.no_grad():
        attn.set_processor(AttnProcessor2_0())
        expected = attn(x, encoder_hidden_states=context, attention_mask=mask)
        attn.set_processor(AttnctlProcessor("layer", _standalone(backend)))
        got = attn(x, encoder_hidden_states=context, attention_mask=mask)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=2e-5)


def test_processor_uses_attn_scale():
    # AttnProcessor2_0 ignores attn.scale (SDPA's default 1/sqrt(d) applies); the classic
    # AttnProcessor honours it, and so must attnctl.
    attn = Attention(query_dim=32, heads=2, dim_head=16, scale_qk=False).eval()
    assert attn.scale == 1.0
    x = torch.randn(2, 24, 32)
    with torch.no_grad():
        attn.set_processor(AttnProcessor())
        expected = attn(x)
        attn.set_processor(AttnctlProcessor("layer", _standalone("torch")))
        got = attn(x)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=2e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_installed_pipeline_matches_attnprocessor2_0_without_controllers(backend):
    pipe = sd_pipe()
    # The interpreted Triton kernel is slow: a smaller image (latent 8 x 12) and one step.
    size = dict(height=16, width=24, steps=1) if backend == "triton" else {}
    got, expected, exact = _stock_and_installed(pipe, ["a cat on a car", "a dog"], backend, **size)
    assert_within_reference_error(got, expected, exact)


def test_sdxl_unet_matches_attnprocessor2_0():
    pipe = sdxl_pipe()
    got, expected, exact = _stock_and_installed(pipe, "a red bus", "torch", steps=1)
    assert_within_reference_error(got, expected, exact)


def _stock_and_installed(pipe, prompt, backend, **kwargs):
    """Images of attnctl installed (no controller), of stock diffusers in fp32, and of stock
    diffusers in fp64, all from the same initial noise: the tolerance of the comparison is
    the fp32 pipeline's own rounding error (assert_within_reference_error)."""
    images = len([prompt] if isinstance(prompt, str) else prompt)
    size = {key: kwargs.pop(key, default) for key, default in (("height", HEIGHT), ("width", WIDTH))}
    noise = initial_noise(pipe, images, size["height"], size["width"])
    expected = generate(pipe, prompt, latents=noise, **size, **kwargs)
    exact = generate(float64_pipe(pipe), prompt, latents=noise.double(), **size, **kwargs)
    with attnctl.install(pipe, backend=backend):
        got = generate(pipe, prompt, latents=noise, **size, **kwargs)
    return got, expected, exact


def test_uninstall_restores_the_exact_processor_objects_and_hooks():
    pipe = sd_pipe()
    before = dict(pipe.unet.attn_processors)
    hooks_before = dict(pipe.unet._forward_pre_hooks)
    installation = attnctl.install(pipe)
    assert all(isinstance(p, AttnctlProcessor) for p in pipe.unet.attn_processors.values())
    assert attnctl.install(pipe) is installation  # installing twice reuses the installation
    attnctl.uninstall(pipe)
    after = pipe.unet.attn_processors
    assert after.keys() == before.keys() and all(after[k] is before[k] for k in before)
    assert dict(pipe.unet._forward_pre_hooks) == hooks_before
    assert "encode_prompt" not in pipe.__dict__
    attnctl.uninstall(pipe)  # a second uninstall is a no-op

    with attnctl.install(pipe) as inst:
        assert inst.active
    assert not inst.active and all(pipe.unet.attn_processors[k] is before[k] for k in before)


def test_install_rejects_models_it_does_not_support():
    class FluxLikePipeline:
        components = {"transformer": torch.nn.Linear(2, 2)}

    with pytest.raises(TypeError, match=r"UNet2DConditionModel.*got FluxLikePipeline \(models: transformer: Linear\)"):
        attnctl.install(FluxLikePipeline())
    with pytest.raises(ValueError, match="backend: expected one of"):
        attnctl.install(sd_pipe(), backend="flash")
    with pytest.raises(TypeError, match=r"controllers\[0\]: expected an attnctl.Controller"):
        attnctl.install(sd_pipe(), object())
    attnctl.uninstall(sd_pipe())


class Recorder(Controller):
    def __init__(self):
        self.calls, self.generations = [], []

    def on_generation_start(self, generation):
        self.generations.append(generation)

    def plan(self, call):
        self.calls.append((call.layer, call.is_cross, call.grid, call.factor, call.step.index,
                           call.layout, call.batch, call.heads, call.keys))
        return None


@pytest.mark.parametrize("guidance", [7.5, 1.0], ids=["cfg", "no_cfg"])
def test_calls_know_step_grid_layout_and_layer(guidance):
    pipe = sd_pipe()
    recorder = Recorder()
    with attnctl.install(pipe, recorder, backend="torch") as inst:
        generate(pipe, ["a cat", "a dog"], steps=3, guidance_scale=guidance, num_images_per_prompt=2)
        cross = inst.cross_layers
    (generation,) = recorder.generations
    assert generation.prompts == ("a cat", "a dog") and generation.images_per_prompt == 2
    assert generation.cfg == (guidance > 1)
    cfg = guidance > 1
    rows = 8 if cfg else 4
    assert {c[4] for c in recorder.calls} == {0, 1, 2}
    for layer, is_cross, grid, factor, step, layout, batch, heads, keys in recorder.calls:
        assert layout.rows == batch == rows and layout.cfg == cfg and layout.images == 4
        assert list(layout.cond_rows) == list(range(rows - 4, rows))
        assert layout.prompt_of_image(3) == 1
        assert is_cross == (layer in cross) == layer.endswith("attn2")
        expected = LATENT if layer.startswith(("down_blocks.0", "up_blocks.1")) else (8, 12)
        assert grid == expected and factor == LATENT[0] // expected[0]
        assert keys == (77 if is_cross else grid[0] * grid[1])
    # 4 transformer blocks x (self + cross) x 3 steps
    assert len(recorder.calls) == 4 * 2 * 3 and len(cross) == 4


def test_step_counter_restarts_each_generation_and_sigma_is_the_schedulers():
    pipe = sd_pipe()
    seen = []

    class Steps(Controller):
        def on_step(self, step, layout):
            seen.append((step.index, step.sigma))

    with attnctl.install(pipe, Steps(), backend="torch"):
        generate(pipe, "a cat", steps=2)
        generate(pipe, "a cat", steps=3)
    alphas = pipe.scheduler.alphas_cumprod
    timesteps = pipe.scheduler.timesteps  # the last generation's
    assert [s for s, _ in seen] == [0, 1, 0, 1, 2]
    for (index, sigma), t in zip(seen[2:], timesteps):
        a = float(alphas[int(t)])
        assert sigma == pytest.approx(((1 - a) / a) ** 0.5)


@pytest.mark.parametrize("latent,queries,grid,factor", [
    ((64, 64), 1024, (32, 32), 2), ((16, 24), 384, (16, 24), 1), ((16, 24), 24, (4, 6), 4),
    ((15, 23), 96, (8, 12), 2), ((15, 23), 24, (4, 6), 4), ((128, 96), 192, (16, 12), 8),
    ((16, 24), 100, None, None)])
def test_query_grid_follows_the_unet_downsampling_for_any_aspect_ratio(latent, queries, grid, factor):
    assert query_grid(latent, queries) == (grid, factor)


class Fixed(Controller):
    """Applies fixed controls and captures on cross-attention calls of one layer."""

    def __init__(self, layer, bias=None, prob_mult=None, capture=None):
        self.layer, self.bias, self.prob_mult, self.capture = layer, bias, prob_mult, capture
        self.seen = None

    def plan(self, call):
        if call.layer != self.layer:
            return None
        self.seen = call
        return Plan(bias=self.bias, prob_mult=self.prob_mult, capture=self.capture)


def test_controllers_compose_biases_add_prob_mults_multiply_captures_merge():
    # One cross-attention layer of the tiny SD UNet, called directly at its own shapes.
    pipe = sd_pipe()
    name = "down_blocks.0.attentions.0.transformer_blocks.0.attn2"
    attn = dict(pipe.unet.named_modules())[name]
    B, H, M, N = 2, 2, 12, 77
    x, context = torch.randn(B, M, 32), torch.randn(B, N, 32)
    b1, b2 = torch.randn(1, H, 1, N), torch.randn(B, 1, M, N)
    f1, f2 = torch.rand(1, H, 1, N) + 0.5, torch.rand(B, 1, M, 1) + 0.5
    w = torch.tensor([1.0, 0.25])
    cap1 = attnctl.Capture(token_mass=torch.zeros(B, H, N), maps=torch.zeros(B, M, 2),
                           tokens=torch.tensor([1, 2], dtype=torch.int32))
    cap2 = attnctl.Capture(head_maps=torch.zeros(B, H, M, 1), lse=torch.zeros(B, H, M),
                           maps=torch.zeros(B, M, 1), head_weights=w,
                           tokens=torch.tensor([[3], [5]], dtype=torch.int32), rows=range(1, 2))
    with attnctl.install(pipe, Fixed(name, b1, f1, cap1), Fixed(name, b2, f2, cap2), backend="torch"):
        with torch.no_grad():
            got = attn(x, encoder_hidden_states=context)

    q = attn.to_q(x).view(B, M, H, -1).transpose(1, 2)
    k = attn.to_k(context).view(B, N, H, -1).transpose(1, 2)
    v = attn.to_v(context).view(B, N, H, -1).transpose(1, 2)
    with torch.no_grad():
        s = q @ k.transpose(-1, -2) * attn.scale + b1 + b2
        p = s.softmax(-1)
        o = ((p * f1 * f2) @ v).transpose(1, 2).reshape(B, M, -1)
        expected = attn.to_out[0](o)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cap1.token_mass, p.sum(2))
    torch.testing.assert_close(cap1.maps, p[..., [1, 2]].sum(1))
    # cap2 captures row 1 only (Capture.rows): its row 0 stays zero.
    cols = torch.stack([torch.zeros_like(p[0, :, :, 3]), p[1, :, :, 5]])[..., None]  # (B, H, M, 1)
    torch.testing.assert_close(cap2.head_maps, cols)
    torch.testing.assert_close(cap2.maps, torch.einsum("h,bhmt->bmt", w, cols))
    torch.testing.assert_close(cap2.lse, torch.logsumexp(s, -1) * torch.tensor([0.0, 1.0])[:, None, None])
