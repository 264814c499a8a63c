"""``diffin bench speed``: its options, the run, the printed ratios (the benchmark itself:
:mod:`pipeline.bench.speed`)."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from pipeline.bench import speed
from pipeline.bench.speed import DEFAULT_OUT, QUICK_OUT


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``diffin bench speed``."""
    parser.add_argument("--quick", action="store_true", help="tiny model only, fewer repeats (a smoke run)")
    parser.add_argument("--out", help=f"result JSON (default {DEFAULT_OUT}; {QUICK_OUT} with --quick)")
    parser.add_argument("--models", default=None, help="comma-separated model names (default tiny-clip-32,ViT-B-32)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)


def command(args: argparse.Namespace) -> str:
    """The ``diffin bench speed …`` command recorded in the results."""
    return "diffin bench speed" + (" --quick" if args.quick else "") + \
        (f" --threads {args.threads}" if args.threads else "") + (f" --models {args.models}" if args.models else "")


def _print_ratios(name: str, result: dict) -> None:
    print(f"{name}: " + "  ".join(f"{k} {v:.2f}x" for k, v in result["ratio_to_forward"].items()))


def run(args: argparse.Namespace) -> int:
    """``diffin bench speed``: measure each model (printing its ratios), write the results JSON."""
    logging.getLogger("pipeline").setLevel(logging.INFO)
    settings = speed.settings_for(args.quick, models=args.models.split(",") if args.models else None,
                                  threads=args.threads, device=args.device, seed=args.seed)
    out = Path(args.out or (QUICK_OUT if args.quick else DEFAULT_OUT))
    speed.run_benchmark(settings, out, command(args), merge=bool(args.models), on_model=_print_ratios)
    print(f"wrote {out}")
    return 0
