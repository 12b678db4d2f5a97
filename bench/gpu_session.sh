#!/usr/bin/env bash
# Everything a GPU session checks, in one device call (the lease is short; see
# /work/.library/device/METHOD.md): build the CUDA extension, run the GPU tests of every
# backend, then the kernel, end-to-end and prompt-to-prompt edit benchmarks. Raw results
# land in $OUT; copy them to bench/results/ and run bench/update_readme.py.
#
#   bench/fetch_gpu_wheels.sh            # here, first: diffusers for the GPU machine
#   device run (carry [".whl"]):  bash bench/gpu_session.sh
set -uo pipefail
OUT=${OUT:-/tmp/attnctl-gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD
nvidia-smi --query-gpu=name,driver_version --format=csv | tee "$OUT/device.txt"

# The extension builds in place (python 3.12 here differs from the CI machine's).
ATTNCTL_BUILD_CUDA=1 ATTNCTL_CUDA_ARCHS="90a" python3 setup.py -q build_ext --inplace 2>&1 | tail -20 | tee "$OUT/build.log"

python3 -m pytest -q -x --timeout 900 tests/gpu tests/test_cuda_host.py tests/test_op_dispatch.py \
    2>&1 | tail -40 | tee "$OUT/gpu-tests.log"
stamp=$(date -u +%Y%m%dT%H%M%SZ)
python3 -m attnctl.cli bench --quick --dtype fp16 --dtype bf16 --json "$OUT/kernels-quick-$stamp.json" 2>&1 | tail -60
python3 -m attnctl.cli bench --skip-kernels --e2e sd15-512 --json "$OUT/e2e-sd15-$stamp.json" 2>&1 | tail -15
# Prompt-to-prompt edit, whole pipeline calls: fp16 (the CUDA default), 20 steps.
python3 -m attnctl.cli bench --skip-kernels --p2p sd15-512 --p2p sdxl-1024 --steps 20 \
    --json "$OUT/p2p-$stamp.json" 2>&1 | tail -15
