"""Benchmark the attention op against torch SDPA at real diffusion shapes.

    python bench/bench_attention.py --quick          # SD1.5/SDXL target shapes, fp16
    python bench/bench_attention.py                  # every shape, fp16 and bf16, B = 2 and 8

Writes bench/results/<device>-<date>.json (raw records with device, driver, versions,
date, command) unless --json says otherwise. Same options as `attnctl bench`.
"""
import argparse
import datetime
import os
import re
import sys

import torch

if not torch.cuda.is_available():  # the Triton interpreter must be chosen before triton is imported
    os.environ.setdefault("TRITON_INTERPRET", "1")

from attnctl.benchmarks import cli  # noqa: E402


def default_json_path() -> str:
    name = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu-smoke"
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    return os.path.join(os.path.dirname(__file__), "results", f"kernels-{slug}-{stamp}.json")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="bench_attention.py")
    cli.add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["bench", *sys.argv[1:]])
    if args.json is None and torch.cuda.is_available():
        args.json = default_json_path()
    sys.exit(args.func(args))
