"""The benchmark code runs on a CPU (smoke: times meaningless) and reports what it should."""
import argparse
import json

import pytest

from attnctl.benchmarks import cli, report
from attnctl.benchmarks.shapes import catalog, quick_catalog
from attnctl.configs import load_unet_config


def _parse(argv):
    parser = argparse.ArgumentParser()
    cli.add_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(["bench", *argv])


def test_catalog_matches_published_unet_configs():
    """Head counts and head dims of the SD1.5/SDXL shapes follow from the shipped configs."""
    for model, config_name, grid in (("sd15-512", "sd15_unet", 64), ("sdxl-1024", "sdxl_unet", 128)):
        cfg = load_unet_config(config_name)
        heads = cfg["attention_head_dim"]
        expected = set()
        for i, (block, channels) in enumerate(zip(cfg["down_block_types"], cfg["block_out_channels"])):
            if block.startswith("CrossAttn"):
                h = heads[i] if isinstance(heads, list) else heads
                side = grid // 2**i
                expected.add((side * side, h, channels // h))
        got = {(s.M, s.H, s.D) for s in catalog(batches=(2,), kinds=("cross",), models=[model])}
        if model == "sd15-512":  # the mid block at 8x8 runs cross-attention too
            expected.add((64, 8, 160))
        assert got == expected


def test_quick_catalog_holds_the_target_shapes():
    names = {(s.model, s.level, s.kind) for s in quick_catalog()}
    assert ("sd15-512", "64x64", "cross") in names and ("sdxl-1024", "64x64", "self") in names


def test_cli_smoke_run_writes_json_and_plot(tmp_path, capsys):
    out, png = tmp_path / "r.json", tmp_path / "r.png"
    args = _parse(["--json", str(out), "--plot", str(png), "--contender", "sdpa",
                   "--contender", "triton+capture", "--contender", "materialised+capture"])
    assert args.func(args) == 0
    result = json.loads(out.read_text())
    assert result["environment"]["device"] == "cpu"
    assert "smoke" in result["environment"]["device_name"]
    rows = result["rows"]
    assert {r["contender"] for r in rows} == {"sdpa", "triton+capture", "materialised+capture"}
    assert all(r["status"] == "ok" for r in rows), [r["status"] for r in rows]
    for r in rows:
        assert r["median_ms"] > 0
        assert r["time_vs_sdpa"] == pytest.approx(r["median_ms"] / next(
            x["median_ms"] for x in rows if x["contender"] == "sdpa" and x["shape"] == r["shape"]))
    assert png.stat().st_size > 0
    assert "smoke" in capsys.readouterr().out


def test_unknown_contender_is_rejected():
    from attnctl.benchmarks.contenders import select
    with pytest.raises(ValueError, match="unknown"):
        select(["sdpa", "nope"], "cpu")


def _gpu_result(date, ms):
    rows = [{"shape": "sd15-512/64x64/cross/B2/N77/D40", "dtype": "fp16", "contender": c,
             "status": "ok", "median_ms": t, "time_vs_sdpa": t / ms[0]}
            for c, t in zip(("sdpa", "triton", "triton+capture"), ms)]
    env = {"device": "cuda", "device_name": "NVIDIA H100 80GB HBM3", "torch": "2.11",
           "triton": "3.6", "date": date}
    return {"environment": env, "ceilings": {}, "rows": rows}


def test_readme_table_is_generated_from_the_newest_gpu_result(tmp_path):
    results = tmp_path / "results"
    results.mkdir()
    (results / "a.json").write_text(json.dumps(_gpu_result("2026-01-01T00:00:00+00:00", [1.0, 2.0, 3.0])))
    (results / "b.json").write_text(json.dumps(_gpu_result("2026-02-01T00:00:00+00:00", [0.5, 0.55, 0.6])))
    cpu = _gpu_result("2026-03-01T00:00:00+00:00", [9.0, 9.0, 9.0])
    cpu["environment"]["device"] = "cpu"
    (results / "c.json").write_text(json.dumps(cpu))
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{report.README_START}\nold\n{report.README_END}\nrest\n")
    assert report.update_readme(str(readme), str(results))
    text = readme.read_text()
    assert "b.json" in text and "0.5000" in text and "1.20" in text  # 0.6 / 0.5
    assert "9.0000" not in text and "old" not in text and text.endswith("rest\n")
    assert not report.update_readme(str(readme), str(results))


def test_readme_table_says_when_no_gpu_result_exists(tmp_path):
    assert "No GPU benchmark" in report.readme_table(str(tmp_path))


def test_cli_end_to_end_smoke_compares_fused_and_materialised_capture(tmp_path):
    out = tmp_path / "e2e.json"
    args = _parse(["--skip-kernels", "--e2e", "sd15-512", "--json", str(out),
                   "--e2e-contender", "diffusers-sdpa", "--e2e-contender", "attnctl+trace",
                   "--e2e-contender", "daam-materialised"])
    assert args.func(args) == 0
    rows = json.loads(out.read_text())["e2e"]
    assert [r["contender"] for r in rows] == ["diffusers-sdpa", "attnctl+trace", "daam-materialised"]
    assert all(r["status"] == "ok" and r["model"] == "tiny" and r["step_ms"] > 0 for r in rows)


def test_daam_baseline_keeps_the_maps_it_materialises():
    """The materialising baseline really computes P: its per-layer maps sum to the number of
    query rows per batch item and head (each P row sums to 1)."""
    import torch
    from attnctl.benchmarks import e2e
    from attnctl.benchmarks.baselines import install_daam_style

    unet = e2e.build_unet("tiny", torch.float32, "cpu")
    maps = install_daam_style(unet)
    inputs = e2e.unet_inputs("tiny", unet, 1, torch.float32, "cpu")
    with torch.no_grad():
        unet(timestep=torch.tensor(10), **inputs)
    assert maps
    for name, m in maps.items():
        heads = dict(unet.named_modules())[name].heads
        assert torch.allclose(m.sum(-1), torch.full_like(m.sum(-1), heads), atol=1e-4)


def test_e2e_models_name_shipped_configs():
    from attnctl.benchmarks import e2e
    for model, (config_name, latent, sdxl) in e2e.MODELS.items():
        if config_name is None:
            continue
        cfg = load_unet_config(config_name)
        assert latent == (cfg["sample_size"], cfg["sample_size"])
        assert (cfg.get("addition_embed_type") == "text_time") == sdxl


def test_attnctl_bench_command_runs_the_triton_kernel_on_a_cpu(tmp_path):
    """As a user runs it: a fresh process without TRITON_INTERPRET. The CLI must choose the
    interpreter before diffusers imports triton, or the kernel cannot run."""
    import os
    import subprocess
    import sys

    out = tmp_path / "r.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "attnctl.cli", "bench", "--contender", "triton+capture",
                           "--kind", "cross", "--json", str(out)], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    assert rows and all(r["status"] == "ok" for r in rows), [r["status"] for r in rows]


def test_json_holds_every_row_as_soon_as_it_is_measured(tmp_path, monkeypatch):
    """A run cut short (a device call's time limit) leaves valid JSON with the rows it measured,
    marked incomplete, and the README table says so."""
    from attnctl.benchmarks import runner

    measured = []
    record = runner._record

    def cut_after_first_group(*args):
        if len(measured) == 2:   # the first shape's two contenders are done
            assert len(json.loads(out.read_text())["rows"]) == 2
            raise KeyboardInterrupt
        measured.append(record(*args))
        return measured[-1]

    out = tmp_path / "r.json"
    monkeypatch.setattr(runner, "_record", cut_after_first_group)
    args = _parse(["--json", str(out), "--contender", "sdpa", "--contender", "materialised+capture"])
    with pytest.raises(KeyboardInterrupt):
        args.func(args)
    result = json.loads(out.read_text())
    assert result["complete"] is False and [r["contender"] for r in result["rows"]] == ["sdpa", "materialised+capture"]
    assert not list(tmp_path.glob("*.partial"))
    result["environment"].update(device="cuda", device_name="NVIDIA H100 80GB HBM3")
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "cut.json").write_text(json.dumps(result))
    assert "cut short" in report.readme_table(str(tmp_path / "results"))
