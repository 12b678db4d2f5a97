"""`attnctl demo` end to end, offline and from a local model directory."""
import json

import pytest
import torch

from attnctl import TraceMaps
from attnctl.cli import build_parser, main
from diffusion_helpers import sd_pipe

SMALL = ["--steps", "2", "--height", "32", "--width", "48"]
# The demo runs on the GPU when there is one, where "auto" picks the fused Triton kernel.
TRACE_ROW = f"attnctl.trace (fused capture, backend {'triton' if torch.cuda.is_available() else 'torch'})"


def test_demo_writes_image_overlays_trace_summary_and_prints_the_comparison(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["demo", "--out", str(out), "--prompt", "a cat on a red car", *SMALL]) == 0
    printed = capsys.readouterr().out
    for variant in ("no capture", TRACE_ROW, "materialised capture"):
        assert variant in printed
    summary = json.loads((out / "summary.json").read_text())
    assert list(summary["words"]) == ["a", "cat", "on", "red", "car"]
    assert summary["image_size"] == [32, 48] and summary["latent"] == [16, 24] and summary["cfg"]
    assert [row["variant"] for row in summary["comparison"]][1].startswith("attnctl.trace")
    assert summary["heat_map_max_relative_difference"] < 1e-4  # fused and materialised agree
    assert summary["words"]["cat"]["token_positions"] == [2, 3, 4]
    for path in [summary["files"]["image"], summary["files"]["grid"], *summary["files"]["heatmaps"]]:
        assert open(path, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    assert len(summary["files"]["heatmaps"]) == 5
    maps = TraceMaps.load(summary["files"]["trace"])
    cat = maps.heat_map(0, size="latent").word("cat").value  # 32 x 48: not square, so not DAAM's size
    assert float(cat.max()) == pytest.approx(summary["words"]["cat"]["max"])


def test_demo_loads_a_local_model_directory(tmp_path, capsys):
    model = tmp_path / "model"
    sd_pipe().save_pretrained(str(model))
    out = tmp_path / "out"
    assert main(["demo", "--model", str(model), "--out", str(out), "--words", "dog", "--no-compare",
                 "--guidance", "1", "--prompt", "a dog", *SMALL]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["model"] == str(model) and not summary["cfg"] and list(summary["words"]) == ["dog"]
    assert [row["variant"] for row in summary["comparison"]] == [TRACE_ROW]


def test_demo_rejects_bad_input(tmp_path):
    with pytest.raises(SystemExit, match="--words: word: 'zebra' is not in the prompt"):
        main(["demo", "--out", str(tmp_path), "--words", "zebra", "--no-compare", *SMALL])
    with pytest.raises(SystemExit, match="--model: expected a local model directory"):
        main(["demo", "--model", str(tmp_path / "missing")])


def test_cli_registers_demo_and_bench():
    parser = build_parser()
    assert parser.parse_args(["demo"]).func.__module__ == "attnctl.cli_demo"
    assert parser.parse_args(["bench"]).func.__module__ == "attnctl.benchmarks.cli"
