"""The MM-DiT end-to-end benchmark (attnctl.benchmarks.e2e_dit) on the tiny offline Flux and
SD3 transformers: every contender runs, the materialising baseline keeps exactly the
per-head image→text slices of the joint blocks on the host, and `attnctl bench --e2e
flux-1024` runs its CPU stand-in. Times mean nothing here (CPU smoke)."""
import json

import pytest
import torch

from attnctl.benchmarks import e2e_dit
from attnctl.cli import main


@pytest.mark.parametrize("name,joint_blocks,image,text", [("flux-tiny", 1, 16, 8), ("sd3-tiny", 2, 16, 77 + 8)])
def test_every_contender_runs_and_the_baseline_keeps_the_image_text_slices(name, joint_blocks, image, text):
    rows = e2e_dit.run_e2e_dit(name, list(e2e_dit.CONTENDERS), steps=1, dtype=torch.float32, device="cpu")
    assert [r["contender"] for r in rows] == list(e2e_dit.CONTENDERS)
    assert all(r["status"] == "ok" and r["step_ms"] > 0 for r in rows), rows
    spec = e2e_dit.MODELS[name]
    heads = 2
    per_step = joint_blocks * spec.rows * heads * image * text * 4   # fp32 slices
    by_name = {r["contender"]: r for r in rows}
    assert by_name["materialised"]["host_mb_per_step"] * 2**20 == pytest.approx(per_step)
    assert by_name["attnctl+trace"]["host_mb_per_step"] == 0
    assert by_name["diffusers-sdpa"]["step_vs_sdpa"] == 1.0


def test_materialised_baseline_gives_stock_outputs():
    spec = e2e_dit.MODELS["sd3-tiny"]
    model = e2e_dit.build_transformer(spec, torch.float64, "cpu")
    inputs = e2e_dit.transformer_inputs(spec, model, torch.float64, "cpu")
    with torch.no_grad():
        stock = model(timestep=torch.ones(2, dtype=torch.float64), **inputs, return_dict=False)[0]
        with e2e_dit.materialised_joint_capture(model, spec) as kept:
            explicit = model(timestep=torch.ones(2, dtype=torch.float64), **inputs, return_dict=False)[0]
    assert len(kept) == 2
    torch.testing.assert_close(explicit, stock, rtol=1e-10, atol=1e-12)


def test_cli_runs_the_cpu_stand_in(tmp_path, capsys):
    out = tmp_path / "e2e.json"
    assert main(["bench", "--skip-kernels", "--e2e", "flux-1024", "--e2e-contender", "diffusers-sdpa",
                 "--e2e-contender", "materialised", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["e2e"]
    assert [(r["model"], r["contender"], r["status"]) for r in rows] == [
        ("flux-tiny", "diffusers-sdpa", "ok"), ("flux-tiny", "materialised", "ok")]
    assert "host MiB/step" in capsys.readouterr().out
