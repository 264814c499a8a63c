"""``diffin train`` / ``python -m jobs.train``: train the proxy CLIP trajectory."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from jobs._common import SimpleJob
from pipeline.config import RunConfig, load_config
from pipeline.errors import UsageError

DESCRIPTION = "Train a proxy open_clip CLIP on the config's shards and save m checkpoints + trajectory.json."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="run config YAML (uses data, trajectory.train, resources)")
    parser.add_argument("--out", required=True, help="trajectory directory to create")
    parser.add_argument("--exclude-uids", help="uids to leave out: .npy (u8,u8) or text, one per line")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    parser.add_argument("--executor", choices=("local", "ray"), default="local",
                        help="train in this process (default) or as a Ray task")
    parser.add_argument("--on-selection", metavar="RUN_DIR[:NAME]",
                        help="train on the resharded shards of a run's selection instead of data.shards: "
                             "RUN_DIR/shards/ (selection/), or RUN_DIR/selections/NAME/shards/; refused when "
                             "they are missing or stale (made from another selection than the current one)")


def split_on_selection(text: str) -> tuple[str, str | None]:
    """``RUN_DIR[:NAME]`` → (run dir, name or None). The part after the last ``:`` is a name
    only when it is a valid selection name (so ``s3://bucket/run`` stays a run dir)."""
    from pipeline.io.layout import check_selection_name

    run_dir, colon, name = text.rpartition(":")
    if not colon or not run_dir:
        return text, None
    try:
        return run_dir, check_selection_name(name)
    except UsageError:
        if "/" in name:  # the colon belonged to the run dir (a URL)
            return text, None
        raise


def on_selection(config: RunConfig, text: str) -> RunConfig:
    """``config`` with ``data.shards`` / ``data.sizes`` replaced by the shards of selection
    ``text`` (``RUN_DIR[:NAME]``), after checking they are current
    (:func:`pipeline.stages.derived.current_shards`: one-line UsageError otherwise)."""
    from pipeline.data.shards import SIZES_FILE
    from pipeline.io.layout import RunLayout
    from pipeline.stages.derived import current_shards

    run_dir, name = split_on_selection(text)
    layout = RunLayout.of(run_dir, config.storage)
    if not layout.root.is_dir():
        raise UsageError(f"--on-selection: run directory {run_dir} not found")
    if name is not None and name not in layout.selection_names():
        known = ", ".join(layout.selection_names()) or "none"
        raise UsageError(f"--on-selection: unknown selection {name!r} in {run_dir} (named selections there: {known})")
    sizes = current_shards(layout, name)
    if not sizes:
        raise UsageError(f"--on-selection: the shards of {text} hold no pairs")
    shards_dir = layout.shards_dir(name)
    data = config.data.model_copy(update={"shards": [str(shards_dir / shard) for shard in sizes],
                                          "sizes": str(shards_dir / SIZES_FILE)})
    return config.model_copy(update={"data": data})


def run(args: argparse.Namespace) -> int:
    import shutil

    from pipeline.model.train import read_uid_list
    from pipeline.model.trajectory import MANIFEST
    from pipeline.runtime.executor import make_executor
    from pipeline.stages.context import RunContext
    from pipeline.stages.trajectory import train_trajectory

    config = load_config(args.config)
    if args.on_selection:
        config = on_selection(config, args.on_selection)
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
