"""``diffin bench gpu`` / ``python -m jobs.bench_gpu``: scoring throughput on one device, in one call
(the benchmark itself: :mod:`pipeline.bench.gpu`; the device wrapper: ``benchmarks/gpu/run.sh``).

Writes ``speed_gpu.json`` into ``--out`` (default: the folder in $OUT). Runs standalone with
only torch, numpy, PIL, open_clip and webdataset importable (no Ray, no 'bench' extra).
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import sys
from pathlib import Path
from typing import Sequence

from jobs._common import int_at_least, standalone
from pipeline.errors import UsageError

DESCRIPTION = ("GPU throughput benchmark: forward, diffin_unrolled / tracin / diffin per sample per checkpoint "
               "(float32, TF32, bfloat16), a whole score task with parallel decode, prepare cost, peak memory "
               "per batch and score.compile, on synthetic pairs; writes speed_gpu.json")


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return value


def _sizes(text: str) -> tuple[int, ...]:
    try:
        sizes = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers") from None
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"batch sizes must be >= 1, got {text!r}")
    return sizes


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``diffin bench gpu`` (unset ones keep the preset's value)."""
    parser.add_argument("--out", default=None, help="output folder for speed_gpu.json (default: $OUT)")
    parser.add_argument("--tiny", action="store_true",
                        help="the tiny model, 2 checkpoints, a few pairs: every section in seconds on a CPU (smoke run)")
    parser.add_argument("--device", default=None, help="auto (default: cuda if present), cpu, cuda, cuda:N")
    parser.add_argument("--model", default=None, help="model name (default ViT-B-32)")
    parser.add_argument("--checkpoints", type=int_at_least(1), default=None, help="checkpoints (default 5)")
    parser.add_argument("--batch-size", type=int_at_least(1), default=None, help="scoring batch (default 256)")
    parser.add_argument("--score-pairs", type=int_at_least(2), default=None,
                        help="pairs per score-task measurement at most (default 8192)")
    parser.add_argument("--memory-batches", type=_sizes, default=None,
                        help="comma-separated batch sizes for the memory section (default 64,...,4096)")
    parser.add_argument("--lanczos-steps", type=int_at_least(1), default=None, help="K for the unrolled prepare (default 10)")
    parser.add_argument("--decode-workers", type=int_at_least(0), default=None,
                        help="CPU decode processes (default 0: cores - 2, at most 12)")
    parser.add_argument("--repeats", type=int_at_least(1), default=None, help="timed repeats per measurement (default 5)")
    parser.add_argument("--budget-s", type=_positive_float, default=None,
                        help="seconds per timed measurement (default 10)")
    parser.add_argument("--deadline-s", type=_positive_float, default=None,
                        help="no section starts after this many seconds (default 450)")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                        help="measure score.compile on and off (default: on; off with --tiny)")
    parser.add_argument("--threads", type=int_at_least(1), default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--seed", type=int, default=None)


OPTION_FIELDS = ("device", "model", "checkpoints", "batch_size", "score_pairs", "memory_batches", "lanczos_steps",
                 "decode_workers", "repeats", "budget_s", "deadline_s", "threads", "seed")


def settings_from(args: argparse.Namespace):
    """The run's settings: the preset (full or ``--tiny``) with the options given."""
    from pipeline.bench.gpu import GpuBenchSettings, tiny_settings

    given = {name: getattr(args, name) for name in OPTION_FIELDS if getattr(args, name) is not None}
    if args.compile is not None:
        given["compile"] = args.compile
    return tiny_settings(**given) if args.tiny else GpuBenchSettings(**given)


def command_line(args: argparse.Namespace) -> str:
    """The ``diffin bench gpu …`` command recorded in the results (the options given)."""
    words = ["diffin", "bench", "gpu"] + (["--tiny"] if args.tiny else []) + (
        [] if args.compile is None else ["--compile" if args.compile else "--no-compile"])
    for name in OPTION_FIELDS:
        value = getattr(args, name)
        if value is not None:
            text = ",".join(map(str, value)) if isinstance(value, tuple) else str(value)
            words += [f"--{name.replace('_', '-')}", text]
    return shlex.join(words)


def output_dir(args: argparse.Namespace) -> Path:
    """``--out``, else $OUT; one of them is needed."""
    out = args.out or os.environ.get("OUT")
    if not out:
        raise UsageError("no output folder: pass --out DIR or set OUT")
    return Path(out)


def run(args: argparse.Namespace) -> int:
    """Run the benchmark, printing each section as it ends and the headline numbers at the end.
    Exit 0 when every section ran, 1 when one failed or was skipped (the JSON says which)."""
    from pipeline.bench import gpu

    logging.getLogger("pipeline").setLevel(logging.WARNING)
    out = output_dir(args)
    settings = settings_from(args)
    command = command_line(args)

    def printed(name: str, entry: dict) -> None:
        state = entry.get("error") or entry.get("skipped") or "ok"
        print(f"[{name}] {state} ({entry.get('section_s', 0):.1f} s)", flush=True)

    report = gpu.run_benchmark(settings, out, command, on_section=printed)
    for line in gpu.summary_lines(report):
        print(line)
    print(f"wrote {out / gpu.JSON_NAME}")
    return 0 if report["meta"]["complete"] else 1


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m jobs.bench_gpu``."""
    return standalone(add_arguments, run, DESCRIPTION, argv)


if __name__ == "__main__":
    sys.exit(main())
