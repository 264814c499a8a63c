"""``diffin train`` / ``python -m jobs.train``: train the proxy CLIP trajectory (DESIGN §2.5)."""

from __future__ import annotations

import argparse
import sys
import time

from jobs._common import SimpleJob
from pipeline.config import load_config
from pipeline.errors import UsageError

DESCRIPTION = "Train a proxy open_clip CLIP on the config's shards and save m checkpoints + trajectory.json."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="run config YAML (uses data, trajectory.train, resources)")
    parser.add_argument("--out", required=True, help="trajectory directory to create")
    parser.add_argument("--exclude-uids", help="uids to leave out: .npy (u8,u8) or text, one per line")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    parser.add_argument("--executor", choices=("local", "ray"), default="local",
                        help="train in this process (default) or as a Ray task")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from pipeline.data.shards import expand_shards, load_sizes
    from pipeline.model.train import read_uid_list
    from pipeline.runtime.executor import Resources, make_executor
    from pipeline.stages.trajectory import TrainStage, TrainTask

    config = load_config(args.config)
    cfg = config.trajectory.train
    if cfg is None:
        raise UsageError(f"{args.config}: trajectory.train: required by `diffin train` (the config names an existing trajectory)")
    out = Path(args.out)
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        raise UsageError(f"--out {out} is not empty; pass --overwrite to replace it")
    if args.exclude_uids and not Path(args.exclude_uids).is_file():
        raise UsageError(f"--exclude-uids: file not found: {args.exclude_uids}")
    exclude = frozenset(read_uid_list(args.exclude_uids)) if args.exclude_uids else frozenset()
    sizes = load_sizes(config.data.sizes) if config.data.sizes else None
    task = TrainTask(tuple(expand_shards(config.data.shards)), cfg, str(out), sizes, exclude)
    resources = Resources(config.resources.num_cpus, config.resources.num_gpus)
    executor = make_executor(args.executor, config.resources.address)
    start = time.perf_counter()
    try:
        executor.map(TrainStage(resources).process, [task], resources)
    finally:
        executor.shutdown()
    from pipeline.model.trajectory import Trajectory

    traj = Trajectory.load(out)
    print(f"trajectory: {out / 'trajectory.json'}  ({len(traj.checkpoints)} checkpoints, "
          f"N={traj.num_samples}, T={traj.total_steps}, {time.perf_counter() - start:.1f}s)")
    for ckpt in traj.checkpoints:
        print(f"  step {ckpt.step:>7d}  lr {ckpt.lr:.3e}  {ckpt.path}")
    return 0


JOB = SimpleJob('train', 'train a proxy CLIP trajectory', DESCRIPTION, add_arguments, run)
register = JOB.register
main = JOB.main


if __name__ == "__main__":
    sys.exit(main())
