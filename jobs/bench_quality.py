"""``diffin bench quality``: its options, the run, the printed tables (the benchmark itself:
:mod:`pipeline.bench.quality`)."""

from __future__ import annotations

import argparse

from jobs._common import bench_command
from pipeline.bench import quality
from pipeline.bench.quality import DATASETS, DEFAULT_OUT, DEFAULT_QUICK_OUT


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``diffin bench quality``."""
    parser.add_argument("--quick", action="store_true",
                        help="tiny data, one seed: checks the machinery, not the outcome (< 3 min)")
    parser.add_argument("--seeds", type=int, default=None, metavar="N",
                        help="run seeds 0..N-1 (default 3; 1 with --quick)")
    parser.add_argument("--out", default=None, metavar="PATH",
                        help=f"JSON report (default {DEFAULT_OUT}; with --quick {DEFAULT_QUICK_OUT})")
    parser.add_argument("--data-dir", default="data", metavar="DIR",
                        help="where the corpora are reused from or built into (default data)")
    parser.add_argument("--datasets", default=None, metavar="LIST",
                        help=f"comma-separated subset of {','.join(DATASETS)} (default: all of them)")
    parser.add_argument("--workers", type=int, default=None, metavar="N",
                        help="(dataset, seed) cells run in N processes (default 2; 1 with --quick)")
    parser.add_argument("--threads", type=int, default=1, metavar="N",
                        help="torch threads per process (default 1)")
    parser.add_argument("--noise", type=float, default=None, metavar="P",
                        help="share of mismatched captions in the Fashion-MNIST corpora (default 0.3; "
                             "use its own --out: the report holds one noise rate)")
    parser.add_argument("--report-only", action="store_true",
                        help="compute nothing: write the report from the cells the results file already holds")
    parser.add_argument("--methods", default=None, metavar="LIST",
                        help="comma-separated methods: COLUMN (top fraction), COLUMN+drop, COLUMN+cluster, chain, "
                             "random, oracle (default: the full comparison; see docs/QUALITY.md)")


def settings(args: argparse.Namespace) -> quality.QualitySettings:
    """The preset chosen by ``--quick``, with the command-line overrides applied."""
    return quality.settings_for(args.quick, seeds=args.seeds, workers=args.workers,
                                datasets=args.datasets.split(",") if args.datasets else None,
                                threads=args.threads, methods=args.methods.split(",") if args.methods else None,
                                noise=args.noise)


def command(args: argparse.Namespace, out: str) -> str:
    """The canonical ``diffin bench quality …`` command that reproduces ``args``."""
    return bench_command("quality", args, out, (("--seeds", args.seeds), ("--workers", args.workers),
                                                 ("--datasets", args.datasets), ("--methods", args.methods),
                                                 ("--noise", args.noise)))


def run(args: argparse.Namespace) -> int:
    """``diffin bench quality``: run, print the tables, write the JSON report."""
    out = args.out or (DEFAULT_QUICK_OUT if args.quick else DEFAULT_OUT)
    report = quality.run_benchmark(settings(args), out, args.data_dir, command(args, out),
                                   report_only=args.report_only)
    print(quality.format_table(report))
    print(f"wrote {out} ({report['_meta']['seconds']['total_this_run']:.0f} s)")
    return 0
