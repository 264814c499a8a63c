"""``diffin trajectory import RUN_DIR``: turn an open_clip / DataComp run into a trajectory.

Also runnable as ``python -m jobs.trajectory import RUN_DIR [--out DIR]``.
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from jobs._common import int_at_least, standalone  # first: applies environment defaults

from pipeline.model.trajectory import Trajectory

DESCRIPTION = "Manage training trajectories (the checkpoints that scores are computed against)."


def add_import_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``trajectory import``."""
    parser.add_argument("run_dir", metavar="RUN_DIR",
                        help="open_clip run directory (<logs>/<name>: params.txt, checkpoints/)")
    parser.add_argument("--out", metavar="DIR", default=None,
                        help="directory of the trajectory.json to write (default: RUN_DIR)")
    parser.add_argument("--world-size", type=int_at_least(1), default=None,
                        help="override params.txt's world_size (processes of the run)")
    parser.add_argument("--train-num-samples", type=int_at_least(1), default=None,
                        help="override the training set size (rows, for a csv run)")
    parser.add_argument("--workers", type=int_at_least(1), default=None,
                        help="override params.txt's dataloader workers per process (webdataset rounding)")
    parser.add_argument("--no-verify-lr", dest="verify_lr", action="store_false",
                        help="do not check the recomputed lr against each checkpoint's optimizer")


def add_actions(parser: argparse.ArgumentParser) -> None:
    """The ``trajectory`` actions (``import``) under ``parser``."""
    actions = parser.add_subparsers(dest="trajectory_action", metavar="ACTION", required=True)
    importer = actions.add_parser(
        "import", help="write trajectory.json for an open_clip / DataComp training run",
        description="Recompute each epoch_K.pt's global step and lr from the run's params.txt "
                    "and write trajectory.json.")
    add_import_arguments(importer)
    importer.set_defaults(func=run_import)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``trajectory`` to the ``diffin`` command."""
    parser = subparsers.add_parser("trajectory", help="import an open_clip run as a trajectory",
                                   description=DESCRIPTION)
    add_actions(parser)


def summary(trajectory: Trajectory) -> str:
    """A short table of the trajectory's checkpoints."""
    source = trajectory.source
    lines = [
        f"{len(trajectory.checkpoints)} checkpoints, T={trajectory.total_steps} steps "
        f"({source.get('steps_per_epoch', '?')} per epoch), N={trajectory.num_samples}, "
        f"batch {trajectory.batch_size}, model {trajectory.model['name']}",
        f"{'epoch':>5}  {'step':>8}  {'lr':>12}  path",
    ]
    epochs = source.get("epochs") or ["?"] * len(trajectory.checkpoints)
    for epoch, ref in zip(epochs, trajectory.checkpoints):
        lines.append(f"{epoch:>5}  {ref.step:>8}  {ref.lr:>12.6g}  {ref.path}")
    return "\n".join(lines)


def run_import(args: argparse.Namespace) -> int:
    """Import the run and write its trajectory.json."""
    from pipeline.model.openclip_import import import_run

    trajectory = import_run(args.run_dir, args.out, world_size=args.world_size,
                            train_num_samples=args.train_num_samples, workers=args.workers,
                            verify_lr=args.verify_lr)
    path = trajectory.save()
    print(f"wrote {path}: {summary(trajectory)}")
    return 0


def _dispatch(args: argparse.Namespace) -> int | None:
    return args.func(args)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m jobs.trajectory``."""
    return standalone(add_actions, _dispatch, DESCRIPTION, argv)


if __name__ == "__main__":
    sys.exit(main())
