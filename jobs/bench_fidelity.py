"""``diffin bench fidelity``: its options, the run, the printed table (the benchmark itself:
:mod:`pipeline.bench.fidelity`)."""

from __future__ import annotations

import argparse

from jobs._common import bench_command
from pipeline.bench import fidelity
from pipeline.bench.fidelity import DATASETS, DEFAULT_OUT, DEFAULT_QUICK_OUT
from pipeline.errors import UsageError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``diffin bench fidelity``."""
    parser.add_argument("--quick", action="store_true",
                        help="a short run (fewer leave-one-out samples, subsets and steps; both datasets)")
    parser.add_argument("--out", default=None, metavar="PATH",
                        help=f"JSON report (default {DEFAULT_OUT}; with --quick {DEFAULT_QUICK_OUT})")
    parser.add_argument("--data-dir", default="data", metavar="DIR",
                        help="where the OpenMoji corpus is reused from or built into (DIR/openmoji; default data)")
    parser.add_argument("--datasets", default=None, metavar="LIST",
                        help=f"comma-separated subset of {','.join(DATASETS)} (default: both)")
    parser.add_argument("--threads", type=int, default=1, metavar="N",
                        help="torch threads (default 1: fastest for these tiny models on a shared 2-core machine)")
    parser.add_argument("--seed", type=int, default=None, help="seed of splits, training, bank and subsets (default 0)")
    parser.add_argument("--digits-steps", type=int, default=None, metavar="T",
                        help="override the MLP's number of SGD steps (horizon study)")
    parser.add_argument("--lds-fraction", type=float, default=None, metavar="F",
                        help="OpenMoji: share of the training pairs each LDS subset removes (default 0.5)")
    parser.add_argument("--loo", type=int, default=None, metavar="N", help="OpenMoji: leave-one-out count")
    parser.add_argument("--no-sweep", action="store_true", help="OpenMoji: skip the unrolled variants")


def settings(args: argparse.Namespace) -> fidelity.FidelitySettings:
    """The preset chosen by ``--quick``, with the command-line overrides applied."""
    return fidelity.settings_for(args.quick, seed=args.seed,
                                 datasets=args.datasets.split(",") if args.datasets else None,
                                 threads=args.threads, digits_steps=args.digits_steps,
                                 lds_fraction=args.lds_fraction, loo=args.loo, sweep=not args.no_sweep)


def command(args: argparse.Namespace, out: str) -> str:
    """The canonical ``diffin bench fidelity …`` command that reproduces ``args``."""
    return bench_command("fidelity", args, out, (("--datasets", args.datasets), ("--seed", args.seed),
                                                  ("--digits-steps", args.digits_steps),
                                                  ("--lds-fraction", args.lds_fraction), ("--loo", args.loo),
                                                  ("--no-sweep", True if args.no_sweep else None)))


def run(args: argparse.Namespace) -> int:
    """``diffin bench fidelity``: run, print the table, write the JSON report."""
    if args.threads < 1:
        raise UsageError(f"--threads must be >= 1, got {args.threads}")
    out = args.out or (DEFAULT_QUICK_OUT if args.quick else DEFAULT_OUT)
    report = fidelity.run_benchmark(settings(args), out, args.data_dir, command(args, out))
    print(fidelity.format_table(report))
    print(f"wrote {out} ({report['_meta']['seconds_total']:.0f} s)")
    return 0
