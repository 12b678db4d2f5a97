"""The transformer end-to-end benchmark (attnctl.benchmarks.e2e_dit) on the tiny offline
Flux, SD3, PixArt and Wan transformers: every contender runs and its record has the fields
the report reads, the materialising baseline keeps exactly the per-head image→text slices
on the token grid (on Wan per latent frame, the conditional call only) and gives stock
outputs, a host running out of memory is a result, and `attnctl bench --e2e flux-1024`
runs its CPU stand-in. Times mean nothing here (CPU smoke)."""
import json

import pytest
import torch

from attnctl.benchmarks import e2e_dit, report
from attnctl.cli import main

HEADS = 2   # every tiny config
# name: (layers the materialised capture maps, image tokens (frames, h, w), text keys)
TINY = {"flux-tiny": (1, (1, 4, 4), 16), "sd3-tiny": (2, (1, 4, 4), 77 + 16),
        "pixart-tiny": (2, (1, 4, 4), 16), "wan-tiny": (2, (2, 2, 3), 16)}


@pytest.mark.parametrize("name", list(TINY))
def test_every_contender_runs_and_the_baseline_keeps_the_image_text_slices(name):
    spec = e2e_dit.MODELS[name]
    rows = e2e_dit.run_e2e_dit(name, list(e2e_dit.CONTENDERS), dtype=torch.float32, device="cpu")
    assert [r["contender"] for r in rows] == list(e2e_dit.CONTENDERS)
    assert all(r["status"] == "ok" and r["step_ms"] > 0 and r["steps"] == spec.steps == 2 for r in rows), rows
    for r in rows:   # the report's columns, and the ratio run_contenders adds
        assert {key for key, _, _ in report.E2E_COLUMNS} <= set(r) | {"peak_mem_mb"}, r
        assert r["peak_mem_mb"] is None    # a CPU has no device memory to report
    layers, grid, text = TINY[name]
    frames, h, w = grid
    assert spec.token_grid == grid
    per_step = layers * spec.rows * HEADS * frames * h * w * text * 4   # fp32 slices, one call per step
    by_name = {r["contender"]: r for r in rows}
    assert by_name["materialised"]["host_mb_per_step"] * 2**20 == pytest.approx(per_step)
    assert by_name["attnctl+trace"]["host_mb_per_step"] == 0
    assert by_name["diffusers-sdpa"]["step_vs_sdpa"] == 1.0
    assert (by_name["attnctl"]["calls_per_step"], by_name["attnctl"]["rows_per_call"]) == (
        (2, 1) if name == "wan-tiny" else (1, 2 if spec.cfg else 1))


def _one_step(name, dtype=torch.float64):
    """A tiny model, its spec, one step's inputs and a run of that step."""
    spec = e2e_dit.MODELS[name]
    model = e2e_dit.build_transformer(spec, dtype, "cpu")
    calls = e2e_dit.transformer_inputs(spec, model, dtype, "cpu")

    def run():
        with torch.no_grad():
            return [model(timestep=torch.full((spec.rows,), 500.0, dtype=dtype), **inputs, return_dict=False)[0]
                    for inputs in calls]
    return model, spec, calls, run


@pytest.mark.parametrize("name", ["sd3-tiny", "pixart-tiny", "wan-tiny"])
def test_materialised_baseline_gives_stock_outputs_and_the_softmax_it_computed(name):
    """Explicit P (PixArt: with its T5 mask as the bias) gives stock outputs; the kept maps
    are P's image rows × text columns on the token grid (cross-attention: each row sums to 1;
    joint: the text's share, in (0, 1); PixArt's masked keys get 0), on Wan only the
    conditional (first) call of the step."""
    model, spec, calls, run = _one_step(name)
    stock = run()
    with e2e_dit.materialised_capture(model, spec) as kept:
        explicit = run()
    layers, grid, text = TINY[name]
    assert len(kept) == layers
    for got, want in zip(explicit, stock):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    for maps in kept:
        assert maps.shape == (spec.rows, HEADS, *grid, text) and maps.device.type == "cpu"
        mass = maps.sum(-1)
        if spec.kind.text_first is None:
            torch.testing.assert_close(mass, torch.ones_like(mass))
        else:
            assert 0 < mass.min() and mass.max() < 1
        if name == "pixart-tiny":
            assert maps[..., e2e_dit.prompt_tokens(spec):].abs().max() < 1e-3   # exp(-10000) after the bias
    if name == "wan-tiny":   # the two calls of a step see different text: the maps are the first call's
        first = _first_call_maps(model, spec, calls[0])
        assert len(first) == len(kept)
        for got, want in zip(kept, first):
            torch.testing.assert_close(got, want)


def _first_call_maps(model, spec, inputs):
    """Wan: softmax(q·kᵀ/√d) of each cross-attention layer in the step's first call, from the
    q and k the layer computes (hooks on norm_q / norm_k: Wan's RMS norms over all heads),
    on the token grid."""
    import re

    seen = {}
    hooks = []
    for name, module in model.named_modules():
        if re.fullmatch(r"blocks\.\d+\.attn2", name):
            for part in ("norm_q", "norm_k"):
                hooks.append(getattr(module, part).register_forward_hook(
                    lambda m, a, out, key=(name, part): seen.setdefault(key, out)))
    with torch.no_grad():
        model(timestep=torch.full((1,), 500.0, dtype=torch.float64), **inputs, return_dict=False)
    for hook in hooks:
        hook.remove()
    layers = sorted({name for name, _ in seen}, key=lambda n: int(n.split(".")[1]))
    maps = []
    for name in layers:
        q = seen[(name, "norm_q")].unflatten(-1, (HEADS, -1)).transpose(1, 2)
        k = seen[(name, "norm_k")].unflatten(-1, (HEADS, -1)).transpose(1, 2)
        p = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1)
        maps.append(p.unflatten(2, spec.token_grid))
    return maps


def test_a_host_without_room_for_the_maps_is_a_result(monkeypatch):
    monkeypatch.setattr(e2e_dit, "host_available", lambda: 0)
    rows = e2e_dit.run_e2e_dit("pixart-tiny", ["diffusers-sdpa", "materialised", "attnctl"], steps=1,
                               dtype=torch.float32, device="cpu")
    status = {r["contender"]: r["status"] for r in rows}
    assert status["diffusers-sdpa"] == status["attnctl"] == "ok"
    assert status["materialised"].startswith("host OOM: host memory: the next map")


def test_without_a_known_host_memory_the_capture_runs_and_says_so_once(monkeypatch, caplog):
    monkeypatch.setattr(e2e_dit, "host_available", lambda: None)
    e2e_dit._no_host_guard.cache_clear()
    rows = e2e_dit.run_e2e_dit("pixart-tiny", ["materialised"], steps=1, dtype=torch.float32, device="cpu")
    assert rows[0]["status"] == "ok" and rows[0]["host_mb_per_step"] > 0
    warned = [r for r in caplog.records if "available memory is unknown" in r.getMessage()]
    assert len(warned) == 1
    e2e_dit._no_host_guard.cache_clear()


def test_published_models_follow_the_shipped_configs():
    """The full-size rows: the latent, frames and text lengths of the issue's settings, and
    configs that ship with the package (built on the meta device here: shapes only)."""
    from attnctl.configs import load_transformer_config

    expected = {"flux-1024": (64 * 64, 512), "sd35l-1024": (64 * 64, 77 + 256),
                "pixart-1024": (64 * 64, 300), "wan-480p": (21 * 30 * 52, 512)}
    for name, (tokens, text) in expected.items():
        spec = e2e_dit.MODELS[name]
        frames, h, w = spec.token_grid
        assert frames * h * w == tokens and e2e_dit.text_tokens(spec) == text
        config = load_transformer_config(spec.config)
        assert config["_class_name"] == spec.kind.model_class
        assert e2e_dit.SMOKE[name] in e2e_dit.MODELS
    assert (e2e_dit.MODELS["pixart-1024"].steps, e2e_dit.MODELS["wan-480p"].steps) == (20, 3)


def test_cli_runs_the_cpu_stand_in(tmp_path, capsys):
    out = tmp_path / "e2e.json"
    assert main(["bench", "--skip-kernels", "--e2e", "flux-1024", "--e2e", "wan-480p",
                 "--e2e-contender", "diffusers-sdpa", "--e2e-contender", "materialised", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["e2e"]
    assert [(r["model"], r["contender"], r["status"]) for r in rows] == [
        ("flux-tiny", "diffusers-sdpa", "ok"), ("flux-tiny", "materialised", "ok"),
        ("wan-tiny", "diffusers-sdpa", "ok"), ("wan-tiny", "materialised", "ok")]
    assert "host MiB/step" in capsys.readouterr().out


@pytest.mark.parametrize("name", ["pixart-1024", "wan-480p"])
def test_full_size_inputs_fit_the_published_transformer(name):
    """One step's inputs at full size through the published architecture on the meta device
    (shapes only): the output is the latent's shape, every call of the step."""
    import diffusers

    from attnctl.configs import load_transformer_config

    spec = e2e_dit.MODELS[name]
    config = load_transformer_config(spec.config)
    with torch.device("meta"):
        model = getattr(diffusers, config["_class_name"]).from_config(config).to(torch.bfloat16)
    calls = e2e_dit.transformer_inputs(spec, model, torch.bfloat16, "meta")
    assert len(calls) == spec.calls
    for inputs in calls:
        with torch.no_grad():
            out = model(timestep=torch.ones(spec.rows, device="meta"), **inputs, return_dict=False)[0]
        latent = inputs["hidden_states"]
        assert latent.shape[0] == spec.rows and latent.shape[-2:] == spec.latent
        assert out.shape == (spec.rows, config["out_channels"], *latent.shape[2:])


def test_readme_lists_the_transformer_loops_until_a_gpu_measures_them(tmp_path):
    """The generated README section names every full-size end-to-end model without a GPU
    record, and a GPU result's PixArt / Wan rows (an OOM among them) make their table."""
    env = {"device": "cuda", "device_name": "NVIDIA H100 80GB HBM3", "torch": "2.11", "triton": "3.6",
           "date": "2026-12-01T00:00:00+00:00"}
    rows = [{"model": "wan-480p", "contender": c, "steps": 3, "status": s, "step_ms": ms, "peak_mem_mb": 9000.0,
             "host_mb_per_step": host}
            for c, s, ms, host in (("diffusers-sdpa", "ok", 1200.0, 0.0),
                                   ("materialised", "host OOM: host memory: the next map", None, None))]
    results = tmp_path / "results"
    results.mkdir()
    before = report.readme_table(str(results))
    assert all(m in before for m in ("pixart-1024", "wan-480p", "flux-1024", "sd35l-1024"))
    (results / "wan.json").write_text(json.dumps({"environment": env, "ceilings": {}, "rows": [], "e2e": rows}))
    after = report.readme_table(str(results))
    table = after[after.index("| model |"):]
    assert "| wan-480p | diffusers-sdpa | 3 | 1200.00 |" in table and "host OOM" in table
    unmeasured = next(line for line in after.splitlines() if line.startswith("End-to-end loops not measured"))
    assert "pixart-1024" in unmeasured and "wan-480p" not in unmeasured
