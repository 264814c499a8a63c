"""``diffin trajectory import``: turn an open_clip / DataComp run, or a released checkpoint
file, into a trajectory.

Also runnable as ``python -m jobs.trajectory import RUN_DIR [--out DIR]`` or
``python -m jobs.trajectory import CHECKPOINT --model NAME --steps T --lr ETA
--train-num-samples N --batch-size B --out DIR``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

from jobs._common import int_at_least, run_subcommand, standalone  # first: applies environment defaults

from pipeline.errors import UsageError
from pipeline.model.trajectory import Trajectory

DESCRIPTION = "Manage training trajectories (the checkpoints that scores are computed against)."


# dest → flag of the options that belong to one form only
RUN_DIR_OPTIONS = {"world_size": "--world-size", "workers": "--workers"}
RELEASED_OPTIONS = {"model": "--model", "steps": "--steps", "lr": "--lr", "batch_size": "--batch-size"}


def add_import_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``trajectory import``."""
    parser.add_argument("source", metavar="RUN_DIR|CHECKPOINT",
                        help="open_clip run directory (<logs>/<name>: params.txt, checkpoints/), or a "
                             "released checkpoint file (state dict, {'state_dict': ...} or .safetensors)")
    parser.add_argument("--out", metavar="DIR", default=None,
                        help="directory of the trajectory.json to write (default: RUN_DIR; required "
                             "for a CHECKPOINT, which is referenced, never copied)")
    parser.add_argument("--train-num-samples", metavar="N", type=int_at_least(1), default=None,
                        help="the training set size N: overrides the run's (rows, for a csv run); "
                             "required for a CHECKPOINT (scores scale by 1/N)")
    run = parser.add_argument_group("open_clip run directory")
    run.add_argument("--world-size", type=int_at_least(1), default=None,
                     help="override params.txt's world_size (processes of the run)")
    run.add_argument("--workers", type=int_at_least(1), default=None,
                     help="override params.txt's dataloader workers per process (webdataset rounding)")
    run.add_argument("--no-verify-lr", dest="verify_lr", action="store_false",
                     help="do not check the recomputed lr against each checkpoint's optimizer")
    released = parser.add_argument_group(
        "released checkpoint file (one checkpoint at step T; every update assumed to have rate ETA)")
    released.add_argument("--model", metavar="NAME", default=None,
                          help="open_clip model name or shipped config (e.g. ViT-B-32, tiny-clip-32); "
                               "the state dict must load into it strictly")
    released.add_argument("--steps", metavar="T", type=int_at_least(1), default=None,
                          help="optimizer steps of the training that produced it (the horizon)")
    released.add_argument("--lr", metavar="ETA", type=float, default=None,
                          help="learning rate of its last update (recorded for every one of the T updates)")
    released.add_argument("--batch-size", metavar="B", type=int_at_least(1), default=None,
                          help="samples per optimizer step (all processes)")


def add_actions(parser: argparse.ArgumentParser) -> None:
    """The ``trajectory`` actions (``import``) under ``parser``."""
    actions = parser.add_subparsers(dest="trajectory_action", metavar="ACTION", required=True)
    importer = actions.add_parser(
        "import", help="write trajectory.json for an open_clip / DataComp run or a released checkpoint",
        description="RUN_DIR: recompute each epoch_K.pt's global step and lr from the run's params.txt. "
                    "CHECKPOINT (a released weights file): check that it loads into --model and record "
                    "it as a one-checkpoint trajectory at step --steps with rate --lr. Writes trajectory.json.")
    add_import_arguments(importer)
    importer.set_defaults(func=run_import)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``trajectory`` to the ``diffin`` command."""
    parser = subparsers.add_parser("trajectory", help="import an open_clip run or checkpoint as a trajectory",
                                   description=DESCRIPTION)
    add_actions(parser)


def summary(trajectory: Trajectory) -> str:
    """A short description of the imported trajectory."""
    from pipeline.model.released import KIND

    if trajectory.source.get("kind") == KIND:
        ref = trajectory.checkpoints[0]
        return (f"1 released checkpoint at T={ref.step} steps, lr {ref.lr:.6g} (constant, as stated), "
                f"N={trajectory.num_samples}, batch {trajectory.batch_size}, model "
                f"{trajectory.model['name']}: {ref.path}")
    return run_summary(trajectory)


def run_summary(trajectory: Trajectory) -> str:
    """A short table of an imported run's checkpoints."""
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


def given(args: argparse.Namespace, options: dict[str, str]) -> list[str]:
    """The flags among ``options`` that were given."""
    return [flag for dest, flag in options.items() if getattr(args, dest) is not None]


def refuse(flags: list[str], form: str, source: str) -> None:
    """Raise when options of the other form were given."""
    if flags:
        raise UsageError(f"{', '.join(flags)}: not for {form} ({source})")


def import_checkpoint_file(args: argparse.Namespace) -> Trajectory:
    """The one-checkpoint trajectory of a released checkpoint file."""
    from pipeline.model.released import ReleasedFacts, import_released

    refuse(given(args, RUN_DIR_OPTIONS) + ([] if args.verify_lr else ["--no-verify-lr"]),
           "a checkpoint file", args.source)
    facts = ReleasedFacts(model=args.model, steps=args.steps, lr=args.lr,
                          num_samples=args.train_num_samples, batch_size=args.batch_size)
    return import_released(args.source, args.out, facts)


def import_run_dir(args: argparse.Namespace) -> Trajectory:
    """The trajectory of an open_clip run directory."""
    from pipeline.model.openclip_import import import_run

    refuse(given(args, RELEASED_OPTIONS), "a run directory (its params.txt states them)", args.source)
    return import_run(args.source, args.out, world_size=args.world_size,
                      train_num_samples=args.train_num_samples, workers=args.workers,
                      verify_lr=args.verify_lr)


def run_import(args: argparse.Namespace) -> int:
    """Import the run directory or checkpoint file and write its trajectory.json."""
    source = Path(args.source)
    if not source.exists():
        raise UsageError(f"{source} not found: give an open_clip run directory or a checkpoint file")
    trajectory = import_checkpoint_file(args) if source.is_file() else import_run_dir(args)
    path = trajectory.save()
    print(f"wrote {path}: {summary(trajectory)}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m jobs.trajectory``."""
    return standalone(add_actions, run_subcommand, DESCRIPTION, argv)


if __name__ == "__main__":
    sys.exit(main())
