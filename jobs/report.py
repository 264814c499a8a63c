"""``diffin report RUN_DIR`` / ``python -m jobs.report RUN_DIR``: one self-contained HTML page
about a run (score histograms, kept / pruned examples, score vs clip_score, counts, config; with two
or more selections, their overlap, kept score distributions and coverage per field value)."""

from __future__ import annotations

import argparse
import sys

from jobs._common import SimpleJob, int_at_least  # first: applies environment defaults

DESCRIPTION = ("Write a self-contained HTML report of a run directory (plots and thumbnails embedded) "
               "to RUN_DIR/report/index.html, and print its path.")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``report``."""
    from pipeline.report import DEFAULT_EXAMPLES, DEFAULT_MAX_POINTS

    parser.add_argument("run_dir", metavar="RUN_DIR", help="a run directory (diffin run --run-dir)")
    parser.add_argument("--out", metavar="FILE", default=None,
                        help="HTML file to write (default: RUN_DIR/report/index.html)")
    parser.add_argument("--examples", type=int_at_least(0), default=DEFAULT_EXAMPLES,
                        help=f"pairs shown in each of the kept / pruned grids (default {DEFAULT_EXAMPLES})")
    parser.add_argument("--config", metavar="FILE", default=None,
                        help="the run's config: its storage section gives the options for a remote "
                             "RUN_DIR (e.g. s3://bucket/runs/r1)")
    parser.add_argument("--max-points", type=int_at_least(0), default=DEFAULT_MAX_POINTS,
                        help=f"rows sampled for the scatter plot, and per set for the quantiles of "
                             f"the selections compared (default {DEFAULT_MAX_POINTS})")
    parser.add_argument("--field", "--by", dest="field", metavar="NAME", default=None,
                        help="selections compared (two or more in RUN_DIR): kept pairs per value of this "
                             "field vs the scored pool: cluster, or a json field the score files carry "
                             "(json.NAME or NAME; default: cluster when the score files have values there)")
    parser.add_argument("--compare-column", metavar="COLUMN", default=None,
                        help="selections compared: the score column every kept set is compared on besides "
                             "its own (default: the run's select.column, else diffin_unrolled)")


def run(args: argparse.Namespace) -> int:
    """Write the report and print its path."""
    from pipeline.report.build import write_report

    storage = _storage_options(args.config) if args.config else None
    path = write_report(args.run_dir, args.out, n_examples=args.examples, max_points=args.max_points,
                        storage=storage, field=args.field, compare_column=args.compare_column)
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


JOB = SimpleJob('report', 'write an HTML report of a run directory', DESCRIPTION, add_arguments, run)
register = JOB.register
main = JOB.main


if __name__ == "__main__":
    sys.exit(main())
