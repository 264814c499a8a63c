"""``diffin bench lds``: its options, the run, the printed table (the benchmark itself:
:mod:`pipeline.bench.lds`)."""

from __future__ import annotations

import argparse

from jobs._common import bench_command, int_at_least
from pipeline.bench import lds
from pipeline.bench.lds import DEFAULT_OUT, DEFAULT_QUICK_OUT, DEFAULT_SCRATCH_OUT


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``diffin bench lds``."""
    parser.add_argument("--quick", action="store_true",
                        help="tiny data, one seed, 4 subsets: checks the machinery, not the outcome (< 20 s)")
    parser.add_argument("--out", default=None, metavar="PATH",
                        help=f"JSON report (default {DEFAULT_OUT}; with --quick {DEFAULT_QUICK_OUT}; with --from-scratch "
                             f"{DEFAULT_SCRATCH_OUT}); the cells "
                             "go to PATH's stem + _cells.jsonl")
    parser.add_argument("--data-dir", default="data", metavar="DIR",
                        help="where the Fashion-MNIST corpus is reused from or built into (default data)")
    parser.add_argument("--seeds", type=int_at_least(1), default=None, metavar="N",
                        help="seeds 0..N-1 (default 2; 1 with --quick)")
    parser.add_argument("--subsets", type=int_at_least(3), default=None, metavar="N",
                        help="removal subsets per seed (default 200)")
    parser.add_argument("--orders", type=int_at_least(2), default=None, metavar="N",
                        help="visiting orders each subset and the full set are retrained under (default 2)")
    parser.add_argument("--fraction", type=float, default=None, metavar="F",
                        help="share of the training pairs each subset removes (default 0.1)")
    parser.add_argument("--workers", type=int_at_least(1), default=None, metavar="N",
                        help="processes (default 2; 1 with --quick)")
    parser.add_argument("--threads", type=int_at_least(1), default=1, metavar="N",
                        help="torch threads per process (default 1)")
    parser.add_argument("--warm-start", type=int_at_least(1), default=None, metavar="STEP",
                        help="the checkpoint step every retrain continues the proxy from, the removed pairs taken "
                             "out of their batches; the scores use the checkpoints from that step on (default 300)")
    parser.add_argument("--from-scratch", action="store_true",
                        help="the first design: retrain from step 0 with the removed pairs excluded from the "
                             "visiting stream, 4 checkpoints (to report its cells)")
    parser.add_argument("--cosine", action="store_true",
                        help="also score the cosine form of tracin (a backward pass per pair and checkpoint)")
    parser.add_argument("--no-zero-shot", action="store_true", help="skip the zero-shot-target columns")
    parser.add_argument("--no-variants", action="store_true", help="skip the unrolled variants (f = exp, Adam floors)")
    parser.add_argument("--report-only", action="store_true",
                        help="compute nothing: write the report from the cells the results file already holds")


def settings(args: argparse.Namespace) -> lds.LdsSettings:
    """The preset chosen by ``--quick``, with the command-line overrides applied."""
    return lds.settings_for(args.quick, seeds=args.seeds, subsets=args.subsets, orders=args.orders,
                            fraction=args.fraction, workers=args.workers, threads=args.threads,
                            cosine=args.cosine, zero_shot=not args.no_zero_shot, variants=not args.no_variants,
                            from_scratch=args.from_scratch, warm_start=args.warm_start)


def command(args: argparse.Namespace, out: str) -> str:
    """The canonical ``diffin bench lds …`` command that reproduces ``args``."""
    return bench_command("lds", args, out, (
        ("--seeds", args.seeds), ("--subsets", args.subsets), ("--orders", args.orders),
        ("--fraction", args.fraction), ("--workers", args.workers), ("--warm-start", args.warm_start),
        ("--from-scratch", True if args.from_scratch else None), ("--cosine", True if args.cosine else None),
        ("--no-zero-shot", True if args.no_zero_shot else None),
        ("--no-variants", True if args.no_variants else None)))


def default_out(args: argparse.Namespace) -> str:
    """The report path when ``--out`` is not given (the cells file sits beside it)."""
    return DEFAULT_QUICK_OUT if args.quick else DEFAULT_SCRATCH_OUT if args.from_scratch else DEFAULT_OUT


def run(args: argparse.Namespace) -> int:
    """``diffin bench lds``: run what is missing, print the table, write the JSON report."""
    out = args.out or default_out(args)
    report = lds.run_benchmark(settings(args), out, args.data_dir, command(args, out), report_only=args.report_only)
    print(lds.format_table(report))
    counts = report["_meta"]["counts"]
    print(f"wrote {out}: {counts['retrains_done']}/{counts['retrains_wanted']} retrains "
          f"({report['_meta']['seconds']['total_this_run']:.0f} s this run)")
    return 0
