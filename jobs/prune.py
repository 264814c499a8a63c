"""``diffin run`` / ``python -m jobs.prune``: every stage of a run, in order, into one run dir.

Stages so far: trajectory (reuse or train the proxy). Prepare, score, select and reshard
join as they land (see the issues); each is resumable from its completion markers.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Sequence

from jobs._common import standalone

DESCRIPTION = "Run every stage of a pruning run (embedded local Ray, or the cluster in RAY_ADDRESS)."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="run config YAML")
    parser.add_argument("--run-dir", help="output directory (default: runs/<config name>)")
    parser.add_argument("--executor", choices=("ray", "local"), default="ray",
                        help="Ray (default: embedded local Ray, or the cluster in RAY_ADDRESS) or in-process")


def run(args: argparse.Namespace) -> int:
    from pipeline.config import load_config
    from pipeline.data.shards import expand_shards, load_sizes
    from pipeline.io.atomic import write_json_atomic
    from pipeline.runtime.executor import make_executor
    from pipeline.stages.trajectory import ensure_trajectory

    config = load_config(args.config)
    run_dir = Path(args.run_dir or Path("runs") / Path(args.config).stem)
    start = time.perf_counter()
    urls = expand_shards(config.data.shards)
    sizes = load_sizes(config.data.sizes) if config.data.sizes else None
    executor = make_executor(args.executor, config.resources.address)
    try:
        trajectory = ensure_trajectory(config, run_dir, executor)
    finally:
        executor.shutdown()
    elapsed = time.perf_counter() - start
    summary = {
        "config": str(args.config), "run_dir": str(run_dir), "shards": len(urls),
        "pairs_in": sum(sizes.values()) if sizes else None,
        "trajectory": str(trajectory.root / "trajectory.json"),
        "checkpoints": [{"step": c.step, "lr": c.lr} for c in trajectory.checkpoints],
        "train_pairs": trajectory.num_samples, "seconds": round(elapsed, 1),
    }
    run_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(run_dir / "run_summary.json", summary)
    print(f"run finished in {elapsed:.1f}s -> {run_dir}")
    print(f"  shards: {len(urls)}   pairs in: {summary['pairs_in']}   proxy training pairs: {trajectory.num_samples}")
    print(f"  trajectory: {summary['trajectory']}  ({len(trajectory.checkpoints)} checkpoints at steps "
          f"{[c.step for c in trajectory.checkpoints]})")
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
