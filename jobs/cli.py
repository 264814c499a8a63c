"""The ``diffin`` command: one subcommand per job (``diffin <job> --help``)."""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from jobs import _common  # noqa: F401  (applies environment defaults first)
from jobs import bench, config, data, prepare, prune, report, reshard, score, select, train, trajectory, validate
from jobs._common import run_cli

JOB_MODULES = (prune, data, validate, train, trajectory, prepare, score, select, reshard, report, config, bench)


def build_parser() -> argparse.ArgumentParser:
    """The full ``diffin`` argument parser."""
    parser = argparse.ArgumentParser(
        prog="diffin",
        description="Prune CLIP pre-training corpora with Diff-In data influence (Ray jobs).",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in JOB_MODULES:
        module.register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``diffin`` console script."""
    args = build_parser().parse_args(argv)
    return run_cli(args.func, args)


if __name__ == "__main__":
    sys.exit(main())
