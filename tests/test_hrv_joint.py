"""Head relevance vectors on MM-DiT joint attention (Flux, SD3, SD3.5 medium) on tiny
offline pipelines: the probe mass of every joint layer against a materialising reference
written in the test (the concept words' rows run through the blocks the long way beside
the prompt, and softmax(q_image · k_probe) formed explicitly), in fp32 and fp64; the
votes; the image unchanged; the HRV controls against a materialised prob_mult reference;
bad input."""
import contextlib
import copy

import pytest
import torch
import torch.nn.functional as F

import attnctl
from attnctl.diffusers.offline_mmdit import (tiny_flux_pipeline, tiny_flux_transformer_config, tiny_sd3_pipeline,
                                             tiny_sd3_transformer_config)
from attnctl.tools.hrv import ConceptAdjusting, HeadRelevance, HRVBuilder, OrderedWeakening, build_hrv
from control_reference import assert_within_reference_error
from diffusion_helpers import weights_in
from joint_blocks import context_update, explicit_attention, projected, recorded_inputs
from op_cases import interpreter_bf16_dot_fixed
from sdpa_replay import sdpa_replay

CONCEPTS = {"animal": ["cat", "dog"], "vehicle": ["car"], "colour": ["red"]}
PROMPTS = ["a cat on a red car", "a dog"]
HEIGHT, WIDTH = 16, 24       # non-square: 4x6 image tokens
TEXT = 16                    # T5 tokens (max_sequence_length)
CLIP_TOKENS = 77


def flux():
    """Two double-stream and two single-stream blocks: the stream advances through both kinds."""
    from diffusers import FluxTransformer2DModel

    pipe = tiny_flux_pipeline()
    torch.manual_seed(1)
    pipe.transformer = FluxTransformer2DModel(**dict(tiny_flux_transformer_config(), num_layers=2,
                                                     num_single_layers=2)).eval()
    return pipe


def sd3(sd35=False):
    """Three joint blocks (the last context_pre_only); SD3.5: an image-only attn2 in block 0."""
    from diffusers import SD3Transformer2DModel

    pipe = tiny_sd3_pipeline(sd35=sd35)
    torch.manual_seed(1)
    pipe.transformer = SD3Transformer2DModel(**dict(tiny_sd3_transformer_config(sd35), num_layers=3)).eval()
    return pipe


@pytest.fixture(scope="module")
def pipes():
    return {"flux": flux(), "sd3": sd3(), "sd35": sd3(sd35=True)}


def is_flux(pipe):
    return type(pipe).__name__ == "FluxPipeline"


def generate(pipe, prompts=PROMPTS):
    h, w = HEIGHT // pipe.vae_scale_factor, WIDTH // pipe.vae_scale_factor
    channels = pipe.vae.config.latent_channels
    shape = (len(prompts), h * w // 4, 4 * channels) if is_flux(pipe) else (len(prompts), channels, h, w)
    latents = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(pipe.dtype)
    extra = {} if is_flux(pipe) else {"guidance_scale": 4.0}
    return pipe(prompts, height=HEIGHT, width=WIDTH, num_inference_steps=2, max_sequence_length=TEXT,
                output_type="latent", latents=latents, **extra).images


# ---- the reference, the long way ----------------------------------------------------------

def t5_positions(tokenizer, text):
    """The columns of ``text``'s own T5 tokens (not </s>, not padding)."""
    ids = tokenizer(text, max_length=TEXT, truncation=True).input_ids
    return [i for i, t in enumerate(ids) if t not in tokenizer.all_special_ids]


def concept_rows(pipe, words):
    """Each word encoded by the stock encode_prompt as a prompt is (T5 length TEXT), its own
    T5 tokens' states; and the token range of every word."""
    rows, ranges, first = [], [], 0
    tokenizer = pipe.tokenizer_2 if is_flux(pipe) else pipe.tokenizer_3
    offset = 0 if is_flux(pipe) else CLIP_TOKENS
    for word in words:
        extra = {} if is_flux(pipe) else {"prompt_3": None, "do_classifier_free_guidance": False}
        with torch.no_grad():
            states = pipe.encode_prompt(word, None, max_sequence_length=TEXT, **extra)[0][0]
        positions = [offset + p for p in t5_positions(tokenizer, word)]
        rows.append(states[positions])
        ranges.append(list(range(first, first + len(positions))))
        first += len(positions)
    return torch.cat(rows), ranges


def probe(q_image, k_probe):
    """Σ over the image rows of softmax over the probe keys alone: (B, H, C)."""
    return torch.softmax(q_image @ k_probe.transpose(-1, -2) / q_image.shape[-1] ** 0.5, dim=-1).sum(2)


def flux_masses(model, inputs, concepts):
    """{layer: probe mass} of one Flux forward: prompt, image and concept rows through every
    block; the concept rows attend [concept keys; image keys] at zero positions (RoPE of
    zero ids), modulated by the forward's temb."""
    from diffusers.models.embeddings import apply_rotary_emb

    img = model.x_embedder(inputs["hidden_states"])
    temb = model.time_text_embed(inputs["timestep"].to(img.dtype) * 1000, inputs["pooled_projections"])
    txt = model.context_embedder(inputs["encoder_hidden_states"])
    con = model.context_embedder(concepts.to(img.dtype)).expand(img.shape[0], -1, -1)
    T, C = txt.shape[1], con.shape[1]
    img_ids = inputs["img_ids"]
    pe = model.pos_embed(torch.cat((inputs["txt_ids"], img_ids)))
    concept_pe = model.pos_embed(torch.cat((torch.zeros(C, 3).to(img_ids), img_ids)))
    rope = lambda x, table: apply_rotary_emb(x, table)
    out = {}
    for i, block in enumerate(model.transformer_blocks):
        attn = block.attn
        img_mod, gate, shift, scale, gate_mlp = block.norm1(img, emb=temb)
        txt_mod, c_gate, c_shift, c_scale, c_gate_mlp = block.norm1_context(txt, emb=temb)
        con_mod, k_gate, k_shift, k_scale, k_gate_mlp = block.norm1_context(con, emb=temb)
        iq, ik, iv = projected(attn, img_mod, (attn.to_q, attn.to_k, attn.to_v), (attn.norm_q, attn.norm_k))
        side = (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj), (attn.norm_added_q, attn.norm_added_k)
        tq, tk, tv = projected(attn, txt_mod, *side)
        cq, ck, cv = projected(attn, con_mod, *side)
        q, k = (rope(torch.cat(x, 2), pe) for x in ((tq, iq), (tk, ik)))
        joint = explicit_attention(q, k, torch.cat((tv, iv), 2)).transpose(1, 2).flatten(2)
        txt_attn, img_attn = joint[:, :T], joint[:, T:]
        q_c, k_c = (rope(torch.cat(x, 2), concept_pe) for x in ((cq, iq), (ck, ik)))
        out[f"transformer_blocks.{i}.attn"] = probe(q[:, :, T:], k_c[:, :, :C])
        con_attn = explicit_attention(q_c, k_c, torch.cat((cv, iv), 2))[:, :, :C].transpose(1, 2).flatten(2)
        img = img + gate.unsqueeze(1) * attn.to_out[0](img_attn)
        img = img + gate_mlp.unsqueeze(1) * block.ff(block.norm2(img) * (1 + scale[:, None]) + shift[:, None])
        txt = context_update(block, txt, txt_attn, c_gate, c_shift, c_scale, c_gate_mlp)
        con = context_update(block, con, con_attn, k_gate, k_shift, k_scale, k_gate_mlp)
    x = torch.cat((txt, img), 1)
    for i, block in enumerate(model.single_transformer_blocks):
        attn = block.attn
        own = (attn.to_q, attn.to_k, attn.to_v), (attn.norm_q, attn.norm_k)
        x_mod, gate = block.norm(x, emb=temb)
        con_mod, k_gate = block.norm(con, emb=temb)
        xq, xk, xv = projected(attn, x_mod, *own)
        cq, ck, cv = projected(attn, con_mod, *own)
        q, k = rope(xq, pe), rope(xk, pe)
        joint = explicit_attention(q, k, xv).transpose(1, 2).flatten(2)
        q_c, k_c = (rope(torch.cat(y, 2), concept_pe) for y in ((cq, xq[:, :, T:]), (ck, xk[:, :, T:])))
        out[f"single_transformer_blocks.{i}.attn"] = probe(q[:, :, T:], k_c[:, :, :C])
        con_attn = explicit_attention(q_c, k_c, torch.cat((cv, xv[:, :, T:]), 2))[:, :, :C].transpose(1, 2).flatten(2)
        x = x + gate.unsqueeze(1) * block.proj_out(torch.cat((joint, block.act_mlp(block.proj_mlp(x_mod))), 2))
        con = con + k_gate.unsqueeze(1) * block.proj_out(
            torch.cat((con_attn, block.act_mlp(block.proj_mlp(con_mod))), 2))
    return out


def sd3_masses(model, inputs, concepts):
    """{layer: probe mass of the conditional half} of one SD3 forward ([image; text] joint
    sequence, CFG batch [uncond; cond]; the concept rows of the cond half)."""
    img = model.pos_embed(inputs["hidden_states"])
    temb = model.time_text_embed(inputs["timestep"], inputs["pooled_projections"])
    txt = model.context_embedder(inputs["encoder_hidden_states"])
    B = img.shape[0]
    cond = slice(B // 2, B)
    con = model.context_embedder(concepts.to(img.dtype)).expand(B - B // 2, -1, -1)
    P, C = img.shape[1], con.shape[1]
    out = {}
    for i, block in enumerate(model.transformer_blocks):
        attn = block.attn
        if block.use_dual_attention:
            img_mod, gate, shift, scale, gate_mlp, img_mod2, gate2 = block.norm1(img, emb=temb)
        else:
            img_mod, gate, shift, scale, gate_mlp = block.norm1(img, emb=temb)
        last = block.context_pre_only
        if last:
            txt_mod, con_mod = block.norm1_context(txt, temb), block.norm1_context(con, temb[cond])
        else:
            txt_mod, c_gate, c_shift, c_scale, c_gate_mlp = block.norm1_context(txt, emb=temb)
            con_mod, k_gate, k_shift, k_scale, k_gate_mlp = block.norm1_context(con, emb=temb[cond])
        iq, ik, iv = projected(attn, img_mod, (attn.to_q, attn.to_k, attn.to_v), (attn.norm_q, attn.norm_k))
        side = (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj), (attn.norm_added_q, attn.norm_added_k)
        tq, tk, tv = projected(attn, txt_mod, *side)
        cq, ck, cv = projected(attn, con_mod, *side)
        joint = explicit_attention(*(torch.cat(x, 2) for x in ((iq, tq), (ik, tk), (iv, tv)))).transpose(1, 2)
        img_attn, txt_attn = joint.flatten(2)[:, :P], joint.flatten(2)[:, P:]
        out[f"transformer_blocks.{i}.attn"] = probe(iq[cond], ck)
        con_attn = explicit_attention(cq, torch.cat((ck, ik[cond]), 2), torch.cat((cv, iv[cond]), 2))
        con_attn = con_attn[:, :, :C].transpose(1, 2).flatten(2)
        img = img + gate.unsqueeze(1) * attn.to_out[0](img_attn)
        if block.use_dual_attention:
            a2 = block.attn2
            q2, k2, v2 = projected(a2, img_mod2, (a2.to_q, a2.to_k, a2.to_v), (a2.norm_q, a2.norm_k))
            img = img + gate2.unsqueeze(1) * a2.to_out[0](explicit_attention(q2, k2, v2).transpose(1, 2).flatten(2))
        img = img + gate_mlp.unsqueeze(1) * block.ff(block.norm2(img) * (1 + scale[:, None]) + shift[:, None])
        if last:
            break
        txt = context_update(block, txt, txt_attn, c_gate, c_shift, c_scale, c_gate_mlp)
        con = context_update(block, con, con_attn, k_gate, k_shift, k_scale, k_gate_mlp)
    return out


def reference_masses(pipe, calls, words, dtype):
    """[{layer: mass}] per recorded transformer forward, computed in ``dtype``."""
    model = copy.deepcopy(pipe.transformer).to(dtype)
    embeds, _ = concept_rows(pipe, words)
    replay = flux_masses if is_flux(pipe) else sd3_masses
    cast = [{k: v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v for k, v in c.items()}
            for c in calls]
    with torch.no_grad():
        return [replay(model, c, embeds.to(dtype)) for c in cast]


# ---- tests ------------------------------------------------------------------------------------

@pytest.mark.parametrize("name, backend", [("flux", "torch"), ("sd3", "torch"), ("sd35", "torch"),
                                           ("flux", "triton"), ("sd35", "triton")])
def test_probe_mass_and_votes_match_the_materialising_reference(pipes, name, backend):
    pipe = pipes[name]
    builder = HRVBuilder(pipe, CONCEPTS, probe_words="all", probe_sot=False, per_step=True)
    masses = []
    real = builder.on_output

    def spy(call, value, out):   # each joint call's probe mass, as the builder keeps it
        real(call, value, out)
        kept = builder.layers.get(call.layer)
        if kept is not None and kept.pending:
            masses.append((call.layer, kept.mass.clone()))

    builder.on_output = spy
    calls, hook = recorded_inputs(pipe)
    try:
        with contextlib.ExitStack() as stack:
            stack.enter_context(interpreter_bf16_dot_fixed())
            stack.enter_context(attnctl.install(pipe, builder, backend=backend))
            stock = generate(pipe)
    finally:
        hook.remove()
        builder.close()
    hrv = builder.result()
    layers = [n for n, _ in hrv.layers]
    expected_layers = ([f"transformer_blocks.{i}.attn" for i in range(2)]
                       + [f"single_transformer_blocks.{i}.attn" for i in range(2)] if name == "flux"
                       else [f"transformer_blocks.{i}.attn" for i in range(3)])
    assert layers == expected_layers and hrv.num_heads == 2 * len(layers)
    assert [n for n, _ in masses] == layers * 2          # every joint layer with text, both steps
    if name == "flux":   # text at position 0, where RoPE is the identity (the stream's rows get none)
        assert all(not c["txt_ids"].any() for c in calls)
        cos, sin = pipe.transformer.pos_embed(torch.zeros(1, 3))
        assert torch.equal(cos, torch.ones_like(cos)) and torch.equal(sin, torch.zeros_like(sin))
    words = [w for ws in CONCEPTS.values() for w in ws]
    single, exact = (reference_masses(pipe, calls, words, d) for d in (torch.float32, torch.float64))
    flat = lambda per_call: torch.cat([m.flatten() for c in per_call for m in c.values()])
    got = torch.cat([m.flatten() for _, m in masses])
    assert_within_reference_error(got, flat(single), flat(exact))
    # votes: each concept's mean over its tokens, argmax per image and head
    _, ranges = concept_rows(pipe, words)
    groups = [[t for r in ranges[i:i + len(ws)] for t in r] for i, ws in
              zip((0, 2, 3), CONCEPTS.values())]
    counts = {}
    for per_call in exact:
        for layer, mass in per_call.items():
            scores = torch.stack([mass[..., g].mean(-1) for g in groups], -1)      # (images, H, K)
            top2 = scores.topk(2, dim=-1).values
            assert (top2[..., 0] - top2[..., 1]).min() > 1e-4, "a near tie: the test needs other weights"
            votes = F.one_hot(scores.argmax(-1), len(groups)).sum(0)
            counts[layer] = counts.get(layer, 0) + votes
    assert torch.equal(hrv.counts, torch.cat([counts[n] for n in layers]).float())
    assert hrv.per_step.shape == (2, len(CONCEPTS), hrv.num_heads)
    # the image: bit-identical to the installation alone
    with attnctl.install(pipe, backend=backend):
        with interpreter_bf16_dot_fixed():
            plain = generate(pipe)
    assert torch.equal(stock, plain)


def test_build_hrv_sampled_words_save_and_load(pipes, tmp_path):
    pipe = pipes["sd35"]
    kwargs = dict(steps=2, probe_sot=False, height=HEIGHT, width=WIDTH, max_sequence_length=TEXT, seed=3,
                  guidance_scale=4.0)
    hrv = build_hrv(pipe, CONCEPTS, PROMPTS, **kwargs)
    again = build_hrv(pipe, CONCEPTS, PROMPTS, **kwargs)
    assert torch.equal(hrv.counts, again.counts)                # seeded draws
    assert torch.equal(hrv.counts.sum(1), torch.full((hrv.num_heads,), 4.0))   # 2 prompts x 2 steps per head
    assert [n for n, _ in hrv.layers] == [f"transformer_blocks.{i}.attn" for i in range(3)]  # no attn2
    hrv.save(str(tmp_path / "hrv.safetensors"))
    loaded = HeadRelevance.load(str(tmp_path / "hrv.safetensors"))
    assert loaded.layers == hrv.layers and torch.equal(loaded.hrv, hrv.hrv) and loaded.words == hrv.words
    assert not pipe.transformer._forward_pre_hooks          # the concept stream's hook is gone
    clip = build_hrv(pipe, CONCEPTS, PROMPTS[:1], text="clip", **{**kwargs, "probe_sot": True})
    assert clip.counts.sum() == 2 * hrv.num_heads


def joint_factor(hrv, head_factor, prompt_columns, layer, batch, keys, text_start, cond):
    """The (B, H, 1, L) factor written out: head_factor at the text columns of each cond
    row's prompt in the layer's heads, 1 elsewhere."""
    start, count = hrv.offsets()[layer]
    f = torch.ones(batch, count, 1, keys, dtype=torch.float64)
    for i, row in enumerate(cond):
        for c in prompt_columns[i]:
            f[row, :, 0, text_start + c] = head_factor[start:start + count].double()
    return f


def materialised_with_factors(pipe, factor_of):
    """Stock processors with SDPA made explicit in fp64: softmax(q·kᵀ/√D) · F · v, F from
    ``factor_of(layer, q)`` (None: 1)."""
    def explicit(call, query, key, value, attn_mask):
        p = torch.softmax(query.double() @ key.double().transpose(-1, -2) * query.shape[-1] ** -0.5, dim=-1)
        f = factor_of(call.layer, query)
        return ((p if f is None else p * f) @ value.double()).to(query.dtype)

    return sdpa_replay(pipe.transformer, explicit)


@pytest.mark.parametrize("name, control", [("flux", "weakening"), ("sd35", "weakening"), ("sd3", "adjusting")])
def test_controls_match_a_materialised_prob_mult(pipes, name, control):
    pipe = pipes[name]
    layers = ([f"transformer_blocks.{i}.attn" for i in range(2)]
              + [f"single_transformer_blocks.{i}.attn" for i in range(2)] if name == "flux"
              else [f"transformer_blocks.{i}.attn" for i in range(3)])
    hrv = HeadRelevance(list(CONCEPTS), [(n, 2) for n in layers],
                        torch.rand(len(CONCEPTS), 2 * len(layers), generator=torch.Generator().manual_seed(4)) * 3,
                        None)
    tokenizer = pipe.tokenizer_2 if name == "flux" else pipe.tokenizer_3
    offset = 0 if name == "flux" else CLIP_TOKENS
    if control == "weakening":
        controller = OrderedWeakening(hrv, "vehicle", 3)
        head_factor = torch.ones(hrv.num_heads)
        head_factor[hrv.ranked_heads("vehicle", 3)] = -2.0
        columns = [[offset + c for c in t5_positions(tokenizer, p)] for p in PROMPTS]
    else:   # "a": twice in the first prompt, once in the second (every occurrence, as get_equalizer)
        controller = ConceptAdjusting(hrv, "a", desired="vehicle", undesired="colour")
        head_factor = 2 * hrv.vector("vehicle") - hrv.vector("colour")
        a = tokenizer("a", add_special_tokens=False).input_ids
        columns = [[offset + c for c, t in enumerate(tokenizer(p).input_ids) if [t] == a] for p in PROMPTS]
        assert [len(c) for c in columns] == [2, 1]

    def factor_of(layer, q):
        if layer not in hrv.offsets():
            return None                                   # SD3.5's attn2
        B, _, L, _ = q.shape
        cond = range(B // 2, B) if name != "flux" else range(B)
        text_start = 0 if name == "flux" else L - (CLIP_TOKENS + TEXT)
        return joint_factor(hrv, head_factor, columns, layer, B, L, text_start, cond)

    with attnctl.install(pipe, controller, backend="torch"):
        got = generate(pipe)
    plain = generate(pipe)
    results = {}
    for dtype in (torch.float32, torch.float64):
        with weights_in(pipe, dtype), materialised_with_factors(pipe, factor_of):
            results[dtype] = generate(pipe)
    single = results[torch.float32]
    exact = results[torch.float64]
    assert (got - plain).abs().max() > 100 * (single.double() - exact).abs().max()   # the control acts
    assert_within_reference_error(got, single, exact)


def test_bad_input(pipes):
    flux_pipe, sd3_pipe = pipes["flux"], pipes["sd3"]
    with pytest.raises(ValueError, match=r"concepts\['vehicle'\]: expected non-empty words, got \['car', ' '\]"):
        HRVBuilder(flux_pipe, {"animal": "cat", "vehicle": ["car", " "]}, probe_sot=False)
    with pytest.raises(ValueError, match=r"text: expected one of \('t5', 'clip'\) .*got 'clip-l'"):
        HRVBuilder(sd3_pipe, CONCEPTS, probe_sot=False, text="clip-l")
    with pytest.raises(ValueError, match="text: Flux attends to T5 tokens only"):
        HRVBuilder(flux_pipe, CONCEPTS, probe_sot=False, text="clip")
    with pytest.raises(ValueError, match="probe_sot: the 't5' segment's tokenizer puts no start-of-text token"):
        build_hrv(flux_pipe, CONCEPTS, PROMPTS, steps=1)
    assert not flux_pipe.transformer._forward_pre_hooks and not sd3_pipe.transformer._forward_pre_hooks
    hrv = HeadRelevance(["cat", "dog"], [("transformer_blocks.0.attn", 2)], torch.ones(2, 2), None)
    with pytest.raises(ValueError, match=r"text: this generation's text segments are \['t5'\], got 'clip'"):
        with attnctl.install(flux_pipe, OrderedWeakening(hrv, "cat", 1, text="clip")):
            generate(flux_pipe)
    unet_hrv = HeadRelevance(["cat", "dog"], [("down_blocks.0.attentions.0.transformer_blocks.0.attn2", 2)],
                             torch.ones(2, 2), None)
    with pytest.raises(ValueError, match="hrv: layer transformer_blocks.0.attn is not in this HRV"):
        with attnctl.install(flux_pipe, OrderedWeakening(unet_hrv, "cat", 1)):
            generate(flux_pipe)
    with pytest.raises(ValueError, match=r"text: expected one of \('t5', 'clip'\)"):
        ConceptAdjusting(hrv, "cat", "cat", "dog", text="T5")


def test_flux_text_positions_other_than_zero_are_refused(pipes):
    """The stream's rows take RoPE's identity, which the prompt's text has only at zero
    positions (as FluxPipeline gives them)."""
    pipe = pipes["flux"]
    model = pipe.transformer
    inputs = dict(hidden_states=torch.randn(1, 24, 16), encoder_hidden_states=torch.randn(1, TEXT, 32),
                  pooled_projections=torch.randn(1, 32), timestep=torch.tensor([0.5]),
                  img_ids=torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(4.0), torch.arange(6.0),
                                                     indexing="ij"), -1).reshape(24, 3),
                  txt_ids=torch.zeros(TEXT, 3))
    builder = HRVBuilder(pipe, CONCEPTS, probe_sot=False)
    try:
        with attnctl.install(pipe, builder, backend="torch"), torch.no_grad():
            model(**inputs)                                    # zeros: probed
        assert len(builder.layers) == 4 and all(p.pending for p in builder.layers.values())
        with attnctl.install(pipe, builder, backend="torch"), torch.no_grad():
            with pytest.raises(NotImplementedError, match="txt_ids: HRV's concept stream places the concept rows "
                                                          "at position 0"):
                model(**{**inputs, "txt_ids": torch.ones(TEXT, 3)})
    finally:
        builder.close()
