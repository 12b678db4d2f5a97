"""Prompt-to-prompt controllers against a materialising reference written here from the
original code (Hertz et al., prompt-to-prompt/ptp_utils.py, seq_aligner.py and the
AttentionReplace / AttentionRefine / AttentionReweight controllers): explicit P of every
call, post-softmax edits exactly as their code does them (einsum with the mapper, the
alignment gather with alphas, the equalizer, the per-word α_t of
get_time_words_attention_alpha, self-attention P_tgt ← P_src), here at every resolution.
Reference and Triton-interpreter backends, fp32, on the tiny SD pipeline with CFG."""
import numpy as np
import pytest
import torch

import attnctl
from attnctl.p2p import Refine, Replace, Reweight, global_align, refinement_mapper
from control_reference import ReferenceState, assert_matches_reference, generate_latents, original_init_latent
from diffusion_helpers import sd_pipe

pytestmark = pytest.mark.filterwarnings("ignore:divide by zero:RuntimeWarning")
SIZE = dict(height=16, width=24)
STEPS = 3
N = 77


# ---- the original's helpers, transcribed (numpy / torch, no attnctl code) ----------------------

def get_word_inds(text, word_place, tokenizer):
    split_text = text.split(" ")
    if isinstance(word_place, str):
        word_place = [i for i, word in enumerate(split_text) if word_place == word]
    elif isinstance(word_place, int):
        word_place = [word_place]
    out = []
    if len(word_place) > 0:
        words_encode = [tokenizer.decode([item]).strip("#") for item in tokenizer.encode(text)][1:-1]
        cur_len, ptr = 0, 0
        for i in range(len(words_encode)):
            cur_len += len(words_encode[i])
            if ptr in word_place:
                out.append(i + 1)
            if cur_len >= len(split_text[ptr]):
                ptr += 1
                cur_len = 0
    return np.array(out)


def get_replacement_mapper_(x, y, tokenizer, max_len=77):
    words_x, words_y = x.split(" "), y.split(" ")
    assert len(words_x) == len(words_y)
    inds_replace = [i for i in range(len(words_y)) if words_y[i] != words_x[i]]
    inds_source = [get_word_inds(x, i, tokenizer) for i in inds_replace]
    inds_target = [get_word_inds(y, i, tokenizer) for i in inds_replace]
    mapper = np.zeros((max_len, max_len))
    i = j = 0
    cur_inds = 0
    while i < max_len and j < max_len:
        if cur_inds < len(inds_source) and inds_source[cur_inds][0] == i:
            inds_source_, inds_target_ = inds_source[cur_inds], inds_target[cur_inds]
            if len(inds_source_) == len(inds_target_):
                mapper[inds_source_, inds_target_] = 1
            else:
                ratio = 1 / len(inds_target_)
                for i_t in inds_target_:
                    mapper[inds_source_, i_t] = ratio
            cur_inds += 1
            i += len(inds_source_)
            j += len(inds_target_)
        elif cur_inds < len(inds_source):
            mapper[i, j] = 1
            i += 1
            j += 1
        else:
            mapper[j, j] = 1
            i += 1
            j += 1
    return torch.from_numpy(mapper).float()


def np_global_align(x, y, gap=0, match=1, mismatch=-1):
    matrix = np.zeros((len(x) + 1, len(y) + 1), dtype=np.int32)
    matrix[0, 1:] = (np.arange(len(y)) + 1) * gap
    matrix[1:, 0] = (np.arange(len(x)) + 1) * gap
    trace_back = np.zeros((len(x) + 1, len(y) + 1), dtype=np.int32)
    trace_back[0, 1:] = 1
    trace_back[1:, 0] = 2
    trace_back[0, 0] = 4
    for i in range(1, len(x) + 1):
        for j in range(1, len(y) + 1):
            left = matrix[i, j - 1] + gap
            up = matrix[i - 1, j] + gap
            diag = matrix[i - 1, j - 1] + (match if x[i - 1] == y[j - 1] else mismatch)
            matrix[i, j] = max(left, up, diag)
            if matrix[i, j] == left:
                trace_back[i, j] = 1
            elif matrix[i, j] == up:
                trace_back[i, j] = 2
            else:
                trace_back[i, j] = 3
    i, j = len(x), len(y)
    mapper_y_to_x = []
    while i > 0 or j > 0:
        if trace_back[i, j] == 3:
            i, j = i - 1, j - 1
            mapper_y_to_x.append((j, i))
        elif trace_back[i][j] == 1:
            j = j - 1
            mapper_y_to_x.append((j, -1))
        elif trace_back[i][j] == 2:
            i = i - 1
        elif trace_back[i][j] == 4:
            break
    mapper_y_to_x.reverse()
    return torch.tensor(mapper_y_to_x, dtype=torch.int64)


def get_mapper(x, y, tokenizer, max_len=77):
    x_seq, y_seq = tokenizer.encode(x), tokenizer.encode(y)
    mapper_base = np_global_align(x_seq, y_seq)
    alphas = torch.ones(max_len)
    alphas[: mapper_base.shape[0]] = mapper_base[:, 1].ne(-1).float()
    mapper = torch.zeros(max_len, dtype=torch.int64)
    mapper[: mapper_base.shape[0]] = mapper_base[:, 1]
    mapper[mapper_base.shape[0]:] = len(y_seq) + torch.arange(max_len - len(y_seq))
    return mapper, alphas


def get_time_words_attention_alpha(prompts, num_steps, cross_replace_steps, tokenizer, max_num_words=77):
    def update(alpha, bounds, prompt_ind, word_inds=None):
        if isinstance(bounds, float):
            bounds = 0, bounds
        start, end = int(bounds[0] * alpha.shape[0]), int(bounds[1] * alpha.shape[0])
        if word_inds is None:
            word_inds = torch.arange(alpha.shape[2])
        alpha[:start, prompt_ind, word_inds] = 0
        alpha[start:end, prompt_ind, word_inds] = 1
        alpha[end:, prompt_ind, word_inds] = 0
        return alpha

    if not isinstance(cross_replace_steps, dict):
        cross_replace_steps = {"default_": cross_replace_steps}
    if "default_" not in cross_replace_steps:
        cross_replace_steps["default_"] = (0.0, 1.0)
    alpha = torch.zeros(num_steps + 1, len(prompts) - 1, max_num_words)
    for i in range(len(prompts) - 1):
        alpha = update(alpha, cross_replace_steps["default_"], i)
    for key, item in cross_replace_steps.items():
        if key != "default_":
            inds = [get_word_inds(prompts[i], key, tokenizer) for i in range(1, len(prompts))]
            for i, ind in enumerate(inds):
                if len(ind) > 0:
                    alpha = update(alpha, item, i, torch.from_numpy(ind))
    return alpha.reshape(num_steps + 1, len(prompts) - 1, 1, 1, max_num_words)


class Original(ReferenceState):
    """AttentionControlEdit.forward on the conditional half of every call."""

    def __init__(self, prompts, tok, kind, cross, self_steps, equalizer=None, prev=None, self_cap=None):
        super().__init__()
        self.kind, self.prev, self.equalizer, self.self_cap = kind, prev, equalizer, self_cap
        self.alpha = get_time_words_attention_alpha(prompts, STEPS, cross, tok)
        if isinstance(self_steps, float):
            self_steps = 0, self_steps
        self.num_self_replace = int(STEPS * self_steps[0]), int(STEPS * self_steps[1])
        if kind == "replace":
            self.mapper = torch.stack([get_replacement_mapper_(prompts[0], p, tok) for p in prompts[1:]])
        if kind == "refine":
            pairs = [get_mapper(prompts[0], p, tok) for p in prompts[1:]]
            self.mapper = torch.stack([m for m, _ in pairs])
            self.alphas = torch.stack([a for _, a in pairs]).reshape(len(pairs), 1, 1, -1)

    def replace_cross_attention(self, attn_base, att_replace):
        if self.kind == "replace":
            return torch.einsum("hpw,bwn->bhpn", attn_base, self.mapper.to(attn_base.dtype))
        if self.kind == "refine":
            attn_base_replace = attn_base[:, :, self.mapper].permute(2, 0, 1, 3)
            return attn_base_replace * self.alphas + att_replace * (1 - self.alphas)
        if self.prev is not None:
            attn_base = self.prev.replace_cross_attention(attn_base, att_replace)
        return attn_base[None, :, :, :] * self.equalizer[:, None, None, :] if self.prev is None else \
            attn_base * self.equalizer[:, None, None, :]

    def edit(self, info, probs):
        B = probs.shape[0]
        attn = probs[B // 2:].clone()
        cur_step = self.step
        if info.is_cross or self.num_self_replace[0] <= cur_step < self.num_self_replace[1]:
            attn_base, attn_replace = attn[0], attn[1:]
            if info.is_cross:
                alpha_words = self.alpha[cur_step]
                new = self.replace_cross_attention(attn_base, attn_replace) * alpha_words \
                    + (1 - alpha_words) * attn_replace
            elif self.self_cap is None or attn_replace.shape[2] <= self.self_cap:   # replace_self_attention
                new = attn_base.unsqueeze(0).expand(attn_replace.shape[0], *attn_base.shape)
            else:   # the original's cap (16**2): larger layers keep their own attention
                new = attn_replace
            attn[1:] = new
        return torch.cat([probs[: B // 2], attn])


def _compare(pipe, state, controller, backend, prompts):
    controllers = controller if isinstance(controller, list) else [controller]
    with attnctl.install(pipe, *controllers, backend=backend):
        got = generate_latents(pipe, prompts, steps=STEPS, **SIZE)
    assert_matches_reference(got, pipe, state, prompts, steps=STEPS, **SIZE)
    _assert_source_untouched(pipe, got, backend, prompts)
    return got


def _assert_source_untouched(pipe, got, backend, prompts, images=1, **kwargs):
    """The source rows of an edit go through the same arithmetic as attnctl without any
    controller (P·(I·V) + 0, I·V exact), so they are bit-identical to it on any machine."""
    with attnctl.install(pipe, backend=backend):
        plain = generate_latents(pipe, prompts, steps=STEPS, **SIZE, **kwargs)
    assert torch.equal(got[:images], plain[:images])                    # the source is untouched
    assert (got[images:] - plain[images:]).abs().amax() > 1e-2            # the edit acts


REPLACE = ["a cat on a red car", "a dog on a red car", "a fox on a blue car"]   # blue: 4 tokens for 3
REFINE = ["a cat on a red car", "a cat on a big red car", "a cat on a car"]


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_replace_two_targets(backend):
    pipe = sd_pipe()
    state = Original(REPLACE, pipe.tokenizer, "replace", 0.6, 0.4)
    _compare(pipe, state, Replace(cross_steps=0.6, self_steps=0.4), backend, REPLACE)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_per_word_window_in_only_some_targets(backend):
    """A per-word window whose word is in one target only: in the steps where only that
    word is active, the other target keeps its own attention, P_tgt (not P_tgt twice)."""
    pipe = sd_pipe()
    cross = {"default_": (0.0, 0.3), "dog": (0.0, 0.7)}      # 3 steps: default step 0, dog steps 0-1
    state = Original(REPLACE, pipe.tokenizer, "replace", dict(cross), 0.4)
    _compare(pipe, state, Replace(cross_steps=cross, self_steps=0.4), backend, REPLACE)


def test_self_attention_cap_option():
    """self_max_queries=16**2 is the original's cap (attn.shape[2] <= 16**2); here a cap
    between the tiny UNet's levels (96 and 24 queries) so that both sides are exercised."""
    pipe = sd_pipe()
    state = Original(REPLACE[:2], pipe.tokenizer, "replace", 0.6, 1.0, self_cap=24)
    _compare(pipe, state, Replace(cross_steps=0.6, self_steps=1.0, self_max_queries=24), "torch", REPLACE[:2])


@pytest.mark.parametrize("backend", ["torch"])
def test_reweight_one_factor_per_target(backend):
    """The original's get_equalizer(text, words, values) with one value per target."""
    pipe = sd_pipe()
    prompts = ["a cat on a red car", "a dog on a red car", "a fox on a red car"]
    eq = torch.ones(2, N)
    eq[:, get_word_inds(prompts[1], "red", pipe.tokenizer)] = torch.tensor([[3.0], [0.5]])
    prev = Original(prompts, pipe.tokenizer, "replace", 0.8, 0.4)
    state = Original(prompts, pipe.tokenizer, "reweight", 0.8, 0.4, equalizer=eq, prev=prev)
    _compare(pipe, state, Reweight({"red": (3.0, 0.5)}, after=Replace(), cross_steps=0.8, self_steps=0.4),
             backend, prompts)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_refine_per_word_schedule(backend):
    pipe = sd_pipe()
    cross = {"default_": 1.0, "big": (0.3, 0.6)}
    state = Original(REFINE, pipe.tokenizer, "refine", dict(cross), (0.0, 0.7))
    _compare(pipe, state, Refine(cross_steps=cross, self_steps=(0.0, 0.7)), backend, REFINE)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_reweight_after_replace(backend):
    pipe = sd_pipe()
    prompts = REPLACE[:2]
    eq = torch.ones(1, N)
    eq[:, get_word_inds(prompts[1], "red", pipe.tokenizer)] = 3.0
    prev = Original(prompts, pipe.tokenizer, "replace", 0.8, 0.2)
    state = Original(prompts, pipe.tokenizer, "reweight", 0.8, 0.2, equalizer=eq, prev=prev)
    _compare(pipe, state, Reweight({"red": 3.0}, after=Replace(), cross_steps=0.8, self_steps=0.2), backend, prompts)


def test_reweight_alone_and_after_refine():
    pipe = sd_pipe()
    prompts = ["a cat on a red car", "a cat on a red car"]
    eq = torch.ones(1, N)
    eq[:, get_word_inds(prompts[1], "cat", pipe.tokenizer)] = -1.0
    state = Original(prompts, pipe.tokenizer, "reweight", 1.0, 0.0, equalizer=eq)
    _compare(pipe, state, Reweight({"cat": -1.0}, cross_steps=1.0, self_steps=0.0), "torch", prompts)
    prompts = REFINE[:2]
    eq = torch.ones(1, N)
    eq[:, get_word_inds(prompts[1], "big", pipe.tokenizer)] = 4.0
    prev = Original(prompts, pipe.tokenizer, "refine", 0.6, 0.4)
    state = Original(prompts, pipe.tokenizer, "reweight", 0.6, 0.4, equalizer=eq, prev=prev)
    _compare(pipe, state, Reweight({"big": 4.0}, after=Refine(), cross_steps=0.6, self_steps=0.4), "torch", prompts)


# ---- alignment -------------------------------------------------------------------------------

@pytest.mark.parametrize("x,y", [
    ([49406, 5, 6, 7, 49407], [49406, 5, 8, 6, 7, 49407]),        # insertion
    ([49406, 5, 6, 7, 9, 49407], [49406, 5, 7, 49407]),            # deletions
    ([49406, 5, 5, 7, 5, 49407], [49406, 5, 7, 5, 5, 5, 49407]),   # repeated tokens
    ([49406, 1, 2, 3, 49407], [49406, 4, 5, 49407]),               # substitutions and a deletion
    ([49406, 49407], [49406, 3, 3, 49407]),
])
def test_alignment_matches_the_original(x, y):
    expected = np_global_align(x, y)
    assert global_align(x, y) == [tuple(p) for p in expected.tolist()]
    mapper, alphas = refinement_mapper(x, y, 20)
    assert [j for j, _ in global_align(x, y)] == list(range(len(y)))   # every target token, in order
    for j, i in global_align(x, y):
        assert mapper[j] == i and alphas[j] == (i != -1)
    assert torch.equal(mapper[len(y):], torch.arange(len(y), 20))


def test_alignment_examples():
    # insertion: the new token maps to -1, the rest keep their source columns
    assert global_align([0, 1, 2, 9], [0, 1, 7, 2, 9]) == [(0, 0), (1, 1), (2, -1), (3, 2), (4, 3)]
    # deletion: source column 2 is skipped
    assert global_align([0, 1, 2, 3, 9], [0, 1, 3, 9]) == [(0, 0), (1, 1), (2, 3), (3, 4)]
    # repeated tokens: one of the three is the insertion (ties prefer an insertion, as in the original)
    assert global_align([0, 5, 5, 9], [0, 5, 5, 5, 9]) == [(0, 0), (1, 1), (2, 2), (3, -1), (4, 3)]


# ---- bad input -------------------------------------------------------------------------------

def test_bad_input():
    pipe = sd_pipe()
    with attnctl.install(pipe, Replace(), backend="torch"):
        with pytest.raises(ValueError, match=r"Replace: expected the source and target prompts to have the same "
                                             r"number of words \(a word swap\), got 6 words in 'a cat on a red car' "
                                             r"and 7 in 'a cat on a big red car'"):
            generate_latents(pipe, REFINE[:2], steps=1, **SIZE)
    with attnctl.install(pipe, Reweight({"dog": 2.0}), backend="torch"):
        with pytest.raises(ValueError, match=r"weights\['dog'\]: 'dog' is not a word of the prompt "
                                             r"'a cat on a red car'"):
            generate_latents(pipe, REPLACE[:1] * 2, steps=1, **SIZE)
    with attnctl.install(pipe, Replace(cross_steps={"bird": 0.5}), backend="torch"):
        with pytest.raises(ValueError, match="cross_steps: 'bird' is not a word of any target prompt"):
            generate_latents(pipe, REPLACE[:2], steps=1, **SIZE)
    with attnctl.install(pipe, Replace(), backend="torch"):
        with pytest.raises(ValueError, match="Replace: expected at least 2 prompts"):
            generate_latents(pipe, REPLACE[:1], steps=1, **SIZE)
    with pytest.raises(ValueError, match=r"cross_steps: expected 0 <= start <= end <= 1, got 1.5"):
        Replace(cross_steps=1.5)
    with pytest.raises(ValueError, match=r"self_steps: expected 0 <= start <= end <= 1, got \(0.5, 0.2\)"):
        Refine(self_steps=(0.5, 0.2))
    with pytest.raises(ValueError, match=r"cross_steps\['cat'\]: expected 0 <= start <= end <= 1, got -0.1"):
        Replace(cross_steps={"cat": -0.1})
    with pytest.raises(ValueError, match=r"weights\['cat'\]: expected a finite number"):
        Reweight({"cat": float("nan")})
    with pytest.raises(ValueError, match=r"compose: source: expected at most one controller's plan"):
        with attnctl.install(pipe, Replace(), Refine(), backend="torch"):
            generate_latents(pipe, REPLACE[:2], steps=1, **SIZE)


# ---- local blend -----------------------------------------------------------------------------

class OriginalBlend(Original):
    """Original plus LocalBlend: AttentionStore keeps the (edited) cross-attention maps of
    the chosen level, summed over steps; step_callback blends x_t as LocalBlend.__call__."""

    def __init__(self, prompts, tok, words, threshold, queries, **kw):
        super().__init__(prompts, tok, "replace", **kw)
        self.alpha_layers = torch.zeros(len(prompts), 1, 1, 1, 1, N)
        for i, (prompt, words_) in enumerate(zip(prompts, words)):
            for word in words_:
                self.alpha_layers[i, :, :, :, :, get_word_inds(prompt, word, tok)] = 1
        self.threshold, self.queries = threshold, queries
        self.step_store, self.attention_store = [], []

    def edit(self, info, probs):
        out = super().edit(info, probs)
        if info.is_cross and info.q.shape[2] == self.queries:
            self.step_store.append(out[out.shape[0] // 2:].clone())
        return out

    def callback(self, pipe, i, t, kwargs):
        if not self.attention_store:
            self.attention_store = self.step_store
        else:
            self.attention_store = [a + b for a, b in zip(self.attention_store, self.step_store)]
        self.step_store = []
        x_t = kwargs["latents"]
        h, w = x_t.shape[2], x_t.shape[3]
        k = 1
        maps = [item.reshape(self.alpha_layers.shape[0], -1, 1, h, w, N) for item in self.attention_store]
        maps = torch.cat(maps, dim=1)
        maps = (maps * self.alpha_layers).sum(-1).mean(1)
        mask = torch.nn.functional.max_pool2d(maps, (k * 2 + 1, k * 2 + 1), (1, 1), padding=(k, k))
        mask = torch.nn.functional.interpolate(mask, size=(x_t.shape[2:]))
        mask = mask / mask.max(2, keepdims=True)[0].max(3, keepdims=True)[0]
        mask = mask.gt(self.threshold)
        mask = (mask[:1] + mask[1:]).float()
        x_t = x_t[:1] + mask * (x_t - x_t[:1])
        return {"latents": x_t}


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_local_blend(backend):
    from attnctl.p2p import LocalBlend, edit
    pipe = sd_pipe()
    prompts = REPLACE[:2]
    words = [["cat"], ["dog"]]
    def state():
        return OriginalBlend(prompts, pipe.tokenizer, words, 0.9, 8 * 12, cross=0.6, self_steps=0.4)

    controller = Replace(cross_steps=0.6, self_steps=0.4, local_blend=LocalBlend(words, threshold=0.9, level=1))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        got = edit(pipe, prompts[0], prompts[1:], controller, backend=backend, num_inference_steps=STEPS,
                   generator=generator, output_type="latent", **SIZE).images
    assert_matches_reference(got, pipe, state, prompts, steps=STEPS, **SIZE,
                             noise=original_init_latent(pipe, len(prompts), **SIZE),   # edit()'s default noise
                             state_kwargs=lambda s: dict(callback_on_step_end=s.callback))
    with attnctl.install(pipe, Replace(cross_steps=0.6, self_steps=0.4), backend=backend):
        unblended = generate_latents(pipe, prompts, steps=STEPS, latents=original_init_latent(pipe, 2, **SIZE),
                                     **SIZE)
    assert (got[1] - unblended[1]).abs().amax() > 1e-2      # the blend acts
    with pytest.raises(ValueError, match=r"LocalBlend words\[1\]: 'cow' is not a word of the prompt"):
        edit(pipe, prompts[0], prompts[1:], Replace(local_blend=LocalBlend([["cat"], ["cow"]], level=1)),
             num_inference_steps=1, **SIZE)


@pytest.mark.parametrize("images_per_prompt", [1, 2])
def test_replace_sdxl(images_per_prompt):
    """SDXL (two text encoders, added conditions), and several images per prompt: image i
    of a target edits image i of the source."""
    from diffusion_helpers import sdxl_pipe
    pipe = sdxl_pipe()
    prompts = REPLACE[:2]

    class PerImage(Original):
        def edit(self, info, probs):
            if images_per_prompt == 1:
                return super().edit(info, probs)
            # rows per half: [p0 i0, p0 i1, p1 i0, p1 i1]: apply the original per image index
            B = probs.shape[0]
            out = probs.clone()
            for i in range(images_per_prompt):
                rows = [r for r in range(B) if r % images_per_prompt == i]     # [u0, u1, c0, c1] of image i
                out[rows] = super().edit(info, probs[rows])
            return out

    state = PerImage(prompts, pipe.tokenizer, "replace", 0.6, 0.4)
    kwargs = dict(num_images_per_prompt=images_per_prompt)
    with attnctl.install(pipe, Replace(cross_steps=0.6, self_steps=0.4), backend="torch"):
        got = generate_latents(pipe, prompts, steps=STEPS, **SIZE, **kwargs)
    assert_matches_reference(got, pipe, state, prompts, steps=STEPS, **SIZE, **kwargs)
    _assert_source_untouched(pipe, got, "torch", prompts, images=images_per_prompt, **kwargs)


def test_compose_rules():
    from attnctl.diffusers.compose import compose
    from attnctl.diffusers.controller import Plan
    shape = (2, 1, 4, 3)
    src = torch.tensor([0, 0])
    own = torch.rand(2, 1, 1, 3)
    other = torch.rand(2, 1, 1, 3)
    W = torch.rand(2, 3, 3)
    plan, _ = compose([Plan(source=src, value_map=W, own_prob_mult=own), Plan(prob_mult=other)], shape, "cpu")
    # Other factors act on the edited map at the target's token columns: folded into the
    # value map of the injected term (W[j, n]·f[n]), multiplied into the own term's factor.
    assert plan.source is src and plan.prob_mult is None
    torch.testing.assert_close(plan.value_map, W[:, None] * other[:, :, 0, None, :])
    torch.testing.assert_close(plan.own_prob_mult, own * other)
    plan, _ = compose([Plan(source=src), Plan(prob_mult=other)], shape, "cpu")   # self-attention: same space
    assert torch.equal(plan.prob_mult, other) and plan.value_map is None
    with pytest.raises(ValueError, match=r"compose: prob_mult of shape \(2, 1, 4, 3\) varies over the query "
                                         r"pixels and cannot act on a prompt-to-prompt token map"):
        compose([Plan(source=src, value_map=W), Plan(prob_mult=torch.rand(2, 1, 4, 3))], shape, "cpu")
    with pytest.raises(ValueError, match="compose: value_map/own_prob_mult: expected a source in the same plan"):
        compose([Plan(value_map=torch.eye(3))], shape, "cpu")
    with pytest.raises(ValueError, match="compose: own_capture: expected own_prob_mult in the same plan"):
        compose([Plan(source=src, own_capture=attnctl.Capture())], shape, "cpu")
    with pytest.raises(ValueError, match="compose: source: expected at most one controller's plan"):
        compose([Plan(source=src), Plan(source=src)], shape, "cpu")


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_concept_strengthening_inside_replace(backend):
    """Official P2P-HRV (p2p_hrv.py AttentionControlEdit.forward / AttentionReplace.
    replace_token_maps with use_soft_vector): from token_insertion_step on, the target
    word's columns of the edited map R are the target's own map × HRV[head]; then
    R·α + (1 - α)·P_tgt. Replayed on explicit P."""
    from diffusers.models.attention_processor import Attention
    from attnctl.tools.hrv import ConceptStrengthening, HeadRelevance

    pipe = sd_pipe()
    prompts = ["a cat on a red car", "a dog on a red car", "a dog on a red dog"]
    layers = [(name, m.heads) for name, m in pipe.unet.named_modules()
              if isinstance(m, Attention) and m.is_cross_attention]
    total = sum(h for _, h in layers)
    values = torch.rand(2, total, generator=torch.Generator().manual_seed(3)) * 3
    hrv = HeadRelevance(concepts=["animal", "vehicle"], layers=layers, hrv=values, counts=None)
    offsets = hrv.offsets()
    word_indices = [get_word_inds(p, "dog", pipe.tokenizer) for p in prompts[1:]]
    start_step = 1

    class Official(Original):
        def replace_token_maps(self, source, target, layer, head):
            result = torch.zeros_like(source)
            for prompt_idx in range(len(prompts) - 1):
                mask = torch.zeros_like(source[prompt_idx])
                mask[:, word_indices[prompt_idx]] = 1
                soft_rescale_factor = values[0, offsets[layer][0] + head]
                result[prompt_idx] = (1 - mask) * source[prompt_idx] + mask * target[prompt_idx] * soft_rescale_factor
            return result

        def edit(self, info, probs):
            if not info.is_cross:
                return super().edit(info, probs)
            B = probs.shape[0]
            attn = probs[B // 2:].clone()
            attn_base, attn_replace = attn[0], attn[1:]
            alpha_words = self.alpha[self.step]
            attn_source = self.replace_cross_attention(attn_base, attn_replace)
            if self.step >= start_step:
                for head in range(attn.shape[1]):
                    attn_source[:, head] = self.replace_token_maps(attn_source[:, head], attn_replace[:, head],
                                                                   info.layer, head)
            attn[1:] = attn_source * alpha_words + (1 - alpha_words) * attn_replace
            return torch.cat([probs[: B // 2], attn])

    cross = {"default_": 0.8, "dog": (0.0, 0.5)}      # dog: steps 0-1 of 3
    state = Official(prompts, pipe.tokenizer, "replace", dict(cross), 0.4)
    strengthen = ConceptStrengthening(hrv, "dog", "animal", start_step=start_step)
    got = _compare(pipe, state, Replace(cross_steps=cross, self_steps=0.4, strengthen=strengthen), backend, prompts)
    with attnctl.install(pipe, Replace(cross_steps=cross, self_steps=0.4), backend=backend):
        plain_edit = generate_latents(pipe, prompts, steps=STEPS, **SIZE)
    assert (got[1:] - plain_edit[1:]).abs().amax() > 1e-3          # the strengthening acts
    with pytest.raises(ValueError, match="strengthen: word 'zebra' is in none of the target prompts"):
        with attnctl.install(pipe, Replace(strengthen=ConceptStrengthening(hrv, "zebra", "animal"))):
            generate_latents(pipe, prompts, steps=1, **SIZE)
    with pytest.raises(TypeError, match=r"controllers\[0\]: expected an attnctl.Controller, got ConceptStrengthening"):
        attnctl.install(pipe, strengthen)
    attnctl.uninstall(pipe)
    with pytest.raises(ValueError, match=r"start_step: expected a non-negative int"):
        ConceptStrengthening(hrv, "dog", "animal", start_step=-1)


# ---- traps ----------------------------------------------------------------------------------

def test_edit_restores_the_pipeline_and_survives_set_attn_processor():
    from diffusers.models.attention_processor import AttnProcessor2_0
    from attnctl.p2p import edit

    pipe = sd_pipe()
    prompts = REPLACE[:2]

    def run():
        generator = torch.Generator().manual_seed(0)
        with torch.no_grad():
            return edit(pipe, prompts[0], prompts[1:], Replace(), backend="torch", num_inference_steps=2,
                        generator=generator, output_type="latent", **SIZE).images

    first = run()
    assert attnctl.diffusers.installation_of(pipe) is None      # edit() installed for its own call only
    pipe.unet.set_attn_processor(AttnProcessor2_0())
    assert torch.equal(run(), first)
    # processors replaced under an installation with controllers: a clear error, not a no-op
    with attnctl.install(pipe, Replace(), backend="torch"):
        pipe.unet.set_attn_processor(AttnProcessor2_0())
        with pytest.raises(RuntimeError, match=r"attnctl: the attention processors of \d+ of \d+ layers .* were "
                                               r"replaced after attnctl was installed"):
            generate_latents(pipe, prompts, steps=1, **SIZE)
        with pytest.raises(RuntimeError, match=r"were replaced after attnctl was installed .* controllers "
                                               r"\(Replace, Refine\)"):
            edit(pipe, prompts[0], prompts[1:], Refine(), num_inference_steps=1, **SIZE)
        assert [type(c) for c in attnctl.diffusers.installation_of(pipe).controllers] == [Replace]


def test_local_blend_with_a_user_callback():
    from attnctl.p2p import LocalBlend, edit

    pipe = sd_pipe()
    prompts = REPLACE[:2]
    seen = []

    def user(pipe_, i, t, kwargs):
        seen.append(kwargs["latents"].clone())
        return kwargs

    def run(**kw):
        generator = torch.Generator().manual_seed(0)
        blend = LocalBlend([["cat"], ["dog"]], threshold=0.9, level=1)
        with torch.no_grad():
            return edit(pipe, prompts[0], prompts[1:], Replace(cross_steps=0.6, self_steps=0.4, local_blend=blend),
                        backend="torch", num_inference_steps=STEPS, generator=generator, output_type="latent",
                        **SIZE, **kw).images

    blended = run()          # = the original's LocalBlend (test_local_blend)
    assert torch.equal(run(callback_on_step_end=user), blended)
    assert len(seen) == STEPS and torch.equal(seen[-1], blended)      # the user sees the blended latents
    with pytest.raises(ValueError, match="callback_on_step_end_tensor_inputs: expected it to include 'latents'"):
        run(callback_on_step_end=user, callback_on_step_end_tensor_inputs=[])


def test_after_must_not_have_windows():
    with pytest.raises(ValueError, match="after: expected a Replace without cross_steps, self_steps, num_steps"):
        Reweight({"red": 2.0}, after=Replace(cross_steps=0.5))
    with pytest.raises(ValueError, match="after: expected a Refine without"):
        Reweight({"red": 2.0}, after=Refine(self_steps=0.2))
    pipe = sd_pipe()
    with attnctl.install(pipe, Reweight({"red": (1.0, 2.0, 3.0)}, after=Replace()), backend="torch"):
        with pytest.raises(ValueError, match=r"weights\['red'\]: expected one factor or one per target prompt "
                                             r"\(1\), got 3"):
            generate_latents(pipe, REPLACE[:2], steps=1, **SIZE)
    with pytest.raises(ValueError, match=r"self_max_queries: expected a positive int"):
        Replace(self_max_queries=0)


# ---- the original's AttentionStore view: a trace during an edit records the edited maps ----

@pytest.mark.parametrize("backend,kind", [("torch", "reweight"), ("triton", "replace")])
def test_trace_during_an_edit_records_the_edited_maps(backend, kind):
    """The original's AttentionStore keeps each cross-attention map after the edit (the
    stored tensor is edited in place), summed over steps; a trace installed with the edit
    gives those maps. Replayed from the very q, k of the run (recorded per call), in fp32
    and fp64; the trace may differ from the fp64 replay by a few times the fp32 replay's
    own error."""
    from attnctl.diffusers.controller import Controller
    from attnctl.tools.maps import ALL_STEPS
    from control_reference import CallInfo

    pipe = sd_pipe()
    if kind == "reweight":     # the two-source form: injected and own terms
        prompts = REFINE[:2]
        eq = torch.ones(1, N)
        eq[:, get_word_inds(prompts[1], "big", pipe.tokenizer)] = 4.0
        prev = Original(prompts, pipe.tokenizer, "refine", 0.6, 0.4)
        state = Original(prompts, pipe.tokenizer, "reweight", 0.6, 0.4, equalizer=eq, prev=prev)
        controller = Reweight({"big": 4.0}, after=Refine(), cross_steps=0.6, self_steps=0.4)
    else:                      # per-word windows in only some targets
        prompts = REPLACE
        cross = {"default_": (0.0, 0.3), "dog": (0.0, 0.7)}
        state = Original(prompts, pipe.tokenizer, "replace", dict(cross), 0.4)
        controller = Replace(cross_steps=cross, self_steps=0.4)

    class Recorder(Controller):
        def __init__(self):
            self.calls = []

        def plan(self, call):
            if call.is_cross:
                self.calls.append((call.layer, call.step.index, call.query.clone(), call.key.clone(), call.scale))
            return None

    recorder = Recorder()
    with attnctl.install(pipe, controller, recorder, backend=backend), \
            attnctl.trace(pipe, layers="*", per_head=False, tokens="all", uncond=True) as tc:   # every layer, column, row
        generate_latents(pipe, prompts, steps=STEPS, **SIZE)
    got = {layer.name: layer.maps[ALL_STEPS] for layer in tc.maps().layers}

    def replay(dtype):
        out = {}
        for layer, step, q, k, scale in recorder.calls:
            probs = (scale * q.to(dtype) @ k.to(dtype).transpose(-1, -2)).softmax(-1)
            state.step = step
            edited = state.edit(CallInfo(layer, True, step, None, None, q, k, scale), probs)
            out[layer] = out.get(layer, 0) + edited.sum(1)
        return out

    single, exact = replay(torch.float32), replay(torch.float64)
    assert set(got) == set(exact)
    own_error = max((single[n].double() - exact[n]).abs().max().item() for n in exact)
    error = max((got[n].double() - exact[n]).abs().max().item() for n in exact)
    assert error <= 4 * own_error, (error, own_error)
    plain = {n: sum((scale * q @ k.transpose(-1, -2)).softmax(-1).sum(1) for l, _, q, k, scale in recorder.calls
                    if l == n) for n in exact}
    assert max((got[n] - plain[n]).abs().max().item() for n in exact) > 1e-2     # edited, not the plain P


def test_edited_capture_token_mass_and_per_head_maps():
    """EditedCapture on one op call with a per-head token map (as ConceptStrengthening
    makes it) and an own term: token mass, head-weighted maps of chosen columns (per row)
    and per-head maps all equal the edited map A_h = P_src,h·W_h + P_h·g_h written out."""
    from attnctl.diffusers.compose import compose
    from attnctl.diffusers.controller import Plan

    g = torch.Generator().manual_seed(1)
    B, H, M, Nk, D = 3, 2, 5, 7, 16
    q, k, v = (torch.randn(B, H, n, D, generator=g) for n in (M, Nk, Nk))
    source = torch.tensor([0, 0, 0])
    W = torch.rand(B, H, Nk, Nk, generator=g)
    own = torch.rand(B, H, 1, Nk, generator=g)
    weights = torch.rand(H, generator=g)
    tokens = torch.tensor([[1, 4], [0, 6], [2, 2]])
    trace = attnctl.Capture(token_mass=torch.zeros(B, H, Nk), maps=torch.zeros(B, M, 2), tokens=tokens,
                            head_weights=weights)
    heads = attnctl.Capture(head_maps=torch.zeros(B, H, M, 3), tokens=torch.tensor([0, 3, 5]))
    plan, route = compose([Plan(source=source, value_map=W, own_prob_mult=own), Plan(capture=trace),
                           Plan(capture=heads)], (B, H, M, Nk), "cpu")
    attnctl.attention(q, k, W @ v, scale=D ** -0.5, source=plan.source, capture=plan.capture,
                      own=attnctl.OwnTerm(v, plan.own_prob_mult, plan.own_capture), backend="torch")
    route()
    P = (D ** -0.5 * q @ k.transpose(-1, -2)).softmax(-1)
    A = P[source] @ W + P * own
    torch.testing.assert_close(trace.token_mass, A.sum(2))
    expected_maps = torch.einsum("h,bhmt->bmt", weights, torch.stack([A[b][..., tokens[b]] for b in range(B)]))
    torch.testing.assert_close(trace.maps, expected_maps)
    torch.testing.assert_close(heads.head_maps, A[..., [0, 3, 5]])
    with pytest.raises(ValueError, match="compose: capture: probe keys and row LSE of an edited"):
        compose([Plan(source=source, value_map=W), Plan(capture=attnctl.Capture(lse=torch.zeros(B, H, M)))],
                (B, H, M, Nk), "cpu")


# ---- edit()'s initial noise: one latent shared by the prompts, as ptp_utils.init_latent -------

def _edit_latents(pipe, prompts, controller, **kwargs):
    from attnctl.p2p import edit
    with torch.no_grad():
        return edit(pipe, prompts[0], prompts[1:], controller, backend="torch", num_inference_steps=2,
                    output_type="latent", **SIZE, **kwargs).images


def test_edit_shares_one_initial_latent_across_the_prompts():
    pipe = sd_pipe()
    prompt = REPLACE[0]
    # The source as its own target: the same noise and the same attention give the same image.
    same = _edit_latents(pipe, [prompt, prompt], Replace(), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(same[1], same[0], rtol=0, atol=1e-6)
    # The default is the original's init_latent passed explicitly.
    prompts = REPLACE[:2]
    default = _edit_latents(pipe, prompts, Replace(), generator=torch.Generator().manual_seed(3))
    explicit = _edit_latents(pipe, prompts, Replace(), latents=original_init_latent(pipe, 2, **SIZE, seed=3))
    assert torch.equal(default, explicit)


def test_edit_shares_one_latent_per_image_index():
    pipe = sd_pipe()
    prompt = REPLACE[0]
    scale = pipe.vae_scale_factor
    shape = (2, pipe.unet.config.in_channels, SIZE["height"] // scale, SIZE["width"] // scale)
    got = _edit_latents(pipe, [prompt, prompt], Replace(), num_images_per_prompt=2,
                        generator=torch.Generator().manual_seed(1))     # rows: source 0, 1, target 0, 1
    torch.testing.assert_close(got[2:], got[:2], rtol=0, atol=1e-6)
    assert (got[0] - got[1]).abs().amax() > 1e-2                      # two image indices, two latents
    base = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    explicit = _edit_latents(pipe, [prompt, prompt], Replace(), num_images_per_prompt=2,
                             latents=base.repeat(2, 1, 1, 1))
    assert torch.equal(got, explicit)
    with pytest.raises(ValueError, match=r"generator: expected one torch.Generator or None \(every prompt starts "
                                         r"from the same latents, drawn from it\), got a list of 4"):
        _edit_latents(pipe, [prompt, prompt], Replace(), num_images_per_prompt=2,
                      generator=[torch.Generator() for _ in range(4)])


def test_local_blend_level_missing_from_the_unet_fails_before_generation():
    from attnctl.p2p import LocalBlend

    pipe = sd_pipe()
    calls = []
    hook = pipe.unet.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        with pytest.raises(ValueError, match=r"LocalBlend level: expected the downsampling of a cross-attention "
                                             r"layer of this UNet at the latent \(8, 12\) \(one of \[1, 2\]\), got 8"):
            _edit_latents(pipe, REPLACE[:2], Replace(local_blend=LocalBlend([["cat"], ["dog"]], level=8)))
    finally:
        hook.remove()
    assert not calls and attnctl.diffusers.installation_of(pipe) is None
