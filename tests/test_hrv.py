"""Head relevance vectors: the builder against a materialising reference of the votes,
normalisation, determinism, per-step HRVs, save/load, SDXL layout, the controllers
against a materialising reference, and bad input."""
import os

import numpy as np
import pytest
import torch

import attnctl
from attnctl.tools.hrv import ConceptAdjusting, HeadRelevance, OrderedWeakening, build_hrv
from control_reference import (ReferenceState, assert_matches_reference, generate_latents, prompt_columns,
                               run_reference, word_columns)
from diffusion_helpers import sd_pipe, sdxl_pipe

pytestmark = pytest.mark.filterwarnings("ignore:divide by zero:RuntimeWarning")
CONCEPTS = {"cat": "cat", "dog": ["dog", "puppy"], "red": "red"}
PROMPTS = ["a cat", "a red dog"]
SIZE = dict(height=16, width=24)


def reference_counts(pipe, concepts, prompts, steps=2, probe_words="sample", sot=True, seed=0):
    """Votes computed from materialised logits, replaying head_relevance_calculation.py:
    each concept word encoded by the text encoder (desc, padded to 77), at every
    cross-attention call one word drawn per concept (``probe_words="sample"``; "all": every
    word, a concept's score the mean over all its tokens), the probe set
    [SOT of the first concept's word] + the words' tokens through the layer's to_k,
    softmax over the probe set for the conditional queries, mean over pixels, each
    concept's mean over its tokens, argmax per (image, head), summed.
    Returns {layer: (H, K)} and per-step votes."""
    tok, enc = pipe.tokenizer, pipe.text_encoder
    desc = []                                        # per concept: [(embedding rows (n, dim), SOT row)]
    for words in concepts.values():
        rows = []
        for word in ([words] if isinstance(words, str) else words):
            ids = tok(word, padding="max_length", max_length=77, return_tensors="pt").input_ids
            len_desc = len(tok(word).input_ids) - 2
            with torch.no_grad():
                e = enc(ids)[0][0]
            rows.append((e[1:len_desc + 1], e[0]))
        desc.append(rows)
    K = len(concepts)
    modules = dict(pipe.unet.named_modules())
    generator = torch.Generator().manual_seed(seed)

    def draw():
        counts = [len(rows) for rows in desc]
        if len(set(counts)) == 1:
            return torch.randint(0, counts[0], (K,), generator=generator).tolist()
        return [int(torch.randint(0, n, (1,), generator=generator)) for n in counts]

    class Votes(ReferenceState):
        def __init__(self):
            super().__init__()
            self.votes, self.per_step = {}, {}

        def observe(self, info, probs):
            if not info.is_cross:
                return
            chosen = ([[desc[c][i]] for c, i in enumerate(draw())] if probe_words == "sample"
                      else [rows for rows in desc])
            aggregate = [chosen[0][0][1][None]] if sot else []
            owner = [-1] if sot else []
            for c, rows in enumerate(chosen):
                for e, _ in rows:
                    aggregate.append(e)
                    owner += [c] * e.shape[0]
            embeds = torch.cat(aggregate)
            attn = modules[info.layer]
            H = attn.heads
            pk = attn.to_k(embeds).view(len(owner), H, -1).transpose(0, 1)          # (H, C, D)
            B = info.q.shape[0]
            cond = info.q[B // 2:]                                                 # CFG: second half
            p = (info.scale * cond @ pk.transpose(-1, -2)).softmax(-1).mean(2)     # (images, H, C)
            scores = torch.stack([p[..., [i for i, o in enumerate(owner) if o == c]].mean(-1)
                                  for c in range(K)], -1)
            v = torch.zeros(H, K)
            for img in range(scores.shape[0]):
                for h in range(H):
                    v[h, int(scores[img, h].argmax())] += 1
            self.votes[info.layer] = self.votes.get(info.layer, 0) + v
            per = self.per_step.setdefault(info.step, {})
            per[info.layer] = per.get(info.layer, 0) + v

    state = Votes()
    for i, prompt in enumerate(prompts):
        state.step = -1
        run_reference(pipe, state, [prompt], steps=steps, seed=seed + i, **SIZE)
    return state


@pytest.fixture(scope="module")
def built():
    pipe = sd_pipe()
    return {backend: build_hrv(pipe, CONCEPTS, PROMPTS, steps=2, batch_size=1, per_step=True,
                               backend=backend, **SIZE) for backend in ("torch", "triton")}


@pytest.fixture(scope="module")
def reference():
    return reference_counts(sd_pipe(), CONCEPTS, PROMPTS)


def test_probe_every_word_without_sot_equals_its_reference():
    """The option probe_words="all", probe_sot=False: every word of a concept probed at
    once, the concept's score the mean over all its tokens, no SOT in the softmax."""
    pipe = sd_pipe()
    hrv = build_hrv(pipe, CONCEPTS, PROMPTS, steps=2, batch_size=1, backend="torch", probe_words="all",
                    probe_sot=False, **SIZE)
    reference = reference_counts(pipe, CONCEPTS, PROMPTS, probe_words="all", sot=False)
    assert torch.equal(hrv.counts, torch.cat([reference.votes[name] for name, _ in hrv.layers]))


def test_probe_draws_are_seeded_and_equal_counts_use_the_official_draw():
    concepts = {"animal": ["cat", "dog"], "colour": ["red", "blue"]}
    pipe = sd_pipe()
    hrv = build_hrv(pipe, concepts, PROMPTS[:1], steps=2, batch_size=1, backend="torch", seed=5, **SIZE)
    reference = reference_counts(pipe, concepts, PROMPTS[:1], seed=5)
    assert torch.equal(hrv.counts, torch.cat([reference.votes[name] for name, _ in hrv.layers]))
    again = build_hrv(pipe, concepts, PROMPTS[:1], steps=2, batch_size=1, backend="torch", seed=5, **SIZE)
    assert torch.equal(again.counts, hrv.counts)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_votes_and_hrv_equal_the_materialising_reference(built, reference, backend):
    hrv = built[backend]
    assert hrv.concepts == list(CONCEPTS) and hrv.num_heads == sum(h for _, h in hrv.layers)
    counts = torch.cat([reference.votes[name] for name, _ in hrv.layers])
    assert torch.equal(hrv.counts, counts)
    # normalisation written out: each head over concepts, then each concept over heads to H
    r = counts / counts.sum(1, keepdim=True)
    expected = (r / r.sum(0, keepdim=True) * counts.shape[0]).T
    torch.testing.assert_close(hrv.hrv, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(hrv.hrv.sum(1), torch.full((3,), float(hrv.num_heads)))
    # every head votes once per image and step: 2 prompts x 2 steps
    assert torch.equal(hrv.counts.sum(1), torch.full((hrv.num_heads,), 4.0))
    # per-step HRVs: each step's votes alone, normalised the same way
    for step in (0, 1):
        c = torch.cat([reference.per_step[step][name] for name, _ in hrv.layers])
        r = c / c.sum(1, keepdim=True)
        col = r.sum(0, keepdim=True)
        exp = torch.where(col > 0, r / col * c.shape[0], torch.zeros_like(r)).T
        torch.testing.assert_close(hrv.per_step[step], exp, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(hrv.vector("red", step=step), exp[2], rtol=1e-5, atol=1e-5)


def test_deterministic_and_save_load(built, tmp_path):
    again = build_hrv(sd_pipe(), CONCEPTS, PROMPTS, steps=2, batch_size=1, per_step=True, backend="torch", **SIZE)
    assert torch.equal(again.hrv, built["torch"].hrv) and torch.equal(again.counts, built["torch"].counts)
    path = str(tmp_path / "hrv.safetensors")
    built["torch"].save(path)
    loaded = HeadRelevance.load(path)
    assert loaded.concepts == list(CONCEPTS) and loaded.layers == built["torch"].layers
    assert loaded.words == {"cat": ["cat"], "dog": ["dog", "puppy"], "red": ["red"]}
    assert torch.equal(loaded.hrv, built["torch"].hrv) and torch.equal(loaded.per_step, built["torch"].per_step)
    png = tmp_path / "hrv.png"
    loaded.plot(str(png))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the pipeline is left as it was
    assert attnctl.diffusers.installation_of(sd_pipe()) is None


def test_sdxl_layout():
    hrv = build_hrv(sdxl_pipe(), ["cat", "dog"], ["a cat"], steps=1, backend="torch", **SIZE)
    assert len(hrv.layers) == 8 and hrv.num_heads == 32
    torch.testing.assert_close(hrv.hrv.sum(1)[hrv.counts.sum(0) > 0],
                               torch.full((int((hrv.counts.sum(0) > 0).sum()),), 32.0))


def test_bad_input(built, tmp_path):
    hrv = built["torch"]
    with pytest.raises(ValueError, match=r"concept: expected one of \['cat', 'dog', 'red'\], got 'blue'"):
        OrderedWeakening(hrv, "blue", 2)
    with pytest.raises(ValueError, match=rf"k: expected an integer in \[1, {hrv.num_heads}\] \(the number of heads\), got {hrv.num_heads + 1}"):
        OrderedWeakening(hrv, "cat", hrv.num_heads + 1)
    with pytest.raises(ValueError, match="order: expected 'most' .* got 'top'"):
        OrderedWeakening(hrv, "cat", 2, order="top")
    with pytest.raises(ValueError, match=r"clamp: expected an upper bound .* a pair \(lo, hi\) with lo <= hi"):
        ConceptAdjusting(hrv, "cat", "cat", "dog", clamp=(2, 1))
    with pytest.raises(ValueError, match="concepts: expected at least two concepts"):
        build_hrv(sd_pipe(), ["cat"], ["a cat"], steps=1)
    with pytest.raises(ValueError, match="step: expected an index in"):
        hrv.vector("cat", step=5)
    with pytest.raises(ValueError, match="word: 'horse' is not in the prompt 'a cat'"):
        with attnctl.install(sd_pipe(), ConceptAdjusting(hrv, "horse", "cat", "dog"), backend="torch"):
            generate_latents(sd_pipe(), "a cat", steps=1, **SIZE)
    bad = tmp_path / "x.safetensors"
    from safetensors.torch import save_file
    save_file({"x": torch.zeros(1)}, str(bad))
    with pytest.raises(ValueError, match="path: expected an attnctl HRV file"):
        HeadRelevance.load(str(bad))


def _controlled(pipe, state, controller, prompt, backend):
    with attnctl.install(pipe, controller, backend=backend):
        got = generate_latents(pipe, prompt, **SIZE, steps=2)
    assert_matches_reference(got, pipe, state, prompt, **SIZE, steps=2)
    return got


@pytest.mark.parametrize("order,backend", [("most", "triton"), ("least", "torch")])
def test_ordered_weakening_equals_reference(built, order, backend):
    pipe, hrv = sd_pipe(), built["torch"]
    prompt = ["a red dog", "a cat"]
    vec = hrv.vector("red").tolist()
    ranked = sorted(range(len(vec)), key=lambda i: (-vec[i] if order == "most" else vec[i], i))[:3]
    offsets = hrv.offsets()

    class Weaken(ReferenceState):
        def mult(self, info):
            if not info.is_cross:
                return None
            B, H, N = info.q.shape[0], info.q.shape[1], info.k.shape[2]
            f = torch.ones(B, H, 1, N)
            s, _ = offsets[info.layer]
            for row, p in zip(range(B // 2, B), prompt):
                for h in range(H):
                    if s + h in ranked:
                        f[row, h, 0, prompt_columns(pipe.tokenizer, p)] = -2.0
            return f

    plain = generate_latents(pipe, prompt, **SIZE, steps=2)
    got = _controlled(pipe, Weaken(), OrderedWeakening(hrv, "red", 3, order=order), prompt, backend)
    assert not torch.allclose(got, plain, atol=1e-4)   # the control acts


def test_concept_adjusting_equals_reference(built):
    pipe, hrv = sd_pipe(), built["torch"]
    prompt = ["a red dog"]
    d = hrv.vector("cat").clamp(0.5, 3.0)
    u = hrv.vector("dog").clamp(0.5, 3.0)
    factor = (2 * d - u).tolist()
    offsets = hrv.offsets()

    class Adjust(ReferenceState):
        def mult(self, info):
            if not info.is_cross:
                return None
            B, H, N = info.q.shape[0], info.q.shape[1], info.k.shape[2]
            f = torch.ones(B, H, 1, N)
            for h in range(H):
                f[1, h, 0, word_columns(pipe.tokenizer, prompt[0], "dog")] = factor[offsets[info.layer][0] + h]
            return f

    _controlled(pipe, Adjust(), ConceptAdjusting(hrv, "dog", "cat", "dog", clamp=(0.5, 3.0)), prompt, "torch")


def test_hrv_cli_writes_file_plot_and_summary(tmp_path):
    import argparse
    import json

    from attnctl.tools import hrv_cli

    parser = argparse.ArgumentParser()
    hrv_cli.add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["hrv", "--concepts", "cat", "dog=dog,puppy", "--prompts", "a cat", "--steps", "1",
                              "--height", "16", "--width", "24", "--backend", "torch", "--out", str(tmp_path)])
    assert args.func(args) == 0
    loaded = HeadRelevance.load(str(tmp_path / "hrv.safetensors"))
    assert loaded.concepts == ["cat", "dog"] and loaded.words["dog"] == ["dog", "puppy"]
    assert (tmp_path / "hrv.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = json.loads((tmp_path / "hrv.json").read_text())
    assert summary["heads"] == loaded.num_heads == 10
    with pytest.raises(SystemExit, match="--concepts: expected NAME or NAME=word1,word2"):
        hrv_cli.parse_concepts(["dog="])


# ---- the official release format ----------------------------------------------------------------

OFFICIAL = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "hrv-official")
OFFICIAL_FILES = {
    "sd15_unet": ("sd_v1_4", 128, 16),
    "sdxl_unet": ("sd_xl_base_1_0", 1300, 70),
}


def _official(model):
    stem = f"epoch_1_to_1_neg_prompt_False_merged_340_final_text_descriptions_{model}.npy"
    paths = (os.path.join(OFFICIAL, f"category_vectors_{stem}"), os.path.join(OFFICIAL, f"head_index_{stem}"))
    if not all(os.path.exists(p) for p in paths):
        pytest.skip(f"the official HRV files are not in {OFFICIAL}")
    return paths


def _meta_unet(name):
    from diffusers import UNet2DConditionModel
    from attnctl.configs import load_unet_config
    with torch.device("meta"):
        return UNet2DConditionModel.from_config(load_unet_config(name))


@pytest.mark.parametrize("name", sorted(OFFICIAL_FILES))
def test_load_official_round_trips_the_released_files(name, tmp_path):
    """The released vectors load onto the published architecture (built on the meta device)
    with every head matched by its official name, and save back identically."""
    model, heads, n_layers = OFFICIAL_FILES[name]
    vectors, index = _official(model)
    unet = _meta_unet(name)
    hrv = HeadRelevance.load_official(vectors, index, os.path.join(OFFICIAL, "340_final_text_list.csv"), unet=unet)
    assert len(hrv.concepts) == 34 and hrv.concepts[0] == "Animals" and hrv.num_heads == heads
    assert len(hrv.layers) == n_layers and hrv.counts is None
    # the official order, written out: down, mid, up; each place's cross-attention layers in
    # forward (module) order, heads in order; "layer: l" counts within the place
    from diffusers.models.attention_processor import Attention
    cross = [(n, m.heads) for n, m in unet.named_modules() if isinstance(m, Attention) and m.is_cross_attention]
    names = []
    for place, prefix in (("down", "down_blocks."), ("mid", "mid_block."), ("up", "up_blocks.")):
        mine = [(n, h) for n, h in cross if n.startswith(prefix)]
        names += [f"{place}, layer: {l}, head: {h}" for l, (_, heads_) in enumerate(mine) for h in range(heads_)]
        assert [n for n, _ in hrv.layers if n.startswith(prefix)] == [n for n, _ in mine]
    released = np.load(vectors)
    assert list(np.load(index)) == names
    assert torch.equal(hrv.hrv, torch.from_numpy(released))
    # usable by the controllers: head i of the flat vector is head i of the official files
    row = released[hrv.concepts.index("Animals")]
    assert hrv.ranked_heads("Animals", 3).tolist() == sorted(range(heads), key=lambda i: (-row[i], i))[:3]
    out_v, out_i = str(tmp_path / "v.npy"), str(tmp_path / "i.npy")
    hrv.save_official(out_v, out_i)
    assert np.array_equal(np.load(out_v), released) and np.load(out_v).dtype == released.dtype
    assert np.array_equal(np.load(out_i), np.load(index)) and np.load(out_i).dtype == np.load(index).dtype
    # an HRV whose layers are in another order (e.g. an older attnctl file: down, up, mid)
    # saves in the official order all the same
    order = sorted(range(len(hrv.layers)), key=lambda i: (hrv.layers[i][0].startswith("mid"), i))
    offsets = hrv.offsets()
    cols = [offsets[hrv.layers[i][0]][0] + h for i in order for h in range(hrv.layers[i][1])]
    shuffled = HeadRelevance(hrv.concepts, [hrv.layers[i] for i in order], hrv.hrv[:, cols], None)
    shuffled.save_official(out_v, out_i)
    assert np.array_equal(np.load(out_v), released) and np.array_equal(np.load(out_i), np.load(index))


def test_load_official_default_architecture_and_bad_input(tmp_path):
    vectors, index = _official("sd_v1_4")
    names = [f"c{i}" for i in range(34)]
    hrv = HeadRelevance.load_official(vectors, index, names)          # SD 1.x chosen by its 128 heads
    assert hrv.concepts == names and hrv.layers[6][0].startswith("mid_block")
    with pytest.raises(ValueError, match=r"concepts: expected 34 names \(the rows of .*\), got 2"):
        HeadRelevance.load_official(vectors, index, ["a", "b"])
    bad = str(tmp_path / "i.npy")
    np.save(bad, np.concatenate([np.load(index)[:-1], ["side, layer: 0, head: 0"]]))
    with pytest.raises(ValueError, match=r"head_index: expected the 128 heads of the model .* unknown "
                                         r"'side, layer: 0, head: 0'"):
        HeadRelevance.load_official(vectors, bad, names)


def test_built_hrv_uses_the_official_head_order(built):
    hrv = built["torch"]
    places = [n.split(".")[0] for n, _ in hrv.layers]
    assert places == sorted(places, key=["down_blocks", "mid_block", "up_blocks"].index)
    assert "mid_block" in places and "up_blocks" in places


def test_concept_adjusting_official_every_occurrence_and_upper_clamp(built):
    """The official concept adjusting (reduce_misinterpretation notebooks, AttentionReweight):
    rescale = eq0 + eq1·(2·min(HRV_d, c) - min(HRV_u, c)), eq1 the get_equalizer mask of
    every occurrence of the word, on the conditional half, every step."""
    from test_p2p import get_word_inds

    pipe, hrv = sd_pipe(), built["torch"]
    prompts = ["a red car and a red dog"]
    clamping_value = 1.2
    inds = get_word_inds(prompts[0], "red", pipe.tokenizer)
    assert len(inds) == 2 * (len(pipe.tokenizer("red").input_ids) - 2)      # both occurrences
    zero = torch.ones(1, 77)
    zero[:, inds] = 0.0
    equalizers = [zero, 1 - zero]
    offsets = hrv.offsets()
    d_all, u_all = hrv.vector("cat").numpy(), hrv.vector("dog").numpy()
    assert (d_all > clamping_value).any() or (u_all > clamping_value).any()

    class Official(ReferenceState):
        def edit(self, info, probs):
            if not info.is_cross:
                return probs
            B = probs.shape[0]
            attn = probs[B // 2:].clone()
            start = offsets[info.layer][0]
            for head in range(attn.shape[1]):
                d, u = float(d_all[start + head]), float(u_all[start + head])
                rescale_factor = equalizers[0][:, None, :] + equalizers[1][:, None, :] * (
                    min(d, clamping_value) * 2 - min(u, clamping_value) * 1)
                attn[:, head] = attn[:, head] * rescale_factor
            return torch.cat([probs[: B // 2], attn])

    got = _controlled(pipe, Official(), ConceptAdjusting(hrv, "red", "cat", "dog", clamp=clamping_value), prompts,
                      "torch")
    with attnctl.install(pipe, ConceptAdjusting(hrv, "red", "cat", "dog", clamp=clamping_value, occurrence=0),
                         backend="torch"):
        first_only = generate_latents(pipe, prompts, **SIZE, steps=2)
    assert (got - first_only).abs().amax() > 1e-4
    with pytest.raises(ValueError, match="occurrence: expected 'all' or the index of one occurrence"):
        ConceptAdjusting(hrv, "red", "cat", "dog", occurrence=-1)
