"""The device script's driver: everything a GPU session checks, in one call that returns
what it learnt even when it is cut short. Run it through bench/gpu_session.sh.

Order (most truth first): set-up and versions -> Triton correctness on the GPU (every op
test module, fp16 and bf16), with the CUDA extension building in the background -> the
CUDA extension's GPU tests -> where a call's time goes (bench/diagnose.py: host, launcher
and kernel time per call, the tile sweep) -> headline kernel benchmark (fp16) -> SD1.5
UNet loop and prompt-to-prompt edit -> with time left: the bf16 kernel benchmark,
compute-sanitizer, the remaining (diffusers-level) tests. ``--dit`` instead runs the MM-DiT
(Flux, SD3.5 large) kernel rows and the transformer loops (those two, PixArt-Σ, Wan 2.1),
a call of its own.
``--sdxl`` instead runs the SDXL 1024² edit and loop, a
call of its own.

Every step runs under a hard cap, the smaller of its own and what is left of the total
budget; its output streams into a log in the output folder as it comes; the benchmarks
rewrite their JSON after every row. The folder never holds more than MAX_FILES files (the
device tool returns at most 8). Without a GPU (or with ``--dry-run``) the same steps run
as a smoke test: Triton under its interpreter, the first test of each module, GPU-only
steps reported as skipped. The summary table comes last on stdout and in summary.txt.

Only the standard library is imported here: the steps run as child processes.
"""
from __future__ import annotations

import argparse
import datetime
import glob
import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import xml.etree.ElementTree as ElementTree
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAX_FILES = 8                   # what a device call brings back
MAX_LOG_BYTES = 12 * 2**20      # a returned file may hold 16 MiB
GPU_BUDGET_S = 530              # a device call may run 600 s; the rest is the machine's margin
DRY_RUN_BUDGET_S = 240
RESERVE_S = 15                  # kept back from every cap: stopping a step, writing the summary
MIN_STEP_S = 10                 # a step that would get less is skipped
INTERRUPT_GRACE_S = 8           # SIGINT first: pytest and the benchmarks then save what they have
BUILD_JOBS = 6                  # nvcc jobs of the background CUDA build; pytest-xdist gets the other cores
WHEEL_SITE = "/tmp/attnctl-site"  # the carried wheels (.whl/) install here on the GPU machine
CUDA_BUILD_DIR = os.path.join("build", "gpu-session")
SESSION_LOG, BUILD_LOG, SUMMARY = "session.log", "build.log", "summary.txt"
PIPELINE_PACKAGES = ("diffusers", "transformers")   # without them only the pipelines' steps fail
PIPELINES_MISSING, VERSIONS_FATAL = 1, 2   # the versions step's exit codes (see report_versions)
EXTRAS = "extras.tar.gz"

# Test modules by step; the rest of tests/ runs as "other-tests".
TRITON_TESTS = ["tests/gpu/test_op_gpu.py"] + sorted(
    os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "tests", "test_op_*.py")))
CUDA_TESTS = ["tests/gpu/test_cuda_gpu.py", "tests/test_cuda_host.py"]
SANITIZER_SELECTION = "compute_sanitizer"
THIS_TEST = "tests/test_gpu_session.py"  # runs this script: never from inside it


@dataclass
class Outcome:
    name: str
    status: str                 # passed | failed | timeout | skipped (<why>)
    rc: Optional[int] = None
    seconds: float = 0.0
    counts: Dict[str, int] = field(default_factory=dict)   # passed / failed / skipped

    def line(self) -> str:
        counts = " ".join(f"{k}={v}" for k, v in self.counts.items()) or "-"
        rc = "-" if self.rc is None else str(self.rc)
        return f"{self.name:<14} {self.status:<28} rc={rc:<4} {self.seconds:6.1f} s  {counts}"


class Log:
    """One file in the output folder, appended to as output arrives, cut at MAX_LOG_BYTES."""

    def __init__(self, path: str):
        self.path = path
        self.size = 0
        self.lock = threading.Lock()
        self.cut = False

    def write(self, text: str) -> None:
        data = text.encode(errors="replace")
        with self.lock:
            if self.size + len(data) > MAX_LOG_BYTES:
                if not self.cut:
                    self.cut = True
                    with open(self.path, "ab") as f:
                        f.write(b"\n[log cut here: it reached its size limit; step tails follow]\n")
                return
            with open(self.path, "ab") as f:
                f.write(data)
            self.size += len(data)

    def append_past_limit(self, lines: List[str]) -> None:
        """A cut log still ends with each step's last lines (a few hundred bytes)."""
        with self.lock, open(self.path, "a") as f:
            f.write("".join(f"{line}\n" for line in lines))


class Running:
    """A step's child process: its output pumped into a log (and a short tail kept)."""

    def __init__(self, name: str, cmd: List[str], env: dict, log: Log, deadline: float):
        self.name, self.log, self.deadline = name, log, deadline
        self.start = time.monotonic()
        self.tail: deque = deque(maxlen=12)
        self.timed_out = False
        log.write(f"\n==== {name}: {' '.join(cmd)}\n")
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True)
        self.pump = threading.Thread(target=self._pump, daemon=True)
        self.pump.start()

    def _pump(self) -> None:
        for raw in iter(self.proc.stdout.readline, b""):
            line = raw.decode(errors="replace")
            self.log.write(line)
            self.tail.append(line.rstrip())

    def wait(self) -> int:
        """Wait until the process ends or its deadline passes (then stop it); its exit code."""
        try:
            self.proc.wait(timeout=max(0.0, self.deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            self.timed_out = True
            self._stop()
        self.pump.join(timeout=5)
        return self.proc.returncode

    def _stop(self) -> None:
        """SIGINT (pytest writes its report, a benchmark has saved its rows), then SIGKILL."""
        for sig, grace in ((signal.SIGINT, INTERRUPT_GRACE_S), (signal.SIGKILL, 5)):
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                return
            try:
                self.proc.wait(timeout=grace)
                return
            except subprocess.TimeoutExpired:
                continue

    @property
    def seconds(self) -> float:
        return time.monotonic() - self.start


class Session:
    def __init__(self, args: argparse.Namespace, stamp: str):
        self.args = args
        self.out = os.path.abspath(args.out)
        os.makedirs(self.out, exist_ok=True)
        self.dry_run = args.dry_run
        self.deadline = time.monotonic() + args.budget
        self.outcomes: List[Outcome] = []
        self.running: List[Running] = []   # stopped on the way out, whatever happened
        self.logs = {name: Log(os.path.join(self.out, name)) for name in (SESSION_LOG, BUILD_LOG)}
        self.results: List[str] = []   # benchmark JSON files written into the folder
        self.versions: dict = {}
        self.stamp = stamp
        self.tag = f"{'cpu-dryrun' if self.dry_run else 'gpu'}-{stamp}"   # names the result files
        self.env = dict(os.environ, PYTHONUNBUFFERED="1")
        if self.dry_run:
            self.env["TRITON_INTERPRET"] = "1"
        else:
            self.env["ATTNCTL_CUDA_ARCHS"] = args.cuda_archs
            if not self.env.get("CUDA_HOME") and os.path.isfile("/usr/local/cuda/bin/nvcc"):
                self.env["CUDA_HOME"] = "/usr/local/cuda"   # setup.py and the sanitizer test look there
        self.pytest_plugins = {name: importlib.util.find_spec(module) is not None
                               for name, module in (("xdist", "xdist"), ("timeout", "pytest_timeout"))}

    # ---- time ----

    def cap(self, step_cap: float) -> float:
        return min(step_cap, self.deadline - RESERVE_S - time.monotonic())

    # ---- running steps ----

    def passed(self, name: str) -> bool:
        return any(o.name == name and o.status == "passed" for o in self.outcomes)

    def skip(self, name: str, why: str) -> None:
        self.record(Outcome(name, f"skipped ({why})"))

    def record(self, outcome: Outcome) -> None:
        self.outcomes.append(outcome)
        print(f"[{outcome.line()}]", flush=True)

    def launch(self, name: str, cmd: List[str], step_cap: float, log: str = SESSION_LOG,
               env: Optional[dict] = None) -> Optional[Running]:
        cap = self.cap(step_cap)
        if cap < min(step_cap, MIN_STEP_S):
            self.skip(name, "no time left")
            return None
        print(f"---- {name} (cap {cap:.0f} s)", flush=True)
        running = Running(name, cmd, env or self.env, self.logs[log], time.monotonic() + cap)
        self.running.append(running)
        return running

    def stop_all(self) -> None:
        for running in self.running:
            if running.proc.poll() is None:
                running.deadline = time.monotonic()
                running.wait()

    def finish(self, running: Running, counts: Callable[[], Dict[str, int]] = dict) -> Outcome:
        """Wait for the step (stopping it at its deadline), then record how it went; ``counts``
        reads its passed/failed/skipped once it has ended."""
        rc = running.wait()
        status = "timeout" if running.timed_out else ("passed" if rc == 0 else "failed")
        for line in running.tail:
            print(f"    {line}")
        if running.log.cut:
            running.log.append_past_limit([f"[{running.name}: last lines]", *running.tail])
        outcome = Outcome(running.name, status, rc, running.seconds, counts())
        self.record(outcome)
        return outcome

    def run(self, name: str, cmd: List[str], step_cap: float, **kw) -> Optional[Outcome]:
        running = self.launch(name, cmd, step_cap, **kw)
        return None if running is None else self.finish(running)

    def pytest(self, name: str, targets: List[str], step_cap: float, per_test_s: float,
               extra: Optional[List[str]] = None) -> Optional[Outcome]:
        cap = self.cap(step_cap)
        with tempfile.TemporaryDirectory() as tmp:
            junit = os.path.join(tmp, "junit.xml")
            cmd = [sys.executable, "-m", "pytest", "-q", "-rfEs", "-p", "no:cacheprovider",
                   f"--junitxml={junit}", *targets, *(extra or [])]
            if self.pytest_plugins["xdist"] and not self.dry_run:
                cmd += ["-n", str(max(2, (os.cpu_count() or 2) - BUILD_JOBS))]
            if self.pytest_plugins["timeout"]:
                cmd += [f"--timeout={int(max(5, min(per_test_s, cap - 5)))}"]
            collect_only = "--collect-only" in cmd
            if self.dry_run and not collect_only:
                cmd += ["--first-per-module", "1"]
            running = self.launch(name, cmd, step_cap)
            if running is None:
                return None
            return self.finish(running, (lambda: collected_count(running.tail)) if collect_only
                               else (lambda: junit_counts(junit)))

    def bench(self, name: str, json_name: str, bench_args: List[str], step_cap: float) -> Optional[Outcome]:
        path = os.path.join(self.out, f"{json_name}-{self.tag}.json")
        running = self.launch(name, [sys.executable, "-m", "attnctl.cli", "bench", *bench_args,
                                     "--json", path], step_cap)
        if running is None:
            return None
        self.results.append(os.path.basename(path))   # written from its first row on
        return self.finish(running, lambda: bench_counts(path))

    def diagnose(self, step_cap: float) -> Optional[Outcome]:
        """bench/diagnose.py: host, launcher and kernel time per call, and the tile sweep."""
        cap = self.cap(step_cap)
        path = os.path.join(self.out, f"diagnose-{self.tag}.json")
        cmd = [sys.executable, os.path.join(ROOT, "bench", "diagnose.py"), "--json", path,
               "--budget", str(max(1, int(cap - RESERVE_S)))] + (["--smoke"] if self.dry_run else [])
        running = self.launch("diagnose", cmd, step_cap)
        if running is None:
            return None
        self.results.append(os.path.basename(path))
        return self.finish(running)

    # ---- the end ----

    def expected_files(self) -> set:
        return {SESSION_LOG, BUILD_LOG, SUMMARY, *self.results}

    def write_summary(self) -> str:
        lines = [f"attnctl device session ({'CPU dry run' if self.dry_run else 'GPU'}, "
                 f"budget {self.args.budget:.0f} s, {self.tag})",
                 "versions: " + json.dumps(self.versions, sort_keys=True),
                 f"{'step':<14} {'status':<28} {'rc':<7} {'seconds':>8}  counts"]
        lines += [o.line() for o in self.outcomes]
        failed = [o.name for o in self.outcomes if o.status in ("failed", "timeout")]
        lines.append(f"result: {'FAILED: ' + ', '.join(failed) if failed else 'all steps that ran passed'}")
        lines.append(f"files: {', '.join(sorted(set(os.listdir(self.out)) | {SUMMARY}))}")
        text = "\n".join(lines) + "\n"
        with open(os.path.join(self.out, SUMMARY), "w") as f:
            f.write(text)
        return text


def junit_counts(path: str) -> Dict[str, int]:
    """passed / failed / skipped from pytest's JUnit XML (empty if pytest wrote none)."""
    try:
        root = ElementTree.parse(path).getroot()
    except (OSError, ElementTree.ParseError):
        return {}
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    total = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    failed = total["failures"] + total["errors"]
    return {"passed": total["tests"] - failed - total["skipped"], "failed": failed, "skipped": total["skipped"]}


def collected_count(lines) -> Dict[str, int]:
    """From pytest --collect-only's last line ("12 tests collected in 3.1s")."""
    found = [m for m in (re.search(r"(\d+) tests? collected", line) for line in lines) if m]
    return {"collected": int(found[-1].group(1))} if found else {}


def bench_counts(path: str) -> Dict[str, int]:
    """Benchmark records measured ("passed") and those that errored or ran out of memory."""
    try:
        with open(path) as f:
            result = json.load(f)
    except (OSError, ValueError):
        return {}
    records = [r for key in ("rows", "e2e", "p2p") for r in result.get(key, [])]
    ok = sum(r.get("status") == "ok" for r in records)
    return {"passed": ok, "failed": len(records) - ok}


def bundle_unexpected(out: str, expected: set) -> List[str]:
    """Move whatever else landed in the folder into one archive, so that it never holds more
    than MAX_FILES files (each directly in it). Returns the names it moved."""
    moved = sorted(n for n in os.listdir(out) if n not in expected and n != EXTRAS)
    if not moved:
        return []
    with tarfile.open(os.path.join(out, EXTRAS), "w:gz") as tar:
        for name in moved:
            tar.add(os.path.join(out, name), arcname=name)
    for name in moved:
        path = os.path.join(out, name)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        else:
            os.remove(path)
    return moved


# ---- the steps ----

def setup(s: Session) -> bool:
    """Carried wheels (diffusers) and the package as installed (attnctl.kernels too), then
    versions; False if no other step can mean anything (see report_versions). The dry run
    asks pip what it would do and uses the current environment."""
    pip = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
           "--no-cache-dir"]
    wheels = sorted(glob.glob(os.path.join(ROOT, ".whl", "*.whl")))
    if wheels and s.dry_run:   # the install is tried, the current environment used
        with tempfile.TemporaryDirectory(prefix="attnctl-site-") as target:
            s.run("wheels", pip + ["--upgrade", "--target", target, *wheels], 120)
    elif wheels:
        s.run("wheels", pip + ["--upgrade", "--target", WHEEL_SITE, *wheels], 120)
        s.env["PYTHONPATH"] = os.pathsep.join(filter(None, [WHEEL_SITE, s.env.get("PYTHONPATH")]))
    elif not s.dry_run:
        s.skip("wheels", "no .whl/: bench/fetch_gpu_wheels.sh")
    install = pip + ["--no-build-isolation", *(["--dry-run"] if s.dry_run else []), "-e", "."]
    s.run("install", install, 120, env=dict(s.env, ATTNCTL_BUILD_CUDA="0"))
    fd, report = tempfile.mkstemp(suffix=".json")
    os.close(fd)
    cmd = [sys.executable, os.path.abspath(__file__), "--report-versions", report]
    outcome = s.run("versions", cmd + ([] if s.dry_run else ["--expect-gpu"]), 60)
    if outcome is not None:
        try:
            with open(report) as f:
                s.versions = json.load(f)
        except (OSError, ValueError):   # the step crashed: its failure is in the summary
            pass
    os.remove(report)
    if not s.dry_run and s.versions.get("device"):   # "NVIDIA H100 80GB HBM3" -> nvidia-h100-80gb-hbm3
        s.tag = f"{re.sub(r'[^a-z0-9]+', '-', s.versions['device'].lower()).strip('-')}-{s.stamp}"
    return outcome is not None and outcome.rc in (0, PIPELINES_MISSING)


def start_cuda_build(s: Session) -> Optional[Running]:
    if s.dry_run:
        s.skip("cuda-build", s.args.gpu_steps_skipped)
        return None
    cmd = [sys.executable, "setup.py", "-q", "build_ext", "--build-lib", os.path.join(CUDA_BUILD_DIR, "lib"),
           "--build-temp", os.path.join(CUDA_BUILD_DIR, "tmp")]
    env = dict(s.env, ATTNCTL_BUILD_CUDA="1", MAX_JOBS=str(BUILD_JOBS))
    return s.launch("cuda-build", cmd, 300, log=BUILD_LOG, env=env)


def finish_cuda_build(s: Session, build: Optional[Running]) -> None:
    """Wait for the background build; put the module where the installed package imports it.
    (Built aside, so that the Triton tests ran without a half-written module.)"""
    if build is None:
        return
    if s.finish(build).status != "passed":
        return
    for built in glob.glob(os.path.join(ROOT, CUDA_BUILD_DIR, "lib", "attnctl", "_attnctl_cuda*.so")):
        target = os.path.join(ROOT, "attnctl", os.path.basename(built))
        shutil.copy2(built, target + ".new")
        os.replace(target + ".new", target)


GPU_STEPS = ("triton-tests", "cuda-build", "cuda-tests", "diagnose", "bench-fp16", "sd15", "bench-bf16",
             "sanitizer", "other-tests")
# Benchmarks (steps of their own here) and the CPU-heavy published-architecture builds
# stay out of other-tests: CI runs them.
OTHER_TESTS_ELSEWHERE = ["tests/test_benchmarks.py", "tests/test_p2p_bench.py", "tests/test_real_architectures.py"]


def gpu_plan(s: Session) -> None:
    if not setup(s):   # nothing below means anything
        for name in GPU_STEPS:
            s.skip(name, "set-up failed")
        return
    build = start_cuda_build(s)
    # 270 s: the first H200 run needed 200 s with warm caches; cold, the kernels' JIT compiles add more.
    s.pytest("triton-tests", TRITON_TESTS, 270, per_test_s=120)
    finish_cuda_build(s, build)
    if cuda_ready(s, "cuda-tests"):
        s.pytest("cuda-tests", CUDA_TESTS, 60, per_test_s=60, extra=["-k", f"not {SANITIZER_SELECTION}"])
    s.diagnose(130)
    kernel_bench = ["--quick"] + (["--contender", "sdpa", "--contender", "triton+capture"] if s.dry_run else [])
    s.bench("bench-fp16", "kernels-fp16", kernel_bench + ["--dtype", "fp16"], 80)
    pipeline_contenders = (["--e2e-contender", "diffusers-sdpa", "--p2p-contender", "diffusers-sdpa"]
                           if s.dry_run else [])
    s.bench("sd15", "sd15", ["--skip-kernels", "--e2e", "sd15-512", "--p2p", "sd15-512", "--steps", "20",
                             *pipeline_contenders], 70)
    s.bench("bench-bf16", "kernels-bf16", kernel_bench + ["--dtype", "bf16"], 70)
    if cuda_ready(s, "sanitizer"):
        s.pytest("sanitizer", ["tests/gpu/test_cuda_gpu.py"], 45, per_test_s=40, extra=["-k", SANITIZER_SELECTION])
    # The diffusers-level tests build their pipelines on the CPU. On the GPU machine their
    # Triton cases would need the interpreter (and it numpy < 2.4, which is not there), so the
    # torch-backend cases run: the machine's torch, transformers and diffusers under the tools.
    # Their fixtures take minutes on a CPU, so the dry run only collects them (CI runs them).
    elsewhere = TRITON_TESTS + CUDA_TESTS + OTHER_TESTS_ELSEWHERE + [THIS_TEST]
    selection = ["--collect-only"] if s.dry_run else ["-k", "not triton"]
    s.pytest("other-tests", ["tests", *(f"--ignore={m}" for m in elsewhere), *selection], 120, per_test_s=90)


def cuda_ready(s: Session, name: str) -> bool:
    """Whether a step that runs the CUDA extension can run; if not, it is reported skipped."""
    if s.dry_run:
        s.skip(name, s.args.gpu_steps_skipped)
    elif not s.passed("cuda-build"):
        s.skip(name, "cuda-build failed")
    return not s.dry_run and s.passed("cuda-build")


def sdxl_plan(s: Session) -> None:
    """SDXL 1024² (a 2.6B-parameter UNet built on the CPU first): a device call of its own."""
    if not setup(s):
        for name in ("sdxl-p2p", "sdxl-e2e"):
            s.skip(name, "set-up failed")
        return
    contenders = ["--p2p-contender", "diffusers-sdpa"] if s.dry_run else []
    s.bench("sdxl-p2p", "p2p-sdxl", ["--skip-kernels", "--p2p", "sdxl-1024", "--steps", "20", *contenders], 330)
    contenders = ["--e2e-contender", "diffusers-sdpa"] if s.dry_run else []
    s.bench("sdxl-e2e", "e2e-sdxl", ["--skip-kernels", "--e2e", "sdxl-1024", "--steps", "20", *contenders], 200)


def dit_plan(s: Session) -> None:
    """FLUX.1-dev and SD3.5 large (random weights, built on the GPU, bf16): the joint-attention
    kernel rows (SDPA, Triton with and without captures, ConceptAttention original vs fused),
    then the transformer loops (stock, attnctl, trace, materialised maps) of those two,
    PixArt-Σ 1024² and Wan 2.1 1.3B 480p."""
    if not setup(s):
        for name in ("dit-kernels", "dit-e2e"):
            s.skip(name, "set-up failed")
        return
    kernels = ["--kind", "joint", "--dtype", "bf16"]
    if s.dry_run:
        kernels += ["--contender", "sdpa", "--contender", "triton+capture"]
    s.bench("dit-kernels", "kernels-dit", kernels, 150)
    contenders = ["--e2e-contender", "diffusers-sdpa", "--e2e-contender", "materialised"] if s.dry_run else []
    # Each transformer runs its own number of steps (attnctl.benchmarks.e2e_dit.MODELS: Flux and
    # SD3.5 4, PixArt-Σ 20, Wan 3); the JSON keeps every record as it is measured.
    models = [arg for m in ("flux-1024", "sd35l-1024", "pixart-1024", "wan-480p") for arg in ("--e2e", m)]
    s.bench("dit-e2e", "e2e-dit", ["--skip-kernels", *models, *contenders], 360)


# ---- versions (run as a child: it imports torch) ----

def report_versions(path: str, expect_gpu: bool) -> int:
    """Write the versions that matter to ``path`` and print them. Exit code VERSIONS_FATAL if
    nothing can run: the package not importable as installed (attnctl.kernels too) or from
    elsewhere, or a GPU expected and torch seeing none; 1 if only the pipelines' packages
    (diffusers, transformers) are missing: the op tests still run, the rest fails on its own."""
    problems, fatal = [], False
    found: dict = {"python": sys.version.split()[0]}
    for name in ("torch", "triton", "numpy", "diffusers", "transformers", "attnctl", "attnctl.kernels"):
        try:
            module = importlib.import_module(name)
        except Exception as exc:  # reported, and makes the step fail
            found[name] = None
            problems.append(f"{name} does not import: {type(exc).__name__}: {exc}")
            fatal = fatal or name not in PIPELINE_PACKAGES
            continue
        # the package's own modules by file: they must be this checkout's
        found[name] = module.__file__ if name.startswith("attnctl") else module.__version__
        if name.startswith("attnctl") and not os.path.abspath(module.__file__).startswith(ROOT + os.sep):
            problems.append(f"{name} imports from {module.__file__}, not from this checkout {ROOT}")
            fatal = True
    if found.get("torch"):
        import torch
        found["torch_cuda"] = torch.version.cuda
        found["device"] = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
        if expect_gpu and not torch.cuda.is_available():
            problems.append("a GPU was expected (nvidia-smi answered) but torch.cuda.is_available() is False")
            fatal = True
    found["nvcc"] = _first_line(["nvcc", "--version"], last=True)
    found["driver"] = _first_line(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"])
    found["pytest_plugins"] = sorted(n for n in ("xdist", "pytest_timeout") if importlib.util.find_spec(n))
    with open(path, "w") as f:
        json.dump(found, f)
    print(json.dumps(found, indent=1))
    for problem in problems:
        print(f"ERROR: {problem}")
    return VERSIONS_FATAL if fatal else (PIPELINES_MISSING if problems else 0)


def _first_line(cmd: List[str], last: bool = False) -> Optional[str]:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=20).stdout.strip().splitlines()
    except (OSError, subprocess.SubprocessError):
        return None
    return (out[-1] if last else out[0]) if out else None


def gpu_present() -> bool:
    """nvidia-smi lists a GPU (no torch import here: the steps import it)."""
    try:
        return subprocess.run(["nvidia-smi", "-L"], capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="bench/gpu_session.sh", description=__doc__.split("\n\n")[0])
    p.add_argument("--budget", type=float, default=None,
                   help=f"total seconds for all steps (env GPU_SESSION_BUDGET_S; default {GPU_BUDGET_S} on a "
                        f"GPU, {DRY_RUN_BUDGET_S} for the dry run)")
    p.add_argument("--out", default=os.environ.get("OUT"),
                   help="an empty or new folder for logs, results and the summary (default $OUT, else "
                        "attnctl-out/gpu-session-<time>)")
    p.add_argument("--dry-run", action="store_true",
                   help="the CPU smoke run (implied when nvidia-smi finds no GPU)")
    p.add_argument("--sdxl", action="store_true", help="only the SDXL 1024² edit and UNet loop (a call of its own)")
    p.add_argument("--dit", action="store_true",
                   help="only the Flux / SD3.5-large kernel rows and the Flux, SD3.5-large, PixArt-Σ and Wan "
                        "transformer loops (a call of its own)")
    p.add_argument("--cuda-archs", default="90a", help="ATTNCTL_CUDA_ARCHS for the CUDA build (H100/H200: 90a)")
    p.add_argument("--report-versions", metavar="JSON", help=argparse.SUPPRESS)
    p.add_argument("--expect-gpu", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.report_versions:
        return report_versions(args.report_versions, args.expect_gpu)
    gpu = gpu_present()
    if not gpu and not args.dry_run:
        print("gpu_session: nvidia-smi finds no GPU: this is the CPU dry run", flush=True)
        args.dry_run = True
    args.gpu_steps_skipped = "dry run" if gpu else "no GPU: dry run"
    if args.budget is None:
        env_budget = os.environ.get("GPU_SESSION_BUDGET_S")
        try:
            args.budget = float(env_budget) if env_budget else (DRY_RUN_BUDGET_S if args.dry_run else GPU_BUDGET_S)
        except ValueError:
            p.error(f"GPU_SESSION_BUDGET_S: expected a number of seconds, got {env_budget!r}")
    if args.budget < RESERVE_S + MIN_STEP_S:
        p.error(f"--budget: expected at least {RESERVE_S + MIN_STEP_S} s, got {args.budget:g}")
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    args.out = args.out or os.path.join(ROOT, "attnctl-out", f"gpu-session-{stamp}")
    if os.path.isdir(args.out) and os.listdir(args.out):
        p.error(f"--out: expected an empty or new folder (everything in it is returned), got {args.out} "
                f"holding {len(os.listdir(args.out))} entries")
    s = Session(args, stamp)
    # Stopped from outside: still stop the steps, bundle and write the summary.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    try:
        (sdxl_plan if args.sdxl else dit_plan if args.dit else gpu_plan)(s)
    finally:
        s.stop_all()
        moved = bundle_unexpected(s.out, s.expected_files())
        if moved:
            print(f"gpu_session: moved unexpected files into {EXTRAS}: {', '.join(moved)}")
        print(s.write_summary(), end="", flush=True)
    return 1 if any(o.status in ("failed", "timeout") for o in s.outcomes) else 0


if __name__ == "__main__":
    sys.exit(main())
