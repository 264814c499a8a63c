"""``diffin bench {fidelity,speed,scale,quality,lds,gpu}`` / ``python -m jobs.bench``: the method's benchmarks."""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Sequence

from jobs._common import run_cli
from pipeline.extras import require

BENCHMARKS = {
    "fidelity": "estimated vs actual effect of removing samples (leave-one-out, LDS) on real data",
    "speed": "cost of scoring relative to a plain forward pass, and vs the reference algorithm",
    "scale": "throughput and peak memory of prepare -> score -> select over a large synthetic corpus, "
             "and the reducer over millions of score rows",
    "quality": "zero-shot accuracy / retrieval of models retrained on the pairs each method keeps, "
               "at equal budget, and noisy-pair detection AUC",
    "lds": "a CLIP ground truth that can rank the estimators: LDS over small removal subsets, each "
           "retrained under several visiting orders (resumable, parallel)",
    "gpu": "scoring throughput on one device in one call (synthetic ViT-B-32 trajectory): pairs/s per "
           "method and dtype, a score task with parallel decode, prepare cost, peak memory, score.compile",
}
# Benchmarks that run without the 'bench' extra (synthetic data only: the GPU machine has no extras).
NO_EXTRA = frozenset({"gpu"})


def _module(name: str):
    """``jobs.bench_<name>``: its options (``add_arguments``) and ``run(args)``. Imported when the
    parser is built; it imports :mod:`pipeline.bench` modules, which import the 'bench' extra's
    packages only where used, so the parser builds without them."""
    return importlib.import_module(f"jobs.bench_{name}")


def _run(args: argparse.Namespace) -> int | None:
    """The chosen benchmark, once the 'bench' extra is known to be installed where it needs it
    (one-line error, exit 2, if not)."""
    if args.benchmark not in NO_EXTRA:
        require("bench", f"diffin bench {args.benchmark}")
    return args.run_benchmark(args)


def add_subcommands(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="benchmark", metavar="BENCHMARK", required=True)
    for name, help_text in BENCHMARKS.items():
        bench = sub.add_parser(name, help=help_text, description=help_text)
        module = _module(name)
        module.add_arguments(bench)
        bench.set_defaults(func=_run, run_benchmark=module.run)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("bench", help="run a benchmark (fidelity, speed, scale, quality, lds, gpu)",
                                   description=__doc__)
    add_subcommands(parser)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jobs.bench", description=__doc__)
    add_subcommands(parser)
    args = parser.parse_args(argv)
    return run_cli(args.func, args)


if __name__ == "__main__":
    sys.exit(main())
