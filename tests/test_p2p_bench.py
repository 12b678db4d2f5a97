"""The prompt-to-prompt benchmark: its materialising edit makes the same edit as the fused
path, its CLI runs on a CPU (smoke) and writes sane records, and its README table."""
import argparse
import json

import pytest
import torch

import attnctl
from attnctl.benchmarks import cli, p2p_edit, report
from attnctl.benchmarks.p2p_edit import MaterialisedEdit
from attnctl.diffusers.offline import tiny_sd_pipeline
from attnctl.p2p import Refine, Replace, edit
from control_reference import assert_within_reference_error, float64_pipe, initial_noise

STEPS = 3
SIZE = dict(height=16, width=24)
REPLACE = ["a cat on a red car", "a dog on a red car", "a fox on a blue car"]   # blue: 4 tokens for 3
REFINE = ["a cat on a red car", "a cat on a big red car"]


@pytest.fixture(scope="module")
def pipe():
    return tiny_sd_pipeline()


def _kwargs():
    return dict(num_inference_steps=STEPS, output_type="latent", generator=torch.Generator().manual_seed(0), **SIZE)


@pytest.mark.parametrize("prompts, make", [
    (REPLACE, lambda: Replace(cross_steps=0.6, self_steps=0.4)),
    (REFINE, lambda: Refine(cross_steps={"default_": 1.0, "red": (0.3, 0.6)}, self_steps=(0.0, 0.7))),
], ids=["replace-two-targets", "refine-per-word"])
def test_materialised_edit_reproduces_the_fused_edit(pipe, prompts, make):
    """Tolerance from the baseline's own error: the materialising edit in fp32 and fp64
    from the same noise; the fused edit may be a few times as far from the fp64 one."""
    source, targets = prompts[0], prompts[1:]
    noise = initial_noise(pipe, len(prompts), **SIZE)
    with torch.no_grad():
        try:
            fused = edit(pipe, source, targets, make(), backend="torch", latents=noise, **_kwargs()).images
        finally:
            attnctl.uninstall(pipe)
        with MaterialisedEdit(pipe, make()) as baseline:
            materialised = baseline.generate(source, targets, latents=noise, **_kwargs()).images
        pipe64 = float64_pipe(pipe)
        with MaterialisedEdit(pipe64, make()) as baseline:
            exact = baseline.generate(source, targets, latents=noise.double(), **_kwargs()).images
        plain = pipe(prompts, **_kwargs()).images
    assert_within_reference_error(fused, materialised, exact)
    assert (materialised[1:] - plain[1:]).abs().amax() > 1e-2   # the edit acts
    assert all(type(p).__name__ == "AttnProcessor2_0" for p in pipe.unet.attn_processors.values())


def test_materialised_edit_refuses_what_it_does_not_do(pipe):
    from attnctl.p2p import LocalBlend
    with pytest.raises(ValueError, match="LocalBlend"):
        MaterialisedEdit(pipe, Replace(local_blend=LocalBlend([["cat"], ["dog"]])))
    with pytest.raises(TypeError, match="Replace, Refine or Reweight"):
        MaterialisedEdit(pipe, object())
    with pytest.raises(ValueError, match="1 to 50"):
        p2p_edit.run_p2p_edit("tiny", steps=51, dtype=torch.float32, device="cpu")


def _parse(argv):
    parser = argparse.ArgumentParser()
    cli.add_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(["bench", *argv])


def test_cli_smoke_runs_every_contender_and_writes_json(tmp_path, capsys):
    out = tmp_path / "p2p.json"
    args = _parse(["--skip-kernels", "--p2p", "sd15-512", "--json", str(out)])
    assert args.func(args) == 0
    result = json.loads(out.read_text())
    assert result["environment"]["device"] == "cpu" and result["rows"] == []
    rows = result["p2p"]
    assert [r["contender"] for r in rows] == list(p2p_edit.CONTENDERS)
    by_name = {r["contender"]: r for r in rows}
    for r in rows:
        assert r["status"] == "ok" and r["model"] == "tiny" and r["steps"] == 2 and r["dtype"] == "float32"
        assert r["median_ms"] > 0 and r["step_ms"] == pytest.approx(r["median_ms"] / 2)
        assert r["peak_mem_mb"] is None   # no CUDA allocator to ask
        assert r["time_vs_sdpa"] == pytest.approx(r["median_ms"] / by_name["diffusers-sdpa"]["median_ms"])
        assert r["time_vs_materialised"] == pytest.approx(
            r["median_ms"] / by_name["materialised-p2p"]["median_ms"])
    assert by_name["attnctl-p2p"]["latent_diff_vs_materialised"] < 1e-4
    assert "materialised-p2p" in capsys.readouterr().out


def _gpu_result(date, kernels=True):
    env = {"device": "cuda", "device_name": "NVIDIA H100 80GB HBM3", "torch": "2.11", "triton": "3.6", "date": date}
    rows = [{"shape": "sd15-512/64x64/cross/B2/N77/D40", "dtype": "fp16", "contender": "sdpa", "status": "ok",
             "median_ms": 0.5, "time_vs_sdpa": 1.0}] if kernels else []
    return {"environment": env, "ceilings": {}, "rows": rows}


def _p2p_rows():
    def row(contender, ms, peak, status="ok"):
        return {"model": "sdxl-1024", "contender": contender, "steps": 20, "dtype": "float16", "status": status,
                "median_ms": ms, "step_ms": ms / 20, "peak_mem_mb": peak,
                "time_vs_sdpa": ms / 4000.0, "time_vs_materialised": ms / 9000.0,
                "edit": "Replace(cross_steps=0.8, self_steps=0.4)"}
    return [row("diffusers-sdpa", 4000.0, 900.0), row("attnctl-p2p", 4600.0, 950.0),
            row("materialised-p2p", 9000.0, 6100.0)]


def test_readme_has_a_p2p_table_from_the_newest_p2p_result(tmp_path):
    results = tmp_path / "results"
    results.mkdir()
    (results / "kernels.json").write_text(json.dumps(_gpu_result("2026-01-01T00:00:00+00:00")))
    p2p = _gpu_result("2026-01-02T00:00:00+00:00", kernels=False)
    p2p["p2p"] = _p2p_rows()
    (results / "p2p.json").write_text(json.dumps(p2p))
    table = report.readme_table(str(results))
    assert "kernels.json" in table and "0.5000" in table        # the kernel table is not emptied
    assert "p2p.json" in table
    lines = [line for line in table.splitlines() if line.startswith("| sdxl-1024")]
    assert len(lines) == 3
    assert "| attnctl-p2p | 20 | float16 | 4600 | 230.0 | 1.15 | 0.51 | 950 | ok |" in lines[1]


def test_readme_without_p2p_results_has_no_p2p_table(tmp_path):
    results = tmp_path / "results"
    results.mkdir()
    (results / "kernels.json").write_text(json.dumps(_gpu_result("2026-01-01T00:00:00+00:00")))
    assert "prompt-to-prompt" not in report.readme_table(str(results)).lower()
