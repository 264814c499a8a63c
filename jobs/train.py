"""``diffin train`` / ``python -m jobs.train``: train the proxy CLIP trajectory."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

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
    import shutil

    from pipeline.model.train import read_uid_list
    from pipeline.model.trajectory import MANIFEST
    from pipeline.runtime.executor import make_executor
    from pipeline.stages.context import RunContext
    from pipeline.stages.trajectory import train_trajectory

    config = load_config(args.config)
    if config.trajectory.train is None:
        raise UsageError(f"{args.config}: trajectory.train: required by `diffin train` (the config names an existing trajectory)")
    ctx = RunContext.resolve(config, args.out, args.config)  # inputs and model checked before --overwrite removes anything
    out = ctx.layout.root  # the trajectory directory: here the context's root
    if args.exclude_uids and not Path(args.exclude_uids).is_file():
        raise UsageError(f"--exclude-uids: file not found: {args.exclude_uids}")
    exists = out.exists() and any(out.iterdir())
    if exists and args.overwrite:
        out.fs.rm(str(out), recursive=True) if hasattr(out, "fs") else shutil.rmtree(out)
    elif exists and not (out / MANIFEST).is_file():
        raise UsageError(f"--out {out} is not empty and holds no finished trajectory; pass --overwrite to replace it")
    exclude = frozenset(read_uid_list(args.exclude_uids)) if args.exclude_uids else frozenset()
    executor = make_executor(args.executor, config.resources.address)
    start = time.perf_counter()
    try:
        traj = train_trajectory(ctx, out, executor, exclude)  # a finished one of this configuration is reused
    finally:
        executor.shutdown()
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
