"""Head relevance vectors: the builder against a materialising reference of the votes,
normalisation, determinism, per-step HRVs, save/load, SDXL layout, the controllers
against a materialising reference, and bad input."""
import pytest
import torch

import attnctl
from attnctl.tools.hrv import ConceptAdjusting, HeadRelevance, OrderedWeakening, build_hrv
from control_reference import (ReferenceState, generate_latents, prompt_columns, run_reference,
                               word_columns)
from diffusion_helpers import sd_pipe, sdxl_pipe

pytestmark = pytest.mark.filterwarnings("ignore:divide by zero:RuntimeWarning")
CONCEPTS = {"cat": "cat", "dog": ["dog", "puppy"], "red": "red"}
PROMPTS = ["a cat", "a red dog"]
SIZE = dict(height=16, width=24)


def reference_counts(pipe, concepts, prompts, steps=2):
    """Votes computed from materialised logits: concept embeddings from the text encoder
    directly, probe keys through each layer's to_k, softmax over probes, mean per concept,
    argmax per (image, head), summed. Returns {layer: (H, K)} and per-step votes."""
    tok, enc = pipe.tokenizer, pipe.text_encoder
    rows, owner = [], []
    for c, words in enumerate(concepts.values()):
        for word in ([words] if isinstance(words, str) else words):
            ids = tok(word, padding="max_length", max_length=77, return_tensors="pt").input_ids
            n = len(tok(word).input_ids) - 2
            with torch.no_grad():
                rows.append(enc(ids)[0][0, 1:1 + n])
            owner += [c] * n
    embeds = torch.cat(rows)
    K = len(concepts)
    modules = dict(pipe.unet.named_modules())

    class Votes(ReferenceState):
        def __init__(self):
            super().__init__()
            self.votes, self.per_step = {}, {}

        def observe(self, info, probs):
            if not info.is_cross:
                return
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
        run_reference(pipe, state, [prompt], steps=steps, seed=i, **SIZE)
    return state


@pytest.fixture(scope="module")
def built():
    pipe = sd_pipe()
    return {backend: build_hrv(pipe, CONCEPTS, PROMPTS, steps=2, batch_size=1, per_step=True,
                               backend=backend, **SIZE) for backend in ("torch", "triton")}


@pytest.fixture(scope="module")
def reference():
    return reference_counts(sd_pipe(), CONCEPTS, PROMPTS)


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
    with pytest.raises(ValueError, match=r"clamp: expected \(lo, hi\)"):
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
    expected = run_reference(pipe, state, prompt, **SIZE, steps=2)
    with attnctl.install(pipe, controller, backend=backend):
        got = generate_latents(pipe, prompt, **SIZE, steps=2)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    return got


@pytest.mark.parametrize("order,backend", [("most", "triton"), ("least", "torch")])
def test_ordered_weakening_equals_reference(built, order, backend):
    pipe, hrv = sd_pipe(), built["torch"]
    prompt = ["a red dog", "a cat"]
    vec = hrv.vector("red").tolist()
    ranked = sorted(range(len(vec)), key=lambda i: (-vec[i] if order == "most" else vec[i], i))[:3]
    offsets, start = {}, 0
    for name, heads in hrv.layers:
        offsets[name] = (start, heads)
        start += heads

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
    offsets, start = {}, 0
    for name, heads in hrv.layers:
        offsets[name] = start
        start += heads

    class Adjust(ReferenceState):
        def mult(self, info):
            if not info.is_cross:
                return None
            B, H, N = info.q.shape[0], info.q.shape[1], info.k.shape[2]
            f = torch.ones(B, H, 1, N)
            for h in range(H):
                f[1, h, 0, word_columns(pipe.tokenizer, prompt[0], "dog")] = factor[offsets[info.layer] + h]
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
