"""One factory for the stage jobs: ``python -m jobs.<stage> --config FILE [--run-dir DIR]``."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Sequence

from jobs._common import standalone


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="run config YAML")
    parser.add_argument("--run-dir", help="output directory (default: runs/<config name>)")
    parser.add_argument("--executor", choices=("ray", "local"), default="ray",
                        help="Ray (default: new embedded local Ray, or the cluster in RAY_ADDRESS / "
                             "resources.address) or in-process")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def add_select_arguments(parser: argparse.ArgumentParser) -> None:
    """``diffin select``'s named-selection options (a sweep without editing the config)."""
    parser.add_argument("--selection", action="append", default=[], metavar="'NAME:key=value,...'",
                        dest="selection_overrides",
                        help="a named selection for this invocation (repeatable): select fields as YAML values, "
                             "the rest inherited from the select: section; replaces a selections: entry of that "
                             "name, e.g. --selection keep30:fraction=0.3")
    parser.add_argument("--only", action="append", default=[], metavar="NAME[,NAME]",
                        help="run only these named selections (not selection/)")


def add_reshard_arguments(parser: argparse.ArgumentParser) -> None:
    """``diffin reshard``'s choice of a named selection."""
    parser.add_argument("--selection", metavar="NAME", dest="selection_name",
                        help="reshard the named selection selections/NAME/ (into selections/NAME/shards/) "
                             "instead of selection/ and the selections: entries with reshard: true")


def selection_names(args: argparse.Namespace) -> list[str] | None:
    """The named selections a stage job is restricted to (``--only`` of select, ``--selection``
    of reshard), None when not restricted."""
    only = [n.strip() for item in getattr(args, "only", None) or [] for n in item.split(",")]
    if getattr(args, "only", None):
        return only
    name = getattr(args, "selection_name", None)
    return None if name is None else [name]


def print_summary(summary: dict, run_dir: str) -> None:
    """What a person wants to see at the end of a run: counts, time, where the outputs are."""
    print(f"done in {summary['seconds']:.1f}s ({', '.join(summary['stages'])}) -> {run_dir}")
    print(f"  pairs in: {summary['pairs_in']} in {summary['shards']} shards; "
          f"proxy training pairs: {summary['train_pairs']}")
    print(f"  trajectory: {summary['trajectory']}  (checkpoints at steps {[c['step'] for c in summary['checkpoints']]})")
    losses = [c.get("target_loss") for c in summary["checkpoints"]]
    known = sum(x is not None for x in losses)
    if known:
        shown = ", ".join("–" if x is None else f"{x:.4f}" for x in losses)
        window = summary.get("checkpoint_window")
        over = " over the scored checkpoints" if window else ""
        verdict = (f"  (does NOT fall{over}: the scores measure influence on a loss training does not reduce)"
                   if summary.get("target_loss_warning") else f"  (falls{over})" if known > 1 else "")
        print(f"  target loss L_V per checkpoint: {shown}{verdict}")
        if window:
            print(f"  scored checkpoints (score.checkpoint_window: {window['rule']}): {window['scored']} "
                  f"(steps {window['steps']}); dropped after L_V's lowest: {window['dropped'] or 'none'}")
    if "scores" in summary:
        print(f"  scores: {summary['scores']}/  (scored now: {summary['shards_scored_now']} shards, "
              f"{summary['pairs_scored_now']} pairs; failed now: {summary['failed_now'] or 'none'})")
    if summary.get("retried_shards"):
        retried = summary["retried_shards"]
        print(f"  retried after a worker (or its node) died: {len(retried)} shard(s), e.g. {retried[0]['shard']}")
    if "selection" in summary:
        sel = summary["selection"]
        print(f"  selection: {sel['dir']}/  scored ok {sel['scored_ok']}, failed {sel['failed']}, kept {sel['kept']}")
    if "reshard" in summary:
        print(f"  shards: {summary['reshard']['dir']}/  ({summary['reshard']['shards']} shards, "
              f"{summary['reshard']['pairs']} pairs)")
        for source in summary["reshard"].get("damaged_sources", []):
            print(f"  damaged input shard {source['shard']} ({source['status']}): its {source['kept']} kept "
                  "pair(s) lie before the damage and were copied")
    for name, sel in sorted((summary.get("selections") or {}).items()):
        shards = sel.get("shards")
        resharded = f"; shards: {shards['shards']} shards, {shards['pairs']} pairs" if shards else ""
        counts = (f"scored ok {sel['scored_ok']}, failed {sel['failed']}, kept {sel['kept']}"
                  f"{'' if sel.get('recomputed', True) else ' (reused)'}" if "kept" in sel else "")
        print(f"  selection {name}: {sel.get('dir', '')}/  {counts}{resharded}")
    print(f"  summary: {run_dir.rstrip('/')}/run_summary.json")


@dataclass(frozen=True)
class StageJob:
    """A job entrypoint running ``stages`` of the pipeline."""

    command: str
    stages: tuple[str, ...]
    description: str
    named: Literal["select", "reshard"] | None = None  # which named-selection options it takes

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        """The job's arguments: the run's, and its named-selection options."""
        add_run_arguments(parser)
        if self.named == "select":
            add_select_arguments(parser)
        elif self.named == "reshard":
            add_reshard_arguments(parser)

    def run(self, args: argparse.Namespace) -> int:
        from pipeline.config import load_config, parse_selection_override, with_selections
        from pipeline.runtime.executor import make_executor
        from pipeline.stages.context import RunContext
        from pipeline.stages.pipeline import check_selection_names, run_pipeline

        config = load_config(args.config)
        overrides = getattr(args, "selection_overrides", None) or []
        if overrides:
            config = with_selections(config, [parse_selection_override(text) for text in overrides])
        run_dir = args.run_dir or str(Path("runs") / Path(args.config).stem)  # a path or an fsspec URL
        context = RunContext.resolve(config, run_dir, args.config)  # bad inputs fail here, before Ray starts
        names = selection_names(args)
        if names is not None:
            check_selection_names(context, names, self.named or "select")
        executor = make_executor(args.executor, config.resources.address)
        try:
            summary = run_pipeline(config, run_dir, executor, progress=not args.no_progress, stages=self.stages,
                                   context=context, selections=names)
        finally:
            executor.shutdown()
        print_summary(summary, run_dir)
        return 0

    def register(self, subparsers: argparse._SubParsersAction, help_text: str | None = None) -> None:
        parser = subparsers.add_parser(self.command, help=help_text or self.description,
                                       description=self.description)
        self.add_arguments(parser)
        parser.set_defaults(func=self.run)

    def main(self, argv: Sequence[str] | None = None) -> int:
        return standalone(self.add_arguments, self.run, self.description, argv)
