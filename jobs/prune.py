"""``diffin run`` / ``python -m jobs.prune``: every stage of a run, in order, into one run dir.

Each stage is resumable from its completion markers: a rerun recomputes only what is missing.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

from jobs._common import standalone

DESCRIPTION = "Run every stage of a pruning run (embedded local Ray, or the cluster in RAY_ADDRESS)."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="run config YAML")
    parser.add_argument("--run-dir", help="output directory (default: runs/<config name>)")
    parser.add_argument("--executor", choices=("ray", "local"), default="ray",
                        help="Ray (default: embedded local Ray, or the cluster in RAY_ADDRESS) or in-process")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from pipeline.config import load_config
    from pipeline.runtime.executor import make_executor
    from pipeline.stages.pipeline import run_pipeline

    config = load_config(args.config)
    run_dir = Path(args.run_dir or Path("runs") / Path(args.config).stem)
    executor = make_executor(args.executor, config.resources.address)
    try:
        summary = run_pipeline(config, run_dir, executor, progress=not args.no_progress)
    finally:
        executor.shutdown()
    print(f"run finished in {summary['seconds']:.1f}s -> {run_dir}")
    print(f"  shards: {summary['shards']}   pairs in: {summary['pairs_in']}   proxy training pairs: {summary['train_pairs']}")
    print(f"  trajectory: {summary['trajectory']}  ({len(summary['checkpoints'])} checkpoints at steps "
          f"{[c['step'] for c in summary['checkpoints']]})")
    if "scores" in summary:
        print(f"  scores: {summary['scores']}/  (scored now: {summary['shards_scored_now']} shards, "
              f"{summary['pairs_scored_now']} pairs, failed: {summary['failed_now'] or 'none'})")
    print(f"  summary: {run_dir / 'run_summary.json'}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("run", help="run all stages (same as python -m jobs.prune)",
                                   description=DESCRIPTION)
    add_arguments(parser)
    parser.set_defaults(func=run)


def main(argv: Sequence[str] | None = None) -> int:
    return standalone(add_arguments, run, DESCRIPTION, argv)


if __name__ == "__main__":
    sys.exit(main())
