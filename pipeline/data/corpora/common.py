"""Shared machinery for corpus builders: stream pairs into a shard directory atomically."""

from __future__ import annotations

import io
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping

from PIL import Image

from pipeline.data.shards import Pair, ShardWriter
from pipeline.errors import UsageError
from pipeline.io.atomic import atomic_path, write_json_atomic

CORPUS_FILE = "corpus.json"


@dataclass
class CorpusInfo:
    """What a builder wrote: source, counts, shard names and free-form details."""

    source: str
    out_dir: str
    num_pairs: int
    sizes: dict[str, int]
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def shard_pattern(self) -> str:
        """A brace pattern naming every shard, for configs (e.g. ``DIR/{00000..00008}.tar``)."""
        last = len(self.sizes) - 1
        return os.path.join(self.out_dir, "{00000..%05d}.tar" % last) if last > 0 \
            else os.path.join(self.out_dir, "00000.tar")


def encode_jpeg(image: Image.Image, quality: int = 90) -> bytes:
    """Encode an image as baseline JPEG deterministically (RGB, fixed quality, no metadata)."""
    buf = io.BytesIO()
    image.convert("RGB").save(buf, format="JPEG", quality=quality, optimize=False)
    return buf.getvalue()


def prepare_out_dir(out_dir: str | os.PathLike, overwrite: bool) -> Path:
    """Check that ``out_dir`` may be written; refuse to clobber an existing corpus."""
    path = Path(out_dir)
    if path.exists() and not path.is_dir():
        raise UsageError(f"--out {path} exists and is not a directory")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise UsageError(f"--out {path} is not empty; pass --overwrite to replace it")
    return path


def write_corpus(pairs: Iterable[Pair], out_dir: str | os.PathLike, *, source: str,
                 shard_size: int = 1000, overwrite: bool = False,
                 details: dict[str, Any] | None = None,
                 extra_files: dict[str, bytes] | None = None) -> CorpusInfo:
    """Stream ``pairs`` into ``out_dir`` as shards + ``sizes.json`` + ``corpus.json``.

    Everything is written into a temporary directory that replaces ``out_dir`` only when
    the whole corpus is complete, so a failure never leaves a half-written corpus.
    ``extra_files`` (e.g. a license/attribution text) are written beside the shards.
    ``details`` is read only after the last pair has been consumed, so the pair generator
    may still fill it in (e.g. skipped counts, see :func:`finish_with`).
    """
    if shard_size < 1:
        raise UsageError(f"--shard-size must be >= 1, got {shard_size}")
    target = prepare_out_dir(out_dir, overwrite)
    with atomic_path(target) as tmp:
        writer = ShardWriter(tmp, max_count=shard_size)
        with writer:
            for pair in pairs:
                writer.write_pair(pair)
        if not writer.sizes:
            raise UsageError(f"source {source!r} produced no pairs")
        num = sum(writer.sizes.values())
        for name, data in (extra_files or {}).items():
            (tmp / name).write_bytes(data)
        info = CorpusInfo(source, str(target), num, dict(writer.sizes), dict(details or {}))
        write_json_atomic(tmp / CORPUS_FILE, {
            "source": source, "num_pairs": num, "num_shards": len(writer.sizes),
            "shards": info.shard_pattern.replace(str(target), ".", 1), "details": info.details,
        })
    return info


def finish_with(pairs: Iterable[Pair], on_done: Callable[[], None]) -> Iterator[Pair]:
    """Yield ``pairs``, then call ``on_done()`` once they are exhausted (not on error)."""
    yield from pairs
    on_done()


def skipped_details(stats: Mapping[str, int], not_skips: Iterable[str] = ()) -> dict[str, Any]:
    """``{"skipped": {reason: count}}`` from a counter, plus the counts named in ``not_skips``."""
    keep = set(not_skips)
    details: dict[str, Any] = {
        "skipped": {k: int(v) for k, v in sorted(stats.items()) if v and k not in keep}}
    details.update({k: int(stats.get(k, 0)) for k in sorted(keep)})
    return details


def check_min(option: str, value: int | None, minimum: int) -> None:
    """Raise UsageError unless ``value`` is None or at least ``minimum`` (``option`` names it)."""
    if value is not None and value < minimum:
        raise UsageError(f"{option} must be >= {minimum}, got {value}")


def check_fraction(option: str, value: float) -> None:
    """Raise UsageError unless ``0 <= value <= 1`` (``option`` names it, e.g. ``--noise``)."""
    if not 0.0 <= value <= 1.0:  # also rejects NaN
        raise UsageError(f"{option} must be between 0 and 1, got {value}")
