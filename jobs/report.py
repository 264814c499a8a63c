"""``diffin report RUN_DIR`` / ``python -m jobs.report RUN_DIR``: one self-contained HTML page
about a run (score histograms, kept / pruned examples, score vs clip_score, counts, config)."""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from jobs._common import standalone  # first: applies environment defaults

DESCRIPTION = ("Write a self-contained HTML report of a run directory (plots and thumbnails embedded) "
               "to RUN_DIR/report/index.html, and print its path.")


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``report``."""
    from pipeline.report import DEFAULT_EXAMPLES, DEFAULT_MAX_POINTS

    parser.add_argument("run_dir", metavar="RUN_DIR", help="a run directory (diffin run --run-dir)")
    parser.add_argument("--out", metavar="FILE", default=None,
                        help="HTML file to write (default: RUN_DIR/report/index.html)")
    parser.add_argument("--examples", type=_non_negative_int, default=DEFAULT_EXAMPLES,
                        help=f"pairs shown in each of the kept / pruned grids (default {DEFAULT_EXAMPLES})")
    parser.add_argument("--config", metavar="FILE", default=None,
                        help="the run's config: its storage section gives the options for a remote "
                             "RUN_DIR (e.g. s3://bucket/runs/r1)")
    parser.add_argument("--max-points", type=_non_negative_int, default=DEFAULT_MAX_POINTS,
                        help=f"rows sampled for the scatter plot (default {DEFAULT_MAX_POINTS})")


def run(args: argparse.Namespace) -> int:
    """Write the report and print its path."""
    from pipeline.report.build import write_report

    storage = _storage_options(args.config) if args.config else None
    path = write_report(args.run_dir, args.out, n_examples=args.examples, max_points=args.max_points,
                        storage=storage)
    print(path)
    return 0


def _storage_options(config_path: str) -> dict:
    """The ``storage`` section of a run config (fsspec options by protocol)."""
    import yaml

    from pipeline.errors import UsageError

    try:
        data = yaml.safe_load(open(config_path))
    except (OSError, yaml.YAMLError) as exc:
        raise UsageError(f"--config {config_path}: {exc}".splitlines()[0]) from None
    storage = (data or {}).get("storage", {}) if isinstance(data, dict) else None
    if not isinstance(storage, dict) or not all(isinstance(v, dict) for v in storage.values()):
        raise UsageError(f"--config {config_path}: storage must map protocols to option mappings")
    return storage


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``report`` to the ``diffin`` command."""
    parser = subparsers.add_parser("report", help="write an HTML report of a run directory",
                                   description=DESCRIPTION)
    add_arguments(parser)
    parser.set_defaults(func=run)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m jobs.report``."""
    return standalone(add_arguments, run, DESCRIPTION, argv)


if __name__ == "__main__":
    sys.exit(main())
