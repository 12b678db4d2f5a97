"""Joint-attention (MM-DiT) benchmark rows: Flux and SD3.5-large shapes, and ConceptAttention
original-style against fused, run on the CPU smoke configuration."""
import json
from pathlib import Path

import pytest

from attnctl.benchmarks.contenders import CONTENDERS
from attnctl.benchmarks.shapes import catalog, smoke_catalog
from test_benchmarks import _parse

CONFIGS = Path(__file__).resolve().parents[1] / ".." / "shared" / "configs"


@pytest.mark.parametrize("model, config, batch, text", [("flux-1024", "flux1_dev", 1, 512),
                                                         ("sd35l-1024", "sd35_large", 2, 333)])
def test_joint_shapes_follow_the_published_configs(model, config, batch, text):
    (shape,) = catalog(kinds=("joint",), models=[model])
    path = CONFIGS / f"{config}_transformer.json"
    if not path.exists():
        pytest.skip(f"published config {path} not present")
    cfg = json.loads(path.read_text())
    image = (1024 // 16) ** 2  # VAE 8 x (Flux's 2x2 packing / SD3's patch 2)
    assert (shape.B, shape.H, shape.D) == (batch, cfg["num_attention_heads"], cfg["attention_head_dim"])
    assert shape.M == shape.N == image + text and shape.image_tokens == image
    assert not catalog(kinds=("cross", "self"), models=[model])


def test_concept_contenders_run_on_joint_shapes_only(tmp_path):
    out = tmp_path / "r.json"
    args = _parse(["--json", str(out), "--contender", "sdpa", "--contender", "concept-original",
                   "--contender", "triton+concept"])
    assert args.func(args) == 0
    rows = json.loads(out.read_text())["rows"]
    joint = [s.name for s in smoke_catalog() if s.kind == "joint"]
    assert joint and all(r["status"] == "ok" for r in rows), [r["status"] for r in rows]
    concept_rows = {(r["shape"], r["contender"]) for r in rows if r["contender"] != "sdpa"}
    assert concept_rows == {(s, c) for s in joint for c in ("concept-original", "triton+concept")}
    assert all(CONTENDERS[c].captures for c in ("concept-original", "triton+concept"))


def test_concept_contenders_compute_the_same_maps():
    """The fused contender's maps (softmax over concepts of one block) against the
    original-style contender's scores, within 4x the fp32 original-style run's own error."""
    import torch

    from attnctl.benchmarks.contenders import Inputs
    from control_reference import assert_within_reference_error

    (shape,) = [s for s in smoke_catalog() if s.kind == "joint"]
    x = Inputs.make(shape, torch.float32, "cpu")
    x64 = Inputs(x.q.double(), x.k.double(), x.v.double(), shape)
    single, exact = (CONTENDERS["concept-original"].build(i)()[0].softmax(dim=1) for i in (x, x64))
    fused = CONTENDERS["triton+concept"].build(x)()
    assert_within_reference_error(fused, single, exact)
