"""Dataset-scale jobs (attnctl.jobs): ``attnctl maps``, ``hrv --prompts FILE`` and ``edit``
under ``accelerate launch`` with two CPU processes equal one process file for file; a
killed job resumes; bad input fails before anything is written.

Two processes on a CPU: ``accelerate launch --cpu --num_processes 2`` starts one process
unless an MPI hostfile is given (accelerate 1.x), so the tests use accelerate's torchrun
launcher (``--multi_gpu``), with no GPU visible: PartialState then joins a gloo CPU group.
Every process runs with one thread, as the one-process run does: CPU matmuls of other
thread counts sum in another order, and the comparison is bit for bit.
"""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("accelerate")

from attnctl.cli import main  # noqa: E402

SMALL = ["--steps", "2", "--height", "32", "--width", "48", "--no-progress"]
PROMPTS = ['{"prompt": "a cat on a red car"}',
           '{"prompt": "a blue dog", "seed": 11}',
           '{"prompt": "a bird in a tree", "words": ["bird", "tree"]}']


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", TRITON_INTERPRET="1")
    env.pop("ACCELERATE_CONFIG_FILE", None)
    return env


def _command(args, processes: int):
    from attnctl.benchmarks.jobs import launch_command

    return launch_command(processes, args)


def run_cli(args, processes: int = 1):
    result = subprocess.run(_command(args, processes), env=_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    from attnctl.diffusers.offline import tiny_sd_pipeline

    path = tmp_path_factory.mktemp("model") / "tiny-sd"
    tiny_sd_pipeline().save_pretrained(str(path))
    return str(path)


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "prompts.jsonl"
    path.write_text("\n".join(PROMPTS) + "\n")
    return str(path)


def _outputs(root: Path):
    """Every output file but the per-process parts and the timings."""
    return sorted(str(p.relative_to(root)) for p in root.rglob("*")
                  if p.is_file() and p.parts[len(root.parts)] != "parts" and p.name != "summary.json")


def assert_same_outputs(a: Path, b: Path):
    """Same files; safetensors with equal tensors and metadata (safetensors writes metadata
    keys in hash order, so bytes may differ), every other file byte for byte."""
    from safetensors import safe_open

    assert _outputs(a) == _outputs(b)
    for name in _outputs(a):
        if name.endswith(".safetensors"):
            with safe_open(str(a / name), "pt") as fa, safe_open(str(b / name), "pt") as fb:
                assert fa.metadata() == fb.metadata(), name
                assert sorted(fa.keys()) == sorted(fb.keys()), name
                for key in fa.keys():
                    assert torch.equal(fa.get_tensor(key), fb.get_tensor(key)), (name, key)
        else:
            assert (a / name).read_bytes() == (b / name).read_bytes(), name


@pytest.fixture(scope="module")
def one_process_maps(model, prompts, tmp_path_factory):
    out = tmp_path_factory.mktemp("maps") / "one"
    run_cli(["maps", "--prompts", prompts, "--model", model, "--out", str(out), "--batch-size", "2",
             "--per-head", "--overlays", *SMALL])
    return out


def test_maps_on_two_processes_equal_one_process_file_for_file(model, prompts, one_process_maps, tmp_path):
    from safetensors.torch import load_file

    from attnctl import TraceMaps

    out = tmp_path / "two"
    printed = run_cli(["maps", "--prompts", prompts, "--model", model, "--out", str(out), "--batch-size", "2",
                       "--per-head", "--overlays", *SMALL], processes=2)
    assert "on 2 process(es): 3 images" in printed
    assert sorted(p.name for p in (out / "parts").glob("rank-*.jsonl")) == ["rank-00000.jsonl", "rank-00001.jsonl"]
    assert_same_outputs(one_process_maps, out)
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["processes"], summary["images_generated"], summary["batches"]) == (2, 3, 2)
    assert summary["images_per_second"] > 0

    records = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert [r["index"] for r in records] == [0, 1, 2] and [r["seed"] for r in records] == [0, 11, 2]
    assert records[0]["words"] == ["a", "cat", "on", "red", "car"] and records[2]["words"] == ["bird", "tree"]
    # The word maps are the trace's heat maps: reload the batch trace and recompute one.
    record = records[2]
    maps = load_file(str(out / record["files"]["maps"]))
    trace = TraceMaps.load(str(out / record["files"]["trace"]))
    expected = trace.heat_map(record["trace_image"], size=record["map_size"]).word("tree").value
    assert torch.equal(maps[record["word_keys"][1]], expected)
    assert set(record["token_mass_keys"]) == {layer.name for layer in trace.layers}
    for layer, key in record["token_mass_keys"].items():
        assert torch.equal(maps[key], trace.token_mass(record["trace_image"])[layer])
    assert all(open(out / f, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
               for r in records for f in [r["files"]["image"], *r["files"]["overlays"]])


def test_a_killed_job_resumes_and_redoes_only_what_was_not_committed(model, prompts, one_process_maps, tmp_path):
    out = tmp_path / "killed"
    args = ["maps", "--prompts", prompts, "--model", model, "--out", str(out), "--batch-size", "2",
            "--per-head", "--overlays", *SMALL]
    process = subprocess.Popen(_command(args, 1), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)
    part = out / "parts" / "rank-00000.jsonl"
    deadline = time.monotonic() + 300
    while not (part.exists() and part.read_text().count("\n") >= 1) and process.poll() is None:
        assert time.monotonic() < deadline, "the job committed no batch in 300 s"
        time.sleep(0.01)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert part.read_text().count("\n") == 1, "the kill came after the last batch"
    assert not (out / "manifest.jsonl").exists()
    with open(part, "a") as f:            # as if killed while writing the next commit
        f.write('{"batch": 1, "files": ["maps/b0000')
    (out / "images" / ".000002.png.r1.tmp.png").write_bytes(b"half an image")   # and another file
    printed = run_cli(args, processes=2)
    assert "(1 already done) on 2 process(es): 1 images" in printed
    lines = [json.loads(line) for part in (out / "parts").glob("rank-*.jsonl")
             for line in part.read_text().splitlines() if line.endswith("}")]
    assert sorted(line["batch"] for line in lines) == [0, 1]   # nothing done twice
    assert_same_outputs(one_process_maps, out)


def test_hrv_on_two_processes_equals_build_hrv_exactly(model, tmp_path):
    from attnctl.jobs.common import load_pipeline
    from attnctl.tools.hrv import HeadRelevance, build_hrv

    prompts = ["a cat on a red car", "a blue dog", "a red bird in a tree"]
    path = tmp_path / "prompts.txt"
    path.write_text("\n".join(prompts) + "\n")
    out = tmp_path / "hrv"
    run_cli(["hrv", "--prompts", str(path), "--model", model, "--out", str(out), "--concepts", "cat", "dog", "red",
             "--batch-size", "1", "--seed", "5", *SMALL], processes=2)
    job = HeadRelevance.load(str(out / "hrv.safetensors"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        pipe = load_pipeline(model, "cpu", torch.float32)
        single = build_hrv(pipe, ["cat", "dog", "red"], prompts, steps=2, height=32, width=48, batch_size=1,
                           seed=5, model_id=model)
    finally:
        torch.set_num_threads(threads)
    assert job.layers == single.layers and job.concepts == single.concepts
    assert torch.equal(job.counts, single.counts) and torch.equal(job.hrv, single.hrv)
    assert job.counts.sum() == 3 * 2 * single.num_heads  # one vote per image, step and head


def test_edit_on_two_processes_equals_p2p_edit(model, tmp_path):
    import numpy as np
    from PIL import Image

    from attnctl.jobs.common import load_pipeline
    from attnctl.p2p import Refine, Replace, edit

    path = tmp_path / "pairs.txt"
    path.write_text("a cat on a car | a dog on a car\na cat | a red cat\n")
    out = tmp_path / "edit"
    run_cli(["edit", "--pairs", str(path), "--model", model, "--out", str(out), "--batch-size", "1", *SMALL],
            processes=2)
    records = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert [r["edit"] for r in records] == ["replace", "refine"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        pipe = load_pipeline(model, "cpu", torch.float32)
        for record, controller in zip(records, (Replace(), Refine())):
            # The original's init latent: one (1, C, h, w) draw, shared by source and target.
            latent = torch.randn((1, 4, 16, 24), generator=torch.Generator().manual_seed(record["seed"]))
            images = edit(pipe, record["source"], [record["target"]], controller, num_inference_steps=2,
                          latents=latent.expand(2, -1, -1, -1), height=32, width=48).images
            for role, image in zip(("source", "target"), images):
                saved = np.array(Image.open(out / record["files"][role]))
                assert np.array_equal(saved, np.array(image)), (record["index"], role)
    finally:
        torch.set_num_threads(threads)


def test_bad_input_fails_clearly_before_anything_is_written(model, prompts, one_process_maps, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    with pytest.raises(SystemExit, match=r"--prompts: .*empty.txt holds no prompt"):
        main(["maps", "--prompts", str(empty), "--model", model, "--out", str(tmp_path / "o1")])
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a cat"}\n\n{"prompt": "a dog",}\n')
    with pytest.raises(SystemExit, match=r"bad.jsonl line 3: malformed JSON"):
        main(["maps", "--prompts", str(bad), "--model", model, "--out", str(tmp_path / "o2")])
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text('{"source": "a cat", "target": "a dog", "edit": "swap"}\n')
    with pytest.raises(SystemExit, match=r"pairs.jsonl line 1: expected 'edit' among"):
        main(["edit", "--pairs", str(pairs), "--model", model, "--out", str(tmp_path / "o3")])
    pairs.write_text("a cat | a dog\na cat to a dog\n")
    pairs = pairs.rename(tmp_path / "pairs.txt")
    with pytest.raises(SystemExit, match=r"pairs.txt line 2: expected 'source prompt \| target prompt'"):
        main(["edit", "--pairs", str(pairs), "--model", model, "--out", str(tmp_path / "o3")])
    with pytest.raises(SystemExit, match=r"attnctl hrv: --prompts: expected a prompt file .* \(no such file\)"):
        main(["hrv", "--prompts", str(tmp_path / "typo.txt"), "--model", model, "--out", str(tmp_path / "o3")])
    assert not any((tmp_path / name).exists() for name in ("o1", "o2", "o3"))

    # Another job's directory: the maps job with another step count, and a foreign manifest.
    before = {p: p.read_bytes() for p in one_process_maps.rglob("*") if p.is_file()}
    with pytest.raises(SystemExit, match=r"holds the manifest of another job \(steps: held 2, asked 3\)"):
        main(["maps", "--prompts", prompts, "--model", model, "--out", str(one_process_maps), "--batch-size", "2",
              "--per-head", "--overlays", *SMALL, "--steps", "3"])
    swap = tmp_path / "swap.txt"
    swap.write_text("a cat | a dog\n")
    another = r"holds the manifest of another job \(an 'attnctl maps' job; this is 'attnctl edit'\)"
    with pytest.raises(SystemExit, match=another):
        main(["edit", "--pairs", str(swap), "--model", model, "--out", str(one_process_maps)])
    assert {p: p.read_bytes() for p in one_process_maps.rglob("*") if p.is_file()} == before
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "manifest.jsonl").write_text('{"something": "else"}\n')
    with pytest.raises(SystemExit, match=r"holds a manifest.jsonl but no job.json"):
        main(["maps", "--prompts", prompts, "--model", model, "--out", str(foreign), *SMALL])
    assert [p.name for p in foreign.iterdir()] == ["manifest.jsonl"]

    # A word that is not in its prompt: named with its line, before any generation.
    words = tmp_path / "words.jsonl"
    words.write_text('{"prompt": "a cat"}\n{"prompt": "a dog", "words": ["zebra"]}\n')
    with pytest.raises(SystemExit, match=r"words.jsonl line 2: word: 'zebra' is not in the prompt"):
        main(["maps", "--prompts", str(words), "--model", model, "--out", str(tmp_path / "o4"), *SMALL])
    assert not (tmp_path / "o4").exists()


def test_without_accelerate_a_job_runs_as_one_process(monkeypatch):
    from attnctl.jobs.ranks import Ranks

    monkeypatch.setitem(sys.modules, "accelerate", None)
    ranks = Ranks()
    assert (ranks.rank, ranks.world, ranks.main) == (0, 1, True)
    assert "accelerate is not installed" in ranks.reason
    assert ranks.share([3, 4, 5]) == [3, 4, 5]


def test_throughput_benchmark_runs_every_contender_on_the_tiny_model():
    from attnctl.benchmarks.jobs import CONTENDERS, run_throughput

    rows = run_throughput("tiny", batch=1, steps=1, repeats=1, dtype=torch.float32, device="cpu", side=48)
    assert [row["contender"] for row in rows] == list(CONTENDERS)
    assert all(row["images_per_s"] > 0 and row["batch"] == 1 for row in rows)
    assert rows[0]["x_diffusers_time"] == 1.0


def test_maps_on_flux_keys_words_by_t5_tokens_and_keeps_no_token_mass(tmp_path):
    from safetensors.torch import load_file

    from attnctl import TraceMaps
    from attnctl.diffusers.offline_mmdit import tiny_flux_pipeline

    pipe = tiny_flux_pipeline()
    pipe.vae.register_to_config(shift_factor=0.0)   # the tiny VAE has none; Flux's decode adds it
    pipe.save_pretrained(str(tmp_path / "flux"))
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "a cat on a red car", "words": ["red", "car"]}\n')
    out = tmp_path / "out"
    assert main(["maps", "--prompts", str(prompts), "--model", str(tmp_path / "flux"), "--out", str(out),
                 "--steps", "1", "--height", "32", "--width", "32", "--per-head", "--no-progress"]) == 0
    record = json.loads((out / "manifest.jsonl").read_text())
    assert record["map_size"] == "latent" and record["token_mass_keys"] == {}
    maps = load_file(str(out / record["files"]["maps"]))
    trace = TraceMaps.load(str(out / record["files"]["trace"]))
    assert trace.joint
    assert torch.equal(maps[record["word_keys"][1]], trace.heat_map(0).word("car").value)


HUB_SCRIPT = """
import json, sys
from attnctl.cli import main

def outcome(argv):
    try:
        return main(argv)
    except SystemExit as exc:
        return str(exc.code)

prompts, out = sys.argv[1], sys.argv[2]
small = ["--steps", "1", "--height", "40", "--width", "40"]
print(json.dumps({
    "maps": outcome(["maps", "--model", "attnctl/tiny-sd", "--prompts", prompts, "--out", out + "/maps",
                     "--no-progress", *small]),
    "demo": outcome(["demo", "--model", "attnctl/tiny-sd", "--out", out + "/demo", "--no-compare", *small]),
    "hrv": outcome(["hrv", "--model", "attnctl/tiny-sd", "--out", out + "/hrv", "--prompts", "a cat", *small]),
    "unknown": {command: outcome([command, "--model", "attnctl/no-such-model", "--out", out + "/u-" + command,
                                  *({"maps": ["--prompts", prompts], "hrv": ["--prompts", prompts],
                                     "edit": ["--pairs", sys.argv[3]]}[command])])
                for command in ("maps", "hrv", "edit")},
}))
"""


def test_model_takes_a_cached_hub_id_and_names_an_id_that_resolves_nowhere(model, tmp_path):
    """A hub id in the Hugging Face cache (its layout: models--org--name/snapshots/REV,
    refs/main) loads offline; an id neither local nor cached fails naming --model."""
    import shutil

    revision = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hf" / "hub" / "models--attnctl--tiny-sd"
    shutil.copytree(model, repo / "snapshots" / revision)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat on a red car\n")
    pairs = tmp_path / "pairs.txt"
    pairs.write_text("a cat | a dog\n")
    out = tmp_path / "out"
    env = dict(_env(), HF_HOME=str(tmp_path / "hf"), HF_HUB_OFFLINE="1")
    env.pop("HF_HUB_CACHE", None)
    env.pop("HUGGINGFACE_HUB_CACHE", None)
    result = subprocess.run([sys.executable, "-c", HUB_SCRIPT, str(prompts), str(out), str(pairs)], env=env,
                            capture_output=True, text=True, timeout=600, cwd=str(Path(__file__).parents[1]))
    assert result.returncode == 0, result.stderr[-3000:]
    outcome = json.loads(result.stdout.strip().splitlines()[-1])
    assert (outcome["maps"], outcome["demo"], outcome["hrv"]) == (0, 0, 0)
    assert json.loads((out / "maps" / "job.json").read_text())["model"] == "attnctl/tiny-sd"
    assert (out / "maps" / "manifest.jsonl").is_file() and (out / "demo" / "image.png").is_file()
    assert json.loads((out / "hrv" / "hrv.json").read_text())["model_id"] == "attnctl/tiny-sd"
    for command, message in outcome["unknown"].items():
        assert message == (f"attnctl {command}: --model: expected a local diffusers model directory or a Hugging "
                           "Face hub id (org/name) that is cached or reachable; got 'attnctl/no-such-model', which "
                           "is neither a local directory nor a hub id that resolves (HF_HUB_OFFLINE is set and the "
                           "id is not in the cache)")
        assert not (out / f"u-{command}").exists()


def test_maps_checks_words_size_and_out_before_the_model_loads_or_job_json_is_written(model, tmp_path,
                                                                                       monkeypatch):
    import attnctl.jobs.maps as maps_job

    loaded = []
    load = maps_job.load_pipeline
    monkeypatch.setattr(maps_job, "load_pipeline", lambda *a, **k: loaded.append(1) or load(*a, **k))
    words = tmp_path / "words.jsonl"
    words.write_text('{"prompt": "a dog", "words": ["zebra"]}\n')
    with pytest.raises(SystemExit, match=r"words.jsonl line 1: word: 'zebra' is not in the prompt"):
        main(["maps", "--prompts", str(words), "--model", model, "--out", str(tmp_path / "o1"), *SMALL])
    locked = tmp_path / "locked"
    locked.write_text("a file where --out's parent should be")
    with pytest.raises(SystemExit, match=r"--out: cannot create .*locked/o2: .*locked is not a writable directory"):
        main(["maps", "--prompts", str(words), "--model", model, "--out", str(locked / "o2"), *SMALL])
    assert loaded == [] and not (tmp_path / "o1").exists()

    # The tiny model at its own size (32 x 32): DAAM's rule keeps no layer. Said after the
    # model loads (the sizes follow from its UNet) but before job.json and any generation.
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat on a red car\n")
    out = tmp_path / "o3"
    with pytest.raises(SystemExit, match=r"attnctl maps: --height/--width: DAAM's layer rule keeps no cross-attention "
                                         r"layer at 32x32 pixels .*square sizes that keep one: 12, 40-48, 68 and "
                                         r"above \(multiples of 4 px\); choose such a size, or --layers '\*'"):
        main(["maps", "--prompts", str(prompts), "--model", model, "--out", str(out), "--steps", "1", "--no-progress"])
    assert not out.exists()
    assert main(["maps", "--prompts", str(prompts), "--model", model, "--out", str(out), "--steps", "1",
                 "--no-progress", "--layers", "*"]) == 0
    assert json.loads((out / "job.json").read_text())["layers"] == ["*"]


def test_a_first_run_that_committed_nothing_does_not_refuse_the_corrected_rerun(model, tmp_path, monkeypatch):
    import attnctl.jobs.maps as maps_job

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\n")
    out = tmp_path / "out"
    with monkeypatch.context() as m:
        m.setattr(maps_job.MapsWork, "run", lambda *a: (_ for _ in ()).throw(RuntimeError("out of memory")))
        with pytest.raises(RuntimeError, match="out of memory"):
            main(["maps", "--prompts", str(prompts), "--model", model, "--out", str(out), *SMALL])
    assert (out / "job.json").is_file()
    assert main(["maps", "--prompts", str(prompts), "--model", model, "--out", str(out), *SMALL,
                 "--steps", "1"]) == 0
    assert json.loads((out / "job.json").read_text())["steps"] == 1
    # With a batch committed the directory is that job's: another job is refused.
    with pytest.raises(SystemExit, match=r"holds the manifest of another job \(steps: held 1, asked 2\)"):
        main(["maps", "--prompts", str(prompts), "--model", model, "--out", str(out), *SMALL])


def test_ctrl_c_stops_a_job_with_one_line_and_the_rerun_resumes(model, tmp_path, monkeypatch, capsys):
    import attnctl.jobs.maps as maps_job

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\na dog\n")
    out = tmp_path / "out"
    args = ["maps", "--prompts", str(prompts), "--model", model, "--out", str(out), "--batch-size", "1", *SMALL]
    run = maps_job.MapsWork.run
    batches = []

    def interrupted_second(self, batch, *rest):
        batches.append(batch)
        if batch == 1:
            raise KeyboardInterrupt
        return run(self, batch, *rest)

    with monkeypatch.context() as m:
        m.setattr(maps_job.MapsWork, "run", interrupted_second)
        with pytest.raises(SystemExit) as stopped:
            main(args)
    assert stopped.value.code == 130
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"[attnctl maps] interrupted: 1 of 2 batches are committed in {out}; rerun the same command to resume")
    assert main(args) == 0
    assert "(1 already done)" in capsys.readouterr().out
    assert len((out / "manifest.jsonl").read_text().splitlines()) == 2
