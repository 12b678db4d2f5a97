"""`attnctl demo --excite`: plain vs Attend-and-Excite vs HRV-guided A&E, offline."""
import json

from attnctl.cli import main
from attnctl.diffusers.offline import tiny_sd_pipeline
from attnctl.tools.hrv import HeadRelevance
from attnctl.tools.hrv_official import cross_attention_layers

import torch


def test_demo_multi_concept_writes_the_side_by_side_grid(tmp_path):
    layers = cross_attention_layers(tiny_sd_pipeline())   # the offline pipeline's architecture
    heads = sum(h for _, h in layers)
    hrv = HeadRelevance(["Animals", "Vehicles"], layers, torch.full((2, heads), 1.0), None)
    hrv.save_official(str(tmp_path / "vectors.npy"), str(tmp_path / "heads.npy"))
    (tmp_path / "concepts.csv").write_text("Animals\ncat 1\nVehicles\ncar 1\n")
    out = tmp_path / "out"
    assert main(["demo", "--out", str(out), "--prompt", "a cat on a car", "--steps", "2", "--height", "32",
                 "--width", "32", "--excite", "cat", "car", "--max-refinement-steps", "1",
                 "--hrv", str(tmp_path / "vectors.npy"), str(tmp_path / "heads.npy"), str(tmp_path / "concepts.csv"),
                 "--concepts", "Animals", "Vehicles"]) == 0
    summary = json.loads((out / "multi_concept.json").read_text())
    assert summary["tokens"] == [4, 10]   # the last character token of each word ("t</w>", "r</w>")
    assert list(summary["variants"]) == ["plain", "attend-and-excite", "hrv-attend-and-excite"]
    for variant in summary["variants"].values():
        assert len(variant["losses"]) == 2 and len(variant["final_max"]) == 2
        assert open(variant["image"], "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    assert open(summary["files"]["grid"], "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    plain, excited = summary["variants"]["plain"], summary["variants"]["attend-and-excite"]
    # Step 0 refines the excited latent (one update) before its loss is recorded: it drops.
    assert excited["losses"][0] < plain["losses"][0] and excited["losses"][1] != plain["losses"][1]
