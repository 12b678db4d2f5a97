"""A call that raises leaves the pipeline exactly as it was (issue 22): every public entry
point that installs attnctl (install, trace, p2p.edit, build_hrv, attend_and_excite,
regional_generate, the jobs' work) with a bad argument in each position, on a pipeline
without attnctl and on one where attnctl was installed before (with another backend and
a controller); then a correct call works."""
import argparse
import functools

import pytest
import torch

import attnctl
from attnctl.diffusers.install import installation_of
from attnctl.diffusers.offline_mmdit import tiny_flux_pipeline
from attnctl.p2p import Replace, edit
from attnctl.tools.attend_excite import attend_and_excite
from attnctl.tools.hrv import build_hrv
from attnctl.tools.regional import regional_generate

from diffusion_helpers import sd_pipe
from pipeline_state import assert_unchanged, pipeline_state

pytestmark = pytest.mark.filterwarnings("ignore:divide by zero:RuntimeWarning")

SD = dict(num_inference_steps=1, height=32, width=32, output_type="latent")
FLUX = dict(num_inference_steps=1, height=16, width=24, output_type="latent")
BEFORE = "sdpa"       # a bad call passes this backend: an installation's own ("torch") must stay
FLUX_TEXT = 8


@functools.lru_cache(maxsize=None)
def flux_pipe():
    return tiny_flux_pipeline()


PIPES = {"sd": sd_pipe, "flux": flux_pipe}


class Steps(attnctl.Controller):
    def __init__(self):
        self.steps = 0

    def on_step(self, step, layout):
        self.steps += 1


class RaisesOnGeneration(attnctl.Controller):
    def on_generation_start(self, generation):
        raise RuntimeError("this controller refuses the generation")


def _flux_regions():
    left, right = torch.zeros(16, 24), torch.zeros(16, 24)
    left[:, :12], right[:, 12:] = 1.0, 1.0
    return [(left, "a cat"), (right, "a dog")]


def _job_args(**changes):
    args = dict(backend="torch", probe_words="sample", no_probe_sot=False, seed=0, steps=1, guidance=7.5,
                height=32, width=32, prompts="prompts.jsonl", pairs="pairs.jsonl")
    return argparse.Namespace(**{**args, **changes})


def _prompt_items(*entries):
    from attnctl.jobs.inputs import PromptItem

    return [PromptItem(line=i + 1, prompt=p, seed=None, words=w) for i, (p, w) in enumerate(entries)]


def _pair_items(*pairs):
    from attnctl.jobs.inputs import PairItem

    return [PairItem(line=i + 1, source=s, target=t, seed=None, mode="replace", cross_steps=None, self_steps=None)
            for i, (s, t) in enumerate(pairs)]


def _hrv_work(pipe, **changes):
    from attnctl.jobs.hrv import HRVWork

    return HRVWork(pipe, _job_args(**changes), {"cat": ["cat"], "dog": ["dog"]}, "tiny")


def _maps_work(pipe, words):
    """As the maps job does: the words checked (before the model loads), then the work."""
    from attnctl.jobs.maps import MapsWork, validate_words, word_length

    items = _prompt_items(("a cat", words))
    checked = validate_words(pipe.tokenizer, items, "prompts.jsonl", word_length(type(pipe)))
    return MapsWork(pipe, _job_args(), checked)


def _edit_work(pipe, source, target):
    from attnctl.jobs.edit import EditWork

    return EditWork(pipe, _job_args(), _pair_items((source, target)))


def _trace(pipe, generate=None, options=SD, **kwargs):
    with attnctl.trace(pipe, **kwargs):
        if generate:
            pipe("a cat", **options, **generate)


# (pipeline, entry point, bad call, the exception)
BAD_CALLS = {
    "install/target": ("sd", lambda p: attnctl.install(object()), TypeError),
    "install/controllers": ("sd", lambda p: attnctl.install(p, Replace(), object(), backend=BEFORE), TypeError),
    "install/backend": ("sd", lambda p: attnctl.install(p, Steps(), backend="nope"), ValueError),
    "install/flux-controllers": ("flux", lambda p: attnctl.install(p, Steps(), object(), backend=BEFORE), TypeError),
    "install/flux-backend": ("flux", lambda p: attnctl.install(p, Steps(), backend="nope"), ValueError),
    "trace/pipe": ("sd", lambda p: _trace(object()), TypeError),
    "trace/layers": ("sd", lambda p: _trace(p, layers="no_such_layer", backend=BEFORE), ValueError),
    "trace/tokens": ("sd", lambda p: _trace(p, tokens="bogus", backend=BEFORE), ValueError),
    "trace/kinds": ("sd", lambda p: _trace(p, kinds="double", backend=BEFORE), ValueError),
    "trace/text": ("sd", lambda p: _trace(p, text="clip", backend=BEFORE), ValueError),
    "trace/backend": ("sd", lambda p: _trace(p, backend="nope"), ValueError),
    "trace/generation": ("sd", lambda p: _trace(p, dict(guidance_scale=7.5, callback_on_step_end_tensor_inputs=["x"]),
                                                backend=BEFORE), ValueError),
    "trace/flux-text": ("flux", lambda p: _trace(p, text="clip", backend=BEFORE), ValueError),
    "trace/flux-kinds": ("flux", lambda p: _trace(p, kinds="joint", backend=BEFORE), ValueError),
    "trace/flux-layers": ("flux", lambda p: _trace(p, layers="no_such_layer", backend=BEFORE), ValueError),
    "trace/flux-backend": ("flux", lambda p: _trace(p, backend="nope"), ValueError),
    "trace/flux-generation": ("flux", lambda p: _trace(p, dict(callback_on_step_end_tensor_inputs=["x"]), FLUX,
                                                       backend=BEFORE), ValueError),
    "edit/pipe": ("sd", lambda p: edit(object(), "a cat", "a dog", Replace(), **SD), TypeError),
    "edit/source": ("sd", lambda p: edit(p, None, "a dog", Replace(), backend=BEFORE, **SD), TypeError),
    "edit/targets": ("sd", lambda p: edit(p, "a cat", [], Replace(), backend=BEFORE, **SD), ValueError),
    "edit/target": ("sd", lambda p: edit(p, "a cat", ["a dog", 3], Replace(), backend=BEFORE, **SD), TypeError),
    "edit/controller": ("sd", lambda p: edit(p, "a cat", "a dog", Steps(), backend=BEFORE, **SD), TypeError),
    "edit/backend": ("sd", lambda p: edit(p, "a cat", "a dog", Replace(), backend="nope", **SD), ValueError),
    "edit/word-swap": ("sd", lambda p: edit(p, "a cat", "a big dog", Replace(), backend=BEFORE, **SD), ValueError),
    "edit/pipe_kwargs": ("sd", lambda p: edit(p, "a cat", "a dog", Replace(), backend=BEFORE,
                                              **{**SD, "height": 7}), ValueError),
    "build_hrv/pipe": ("sd", lambda p: build_hrv(object(), ["cat", "dog"], ["a cat"], steps=1), TypeError),
    "build_hrv/concepts": ("sd", lambda p: build_hrv(p, ["cat"], ["a cat"], steps=1, backend=BEFORE), ValueError),
    "build_hrv/prompts": ("sd", lambda p: build_hrv(p, ["cat", "dog"], [], steps=1, backend=BEFORE), ValueError),
    "build_hrv/batch_size": ("sd", lambda p: build_hrv(p, ["cat", "dog"], ["a cat"], steps=1, batch_size=0,
                                                       backend=BEFORE), ValueError),
    "build_hrv/probe_words": ("sd", lambda p: build_hrv(p, ["cat", "dog"], ["a cat"], steps=1, probe_words="x",
                                                        backend=BEFORE), ValueError),
    "build_hrv/text": ("sd", lambda p: build_hrv(p, ["cat", "dog"], ["a cat"], steps=1, text="t5",
                                                 backend=BEFORE), ValueError),
    "build_hrv/backend": ("sd", lambda p: build_hrv(p, ["cat", "dog"], ["a cat"], steps=1, backend="nope"),
                          ValueError),
    "build_hrv/height": ("sd", lambda p: build_hrv(p, ["cat", "dog"], ["a cat"], steps=1, height=7, width=32,
                                                   backend=BEFORE), ValueError),
    "build_hrv/flux-backend": ("flux", lambda p: build_hrv(p, ["cat", "dog"], ["a cat"], steps=1, probe_sot=False,
                                                           backend="nope"), ValueError),
    "attend_and_excite/pipe": ("sd", lambda p: attend_and_excite(object(), "a cat", [2]), TypeError),
    "attend_and_excite/prompt": ("sd", lambda p: attend_and_excite(p, 3, [2], backend=BEFORE), TypeError),
    "attend_and_excite/token_indices": ("sd", lambda p: attend_and_excite(p, ["a cat", "a dog"], [[2]],
                                                                          backend=BEFORE), ValueError),
    "attend_and_excite/maps": ("sd", lambda p: attend_and_excite(p, "a cat", [2], maps=Steps(), backend=BEFORE),
                               TypeError),
    "attend_and_excite/backend": ("sd", lambda p: attend_and_excite(p, "a cat", [2], backend="nope"), ValueError),
    "attend_and_excite/scale_range": ("sd", lambda p: attend_and_excite(p, "a cat", [2], scale_range=(1.0,),
                                                                        backend=BEFORE, **SD), IndexError),
    "regional_generate/pipe": ("flux", lambda p: regional_generate(object(), "a cat", _flux_regions()), TypeError),
    "regional_generate/regions": ("flux", lambda p: regional_generate(p, "a cat", [], **FLUX), ValueError),
    "regional_generate/mask": ("flux", lambda p: regional_generate(p, "a cat", [(torch.ones(3, 4, 6), "a cat")],
                                                                   max_sequence_length=FLUX_TEXT, **FLUX),
                               ValueError),
    "regional_generate/image_rule": ("flux", lambda p: regional_generate(p, "a cat", _flux_regions(), image_rule="x",
                                                                         max_sequence_length=FLUX_TEXT, **FLUX),
                                     ValueError),
    "regional_generate/pipe_kwargs": ("flux", lambda p: regional_generate(
        p, "a cat", _flux_regions(), max_sequence_length=FLUX_TEXT, callback_on_step_end_tensor_inputs=["x"],
        **FLUX), ValueError),
    "jobs/hrv-backend": ("sd", lambda p: _hrv_work(p, backend="nope"), ValueError),
    "jobs/hrv-probe_words": ("sd", lambda p: _hrv_work(p, probe_words="x"), ValueError),
    "jobs/maps-words": ("sd", lambda p: _maps_work(p, ["zebra"]), ValueError),
    "jobs/edit-pairs": ("sd", lambda p: _edit_work(p, "a cat", "a big dog"), ValueError),
}


def _good_install(pipe):
    steps, previous = Steps(), installation_of(pipe)
    installation = attnctl.install(pipe, steps, backend=previous.backend if previous else "torch")
    try:
        pipe("a cat", **(SD if pipe is sd_pipe() else {**FLUX, "max_sequence_length": FLUX_TEXT}))
    finally:
        installation.remove(steps)
        if previous is None:
            installation.uninstall()
    assert steps.steps == 1


def _good_trace(pipe):
    options = SD if pipe is sd_pipe() else {**FLUX, "max_sequence_length": FLUX_TEXT}
    with attnctl.trace(pipe, layers="*", backend="torch") as tc:
        pipe("a cat", **options)
    assert tc.maps().layers


def _good_hrv(pipe):
    if pipe is sd_pipe():
        hrv = build_hrv(pipe, ["cat", "dog"], ["a cat"], steps=1, backend="torch", height=32, width=32)
    else:
        hrv = build_hrv(pipe, ["cat", "dog"], ["a cat"], steps=1, backend="torch", probe_sot=False,
                        max_sequence_length=FLUX_TEXT, height=16, width=24)
    assert hrv.counts.sum() > 0


def _good_job(pipe):
    work = _hrv_work(pipe)
    try:
        assert work.builder in work.installation.controllers
    finally:
        work.builder.close()
        if work.installation.controllers == [work.builder]:   # installed by the work: the job uninstalls it
            work.installation.uninstall()
        else:
            work.installation.remove(work.builder)
    _maps_work(pipe, ["cat"])
    _edit_work(pipe, "a cat", "a dog")


GOOD_CALLS = {
    "install": _good_install,
    "trace": _good_trace,
    "edit": lambda p: edit(p, "a cat", "a dog", Replace(), backend="torch", **SD),
    "build_hrv": _good_hrv,
    "attend_and_excite": lambda p: attend_and_excite(p, "a cat", [2], backend="torch", max_iter_to_alter=1,
                                                     max_refinement_steps=1, **SD),
    "regional_generate": lambda p: regional_generate(p, "a cat", _flux_regions(), max_sequence_length=FLUX_TEXT,
                                                     **FLUX),
    "jobs": _good_job,
}


@pytest.fixture(params=[False, True], ids=["bare", "installed"])
def installed(request):
    return request.param


@pytest.mark.parametrize("case", list(BAD_CALLS))
def test_a_failed_call_leaves_the_pipeline_as_it_was(case, installed):
    kind, bad, error = BAD_CALLS[case]
    pipe = PIPES[kind]()
    before_controller = Steps()
    if installed:
        attnctl.install(pipe, before_controller, backend="torch")
    try:
        state = pipeline_state(pipe)
        with pytest.raises(error):
            bad(pipe)
        assert_unchanged(state, pipe)
        GOOD_CALLS[case.split("/")[0]](pipe)
        assert_unchanged(state, pipe, ignore=("generation",))   # a call that ran leaves its generation
    finally:
        attnctl.uninstall(pipe)
    assert installation_of(pipe) is None


def test_install_undoes_a_controller_that_refuses_the_current_generation():
    pipe = sd_pipe()
    installation = attnctl.install(pipe, Steps(), backend="torch")
    try:
        installation.start_generation(["a cat"])
        state = pipeline_state(pipe)
        with pytest.raises(RuntimeError, match="refuses"):
            attnctl.install(pipe, Steps(), RaisesOnGeneration(), backend=BEFORE)
        assert_unchanged(state, pipe)
    finally:
        attnctl.uninstall(pipe)


@pytest.mark.parametrize("kind", ["sd", "flux"])
def test_an_install_that_fails_while_setting_processors_is_undone(kind, monkeypatch):
    pipe = PIPES[kind]()
    model = pipe.unet if kind == "sd" else pipe.transformer
    state = pipeline_state(pipe)
    set_processors = type(model).set_attn_processor
    calls = []

    def fails_half_way(self, processors):
        calls.append(processors)
        if len(calls) == 1:     # install: put in half the processors, then fail
            half = dict(list(processors.items())[: len(processors) // 2])
            set_processors(self, {**self.attn_processors, **half})
            raise RuntimeError("set_attn_processor failed")
        set_processors(self, processors)

    monkeypatch.setattr(type(model), "set_attn_processor", fails_half_way)
    with pytest.raises(RuntimeError, match="set_attn_processor failed"):
        attnctl.install(pipe, Steps())
    assert_unchanged(state, pipe)
    monkeypatch.undo()
    _good_install(pipe)
    assert_unchanged(state, pipe, ignore=("generation",))
