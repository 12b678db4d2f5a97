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


def test_demo_rejects_bad_input_before_generating(tmp_path, monkeypatch):
    from diffusers import StableDiffusionPipeline

    def generate(*args, **kwargs):
        raise AssertionError("the demo generated before checking its input")

    with monkeypatch.context() as m:
        m.setattr(StableDiffusionPipeline, "__call__", generate)
        with pytest.raises(SystemExit, match="--words: word: 'zebra' is not in the prompt"):
            main(["demo", "--out", str(tmp_path), "--words", "zebra", *SMALL])
        # The tiny UNet at 32 x 32: DAAM's rule keeps no layer; the message names the sizes that do.
        with pytest.raises(SystemExit, match=r"--height/--width: DAAM's layer rule keeps no cross-attention layer "
                                             r"at 32x32 pixels .*square sizes that keep one: 12, 40-48, 68 and "
                                             r"above \(multiples of 4 px\); .*--layers '\*'"):
            main(["demo", "--out", str(tmp_path), "--steps", "1", "--height", "32", "--width", "32"])
    with pytest.raises(SystemExit, match=r"--model: expected a local diffusers model directory or a Hugging Face "
                                         r"hub id \(org/name\) that is cached or reachable; got '.*missing', which "
                                         r"is neither a local directory nor a hub id that resolves \(.*\)"):
        main(["demo", "--model", str(tmp_path / "missing")])


def test_demo_layers_option_traces_every_layer_where_daam_keeps_none(tmp_path):
    out = tmp_path / "out"
    assert main(["demo", "--out", str(out), "--steps", "1", "--height", "32", "--width", "32", "--no-compare",
                 "--words", "cat", "--layers", "*"]) == 0
    layers = [layer["name"] for layer in json.loads((out / "summary.json").read_text())["layers"]]
    assert "mid_block.attentions.0.transformer_blocks.0.attn2" in layers and len(layers) == 4


def test_cli_registers_demo_and_bench():
    parser = build_parser()
    assert parser.parse_args(["demo"]).func.__module__ == "attnctl.cli_demo"
    assert parser.parse_args(["bench"]).func.__module__ == "attnctl.benchmarks.cli"
