"""attnctl.p2p.AttentionStore against a materialising replay of the original's
AttentionStore and aggregate_attention (prompt-to-prompt_stable.ipynb), transcribed here:
every call's P computed from the run's own q, k (recorded per call), edited on the
conditional half by the original's AttentionReplace or AttentionReweight after
AttentionRefine (test_p2p's ``Original``), stored when it has at most 32² queries, summed
per step, divided by the steps, then aggregated per resolution and place over layers·heads. Replays in fp32 and fp64 give the tolerance."""
import numpy as np
import pytest
import torch
from PIL import Image

import attnctl
from attnctl.diffusers.controller import Controller
from attnctl.p2p import AttentionStore, Refine, Replace, Reweight
from control_reference import CallInfo, ReferenceState, generate_latents
from diffusion_helpers import sd_pipe
from test_p2p import N, REFINE, REPLACE, STEPS, Original, get_word_inds

SIZE = dict(height=16, width=16)       # latent 8 x 8: grids 8 x 8 (down / up, 2 heads) and 4 x 4 (mid, 4 heads)
VIEWS = [(8, ("up", "down")), (4, ("mid",)), (8, ("down", "up", "down"))]


# ---- the original's AttentionStore and aggregate_attention, transcribed ---------------------

class OriginalStore:
    @staticmethod
    def get_empty_store():
        return {"down_cross": [], "mid_cross": [], "up_cross": [], "down_self": [], "mid_self": [], "up_self": []}

    def __init__(self):
        self.cur_step = 0
        self.step_store = self.get_empty_store()
        self.attention_store = {}

    def forward(self, attn, is_cross, place_in_unet):
        key = f"{place_in_unet}_{'cross' if is_cross else 'self'}"
        if attn.shape[1] <= 32 ** 2:
            self.step_store[key].append(attn)

    def between_steps(self):
        if len(self.attention_store) == 0:
            self.attention_store = self.step_store
        else:
            for key in self.attention_store:
                for i in range(len(self.attention_store[key])):
                    self.attention_store[key][i] += self.step_store[key][i]
        self.step_store = self.get_empty_store()

    def get_average_attention(self):
        return {key: [item / self.cur_step for item in self.attention_store[key]] for key in self.attention_store}


def aggregate_attention(attention_store, prompts, res, from_where, is_cross, select):
    out = []
    attention_maps = attention_store.get_average_attention()
    num_pixels = res ** 2
    for location in from_where:
        for item in attention_maps[f"{location}_{'cross' if is_cross else 'self'}"]:
            if item.shape[1] == num_pixels:
                cross_maps = item.reshape(len(prompts), -1, res, res, item.shape[-1])[select]
                out.append(cross_maps)
    out = torch.cat(out, dim=0)
    out = out.sum(0) / out.shape[0]
    return out.cpu()


def place_in_unet(layer):
    block = layer.split(".")[0]             # register_attention_control's named_children of the UNet
    return next(p for p in ("down", "up", "mid") if p in block)


class Recorder(Controller):
    def __init__(self):
        self.calls = []

    def plan(self, call):
        self.calls.append((call.layer, call.step.index, call.is_cross, call.query.clone(), call.key.clone(),
                           call.scale))
        return None


def replay(calls, state, dtype):
    """The original's store fed every call's (edited) conditional half, in call order."""
    store = OriginalStore()
    for i, (layer, step, is_cross, q, k, scale) in enumerate(calls):
        probs = (scale * q.to(dtype) @ k.to(dtype).transpose(-1, -2)).softmax(-1)
        state.step = step
        attn = state.edit(CallInfo(layer, is_cross, step, None, None, q, k, scale), probs)
        B = attn.shape[0]
        store.forward(attn[B // 2:].reshape(-1, *attn.shape[2:]), is_cross, place_in_unet(layer))
        if i + 1 == len(calls) or calls[i + 1][1] != step:
            store.cur_step += 1
            store.between_steps()
    return store


_RUNS = {}


def run(case, backend="torch"):
    """(AttentionStore, recorded calls, replay state, prompts) of a generation with the
    edit ``case`` ("replace": a word swap in 2 targets; "reweight": Reweight after Refine,
    the two-source form; None: the store alone), cached."""
    key = (case, backend)
    if key not in _RUNS:
        pipe = sd_pipe()
        store, recorder = AttentionStore(), Recorder()
        controllers = [store, recorder]
        state, prompts = ReferenceState(), REPLACE
        if case == "replace":
            state = Original(prompts, pipe.tokenizer, "replace", 0.8, 0.4)
            controllers.insert(0, Replace(cross_steps=0.8, self_steps=0.4))
        elif case == "reweight":
            prompts = REFINE[:2]
            eq = torch.ones(1, N)
            eq[:, get_word_inds(prompts[1], "big", pipe.tokenizer)] = 4.0
            prev = Original(prompts, pipe.tokenizer, "refine", 0.6, 0.4)
            state = Original(prompts, pipe.tokenizer, "reweight", 0.6, 0.4, equalizer=eq, prev=prev)
            controllers.insert(0, Reweight({"big": 4.0}, after=Refine(), cross_steps=0.6, self_steps=0.4))
        with attnctl.install(pipe, *controllers, backend=backend):
            generate_latents(pipe, prompts, steps=STEPS, **SIZE)
        _RUNS[key] = store, recorder.calls, state, prompts
    return _RUNS[key]


@pytest.mark.parametrize("case", ["replace", "reweight", None])
def test_aggregate_matches_the_original(case):
    """Cross and self, every image, every resolution and place set: within 4x the fp32
    replay's own error of the fp64 replay; with an edit the maps are the edited ones."""
    store, calls, state, prompts = run(case)
    single, exact = replay(calls, state, torch.float32), replay(calls, state, torch.float64)
    plain = replay(calls, ReferenceState(), torch.float64)
    assert store.num_steps == exact.cur_step == STEPS
    own_error = error = 0.0
    edit_effect = {True: 0.0, False: 0.0}
    for res, where in VIEWS:
        for is_cross in (True, False):
            for select in range(len(prompts)):
                got = store.aggregate(res, where, is_cross, select)
                want = aggregate_attention(exact, prompts, res, where, is_cross, select)
                assert got.shape == want.shape == (res, res, 77 if is_cross else res * res)
                ref = aggregate_attention(single, prompts, res, where, is_cross, select)
                own_error = max(own_error, (ref.double() - want).abs().max().item())
                error = max(error, (got.double() - want).abs().max().item())
                unedited = aggregate_attention(plain, prompts, res, where, is_cross, select)
                edit_effect[is_cross] = max(edit_effect[is_cross], (got.double() - unedited).abs().max().item())
    assert error <= 4 * own_error, (error, own_error)
    if case is not None:    # cross and self maps are the edited ones, not the target's own
        assert min(edit_effect.values()) > 1e3 * own_error, (edit_effect, own_error)


def test_aggregate_triton_interpreter():
    """One small case on the Triton backend (interpreter on CPU): the edited run."""
    store, calls, state, _ = run("replace", backend="triton")
    single, exact = replay(calls, state, torch.float32), replay(calls, state, torch.float64)
    own_error = error = 0.0
    for is_cross in (True, False):
        got = store.aggregate(8, ("up", "down"), is_cross, 1)
        want = aggregate_attention(exact, REPLACE, 8, ("up", "down"), is_cross, 1)
        own_error = max(own_error, (aggregate_attention(single, REPLACE, 8, ("up", "down"), is_cross, 1).double()
                                    - want).abs().max().item())
        error = max(error, (got.double() - want).abs().max().item())
    assert error <= 4 * own_error, (error, own_error)


def test_show_cross_attention(tmp_path):
    """One panel per token (start and end included) of the selected prompt, laid out as
    the original's view_images of text_under_image panels; each panel the map scaled to
    255 by its maximum and resized to 256²."""
    store = run("replace")[0]
    tok = sd_pipe().tokenizer
    path = tmp_path / "cross.png"
    image = store.show_cross_attention(tok, REPLACE, 8, ("up", "down"), select=1, path=str(path))
    tokens = tok.encode(REPLACE[1])
    height = 256 + int(256 * 0.2)
    gap = int(height * 0.02)
    written = np.array(Image.open(path))
    assert np.array_equal(written, image)
    assert written.shape == (height, 256 * len(tokens) + gap * (len(tokens) - 1), 3)
    maps = store.aggregate(8, ("up", "down"), True, 1)
    for i in range(len(tokens)):
        panel = written[:, i * (256 + gap): i * (256 + gap) + 256]
        m = (255 * maps[:, :, i] / maps[:, :, i].max()).numpy().astype(np.uint8)
        want = np.array(Image.fromarray(np.repeat(m[:, :, None], 3, axis=2)).resize((256, 256), Image.BICUBIC))
        assert np.array_equal(panel[:256], want)
        assert (panel[256:] < 255).any()                       # the token's text under it
        assert (written[:, i * (256 + gap) + 256: (i + 1) * (256 + gap)] == 255).all()   # white gaps


def test_show_self_attention_comp(tmp_path):
    """max_com panels of 256², each a right singular vector of the row-centred averaged
    self-attention map, shifted to 0 and scaled to 255."""
    store = run("replace")[0]
    path = tmp_path / "self.png"
    image = store.show_self_attention_comp(8, ("up", "down"), max_com=3, select=2, path=str(path))
    written = np.array(Image.open(path))
    assert np.array_equal(written, image) and written.shape == (256, 3 * 256, 3)
    a = store.aggregate(8, ("up", "down"), False, 2).numpy().reshape(64, 64)
    vh = np.linalg.svd(a - a.mean(axis=1, keepdims=True))[2]
    for i in range(3):
        v = vh[i].reshape(8, 8) - vh[i].min()
        m = np.repeat((255 * v / v.max())[:, :, None], 3, axis=2).astype(np.uint8)
        assert np.array_equal(written[:, 256 * i: 256 * (i + 1)],
                              np.array(Image.fromarray(m).resize((256, 256), Image.BICUBIC)))
    assert store.show_self_attention_comp(8, ("up", "down")).shape == (256, 10 * 256, 3)   # default max_com


def test_bad_input():
    store = run("replace")[0]
    tok = sd_pipe().tokenizer
    with pytest.raises(ValueError, match=r"res: no stored cross-attention layer of up, down has grid \(5, 5\); "
                                         r"stored grids there: \[\(8, 8\)\]"):
        store.aggregate(5, ("up", "down"), True, 0)
    with pytest.raises(ValueError, match="res: no stored self-attention layer of mid"):
        store.aggregate(8, ("mid",), False, 0)
    with pytest.raises(ValueError, match=r"from_where: expected places among \('down', 'mid', 'up'\), got "):
        store.aggregate(8, ("up", "left"), True, 0)
    with pytest.raises(IndexError, match=r"select: expected an image index in \[0, 3\), got 3"):
        store.aggregate(8, ("up",), True, 3)
    with pytest.raises(ValueError, match="res: expected a positive int"):
        store.aggregate(0, ("up",), True, 0)
    with pytest.raises(ValueError, match=r"max_com: expected an int in \[1, 16\]"):
        store.show_self_attention_comp(4, ("mid",), max_com=17)
    with pytest.raises(ValueError, match=r"prompts: expected one prompt per stored image \(3\)"):
        store.show_cross_attention(tok, REPLACE[:2], 8, ("up",))
    with pytest.raises(RuntimeError, match="nothing stored yet"):
        AttentionStore().aggregate(8, ("up",), True, 0)
    with pytest.raises(ValueError, match="max_queries: expected a positive int"):
        AttentionStore(max_queries=0)


def test_max_queries_skips_larger_layers():
    """max_queries (the original's 32²) leaves larger layers out: with 16 only the mid
    block's 4 x 4 layers are stored."""
    pipe = sd_pipe()
    store = AttentionStore(max_queries=16)
    with attnctl.install(pipe, store, backend="torch"):
        generate_latents(pipe, REPLACE[:1], steps=1, **SIZE)
    assert store.aggregate(4, ("mid",), True, 0).shape == (4, 4, 77)
    with pytest.raises(ValueError, match=r"stored grids there: none"):
        store.aggregate(8, ("up", "down"), True, 0)


def test_non_square_grid():
    """res=(h, w) reads a non-square grid (the original handles res x res only): the mean
    over steps and heads of the up/down layers' P at that grid, from the recorded q, k."""
    pipe = sd_pipe()
    store, recorder = AttentionStore(), Recorder()
    with attnctl.install(pipe, store, recorder, backend="torch"):
        generate_latents(pipe, REPLACE[:2], steps=2, height=16, width=24)

    def mean_map(is_cross, dtype):
        total, heads = 0, 0
        for _, step, cross, q, k, scale in recorder.calls:
            if cross == is_cross and q.shape[2] == 8 * 12:
                total = total + (scale * q.to(dtype) @ k.to(dtype).transpose(-1, -2)).softmax(-1)[3].sum(0)
                heads += q.shape[1] if step == 0 else 0
        return (total / (2 * heads)).reshape(8, 12, -1)

    for is_cross in (True, False):
        want, single = mean_map(is_cross, torch.float64), mean_map(is_cross, torch.float32)
        got = store.aggregate((8, 12), ("down", "up"), is_cross, 1)
        assert got.shape == want.shape
        assert (got.double() - want).abs().max() <= 4 * (single.double() - want).abs().max()
    with pytest.raises(ValueError, match=r"stored grids there: \[\(8, 12\)\]"):
        store.aggregate(8, ("down", "up"), True, 1)


def test_local_blend_is_refused():
    """The edit's LocalBlend captures its own maps on its level's calls; a store beside it
    is refused there (as a trace is), not silently left empty."""
    from attnctl.p2p import LocalBlend

    pipe = sd_pipe()
    edit = Replace(local_blend=LocalBlend([["cat"], ["dog"]], level=1))
    with attnctl.install(pipe, AttentionStore(), backend="torch"), \
            pytest.raises(ValueError, match="expected no other controller's capture"):
        attnctl.p2p.edit(pipe, REPLACE[0], REPLACE[1], edit, num_inference_steps=1, output_type="latent", **SIZE)
