"""A materialising reference for controllers (no attnctl code): every attention call
computes S = scale·QKᵀ (+ a bias), P = softmax(S), P·f (f a post-softmax factor) and
(P·f)·V explicitly (P optionally edited by ``edit``), with the bias and f given by test-written functions of the call."""
from __future__ import annotations

import contextlib

import torch


class CallInfo:
    def __init__(self, layer, is_cross, step, timestep, latent, q, k, scale):
        self.layer, self.is_cross, self.step, self.timestep = layer, is_cross, step, timestep
        self.latent, self.q, self.k, self.scale = latent, q, k, scale


class ReferenceProcessor:
    def __init__(self, layer, state):
        self.layer = layer
        self.state = state

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None):
        assert hidden_states.ndim == 3 and attention_mask is None and attn.group_norm is None
        is_cross = encoder_hidden_states is not None
        context = encoder_hidden_states if is_cross else hidden_states
        B, M, _ = hidden_states.shape
        H = attn.heads

        def split(x):
            return x.view(B, x.shape[1], H, -1).transpose(1, 2)

        q, k, v = split(attn.to_q(hidden_states)), split(attn.to_k(context)), split(attn.to_v(context))
        info = CallInfo(self.layer, is_cross, self.state.step, self.state.timestep, self.state.latent, q, k,
                        attn.scale)
        scores = attn.scale * q @ k.transpose(-1, -2)
        bias = self.state.bias(info)
        if bias is not None:
            scores = scores + bias
        probs = scores.softmax(-1)
        self.state.observe(info, probs)
        probs = self.state.edit(info, probs)
        mult = self.state.mult(info)
        if mult is not None:
            probs = probs * mult
        out = (probs @ v).transpose(1, 2).reshape(B, M, -1)
        out = attn.to_out[1](attn.to_out[0](out))
        return out / attn.rescale_output_factor


class ReferenceState:
    """Override bias / mult / observe. ``step`` counts UNet calls of the generation."""

    def __init__(self):
        self.step = -1
        self.timestep = None
        self.latent = None

    def bias(self, info):
        return None

    def mult(self, info):
        return None

    def observe(self, info, probs):
        pass

    def edit(self, info, probs):
        """The (B, H, M, N) probabilities actually applied (prompt-to-prompt edits)."""
        return probs


@contextlib.contextmanager
def reference_processors(unet, state):
    """ReferenceProcessor on every layer of ``unet`` (and ``state`` told of every UNet
    call) inside the block."""
    original = unet.attn_processors

    def hook(module, args, kw):
        sample = args[0] if args else kw["sample"]
        state.step += 1
        state.timestep = args[1] if len(args) > 1 else kw.get("timestep")
        state.latent = tuple(sample.shape[-2:])

    handle = unet.register_forward_pre_hook(hook, with_kwargs=True)
    unet.set_attn_processor({name: ReferenceProcessor(name.rsplit(".", 1)[0], state) for name in original})
    try:
        yield
    finally:
        handle.remove()
        unet.set_attn_processor(dict(original))


def run_reference(pipe, state, prompt, **kwargs):
    """Latents of a generation with ReferenceProcessor on every layer."""
    with reference_processors(pipe.unet, state):
        return generate_latents(pipe, prompt, **kwargs)


def generate_latents(pipe, prompt, *, steps=2, height=16, width=24, seed=0, **kwargs):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        return pipe(prompt, num_inference_steps=steps, height=height, width=width, generator=generator,
                    output_type="latent", **kwargs).images


def word_columns(tokenizer, prompt, word):
    """Key columns of the first occurrence of ``word`` (a whole word of ``prompt``),
    counted with the tokenizer from the prompt's words before it."""
    words = prompt.split()
    i = words.index(word)
    before = len(tokenizer(" ".join(words[:i])).input_ids) - 2 if i else 0
    length = len(tokenizer(word).input_ids) - 2
    return list(range(1 + before, 1 + before + length))


def prompt_columns(tokenizer, prompt):
    """Every token column of the prompt's words (not start, end or padding)."""
    return list(range(1, len(tokenizer(prompt).input_ids) - 1))


def sigma_of(pipe, timestep):
    a = float(pipe.scheduler.alphas_cumprod[int(timestep)])
    return ((1 - a) / a) ** 0.5


_FLOAT64_PIPES = {}


def float64_pipe(pipe):
    """A float64 copy of a (tiny) pipeline, cached per pipeline object."""
    import copy

    key = id(pipe)
    if key not in _FLOAT64_PIPES:
        _FLOAT64_PIPES[key] = (pipe, copy.deepcopy(pipe).to(torch.float64))
    return _FLOAT64_PIPES[key][1]


def initial_noise(pipe, images, height, width, seed=0):
    """The fp32 initial latents a seeded generation of ``images`` images draws."""
    from diffusers.utils.torch_utils import randn_tensor

    scale = pipe.vae_scale_factor
    shape = (images, pipe.unet.config.in_channels, height // scale, width // scale)
    return randn_tensor(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float32)


def original_init_latent(pipe, prompts, height, width, seed=0):
    """prompt-to-prompt's ptp_utils.init_latent: one (1, C, h, w) latent from the seeded
    generator, expanded to every prompt."""
    scale = pipe.vae_scale_factor
    shape = (1, pipe.unet.config.in_channels, height // scale, width // scale)
    latent = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    return latent.expand(prompts, *shape[1:])


def assert_within_reference_error(got, single, exact, factor=4.0):
    """``got`` may be at most ``factor`` times as far from the fp64 reference ``exact`` as
    the fp32 reference ``single`` is."""
    reference_error = (single.double() - exact).abs().max().item()
    error = (got.double() - exact).abs().max().item()
    assert error <= factor * reference_error, (
        f"greatest error {error:.3g} against the fp64 reference; the fp32 reference's own is "
        f"{reference_error:.3g} (allowed: {factor} x)")


def assert_matches_reference(got, pipe, state, prompt, *, factor=4.0, seed=0, height=16, width=24,
                             num_images_per_prompt=1, state_kwargs=None, noise=None, **kwargs):
    """``got`` (latents of a controlled fp32 generation) against the materialising
    reference, with a tolerance derived from the reference's own error: the reference runs
    in fp32 and in fp64 from the same initial noise; got may be at most ``factor`` times
    as far from the fp64 result as the fp32 reference is (both are fp32 computations of
    the same math, differing only in the order of roundings). ``state`` is a
    ReferenceState that keeps no run state but its step counter (it is run twice), or a
    function making a fresh one; ``state_kwargs(state)`` adds pipeline arguments that
    belong to a state (e.g. its callback). ``noise``: the fp32 initial latents (default: the
    seeded pipeline's own draw). Returns the fp32 reference."""
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    if noise is None:
        noise = initial_noise(pipe, len(prompts) * num_images_per_prompt, height, width, seed)
    common = dict(height=height, width=width, num_images_per_prompt=num_images_per_prompt, **kwargs)

    def run(target, latents):
        fresh = state() if callable(state) else state
        fresh.step = -1
        extra = state_kwargs(fresh) if state_kwargs is not None else {}
        return run_reference(target, fresh, prompts, latents=latents, **common, **extra)

    expected = run(pipe, noise)
    assert_within_reference_error(got, expected, run(float64_pipe(pipe), noise.double()), factor)
    return expected
