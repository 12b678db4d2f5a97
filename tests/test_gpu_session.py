"""The device script (bench/gpu_session.sh) cannot rot unseen: its CPU dry run runs end to end
here, and the parts that keep a cut-short device call useful are checked on their own: hard
caps that shrink to the time left, a step stopped at its deadline, logs cut at their size
limit, at most 8 files in the folder."""
import importlib.util
import json
import os
import re
import subprocess
import sys
import time

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "bench", "gpu_session.sh")
RETURNABLE_NAME = re.compile(r"^[A-Za-z0-9._-]+$")   # what the device tool brings back


def _load_driver():
    spec = importlib.util.spec_from_file_location("gpu_session", os.path.join(ROOT, "bench", "gpu_session.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module   # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


gs = _load_driver()


def _dry_run(out, *args):
    env = dict(os.environ, PYTHON=sys.executable)
    env.pop("OUT", None)
    proc = subprocess.run(["bash", SCRIPT, "--dry-run", "--out", str(out), *args], capture_output=True,
                          text=True, env=env, timeout=900)
    summary = (out / "summary.txt").read_text()
    steps = {}
    for line in summary.splitlines():
        m = re.match(r"^(\S+)\s+(passed|failed|timeout|skipped \([^)]*\))\s+rc=", line)
        if m:
            steps[m.group(1)] = (m.group(2), line)
    # Only where bench/fetch_gpu_wheels.sh has filled .whl/ (the dry run then tries their install).
    assert steps.pop("wheels", ("passed",))[0] == "passed", summary
    return proc, summary, steps


def _check_returnable(out):
    names = os.listdir(out)
    assert len(names) <= gs.MAX_FILES, names
    for name in names:
        assert os.path.isfile(out / name) and RETURNABLE_NAME.match(name), name


def _check_results(out, prefix, keys):
    (path,) = out.glob(f"{prefix}-cpu-dryrun-*.json")
    result = json.loads(path.read_text())
    assert result["complete"] is True and result["environment"]["device"] == "cpu"
    records = [r for key in keys for r in result[key]]
    assert records and all(r["status"] == "ok" for r in records), records


def test_dry_run_runs_every_step_that_needs_no_gpu(tmp_path):
    out = tmp_path / "out"
    proc, summary, steps = _dry_run(out, "--budget", "400")
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert proc.stdout.endswith(summary)            # the table comes last
    no_gpu = "skipped (no GPU: dry run)"
    assert {name: status for name, (status, _) in steps.items()} == {
        "install": "passed", "versions": "passed", "cuda-build": no_gpu, "triton-tests": "passed",
        "cuda-tests": no_gpu, "diagnose": "passed", "bench-fp16": "passed", "sd15": "passed",
        "other-tests": "passed", "bench-bf16": "passed", "sanitizer": no_gpu}, summary
    triton = steps["triton-tests"][1]
    assert int(re.search(r"passed=(\d+)", triton).group(1)) > 0 and "failed=0" in triton, triton
    assert "result: all steps that ran passed" in summary
    versions = json.loads(re.search(r"^versions: (.*)$", summary, re.M).group(1))
    assert versions["attnctl.kernels"].startswith(os.path.join(ROOT, "kernels"))
    _check_returnable(out)
    _check_results(out, "kernels-fp16", ["rows"])
    _check_results(out, "kernels-bf16", ["rows"])
    _check_results(out, "sd15", ["e2e", "p2p"])
    _check_results(out, "diagnose", ["rows", "sweep"])
    log = (out / gs.SESSION_LOG).read_text()
    for step in ("install", "versions", "triton-tests", "diagnose", "bench-fp16", "sd15", "other-tests", "bench-bf16"):
        assert f"==== {step}: " in log, step


def test_sdxl_dry_run(tmp_path):
    out = tmp_path / "out"
    proc, summary, steps = _dry_run(out, "--sdxl", "--budget", "200")
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert {name: status for name, (status, _) in steps.items()} == {
        "install": "passed", "versions": "passed", "sdxl-p2p": "passed", "sdxl-e2e": "passed"}, summary
    _check_returnable(out)
    _check_results(out, "p2p-sdxl", ["p2p"])
    _check_results(out, "e2e-sdxl", ["e2e"])


def test_dit_dry_run(tmp_path):
    out = tmp_path / "out"
    proc, summary, steps = _dry_run(out, "--dit", "--budget", "200")
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert {name: status for name, (status, _) in steps.items()} == {
        "install": "passed", "versions": "passed", "dit-kernels": "passed", "dit-e2e": "passed"}, summary
    _check_returnable(out)
    _check_results(out, "kernels-dit", ["rows"])
    _check_results(out, "e2e-dit", ["e2e"])
    (path,) = out.glob("e2e-dit-cpu-dryrun-*.json")   # every transformer's loop, by its CPU stand-in
    models = {r["model"] for r in json.loads(path.read_text())["e2e"]}
    assert models == {"flux-tiny", "sd3-tiny", "pixart-tiny", "wan-tiny"}, models


def _session(tmp_path, budget):
    args = gs.argparse.Namespace(out=str(tmp_path / "out"), dry_run=True, budget=budget, cuda_archs="90a",
                                 gpu_steps_skipped="no GPU: dry run")
    return gs.Session(args, "20260101T000000Z")


def test_a_step_is_stopped_at_its_cap_and_what_it_printed_is_kept(tmp_path):
    s = _session(tmp_path, budget=60)
    # Ignores SIGINT, so the stop must escalate to SIGKILL.
    slow = "import signal, time; signal.signal(signal.SIGINT, signal.SIG_IGN); print('started', flush=True); time.sleep(60)"
    t0 = time.monotonic()
    outcome = s.run("stuck", [sys.executable, "-c", slow], step_cap=2)
    assert time.monotonic() - t0 < 2 + gs.INTERRUPT_GRACE_S + 5
    assert outcome.status == "timeout"
    assert "started" in (tmp_path / "out" / gs.SESSION_LOG).read_text()


def test_caps_shrink_to_the_time_left_and_late_steps_are_skipped(tmp_path):
    s = _session(tmp_path, budget=gs.RESERVE_S + gs.MIN_STEP_S + 5)
    assert s.cap(1000) <= gs.MIN_STEP_S + 5
    s.deadline = time.monotonic() + gs.RESERVE_S + gs.MIN_STEP_S - 1
    assert s.run("late", [sys.executable, "-c", "pass"], step_cap=100) is None
    assert s.outcomes[-1].status == "skipped (no time left)"


def test_failed_step_is_reported_with_its_exit_code(tmp_path):
    s = _session(tmp_path, budget=60)
    outcome = s.run("fails", [sys.executable, "-c", "raise SystemExit(3)"], step_cap=30)
    assert (outcome.status, outcome.rc) == ("failed", 3)
    assert "result: FAILED: fails" in s.write_summary()


def test_a_log_is_cut_at_its_limit_and_still_ends_with_the_steps_last_lines(tmp_path, monkeypatch):
    monkeypatch.setattr(gs, "MAX_LOG_BYTES", 2000)
    s = _session(tmp_path, budget=60)
    s.run("chatty", [sys.executable, "-c", "for i in range(1000): print('line', i)"], step_cap=30)
    text = (tmp_path / "out" / gs.SESSION_LOG).read_text()
    assert len(text) < 3000
    assert "[log cut here" in text and text.rstrip().endswith("line 999")


def test_unexpected_files_are_bundled_so_that_at_most_eight_come_back(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    expected = {f"keep{i}.txt" for i in range(7)}
    for name in expected | {f"stray{i}.log" for i in range(5)}:
        (out / name).write_text(name)
    (out / "nested").mkdir()
    (out / "nested" / "deep.txt").write_text("deep")
    moved = gs.bundle_unexpected(str(out), expected)
    assert moved == ["nested"] + [f"stray{i}.log" for i in range(5)]
    assert set(os.listdir(out)) == expected | {gs.EXTRAS}
    _check_returnable(out)


def test_junit_counts(tmp_path):
    path = tmp_path / "j.xml"
    path.write_text('<testsuites><testsuite tests="7" failures="1" errors="1" skipped="2"/></testsuites>')
    assert gs.junit_counts(str(path)) == {"passed": 3, "failed": 2, "skipped": 2}
    assert gs.junit_counts(str(tmp_path / "missing.xml")) == {}


def test_out_folder_must_be_empty(tmp_path, capsys):
    (tmp_path / "old.json").write_text("{}")
    with pytest.raises(SystemExit):
        gs.main(["--dry-run", "--out", str(tmp_path)])
    assert "--out: expected an empty or new folder" in capsys.readouterr().err


@pytest.mark.parametrize("build_ok", [True, False])
def test_gpu_plan_order_and_the_built_module_installed_after_the_triton_tests(tmp_path, monkeypatch, build_ok):
    """The GPU plan without a GPU: steps stubbed, the background build a stand-in process."""
    monkeypatch.setattr(gs, "ROOT", str(tmp_path))
    (tmp_path / "attnctl").mkdir()
    s = _session(tmp_path, budget=120)
    s.dry_run = False
    lib = str(tmp_path / gs.CUDA_BUILD_DIR / "lib" / "attnctl")
    build = (f"import os; os.makedirs({lib!r}); open(os.path.join({lib!r}, '_attnctl_cuda.so'), 'w').write('built')"
             if build_ok else "raise SystemExit(1)")
    monkeypatch.setattr(gs, "setup", lambda s: s.record(gs.Outcome("versions", "passed", 0)) or True)
    monkeypatch.setattr(gs, "start_cuda_build", lambda s: s.launch("cuda-build", [sys.executable, "-c", build], 30,
                                                                   log=gs.BUILD_LOG))
    calls = {}

    def step(name, *args, extra=None, **kw):
        module = tmp_path / "attnctl" / "_attnctl_cuda.so"
        if name == "triton-tests":   # never a half-written module under the Triton tests
            time.sleep(1)            # (the stand-in build is done by now)
            assert not module.exists()
        if name == "cuda-tests":     # in place before its tests
            assert module.read_text() == "built"
        calls[name] = (args[0], extra or [])   # pytest: (targets, extra); bench: (JSON name, [])
        s.record(gs.Outcome(name, "passed", 0))

    monkeypatch.setattr(s, "pytest", step)
    monkeypatch.setattr(s, "bench", step)
    monkeypatch.setattr(s, "diagnose", lambda cap: step("diagnose", "diagnose.json"))
    gs.gpu_plan(s)
    statuses = [(o.name, o.status) for o in s.outcomes]
    cuda = "passed" if build_ok else "skipped (cuda-build failed)"
    assert statuses == [("versions", "passed"), ("triton-tests", "passed"),
                        ("cuda-build", "passed" if build_ok else "failed"), ("cuda-tests", cuda),
                        ("diagnose", "passed"), ("bench-fp16", "passed"), ("sd15", "passed"), ("bench-bf16", "passed"),
                        ("sanitizer", cuda), ("other-tests", "passed")]
    assert calls["triton-tests"][0] == gs.TRITON_TESTS
    other = calls["other-tests"][0]
    assert other[-2:] == ["-k", "not triton"]
    assert {f"--ignore={m}" for m in gs.TRITON_TESTS + gs.CUDA_TESTS + [gs.THIS_TEST]} <= set(other)
    if build_ok:
        assert calls["cuda-tests"] == (gs.CUDA_TESTS, ["-k", f"not {gs.SANITIZER_SELECTION}"])
        assert calls["sanitizer"][1] == ["-k", gs.SANITIZER_SELECTION]


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is there")
def test_versions_report_a_missing_gpu_as_fatal(tmp_path, capsys):
    path = tmp_path / "v.json"
    assert gs.report_versions(str(path), expect_gpu=True) == gs.VERSIONS_FATAL
    found = json.loads(path.read_text())
    assert found["attnctl.kernels"].startswith(os.path.join(ROOT, "kernels")) and found["device"] == "cpu"
    assert "ERROR: a GPU was expected" in capsys.readouterr().out
    assert gs.report_versions(str(path), expect_gpu=False) == 0
