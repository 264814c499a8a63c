"""Example grids: the best kept and the worst pruned pairs, with thumbnails from the shards.

Only the shards that hold an example are read, each once, and only until its last wanted
key has been seen.
"""

from __future__ import annotations

import collections
import contextlib
import io
import logging
import tarfile
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from PIL import Image

from pipeline.data.scan import ShardReader
from pipeline.data.shards import IMAGE_EXTS
from pipeline.io.storage import StorageOptions, arrow_source
from pipeline.report.gather import Candidate, is_kept, read_rows

log = logging.getLogger(__name__)

THUMBNAIL_PX = 128
_EXAMPLE_COLUMNS = ["uid", "key", "shard", "index"]
_IMAGE_ERRORS = (OSError, ValueError, tarfile.TarError, Image.DecompressionBombError)


@dataclass(frozen=True)
class Example:
    """One pair shown in a grid."""

    uid: str
    key: str
    shard: str
    index: int
    score: float
    rank: int | None = None
    caption: str | None = None
    thumbnail: bytes | None = None  # JPEG


def best_kept(selection: Path, n: int) -> list[Example]:
    """The ``n`` kept pairs of best rank (from ``kept.parquet``), best first."""
    path = selection / "kept.parquet"
    if n <= 0 or not path.is_file():
        return []
    parts = []
    where, filesystem = arrow_source(path)
    with pq.ParquetFile(where, filesystem=filesystem) as parquet:
        for batch in parquet.iter_batches(batch_size=1 << 16, columns=[*_EXAMPLE_COLUMNS, "score", "rank"]):
            parts.append(batch.filter(pc.less_equal(batch.column("rank"), n)))
    rows = pa.Table.from_batches(parts).sort_by("rank").slice(0, n).to_pylist() if parts else []
    return [Example(r["uid"], r["key"], r["shard"], r["index"], r["score"], rank=r["rank"]) for r in rows]


def worst_pruned(files: list[Path], lowest: list[Candidate], kept_uids: np.ndarray | None,
                 n: int) -> list[Example]:
    """The ``n`` lowest-scoring candidates that were not kept, lowest first (ties by uid)."""
    by_file: dict[int, list[Candidate]] = collections.defaultdict(list)
    for candidate in lowest:
        by_file[candidate.file].append(candidate)
    examples = []
    for file_no, candidates in sorted(by_file.items()):
        table = read_rows(files[file_no], [c.row for c in candidates], _EXAMPLE_COLUMNS)
        kept = (is_kept(table.column("uid"), kept_uids) if kept_uids is not None
                else np.zeros(len(candidates), bool))
        for row, candidate, was_kept in zip(table.to_pylist(), candidates, kept):
            if not was_kept:
                examples.append(Example(row["uid"], row["key"], row["shard"], row["index"], candidate.score))
    examples.sort(key=lambda e: (e.score, e.uid))
    return examples[:n]


def thumbnail(data: bytes, size: int = THUMBNAIL_PX) -> bytes:
    """A JPEG of at most ``size``×``size`` pixels (transparency flattened onto white)."""
    with Image.open(io.BytesIO(data)) as image:
        image.draft("RGB", (size, size))
        rgba = image.convert("RGBA")
    canvas = Image.new("RGB", rgba.size, (255, 255, 255))
    canvas.paste(rgba, mask=rgba.getchannel("A"))
    canvas.thumbnail((size, size), Image.Resampling.LANCZOS)
    out = io.BytesIO()
    canvas.save(out, format="JPEG", quality=85, optimize=True)
    return out.getvalue()


def _image_member(sample: dict) -> bytes | None:
    return next((sample[ext] for ext in IMAGE_EXTS if ext in sample), None)


def _read_shard(url: str, keys: set[str], size: int,
                storage: StorageOptions | None = None) -> dict[str, tuple[str | None, bytes | None]]:
    """Caption and thumbnail of each wanted key of one shard (local or remote)."""
    found: dict[str, tuple[str | None, bytes | None]] = {}
    reader = ShardReader(url, storage=storage)
    try:
        samples = ({"__key__": raw.key, **raw.members} for raw in reader)
        with contextlib.closing(samples):
            found = _find_keys(samples, url, keys, size)
    except Exception as exc:  # noqa: BLE001  (thumbnails are best effort: any storage error)
        log.warning("report: cannot read shard %s: %s", url, exc)
    if reader.report.status == "unreadable":
        log.warning("report: shard %s cannot be read (%s); its examples have no image", url, reader.report.error)
    return found


def _find_keys(samples, url: str, keys: set[str], size: int) -> dict[str, tuple[str | None, bytes | None]]:
    found: dict[str, tuple[str | None, bytes | None]] = {}
    for sample in samples:
        key = sample.get("__key__")
        if key not in keys:
            continue
        text = sample.get("txt")
        caption = text.decode("utf-8", errors="replace") if isinstance(text, bytes) else None
        image = _image_member(sample)
        try:
            thumb = thumbnail(image, size) if image is not None else None
        except _IMAGE_ERRORS as exc:
            log.warning("report: cannot decode the image of %s in %s: %s", key, url, exc)
            thumb = None
        found[key] = (caption, thumb)
        if len(found) == len(keys):
            break
    return found


def attach_media(examples: list[Example], size: int = THUMBNAIL_PX,
                 storage: StorageOptions | None = None) -> list[Example]:
    """The examples with captions and thumbnails read from their shards (None where unreadable)."""
    keys_by_shard: dict[str, set[str]] = collections.defaultdict(set)
    for example in examples:
        keys_by_shard[example.shard].add(example.key)
    media = {shard: _read_shard(shard, keys, size, storage) for shard, keys in sorted(keys_by_shard.items())}
    out = []
    for example in examples:
        caption, thumb = media[example.shard].get(example.key, (None, None))
        out.append(replace(example, caption=caption, thumbnail=thumb))
    return out
