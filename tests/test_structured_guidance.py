"""Structured diffusion guidance against a materialising replay of the original's code
(tests/structured_replay.py) on a tiny offline SD pipeline, both modes, on the reference
and Triton-interpreter backends; its fused form (one attention call per layer); bad input."""
import pytest
import torch

import attnctl
import attnctl.diffusers.processor as processor_module
from attnctl.diffusers.compose import compose
from attnctl.diffusers.controller import Plan
from attnctl.tools.structured_guidance import StructuredGuidance, structured_guidance
from control_reference import assert_within_reference_error, float64_pipe, generate_latents, initial_noise
from diffusion_helpers import sd_pipe
from structured_replay import conditioning, original_processors, preprocess_prompts

SIZE = dict(height=16, width=24)      # latent 8 x 12
STEPS = 2
PROMPT = "A red box and a small blue cat."
PHRASES = ["a red box", "a small blue cat", "blue cat"]     # nested spans, as a parse tree gives
CONJUNCTION_PHRASES = ["a red box", "a small blue cat"]


def parser_span(tokenizer, prompt, phrase):
    """The original parser's span of ``phrase`` (a run of the prompt's words): token
    positions without the start token, end exclusive."""
    words, part = prompt.split(), phrase.split()
    i = next(i for i in range(len(words)) if words[i:i + len(part)] == part)
    before = len(tokenizer(" ".join(words[:i])).input_ids) - 2 if i else 0
    return before, before + len(tokenizer(phrase).input_ids) - 2


def replay(pipe, prompt, phrases, conjunction, noise, prompt_first_key=False):
    """The original's generation of ``len(noise)`` samples of ``prompt`` (its batch: the
    prompt repeated)."""
    prompts = preprocess_prompts([prompt] * len(noise))
    prompt, tokenizer = prompts[0], pipe.tokenizer
    spans = [(0, len(tokenizer(prompt).input_ids) - 2)] + [parser_span(tokenizer, prompt, p) for p in phrases]
    c = conditioning(pipe, prompts, [prompt] + list(phrases), spans, conjunction, prompt_first_key)
    with original_processors(pipe.unet, c):
        return generate_latents(pipe, prompts, steps=STEPS, latents=noise, **SIZE)


def run_tool(pipe, phrases, backend, noise, **options):
    with torch.no_grad():
        return structured_guidance(pipe, PROMPT, phrases, backend=backend, num_inference_steps=STEPS,
                                   latents=noise, output_type="latent", num_images_per_prompt=len(noise),
                                   **SIZE, **options).images


def check_against_original(backend, phrases, conjunction, images=1, **options):
    pipe = sd_pipe()
    noise = initial_noise(pipe, images, **SIZE)
    got = run_tool(pipe, phrases, backend, noise, conjunction=conjunction, **options)
    prompt_first_key = options.get("first_key") == "prompt"
    single = replay(pipe, PROMPT, phrases, conjunction, noise, prompt_first_key)
    exact = replay(float64_pipe(pipe), PROMPT, phrases, conjunction, noise.double(), prompt_first_key)
    assert_within_reference_error(got, single, exact)
    plain = generate_latents(pipe, [preprocess_prompts(PROMPT)], steps=STEPS, latents=noise,
                             num_images_per_prompt=images, **SIZE)
    assert (got - plain).abs().max() > 1e3 * (single.double() - exact).abs().max()   # the guidance acts
    return got


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_default_mode_equals_the_original(backend):
    check_against_original(backend, PHRASES, conjunction=False)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_conjunction_mode_equals_the_original(backend):
    check_against_original(backend, CONJUNCTION_PHRASES, conjunction=True)


@pytest.mark.parametrize("conjunction", [False, True])
def test_several_images_equal_the_original(conjunction):
    check_against_original("torch", CONJUNCTION_PHRASES, conjunction, images=2)


def test_conjunction_prompt_first_key_option():
    got = check_against_original("torch", CONJUNCTION_PHRASES, conjunction=True, first_key="prompt")
    pipe = sd_pipe()
    default = run_tool(pipe, CONJUNCTION_PHRASES, "torch", initial_noise(pipe, 1, **SIZE), conjunction=True)
    assert not torch.allclose(got, default)


def test_parser_spans_give_the_same_result_as_phrases():
    pipe = sd_pipe()
    noise = initial_noise(pipe, 1, **SIZE)
    prompt = preprocess_prompts(PROMPT)
    spans = [(p, parser_span(pipe.tokenizer, prompt, p)) for p in PHRASES]
    by_span = run_tool(pipe, spans, "torch", noise)
    by_text = run_tool(pipe, PHRASES, "torch", noise)
    torch.testing.assert_close(by_span, by_text, rtol=0, atol=0)
    # The original parser's output as it is: the prompt and its span first.
    nps = [prompt] + PHRASES
    parsed = StructuredGuidance.from_parse(pipe, nps, [(0, len(pipe.tokenizer(prompt).input_ids) - 2)]
                                           + [span for _, span in spans])
    with attnctl.install(pipe, parsed, backend="torch"):
        by_parse = generate_latents(pipe, [prompt], steps=STEPS, latents=noise, **SIZE)
    torch.testing.assert_close(by_parse, by_text, rtol=0, atol=0)


def test_values_mode_is_one_attention_call_per_layer(monkeypatch):
    """P once, on the mixed values: the guided generation makes as many op calls as the
    plain one, and the cross-attention calls read the keys of the prompt alone."""
    pipe = sd_pipe()
    calls = []
    op = processor_module.attention

    def counting(q, k, v, **kwargs):
        calls.append((q.shape[0], k.shape[2]))
        return op(q, k, v, **kwargs)

    monkeypatch.setattr(processor_module, "attention", counting)
    noise = initial_noise(pipe, 1, **SIZE)
    run_tool(pipe, PHRASES, "torch", noise)
    guided = list(calls)
    calls.clear()
    with attnctl.install(pipe, backend="torch"):
        generate_latents(pipe, [preprocess_prompts(PROMPT)], steps=STEPS, latents=noise, **SIZE)
    assert guided == calls and any(n == 77 for _, n in calls)


def test_bad_phrases_are_refused():
    pipe = sd_pipe()
    prompt = "a red box and a small blue cat"
    with pytest.raises(ValueError, match="'a green box' is not a run of whole words"):
        StructuredGuidance(pipe, prompt, ["a green box"])
    with pytest.raises(ValueError, match="'ed box' is not a run of whole words"):
        StructuredGuidance(pipe, prompt, ["ed box"])
    with pytest.raises(ValueError, match="'a' occurs 2 times"):
        StructuredGuidance(pipe, prompt, ["a"])
    with pytest.raises(ValueError, match="overlap; spans must be disjoint or nested"):
        StructuredGuidance(pipe, prompt, ["a red box and", "box and a small"])
    with pytest.raises(ValueError, match="overlap; spans must be disjoint or nested"):
        StructuredGuidance(pipe, prompt, ["a red box", ("a red box", parser_span(pipe.tokenizer, prompt, "a red box"))])
    with pytest.raises(ValueError, match="overlap; conjunction mode"):
        StructuredGuidance(pipe, prompt, ["a small blue cat", "blue cat"], conjunction=True)
    with pytest.raises(ValueError, match=r"span \(0, 99\) of 'a red box': expected 0 <= start < end <= 23"):
        StructuredGuidance(pipe, prompt, [("a red box", (0, 99))])
    with pytest.raises(ValueError, match="'a red box' has 7 tokens, its span .* covers 4"):
        StructuredGuidance(pipe, prompt, [("a red box", (0, 4))])
    with pytest.raises(ValueError, match="phrases: expected a non-empty list"):
        StructuredGuidance(pipe, prompt, "a red box")
    with pytest.raises(ValueError, match="phrases: expected a non-empty list"):
        StructuredGuidance(pipe, prompt, [])
    with pytest.raises(ValueError, match="spans the whole prompt"):
        StructuredGuidance(pipe, prompt, [prompt])
    with pytest.raises(ValueError, match="nps, spans: expected equal-length lists"):
        StructuredGuidance.from_parse(pipe, [prompt, "a red box"], [(0, 23)])
    with pytest.raises(ValueError, match="first_key: expected one of"):
        StructuredGuidance(pipe, prompt, ["a red box"], conjunction=True, first_key="full")


def test_a_generation_with_another_prompt_is_refused():
    pipe = sd_pipe()
    control = StructuredGuidance(pipe, "a red box and a small blue cat", ["a red box"])
    with attnctl.install(pipe, control, backend="torch"), pytest.raises(ValueError, match="expected every prompt"):
        generate_latents(pipe, ["a blue box"], steps=1, **SIZE)


def test_text_states_composition_rules():
    shape = (2, 2, 4, 77)
    states = torch.zeros(2, 1, 77, 8)
    values = Plan(value_states=states, state_rows=range(1, 2))
    keys = Plan(value_states=states[:1], key_states=states, state_rows=range(1, 2))
    with pytest.raises(ValueError, match="state_rows: expected together with value_states"):
        compose([Plan(value_states=states)], shape, torch.device("cpu"))
    with pytest.raises(ValueError, match="at most one controller's plan with replacement text states"):
        compose([values, values], shape, torch.device("cpu"))
    with pytest.raises(ValueError, match="key_states: expected no other controller"):
        compose([keys, Plan(prob_mult=torch.ones(1))], shape, torch.device("cpu"))
    with pytest.raises(ValueError, match="value_states: expected no injection source"):
        compose([values, Plan(source=torch.zeros(2, dtype=torch.long))], shape, torch.device("cpu"))
    factor = torch.ones(1)
    plan, _ = compose([values, Plan(prob_mult=factor)], shape, torch.device("cpu"))
    assert plan.value_states is states and plan.state_rows == range(1, 2) and plan.prob_mult is factor


def test_values_mode_composes_with_a_trace_and_conjunction_refuses_one():
    """A trace during the default mode sees P (from the prompt's keys) and leaves the
    latents alone; conjunction mode's several softmaxes compose with no other control."""
    pipe = sd_pipe()
    noise = initial_noise(pipe, 1, **SIZE)
    alone = run_tool(pipe, PHRASES, "torch", noise)
    with attnctl.trace(pipe, layers="*", backend="torch") as tc:
        traced = run_tool(pipe, PHRASES, None, noise)
    torch.testing.assert_close(traced, alone, rtol=0, atol=0)
    assert float(tc.heat_map(size="latent").word("box").value.sum()) > 0
    with attnctl.trace(pipe, layers="*", backend="torch"), pytest.raises(ValueError, match="key_states: expected no other"):
        run_tool(pipe, PHRASES[:2], None, noise, conjunction=True)
