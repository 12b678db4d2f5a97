#!/usr/bin/env bash
# Run here (with network to the package registry) before a GPU session: the GPU machine has
# no network and no diffusers, so its pure-Python wheels travel in .whl/ (git-ignored).
set -euo pipefail
cd "$(dirname "$0")/.."

mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 \
    -d .whl "diffusers==0.42.1" "importlib_metadata" "zipp"
ls -l .whl
