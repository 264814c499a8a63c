"""Openclipart corpus: the Debian ``openclipart-svg`` drawings with their titles.

Real, noisy captions: ``dc:title`` of the drawing's ``cc:Work`` (plus ``dc:description`` where
present, different and plain text). The same drawing is filed under several category folders,
sometimes in slightly different revisions: files are deduplicated by file name (the first
relative path in sorted order is canonical), then by content hash. Each SVG is rasterised
with cairosvg to a square image (aspect kept, padded on white) in a process pool; the output
order is the sorted order of the canonical paths whatever the number of workers.

Openclipart drawings are public domain.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import xml.etree.ElementTree as ET
from collections import Counter, deque
from concurrent.futures import Executor, Future, ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, TypeVar

from PIL import Image

from pipeline.data.corpora.common import (
    CorpusInfo, check_min, encode_jpeg, finish_with, prepare_out_dir, skipped_details,
    write_corpus,
)
from pipeline.data.shards import Pair
from pipeline.data.uids import make_uid
from pipeline.errors import UsageError
from pipeline.extras import require

SOURCE = "openclipart"
DEFAULT_ROOT = "/usr/share/openclipart/svg"
MIN_IMAGE_SIZE = 8
MAX_DESCRIPTION_CHARS = 200

NS = {
    "cc": "http://web.resource.org/cc/",
    "dc": "http://purl.org/dc/elements/1.1/",
    "rdf": "http://www.w3.org/1999/02/22-rdf-syntax-ns#",
}
# Strings that are artefacts of the export, not descriptions of the drawing.
_JUNK_TEXT = re.compile(r"^(hash\(0x[0-9a-f]+\)|hash|none|null|untitled|\s*)$", re.IGNORECASE)
# Descriptions that say how or by whom the file was made, not what it shows.
_TOOL_OR_CONTACT = re.compile(
    r"((made|created|drawn|done) (with|in|using) (the )?(sodipodi|inkscape|illustrator)"
    r"|\S+@\S+\.\w+|^https?://\S+$)", re.IGNORECASE)
_KEY_UNSAFE = re.compile(r"[^A-Za-z0-9_-]+")
_NON_WORD = re.compile(r"[\W_]+")

T = TypeVar("T")
R = TypeVar("R")


@dataclass(frozen=True)
class ClipartMeta:
    """Caption-relevant metadata of one drawing."""

    title: str | None
    description: str | None = None
    keywords: tuple[str, ...] = ()


@dataclass
class Rendered:
    """Result of processing one SVG in a worker: a pair's parts, or the reason it was skipped."""

    path: str
    sha256: str = ""
    skip: str | None = None
    image: bytes = b""
    meta: ClipartMeta = field(default_factory=lambda: ClipartMeta(None))


# --------------------------------------------------------------------------- metadata


def clean_text(text: str | None) -> str | None:
    """Collapse whitespace; None for empty text and export artefacts such as ``HASH(0x…)``."""
    if text is None:
        return None
    text = " ".join(text.split())
    return None if _JUNK_TEXT.match(text) else text


def parse_metadata(data: bytes) -> ClipartMeta:
    """Title, description and keywords of the drawing's ``cc:Work`` (namespace-aware).

    Raises ``ET.ParseError`` for malformed XML.
    """
    root = ET.fromstring(data)
    work = root.find(".//cc:Work", NS)
    if work is None:
        return ClipartMeta(None)
    title = clean_text(work.findtext("dc:title", None, NS))
    description = clean_text(work.findtext("dc:description", None, NS))
    keywords: list[str] = []
    for item in work.findall("dc:subject/rdf:Bag/rdf:li", NS):
        word = clean_text((item.text or "").replace("_", " "))
        if word and word.lower() not in keywords:
            keywords.append(word.lower())
    return ClipartMeta(title, description, tuple(keywords))


def _words(text: str) -> str:
    return " ".join(_NON_WORD.sub(" ", text.lower()).split())


def _usable_description(meta: ClipartMeta) -> str | None:
    """The description if it adds plain-text information to the title, else None."""
    desc = meta.description
    if not desc or not meta.title or "<" in desc or _TOOL_OR_CONTACT.search(desc):
        return None
    if _words(desc) == _words(meta.title):
        return None
    if len(desc) > MAX_DESCRIPTION_CHARS:
        cut = desc[:MAX_DESCRIPTION_CHARS].rsplit(" ", 1)[0]
        desc = cut.rstrip(" ,;:") + "…"
    return desc


def make_caption(meta: ClipartMeta, with_keywords: bool = False) -> str | None:
    """``title`` (+ ``. description`` when present and different, + ``; tags: …``)."""
    if not meta.title:
        return None
    caption = meta.title
    desc = _usable_description(meta)
    if desc:
        caption = f"{caption.rstrip('.')}. {desc}"
    if with_keywords and meta.keywords:
        caption = f"{caption}; tags: {', '.join(meta.keywords)}"
    return caption


# --------------------------------------------------------------------------- rendering


def _rasterise(data: bytes, **size: int) -> Image.Image:
    import cairosvg

    png = cairosvg.svg2png(bytestring=data, **size)
    with Image.open(io.BytesIO(png)) as raster:
        return raster.convert("RGBA")


def render_svg(data: bytes, image_size: int) -> Image.Image | None:
    """Rasterise to fit ``image_size`` (aspect kept), centred on white; None if blank.

    Raises whatever cairosvg raises for SVGs it cannot render.
    """
    raster = _rasterise(data, output_width=image_size)
    if raster.height > image_size:
        raster = _rasterise(data, output_height=image_size)
    if raster.getextrema()[3][1] == 0:
        return None  # fully transparent: nothing visible
    canvas = Image.new("RGBA", (image_size, image_size), (255, 255, 255, 255))
    offset = ((image_size - raster.width) // 2, (image_size - raster.height) // 2)
    canvas.alpha_composite(raster, offset)
    return canvas.convert("RGB")


def process_file(path: str, image_size: int) -> Rendered:
    """Read, hash, parse and render one SVG (runs in a worker process)."""
    data = Path(path).read_bytes()
    result = Rendered(path, hashlib.sha256(data).hexdigest())
    try:
        result.meta = parse_metadata(data)
    except ET.ParseError:
        result.skip = "xml_error"
        return result
    if make_caption(result.meta) is None:
        result.skip = "no_title"
        return result
    try:
        image = render_svg(data, image_size)
    except Exception:  # noqa: BLE001 - cairosvg raises many types for bad SVGs
        result.skip = "render_error"
        return result
    if image is None:
        result.skip = "blank_image"
        return result
    result.image = encode_jpeg(image)
    return result


# --------------------------------------------------------------------------- sources


def list_canonical(root: str | os.PathLike) -> dict[str, list[str]]:
    """The ``.svg`` files under ``root``, one per file name: canonical path → other paths.

    Paths are relative, ``/``-separated; the canonical one is the first in sorted order and
    the result is ordered by it.
    """
    paths = []
    for folder, _dirs, files in os.walk(root):
        rel = os.path.relpath(folder, root)
        paths.extend(os.path.normpath(os.path.join(rel, f)).replace(os.sep, "/")
                     for f in files if f.lower().endswith(".svg"))
    by_name: dict[str, list[str]] = {}
    for path in sorted(paths):
        by_name.setdefault(path.rsplit("/", 1)[-1], []).append(path)
    groups = sorted(by_name.values())
    return {group[0]: group[1:] for group in groups}


def _ordered_map(fn: Callable[[T], R], items: Iterable[T], executor: Executor | None,
                 window: int) -> Iterator[R]:
    """``map(fn, items)`` in input order, at most ``window`` tasks in flight (bounded memory)."""
    if executor is None:
        yield from map(fn, items)
        return
    pending: deque[Future] = deque()
    for item in items:
        pending.append(executor.submit(fn, item))
        if len(pending) >= window:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


class _Task:
    """Picklable ``process_file`` with the root and size bound in."""

    def __init__(self, root: str, image_size: int) -> None:
        self.root, self.image_size = root, image_size

    def __call__(self, rel: str) -> Rendered:
        result = process_file(os.path.join(self.root, rel), self.image_size)
        result.path = rel
        return result


def sample_key(rel_path: str) -> str:
    """A dot-free key from the file name, e.g. ``openclipart_heart_roberto_u_01``."""
    stem = rel_path.rsplit("/", 1)[-1].rsplit(".", 1)[0]
    return f"{SOURCE}_{_KEY_UNSAFE.sub('_', stem).strip('_') or 'unnamed'}"


def _to_pair(result: Rendered, key: str, duplicates: list[str], with_keywords: bool) -> Pair:
    meta: dict[str, Any] = {
        "uid": make_uid(SOURCE, result.path), "source": SOURCE, "path": result.path,
        "duplicate_paths": duplicates, "title": result.meta.title,
        "keywords": list(result.meta.keywords), "sha256": result.sha256,
    }
    if result.meta.description:
        meta["description"] = result.meta.description
    caption = make_caption(result.meta, with_keywords)
    return Pair(key, result.image, caption or "", meta)


def iter_openclipart_pairs(root: str | os.PathLike = DEFAULT_ROOT, *, image_size: int = 64,
                           limit: int | None = None, workers: int | None = None,
                           with_keywords: bool = False,
                           stats: Counter | None = None) -> Iterator[Pair]:
    """Yield pairs for the canonical SVGs under ``root`` in sorted path order.

    ``limit`` keeps the first ``limit`` canonical files (before the content-hash dedupe and
    the skips). ``workers`` > 1 renders in a process pool; 0 or 1 renders in this process.
    """
    stats = Counter() if stats is None else stats
    groups = list_canonical(root)
    canonical = list(groups)[:limit]
    stats["duplicate_name"] += sum(len(groups[path]) for path in canonical)
    workers = (os.cpu_count() or 1) if workers is None else workers
    task = _Task(str(root), image_size)
    executor = ProcessPoolExecutor(workers) if workers > 1 else None
    seen_hashes: set[str] = set()
    keys: set[str] = set()
    try:
        for result in _ordered_map(task, canonical, executor, window=16 * max(workers, 1)):
            if result.sha256 in seen_hashes:
                stats["duplicate_content"] += 1
                continue
            seen_hashes.add(result.sha256)
            if result.skip:
                stats[result.skip] += 1
                continue
            key = sample_key(result.path)
            if key in keys:
                key = f"{key}_{make_uid(SOURCE, result.path)[:8]}"
            keys.add(key)
            yield _to_pair(result, key, groups[result.path], with_keywords)
    finally:
        if executor is not None:
            executor.shutdown(wait=True, cancel_futures=True)


def attribution_text() -> str:
    """The provenance note written beside Openclipart shards."""
    return (
        "Images: Openclipart drawings (Debian package openclipart-svg), public domain\n"
        "(https://openclipart.org). Captions: the drawings' own dc:title / dc:description.\n"
    )


def build_openclipart(out_dir: str | os.PathLike, *, root: str | os.PathLike = DEFAULT_ROOT,
                      image_size: int = 64, shard_size: int = 1000, overwrite: bool = False,
                      limit: int | None = None, workers: int | None = None,
                      with_keywords: bool = False) -> CorpusInfo:
    """Build the Openclipart corpus into ``out_dir``; skipped counts go to ``details``."""
    require("data", "the Openclipart corpus builder", ("cairosvg",))
    check_min("--image-size", image_size, MIN_IMAGE_SIZE)
    check_min("--limit", limit, 1)
    check_min("--workers", workers, 0)
    if not Path(root).is_dir():
        raise UsageError(f"openclipart source {root} not found "
                         "(install the Debian package openclipart-svg)")
    prepare_out_dir(out_dir, overwrite)
    stats: Counter = Counter()
    details: dict[str, Any] = {"root": str(root), "image_size": image_size, "limit": limit,
                               "with_keywords": with_keywords}
    pairs = iter_openclipart_pairs(root, image_size=image_size, limit=limit, workers=workers,
                                   with_keywords=with_keywords, stats=stats)
    pairs = finish_with(pairs, lambda: details.update(skipped_details(stats)))
    return write_corpus(pairs, out_dir, source=SOURCE, shard_size=shard_size,
                        overwrite=overwrite, details=details,
                        extra_files={"ATTRIBUTION.txt": attribution_text().encode("utf-8")})
