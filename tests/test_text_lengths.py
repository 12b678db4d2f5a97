"""The prompt's tokens as the text encoder got them, on pipelines whose T5 tokenizer was
saved without ``model_max_length`` (transformers then reports its sentinel 1e30, as for
many T5 / umT5 / Gemma tokenizers): attnctl cuts the prompt to the length the pipeline's
encoder call used (``max_sequence_length``), never to the tokenizer's limit.

Each pipeline is a tiny offline one (attnctl.diffusers.offline_dit / offline_mmdit) with
its T5 tokenizer's limit unset; the prompt is longer than ``max_sequence_length``, so a
length taken from anywhere else would give other tokens than the encoder's input ids,
which a hook on the T5 encoder records."""
import pytest
import torch
from transformers.tokenization_utils_base import VERY_LARGE_INTEGER

import attnctl
from attnctl.diffusers.offline_dit import tiny_pixart_pipeline, tiny_sana_pipeline, tiny_wan_pipeline
from attnctl.diffusers.offline_mmdit import tiny_flux_pipeline, tiny_sd3_pipeline
from attnctl.tools.inside_outside import InsideOutside
from attnctl.tools.paint import PaintWithWords

TEXT = 8   # max_sequence_length: the prompt's first 7 T5 pieces and </s>
PROMPT = "a photo of a cat sitting on the red car and a dog"   # 15 pieces + </s>
KEPT, CUT = ("photo", "cat", "sitting"), ("car", "dog")

# name: (pipeline, its T5 tokenizer and encoder, call options, default max_sequence_length)
OPTIONS = dict(num_inference_steps=1, output_type="latent", max_sequence_length=TEXT)
DIT_IMAGE = dict(clean_caption=False, use_resolution_binning=False)
FAMILIES = {
    "pixart": (tiny_pixart_pipeline, "", dict(height=16, width=24, **DIT_IMAGE), 300),
    "sana": (tiny_sana_pipeline, "", dict(height=32, width=32, complex_human_instruction=None, **DIT_IMAGE), 300),
    "wan": (tiny_wan_pipeline, "", dict(height=48, width=64, num_frames=5), 512),
    "flux": (tiny_flux_pipeline, "_2", dict(height=16, width=24), 512),
    "sd3": (tiny_sd3_pipeline, "_3", dict(height=16, width=24), 256),
}


@pytest.fixture(scope="module")
def pipes():
    """Each family's tiny pipeline, its T5 tokenizer's limit unset."""
    made = {}
    for name, (make, suffix, _, _) in FAMILIES.items():
        pipe = make()
        getattr(pipe, f"tokenizer{suffix}").model_max_length = VERY_LARGE_INTEGER
        made[name] = pipe
    return made


def encoded_ids(pipe, suffix, run):
    """The input ids of the first T5 encoder call made by ``run()``."""
    seen = []
    encoder = getattr(pipe, f"text_encoder{suffix}")
    hook = encoder.register_forward_pre_hook(
        lambda m, a, kw: seen.append(a[0] if a else kw["input_ids"]), with_kwargs=True)
    try:
        run()
    finally:
        hook.remove()
    return seen[0][0].tolist()


@pytest.mark.parametrize("name", list(FAMILIES))
def test_trace_records_the_tokens_the_text_encoder_got(pipes, name):
    pipe, (_, suffix, options, _) = pipes[name], FAMILIES[name]
    tokenizer = getattr(pipe, f"tokenizer{suffix}")
    with attnctl.trace(pipe, backend="torch") as tc:
        ids = encoded_ids(pipe, suffix, lambda: pipe(PROMPT, guidance_scale=1.0, **OPTIONS, **options))
    text = tc.maps().prompts[0]
    assert len(ids) == TEXT and tokenizer.convert_tokens_to_ids(list(text.tokens)) == ids
    assert text.truncated
    for word in KEPT:
        pieces = [i for i in tokenizer(word).input_ids if i not in tokenizer.all_special_ids]
        start = next(c for c in range(len(ids)) if ids[c:c + len(pieces)] == pieces)
        assert text.positions(word) == list(range(start, start + len(pieces)))
        assert torch.isfinite(tc.word_heat_map(word).value).all()
    for word in CUT:
        with pytest.raises(ValueError, match=f"{word!r} is not in the prompt .* cut to {TEXT} tokens"):
            text.positions(word)


def test_sana_with_its_instruction_after_the_tokenizer_limit_is_unset(pipes):
    """Sana's complex_human_instruction: the prompt's columns are the last
    max_sequence_length − 1 of instruction + prompt, whatever the tokenizer's limit."""
    pipe = pipes["sana"]
    options = dict(FAMILIES["sana"][2], complex_human_instruction=["Describe it", "then:"])
    with attnctl.trace(pipe, backend="torch") as tc:
        ids = encoded_ids(pipe, "", lambda: pipe(PROMPT, guidance_scale=1.0, **OPTIONS, **options))
    kept = [ids[0]] + ids[-TEXT + 1:]                        # the pipeline's select_index
    text = tc.maps().prompts[0]
    assert pipe.tokenizer.convert_tokens_to_ids(list(text.tokens)) == kept[:len(text.tokens)]
    assert text.positions("a photo") == [1, 2]


@pytest.mark.parametrize("name", ["pixart", "sana"])
def test_word_controllers_find_words_in_the_encoders_tokens(pipes, name):
    """PaintWithWords and InsideOutside find a prompt's word within the encoder's cut and
    refuse one the cut left out."""
    pipe, (_, _, options, _) = pipes[name], FAMILIES[name]
    mask = torch.ones(options["height"], options["width"])
    for make in (lambda word: PaintWithWords({word: mask}), lambda word: InsideOutside(mask, inside=word)):
        with attnctl.install(pipe, make("cat"), backend="torch"):
            pipe(PROMPT, guidance_scale=1.0, **OPTIONS, **options)
        with attnctl.install(pipe, make("dog"), backend="torch"):
            with pytest.raises(ValueError, match="dog"):
                pipe(PROMPT, guidance_scale=1.0, **OPTIONS, **options)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_maps_job_checks_words_at_the_pipelines_default_length(pipes, name):
    """`attnctl maps` calls the pipeline without max_sequence_length: its words are checked
    against the prompt cut to the pipeline's default length."""
    from attnctl.jobs.inputs import InputError
    from attnctl.jobs.maps import validate_words, word_length

    pipe, default = pipes[name], FAMILIES[name][3]
    assert word_length(type(pipe)) == default

    class Item:
        line, prompt, words = 1, " ".join(["a"] * (default - 2) + ["cat", "dog"]), ["cat"]

    # the words' tokenizer: T5's on Flux and SD3 (the trace's default text segment)
    tokenizer = {"flux": getattr(pipe, "tokenizer_2", None), "sd3": getattr(pipe, "tokenizer_3", None)}.get(name) or pipe.tokenizer
    assert validate_words(tokenizer, [Item], "prompts.txt", word_length(type(pipe))) == [["cat"]]
    Item.words = ["dog"]
    with pytest.raises(InputError, match="dog"):
        validate_words(tokenizer, [Item], "prompts.txt", word_length(type(pipe)))
