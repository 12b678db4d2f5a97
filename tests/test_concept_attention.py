"""ConceptAttention (attnctl.concept_attention) on a tiny offline Flux pipeline, against a
materialising reference written like the original (helblazer811/ConceptAttention,
concept_attention/flux: ModifiedFluxDiT.forward, ModifiedDoubleStreamBlock.forward,
embed_concepts, compute_heatmaps_from_vectors), replayed on diffusers' Flux modules.

The reference replays the transformer inputs the fused run saw (recorded per step), so
both compute the same generation; it runs in fp32 and in fp64, and the fused maps may be
at most a few times as far from the fp64 maps as the fp32 reference is."""
import copy

import pytest
import torch

import attnctl
import attnctl.tools.concept_attention as concept_module
from attnctl.diffusers.offline_mmdit import tiny_flux_pipeline, tiny_flux_transformer_config, tiny_sd3_pipeline
from attnctl.diffusers.install import installation_of
from control_reference import assert_within_reference_error
from diffusion_helpers import weights_in
from joint_blocks import context_update, explicit_attention, projected, recorded_inputs

PROMPTS = ["a cat on a red car", "a dog"]
CONCEPTS = ["cat", "car", "sky"]
HEIGHT, WIDTH = 16, 24       # non-square: 4x6 image tokens
TEXT = 16                    # max_sequence_length: the prompt's (and so the concepts') T5 length


def flux_pipeline(double_blocks: int):
    """The tiny offline Flux pipeline with ``double_blocks`` double-stream blocks (19: the
    published count, so the original's default blocks 15-18 exist) and one single block."""
    from diffusers import FluxTransformer2DModel

    pipe = tiny_flux_pipeline()
    torch.manual_seed(1)
    config = dict(tiny_flux_transformer_config(), num_layers=double_blocks)
    pipe.transformer = FluxTransformer2DModel(**config).eval()
    return pipe


@pytest.fixture(scope="module")
def flux19():
    return flux_pipeline(19)


@pytest.fixture(scope="module")
def flux3():
    return flux_pipeline(3)


def generate(pipe, **kwargs):
    tokens = (HEIGHT // pipe.vae_scale_factor // 2) * (WIDTH // pipe.vae_scale_factor // 2)
    latents = torch.randn((len(PROMPTS), tokens, 4 * pipe.vae.config.latent_channels),
                          generator=torch.Generator().manual_seed(0)).to(pipe.device, pipe.dtype)
    return pipe(PROMPTS, height=HEIGHT, width=WIDTH, num_inference_steps=2, max_sequence_length=TEXT,
                output_type="latent", latents=latents, **kwargs).images


# ---- the reference, written like the original -------------------------------------------

def embed_concepts(tokenizer, t5, concepts, length):
    """embed_concepts: each concept alone through T5 (padded like the prompt, no mask), its
    first token; the concepts' ids are zeros; the pooled vector is zeros."""
    embeddings = []
    for concept in concepts:
        ids = tokenizer(concept, padding="max_length", max_length=length, truncation=True,
                        return_tensors="pt").input_ids.to(t5.device)
        embeddings.append(t5(ids)[0][0, 0, :])
    return torch.stack(embeddings).unsqueeze(0), torch.zeros(len(concepts), 3)


def original_concept_scores(model, tokenizer, t5, concepts, inputs):
    """ModifiedFluxDiT.forward up to the double blocks (stop_after_multimodal_attentions),
    with ModifiedDoubleStreamBlock's math: (layers, B, C, P) concept scores in the output
    space and of the cross-attention baseline (concept q · image q, before RoPE)."""
    from diffusers.models.embeddings import apply_rotary_emb

    img = model.x_embedder(inputs["hidden_states"])
    dtype = img.dtype
    timestep = inputs["timestep"].to(dtype) * 1000
    guidance = inputs.get("guidance")
    pooled = inputs["pooled_projections"]
    txt = model.context_embedder(inputs["encoder_hidden_states"])

    def time_embed(y):
        if guidance is None:
            return model.time_text_embed(timestep, y)
        return model.time_text_embed(timestep, guidance.to(dtype) * 1000, y)

    vec = time_embed(pooled)
    embeddings, concept_ids = embed_concepts(tokenizer, t5, concepts, txt.shape[1])
    concept_vec = time_embed(torch.zeros_like(pooled))
    concepts_h = model.context_embedder(embeddings.to(dtype)).expand(img.shape[0], -1, -1)
    img_ids, txt_ids = inputs["img_ids"], inputs["txt_ids"]
    pe = model.pos_embed(torch.cat((txt_ids, img_ids), dim=0))
    concept_pe = model.pos_embed(torch.cat((concept_ids.to(img_ids), img_ids), dim=0))
    C, T = concepts_h.shape[1], txt.shape[1]
    scores, cross = [], []
    for block in model.transformer_blocks:
        attn = block.attn
        img_mod, gate, shift_mlp, scale_mlp, gate_mlp = block.norm1(img, emb=vec)
        txt_mod, c_gate, c_shift_mlp, c_scale_mlp, c_gate_mlp = block.norm1_context(txt, emb=vec)
        con_mod, k_gate, k_shift_mlp, k_scale_mlp, k_gate_mlp = block.norm1_context(concepts_h, emb=concept_vec)
        img_q, img_k, img_v = projected(attn, img_mod, (attn.to_q, attn.to_k, attn.to_v), (attn.norm_q, attn.norm_k))
        text_side = (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj), (attn.norm_added_q, attn.norm_added_k)
        txt_q, txt_k, txt_v = projected(attn, txt_mod, *text_side)
        con_q, con_k, con_v = projected(attn, con_mod, *text_side)
        cross.append(torch.einsum("bcd,bpd->bcp", *(x.transpose(1, 2).flatten(2) for x in (con_q, img_q))))
        # text-image joint attention
        q, k = (apply_rotary_emb(torch.cat(x, dim=2), pe) for x in ((txt_q, img_q), (txt_k, img_k)))
        text_image = explicit_attention(q, k, torch.cat((txt_v, img_v), dim=2))
        txt_attn, img_attn = text_image[:, :, :T], text_image[:, :, T:]
        # concept-image joint attention (concept_cross_attention and concept_self_attention)
        q, k = (apply_rotary_emb(torch.cat(x, dim=2), concept_pe) for x in ((con_q, img_q), (con_k, img_k)))
        concept_attn = explicit_attention(q, k, torch.cat((con_v, img_v), dim=2))[:, :, :C]
        txt_attn, img_attn, concept_attn = (x.transpose(1, 2).flatten(2) for x in (txt_attn, img_attn, concept_attn))
        scores.append(torch.einsum("bcd,bpd->bcp", concept_attn, img_attn))
        # block updates
        img = img + gate.unsqueeze(1) * attn.to_out[0](img_attn)
        img = img + gate_mlp.unsqueeze(1) * block.ff(block.norm2(img) * (1 + scale_mlp[:, None]) + shift_mlp[:, None])
        txt = context_update(block, txt, txt_attn, c_gate, c_shift_mlp, c_scale_mlp, c_gate_mlp)
        concepts_h = context_update(block, concepts_h, concept_attn, k_gate, k_shift_mlp, k_scale_mlp, k_gate_mlp)
    return {"output": torch.stack(scores), "cross_attention": torch.stack(cross)}


def original_heatmaps(pipe, inputs, concepts, layers, timesteps, softmax, dtype, space="output"):
    """compute_heatmaps_from_vectors: (time, layers, B, C, P) scores, softmax over the
    concepts, the selected steps and layers, the mean."""
    model = copy.deepcopy(pipe.transformer).to(dtype)
    t5 = copy.deepcopy(pipe.text_encoder_2).to(dtype)
    cast = [{k: v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v
             for k, v in call.items()} for call in inputs]
    with torch.no_grad():
        heatmaps = torch.stack([original_concept_scores(model, pipe.tokenizer_2, t5, concepts, c)[space]
                                for c in cast])
    if softmax:
        heatmaps = torch.softmax(heatmaps, dim=-2)
    heatmaps = heatmaps[timesteps][:, layers]
    return heatmaps.mean(dim=(0, 1))


# ---- tests --------------------------------------------------------------------------------

@pytest.mark.parametrize("backend, blocks, options", [
    ("torch", 19, {}),                                                  # the original's defaults
    ("triton", 3, dict(layers=[0, 2], steps=[1], softmax=False, cross_attention=True)),
])
def test_maps_match_the_original(flux19, flux3, backend, blocks, options, monkeypatch):
    pipe = flux19 if blocks == 19 else flux3
    concept_calls = []

    def spy(q, k, v, **kwargs):  # the concept attention: C query rows, on the asked backend
        out = real_attention(q, k, v, **kwargs)
        concept_calls.append((q.shape[2], k.shape[2], attnctl.last_dispatch().backend))
        return out

    real_attention = concept_module.attention
    monkeypatch.setattr(concept_module, "attention", spy)
    calls, hook = recorded_inputs(pipe)
    try:
        with attnctl.concept_attention(pipe, CONCEPTS, backend=backend, **options) as ca:
            generate(pipe)
    finally:
        hook.remove()
    got = ca.maps()
    layers = options.get("layers", list(range(15, 19)))
    steps = options.get("steps", [0, 1])
    assert got.layers == layers and got.steps == steps and got.concepts == CONCEPTS
    assert got.maps.shape == (len(PROMPTS), len(CONCEPTS), 4, 6) and got.maps.dtype == torch.float32
    # every double block up to the last selected one, on the selected steps; C + P keys
    assert concept_calls == [(len(CONCEPTS), len(CONCEPTS) + 24, backend)] * (layers[-1] + 1) * len(steps)
    reference = dict(concepts=CONCEPTS, layers=layers, timesteps=steps, softmax=options.get("softmax", True))
    single = original_heatmaps(pipe, calls, dtype=torch.float32, **reference)
    exact = original_heatmaps(pipe, calls, dtype=torch.float64, **reference)
    assert_within_reference_error(got.maps.flatten(2), single, exact)
    if options.get("softmax", True):
        torch.testing.assert_close(got.maps.sum(1), torch.ones_like(got.maps[:, 0]))
    if options.get("cross_attention"):
        single, exact = (original_heatmaps(pipe, calls, dtype=d, space="cross_attention", **reference)
                         for d in (torch.float32, torch.float64))
        assert_within_reference_error(ca.cross_attention_maps().maps.flatten(2), single, exact)
    else:
        with pytest.raises(RuntimeError, match="cross_attention=True"):
            ca.cross_attention_maps()
    assert installation_of(pipe) is None  # uninstalled on exit


def test_the_image_is_unchanged(flux3):
    pipe = flux3
    stock = generate(pipe)
    with attnctl.install(pipe, backend="torch"):
        plain = generate(pipe)
    with attnctl.concept_attention(pipe, CONCEPTS, layers=[0, 1, 2], backend="torch") as ca:
        with_concepts = generate(pipe)
    assert ca.maps().maps.isfinite().all()
    assert torch.equal(with_concepts, plain)
    with weights_in(pipe, torch.float64):
        exact = generate(pipe)
    assert_within_reference_error(with_concepts, stock, exact)


def test_maps_plot_and_save(flux3, tmp_path):
    with attnctl.concept_attention(flux3, CONCEPTS, layers=2) as ca:
        generate(flux3)
    maps = ca.maps()
    assert maps.map("car", image=1).value.shape == (4, 6)
    maps.plot(None, str(tmp_path / "concepts.png"))
    maps.save(str(tmp_path / "concepts.safetensors"))
    from safetensors import safe_open

    with safe_open(str(tmp_path / "concepts.safetensors"), "pt") as f:
        assert f.metadata()["concepts"].split("\n") == CONCEPTS
        assert torch.equal(f.get_tensor("maps"), maps.maps)
    assert (tmp_path / "concepts.png").stat().st_size > 0


def test_clear_errors(flux3):
    for concepts, message in [("cat", "concepts: expected a non-empty list"), ([], "concepts: expected a non-empty"),
                              (["cat", " "], "concepts: expected non-empty strings")]:
        with pytest.raises(ValueError, match=message):
            attnctl.concept_attention(flux3, concepts)
    with pytest.raises(TypeError, match="layers: expected an int or an iterable"):
        attnctl.concept_attention(flux3, CONCEPTS, layers="last")
    outside = r"layers: expected double-stream block indices in \[0, 3\), got \[15, 16, 17, 18\]"
    with pytest.raises(ValueError, match=outside):
        with attnctl.concept_attention(flux3, CONCEPTS):
            pass
    assert installation_of(flux3) is None
    with pytest.raises(ValueError, match="pipe: ConceptAttention runs on Flux's double-stream blocks; expected a "
                                         "FluxPipeline, got StableDiffusion3Pipeline"):
        with attnctl.concept_attention(tiny_sd3_pipeline(), CONCEPTS):
            pass
    ca = attnctl.concept_attention(flux3, CONCEPTS, layers=0)
    with pytest.raises(RuntimeError, match="no map was captured yet"):
        ca.maps()
    with ca:
        generate(flux3)
    with pytest.raises(KeyError, match="concept: expected one of"):
        ca.maps().map("dog")
    with pytest.raises(IndexError, match=r"image: expected an index in \[0, 2\)"):
        ca.maps().map("cat", image=2)
