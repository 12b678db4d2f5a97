#!/usr/bin/env bash
# One device call (<= 9 minutes) that returns the most truth, and returns it even when cut
# short: set-up and versions, Triton correctness on the GPU (every op test module, fp16 and
# bf16) while the CUDA extension builds, the CUDA tests, the fp16 kernel benchmark, the SD1.5
# UNet loop and prompt-to-prompt edit, then with time left the bf16 benchmark,
# compute-sanitizer and the remaining tests. Logs, benchmark JSON and summary.txt land in $OUT.
#
#   bench/fetch_gpu_wheels.sh                       # here, first: diffusers for the GPU machine
#   device run, carry [".whl"]:  bash bench/gpu_session.sh            (--budget S, default 530)
#   SDXL 1024², a call of its own:  bash bench/gpu_session.sh --sdxl
#   CPU dry run (no GPU: smoke tests, Triton interpreter, GPU steps skipped):
#                                   bash bench/gpu_session.sh --dry-run --out /tmp/dry
#
# Options: bench/gpu_session.py --help. Exit status 1 when a step failed or timed out.
set -euo pipefail
exec "${PYTHON:-python3}" -u "$(dirname "$0")/gpu_session.py" "$@"
