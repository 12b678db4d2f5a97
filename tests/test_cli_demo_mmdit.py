"""`attnctl demo --offline-arch flux / sd3`: word heat maps (and Flux's ConceptAttention
maps) from a tiny offline MM-DiT pipeline."""
import json

import pytest
from safetensors import safe_open

from attnctl import TraceMaps
from attnctl.cli import main

SMALL = ["--steps", "1", "--height", "32", "--width", "48", "--prompt", "a cat on a red car"]
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("arch", ["flux", "sd3"])
def test_demo_writes_word_heat_maps(tmp_path, capsys, arch):
    out = tmp_path / arch
    compare = [] if arch == "flux" else ["--no-compare"]
    assert main(["demo", "--offline-arch", arch, "--out", str(out), *SMALL, *compare]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["image_size"] == [32, 48] and summary["grid"] == [8, 12]  # VAE 2 x (pack / patch) 2
    assert list(summary["words"]) == ["a", "cat", "on", "red", "car"]
    assert len(summary["layers"]) == 2  # Flux: one double + one single block; SD3: two joint blocks
    variants = [row["variant"] for row in summary["comparison"]]
    assert variants[-1].startswith("attnctl.trace") and len(variants) == (2 if arch == "flux" else 1)
    files = summary["files"]
    for path in [files["image"], files["grid"], *files["heatmaps"]]:
        assert open(path, "rb").read(8) == PNG
    cat = TraceMaps.load(files["trace"]).heat_map(0).word("cat").value
    assert tuple(cat.shape) == (8, 12) and float(cat.max()) == pytest.approx(summary["words"]["cat"]["max"])
    if arch == "flux":
        concepts = summary["concept_attention"]
        assert list(concepts["concepts"]) == ["a", "cat", "on", "red", "car"] and concepts["layers"] == [0]
        assert open(files["concepts"], "rb").read(8) == PNG
        with safe_open(files["concept_maps"], "pt") as f:
            assert tuple(f.get_tensor("maps").shape) == (1, 5, 8, 12)
    else:
        assert "concept_attention" not in summary


def test_demo_flux_concepts_and_bad_words(tmp_path):
    out = tmp_path / "flux"
    assert main(["demo", "--offline-arch", "flux", "--out", str(out), "--no-compare", "--words", "car",
                 "--concepts", "car", "sky", *SMALL]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert list(summary["words"]) == ["car"] and list(summary["concept_attention"]["concepts"]) == ["car", "sky"]
    with pytest.raises(SystemExit, match="--words: word: 'zebra' is not in the prompt"):
        main(["demo", "--offline-arch", "sd3", "--out", str(tmp_path / "sd3"), "--no-compare", "--words", "zebra",
              *SMALL])


def test_readme_flux_example(tmp_path):
    """The README's three lines (install + trace + heat map) on a Flux pipeline."""
    import attnctl
    from attnctl.diffusers.offline_mmdit import tiny_flux_pipeline

    pipe = tiny_flux_pipeline()
    with attnctl.trace(pipe) as tc:
        image = pipe("a cat sitting on a red car", num_inference_steps=1, height=32, width=32,
                     max_sequence_length=16).images[0]
    tc.word_heat_map("cat").plot(image, str(tmp_path / "cat.png"))
    assert open(tmp_path / "cat.png", "rb").read(8) == PNG
    assert tuple(tc.word_heat_map("cat").value.shape) == (8, 8)
