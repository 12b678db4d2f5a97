"""The ``attnctl`` command. Each subcommand lives in its own module, which provides
``add_parser(subparsers)`` (setting ``func`` on its parser) and returns an exit code from
that ``func(args)``."""
from __future__ import annotations

import argparse
import importlib
import os
from typing import Optional, Sequence

SUBCOMMAND_MODULES = ("attnctl.cli_demo", "attnctl.benchmarks.cli", "attnctl.tools.hrv_cli", "attnctl.jobs.maps",
                      "attnctl.jobs.edit")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="attnctl", description="Fused attention with controls and attention-map capture for diffusion models.")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in SUBCOMMAND_MODULES:
        importlib.import_module(name).add_parser(subparsers)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    import torch

    if not torch.cuda.is_available():
        # Without a GPU the Triton backend (asked for explicitly) runs under Triton's CPU
        # interpreter, which must be chosen before anything imports triton (diffusers does).
        os.environ.setdefault("TRITON_INTERPRET", "1")
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
