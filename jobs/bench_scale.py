"""``diffin bench scale``: its options, the run, the printed table (the benchmark itself:
:mod:`pipeline.bench.scale`)."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from pipeline.bench import scale
from pipeline.bench.scale import DEFAULT_OUT, DEFAULT_WORK, PARTS, QUICK, QUICK_OUT, ScalePlan
from pipeline.errors import UsageError
from pipeline.influence.scores import METHOD_COMPONENTS

# options that override a field of the plan (option dest = ScalePlan field)
PLAN_OPTIONS = ("pairs", "checkpoint_pairs", "shard_size", "method", "batch_size", "bank_size", "actors",
                "reducer_rows", "reducer_files", "reducer_strategy", "reducer_executor")


def _int_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``diffin bench scale``."""
    d = ScalePlan()
    parser.add_argument("--quick", action="store_true",
                        help=f"a smoke run ({QUICK.pairs} pairs, {QUICK.reducer_rows} reducer rows) in a temporary dir")
    parser.add_argument("--pairs", type=int, help=f"synthetic pairs to score (default {d.pairs})")
    parser.add_argument("--checkpoint-pairs", type=_int_list, metavar="N[,N...]",
                        help="also record peak RSS when scoring passes these pair counts (default "
                             + ",".join(map(str, d.checkpoint_pairs)) + ")")
    parser.add_argument("--shard-size", type=int, help=f"pairs per shard (default {d.shard_size})")
    parser.add_argument("--method", choices=tuple(METHOD_COMPONENTS), help=f"score.method (default {d.method})")
    parser.add_argument("--batch-size", type=int, help=f"scoring batch (default {d.batch_size})")
    parser.add_argument("--bank-size", type=int, help=f"negative bank (default {d.bank_size})")
    parser.add_argument("--actors", type=int, help=f"scoring actors, one thread each (default {d.actors})")
    parser.add_argument("--reducer-rows", type=int, help=f"synthetic score rows (default {d.reducer_rows})")
    parser.add_argument("--reducer-files", type=int,
                        help=f"score files they are spread over (default {d.reducer_files})")
    parser.add_argument("--reducer-strategy", choices=("memory", "bounded"),
                        help=f"select strategy of the reducer run (default {d.reducer_strategy})")
    parser.add_argument("--reducer-executor", choices=("local", "ray"),
                        help="bounded reducer's tasks: in its process or on an embedded local Ray "
                             f"(default {d.reducer_executor})")
    parser.add_argument("--parts", default="pipeline,reducer",
                        help="comma-separated: pipeline, reducer (default both)")
    parser.add_argument("--work-dir", help=f"corpora, trajectory, runs (default {DEFAULT_WORK}; reused)")
    parser.add_argument("--out", help=f"results JSON, merged into (default {DEFAULT_OUT}; {QUICK_OUT} with --quick)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar while scoring")


def plan(args: argparse.Namespace) -> ScalePlan:
    """The plan: quick or full defaults, with the options given on the command line."""
    return scale.plan_for(args.quick, **{opt: getattr(args, opt) for opt in PLAN_OPTIONS})


def parts(text: str) -> list[str]:
    """``--parts``: the measurements to run, in the order given."""
    chosen = [p.strip() for p in text.split(",") if p.strip()]
    bad = [p for p in chosen if p not in PARTS]
    if bad or not chosen:
        raise UsageError(f"--parts: expected pipeline and/or reducer, got {text!r}")
    return chosen


def command(args: argparse.Namespace) -> str:
    """The ``diffin bench scale …`` command recorded in the results."""
    words = ["diffin bench scale"] + (["--quick"] if args.quick else [])
    for opt in PLAN_OPTIONS:
        value = getattr(args, opt)
        if value is not None:
            text = ",".join(map(str, value)) if isinstance(value, tuple) else str(value)
            words.append(f"--{opt.replace('_', '-')} {text}")
    if args.parts != "pipeline,reducer":
        words.append(f"--parts {args.parts}")
    return " ".join(words)


def run(args: argparse.Namespace) -> int:
    """``diffin bench scale``: measure, merge into the results JSON, print the table."""
    logging.getLogger("pipeline").setLevel(logging.INFO)
    chosen_plan, chosen_parts = plan(args), parts(args.parts)
    work_dir = args.work_dir or (None if args.quick else DEFAULT_WORK)  # None: a temporary dir
    out = Path(args.out or (QUICK_OUT if args.quick else DEFAULT_OUT))
    results = scale.run_benchmark(chosen_plan, out, work_dir, chosen_parts, command(args),
                                  progress=not args.no_progress)
    print(scale.format_table(results))
    print(f"wrote {out}")
    return 0
