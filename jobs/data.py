"""``diffin data``: build WebDataset corpora from the real data on this machine.

    diffin data openmoji --out data/openmoji
    diffin data openclipart --out data/openclipart --workers 8
    diffin data fashion-mnist --out data/fmnist --noise 0.2 --seed 0
    diffin data fashion-mnist --out data/fmnist-look --noise 0.2 --noise-kind lookalike
    diffin data synthetic --out data/synth --num-pairs 10000000 --noise 0.1

Each writes numbered tar shards, ``sizes.json`` and ``corpus.json`` atomically and prints a
one-line summary. Bad input is reported in one line (exit 2) before anything is written.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, Sequence

from jobs._common import standalone
from pipeline.data.corpora import fashion_mnist, openclipart, openmoji, synthetic
from pipeline.data.corpora.common import CorpusInfo

DESCRIPTION = "Build image-text corpora as WebDataset shards (OpenMoji, Openclipart, " \
              "Fashion-MNIST, synthetic)."


def _skipped(details: dict[str, Any]) -> str:
    skipped = details.get("skipped") or {}
    if not skipped:
        return ""
    return " (skipped: " + ", ".join(f"{k}={v}" for k, v in sorted(skipped.items())) + ")"


def summary(info: CorpusInfo) -> str:
    """One line: pairs, shards, output directory and skipped counts."""
    return (f"{info.source}: {info.num_pairs} pairs in {len(info.sizes)} shards -> "
            f"{info.out_dir}{_skipped(info.details)}")


def run_openmoji(args: argparse.Namespace) -> int:
    """Build the OpenMoji corpus."""
    info = openmoji.build_openmoji(args.out, image_size=args.image_size, limit=args.limit,
                                   shard_size=args.shard_size, overwrite=args.overwrite)
    fallback = info.details.get("svg_fallback", 0)
    print(summary(info) + (f" [{fallback} rendered from SVG]" if fallback else ""))
    return 0


def run_openclipart(args: argparse.Namespace) -> int:
    """Build the Openclipart corpus."""
    info = openclipart.build_openclipart(
        args.out, root=args.source, image_size=args.image_size, limit=args.limit,
        workers=args.workers, with_keywords=args.keywords, shard_size=args.shard_size,
        overwrite=args.overwrite)
    print(summary(info))
    return 0


def run_fashion_mnist(args: argparse.Namespace) -> int:
    """Build the Fashion-MNIST train and test corpora."""
    infos = fashion_mnist.build_fashion_mnist(
        args.out, root=args.source, noise=args.noise, seed=args.seed, limit=args.limit,
        shard_size=args.shard_size, overwrite=args.overwrite, noise_kind=args.noise_kind)
    parts = [f"{split} {info.num_pairs} pairs ({info.details['num_noisy']} noisy captions) "
             f"in {len(info.sizes)} shards" for split, info in infos.items()]
    print(f"{fashion_mnist.SOURCE}: " + ", ".join(parts) + f" -> {args.out}")
    return 0


def run_synthetic(args: argparse.Namespace) -> int:
    """Build a synthetic corpus."""
    info = synthetic.build_synthetic(
        args.out, num_pairs=args.num_pairs, image_size=args.image_size, noise=args.noise,
        seed=args.seed, shard_size=args.shard_size, overwrite=args.overwrite)
    print(summary(info) + f" ({info.details['num_noisy']} noisy)")
    return 0


def _common_options(parser: argparse.ArgumentParser, shard_size: int) -> None:
    parser.add_argument("--out", required=True, metavar="DIR",
                        help="output directory (must be empty or absent unless --overwrite)")
    parser.add_argument("--shard-size", type=int, default=shard_size, metavar="N",
                        help=f"pairs per tar shard (default {shard_size})")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing output directory (atomically, when done)")


def _add_openmoji(sub: Any) -> None:
    p = sub.add_parser("openmoji", help="OpenMoji emoji captioned with Unicode names (CC BY-SA)",
                       description=openmoji.__doc__.split("\n\n")[0])
    _common_options(p, 1000)
    p.add_argument("--image-size", type=int, default=64, metavar="PX", help="default 64")
    p.add_argument("--limit", type=int, default=None, metavar="N",
                   help="only the first N emoji in code point order (for tests)")
    p.set_defaults(func=run_openmoji)


def _add_openclipart(sub: Any) -> None:
    p = sub.add_parser("openclipart", help="Openclipart SVGs captioned with their titles",
                       description=openclipart.__doc__.split("\n\n")[0])
    _common_options(p, 1000)
    p.add_argument("--source", default=openclipart.DEFAULT_ROOT, metavar="DIR",
                   help=f"SVG tree (default {openclipart.DEFAULT_ROOT})")
    p.add_argument("--image-size", type=int, default=64, metavar="PX", help="default 64")
    p.add_argument("--limit", type=int, default=None, metavar="N",
                   help="only the first N unique files in sorted path order (for tests)")
    p.add_argument("--workers", type=int, default=None, metavar="N",
                   help="rasterising processes (default: CPU count; 0 or 1: in-process)")
    p.add_argument("--keywords", action="store_true",
                   help="append the drawing's keywords to the caption")
    p.set_defaults(func=run_openclipart)


def _add_fashion_mnist(sub: Any) -> None:
    p = sub.add_parser("fashion-mnist", help="Fashion-MNIST with templated captions, "
                       "optional label noise", description=fashion_mnist.__doc__.split("\n\n")[0])
    _common_options(p, 1000)
    p.add_argument("--source", default=fashion_mnist.DEFAULT_ROOT, metavar="DIR",
                   help=f"directory of the idx .gz files (default {fashion_mnist.DEFAULT_ROOT})")
    p.add_argument("--noise", type=float, default=0.0, metavar="P",
                   help="fraction of TRAIN captions naming another class (default 0)")
    # Checked by the builder, not argparse ``choices``, so a bad value is a one-line error.
    p.add_argument("--noise-kind", default="uniform", metavar="KIND",
                   help="which class a noisy caption names: uniform (any other class, the "
                        "default) or lookalike (a similar-looking class; bags stay clean)")
    p.add_argument("--seed", type=int, default=0, help="RNG seed (default 0)")
    p.add_argument("--limit", type=int, default=None, metavar="N",
                   help="only the first N images of each split (for tests)")
    p.set_defaults(func=run_fashion_mnist)


def _add_synthetic(sub: Any) -> None:
    p = sub.add_parser("synthetic", help="procedural shapes with captions, for scale tests",
                       description=synthetic.__doc__.split("\n\n")[0])
    _common_options(p, 10000)
    p.add_argument("--num-pairs", type=int, default=100_000, metavar="N",
                   help="number of pairs (default 100000)")
    p.add_argument("--image-size", type=int, default=32, metavar="PX", help="default 32")
    p.add_argument("--noise", type=float, default=0.0, metavar="P",
                   help="fraction of pairs with the caption of another image (default 0)")
    p.add_argument("--seed", type=int, default=0, help="RNG seed (default 0)")
    p.set_defaults(func=run_synthetic)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the corpus sub-commands to ``parser``."""
    sub = parser.add_subparsers(dest="corpus", metavar="CORPUS", required=True)
    for add in (_add_openmoji, _add_openclipart, _add_fashion_mnist, _add_synthetic):
        add(sub)


def register(subparsers: Any) -> None:
    """Add ``data`` to the ``diffin`` sub-commands."""
    parser = subparsers.add_parser("data", help="build corpora as WebDataset shards",
                                   description=DESCRIPTION)
    add_arguments(parser)


def _run(args: argparse.Namespace) -> int:
    return args.func(args)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m jobs.data CORPUS --out DIR …``"""
    return standalone(add_arguments, _run, DESCRIPTION, argv)


if __name__ == "__main__":
    sys.exit(main())
