"""Load image–text pairs from shards into memory as model-ready tensors (for proxy training)."""

from __future__ import annotations

import hashlib
import io
import json
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterable, Sequence

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from pipeline.data.scan import ShardReader
from pipeline.data.shards import IMAGE_EXTS, expected_count
from pipeline.data.uids import DEFAULT_UID_FROM, no_uid_reason, sample_uid
from pipeline.io.storage import StorageOptions

if TYPE_CHECKING:
    from pipeline.data.shards import Pair

log = logging.getLogger(__name__)


@dataclass
class PairTable:
    """Decoded pairs: ids, uint8 NCHW images at one resolution, captions; ``labels`` (a class
    index per pair) only on a target set loaded for a zero-shot target (``target.zero_shot``)."""

    uids: list[str]
    keys: list[str]
    shards: list[str]
    images: torch.Tensor  # uint8 [N, 3, S, S]
    captions: list[str]
    skipped: dict[str, int]
    labels: list[int] | None = None

    def __len__(self) -> int:
        return len(self.uids)

    def subset(self, indices: Sequence[int]) -> "PairTable":
        """The pairs at ``indices``, in that order."""
        idx = list(indices)
        return PairTable([self.uids[i] for i in idx], [self.keys[i] for i in idx],
                         [self.shards[i] for i in idx], self.images[idx],
                         [self.captions[i] for i in idx], dict(self.skipped),
                         None if self.labels is None else [self.labels[i] for i in idx])


def decode_image(data: bytes, size: int) -> np.ndarray:
    """Decode image bytes with PIL into a uint8 HWC RGB array resized to ``size``×``size``."""
    with Image.open(io.BytesIO(data)) as im:
        im = im.convert("RGB")
        if im.size != (size, size):
            im = im.resize((size, size), Image.BICUBIC)
        return np.asarray(im, dtype=np.uint8)


NO_UID_STATUSES = ("missing_json", "bad_json", "missing_uid")  # a row the uid rule gives no uid
ROW_STATUSES = ("ok", "dotted_key", "duplicate_key", "non_contiguous", "missing_json", "bad_json",
                "missing_uid", "missing_image", "missing_text", "empty_text", "not_image", "decode_error",
                "non_finite")


@dataclass
class ParsedSample:
    """One raw WebDataset sample, parsed: identity, json, decoded pair or failure status.

    ``status`` is ``ok`` or the first problem found, checked in this order: the sample's
    structure (``dotted_key``, ``duplicate_key``, ``non_contiguous``, from the reader), its
    identity (no uid by the rule ``uid_from``, :mod:`pipeline.data.uids`: ``missing_json``,
    ``bad_json`` or ``missing_uid``, by what the json member lacked), then ``missing_image``,
    ``missing_text``, ``empty_text``, and decoding (``not_image``: bytes no image library
    recognises; ``decode_error``: a recognised but corrupt image). ``uid`` is set whenever the
    rule gives one, also on a failed row.
    """

    key: str
    meta: dict[str, Any]
    status: str = "ok"
    error: str | None = None
    image: np.ndarray | None = None  # uint8 HWC when ok
    caption: str | None = None
    uid: str | None = None

    def fail(self, status: str, error: str) -> "ParsedSample":
        self.status, self.error = status, error[:300]
        return self


def _parse_json(members: dict[str, bytes]) -> tuple[dict[str, Any], str | None]:
    """(metadata, problem): the json member as a dict, or the reason it is unusable."""
    if "json" not in members:
        return {}, "missing_json"
    try:
        meta = json.loads(members["json"])
    except (json.JSONDecodeError, UnicodeDecodeError):
        return {}, "bad_json"
    return (meta, None) if isinstance(meta, dict) else ({}, "bad_json")


def _image_ext(members: dict[str, bytes]) -> str | None:
    return next((e for e in IMAGE_EXTS if e in members), None)


def _uid_inputs(members: dict[str, bytes]) -> tuple[dict[str, Any], str | None, bytes | None, str | None]:
    """(json metadata, caption text, image bytes, json problem): what the uid rule reads."""
    meta, json_problem = _parse_json(members)
    caption = members["txt"].decode("utf-8", "replace") if "txt" in members else None
    ext = _image_ext(members)
    return meta, caption, (members[ext] if ext else None), json_problem


def raw_sample_uid(members: dict[str, bytes], uid_from: Sequence[str] = DEFAULT_UID_FROM) -> str | None:
    """The uid of a raw sample (member bytes by field, as WebDataset yields them) by the rule
    ``uid_from`` (:func:`pipeline.data.uids.sample_uid`), or None."""
    meta, caption, image, _ = _uid_inputs(members)
    return sample_uid(meta, caption, image, uid_from)


def parse_sample(key: str, members: dict[str, bytes], size: int, *,
                 uid_from: Sequence[str] = DEFAULT_UID_FROM, problem: str | None = None,
                 detail: str | None = None, decode: bool = True) -> ParsedSample:
    """Parse a raw sample (members by field): uid, json, caption, image decoded once to ``size``².

    ``problem``/``detail`` carry a structural problem the shard reader found; such a sample
    is never decoded. ``decode=False`` checks everything but the image bytes.
    """
    meta, text, image, json_problem = _uid_inputs(members)
    parsed = ParsedSample(key, meta, uid=sample_uid(meta, text, image, uid_from))
    if problem is not None:
        return parsed.fail(problem, detail or problem)
    if parsed.uid is None:
        return parsed.fail(json_problem or "missing_uid", no_uid_reason(uid_from))
    ext = _image_ext(members)
    if ext is None:
        return parsed.fail("missing_image", "no image member (" + "/".join(IMAGE_EXTS) + ")")
    if "txt" not in members:
        return parsed.fail("missing_text", "no txt member")
    caption = members["txt"].decode("utf-8", "replace").strip()
    if not caption:
        return parsed.fail("empty_text", "caption is empty")
    if not decode:
        parsed.caption = caption
        return parsed
    try:
        parsed.image, parsed.caption = decode_image(members[ext], size), caption
    except UnidentifiedImageError as exc:
        return parsed.fail("not_image", f"{ext} member is not an image: {exc}")
    except Exception as exc:  # PIL raises many exception types for corrupt data
        return parsed.fail("decode_error", f"{type(exc).__name__}: {exc}")
    return parsed


def _decode_sample(key: str, members: dict[str, bytes], size: int, problem: str | None = None,
                   detail: str | None = None, uid_from: Sequence[str] = DEFAULT_UID_FROM) -> tuple[str, Any]:
    """(status, payload) for training: payload = (uid, key, image, caption) when usable."""
    parsed = parse_sample(key, members, size, uid_from=uid_from, problem=problem, detail=detail)
    if parsed.status != "ok":
        return parsed.status, None
    return "ok", (parsed.uid, parsed.key, parsed.image, parsed.caption)


def _load_shard(url: str, sizes: dict[str, int] | None, size: int, storage: StorageOptions | None = None,
                uid_from: Sequence[str] = DEFAULT_UID_FROM) -> tuple[list, dict[str, int]]:
    """Usable pairs of one shard, and counts of the skipped by reason (shard problems included:
    ``shard_<status>`` counts the pairs ``sizes.json`` promises that could not be read)."""
    reader = ShardReader(url, expected_count(url, sizes), storage)
    rows, statuses = [], []
    for raw in reader:
        status, payload = _decode_sample(raw.key, raw.members, size, raw.problem, raw.detail, uid_from)
        statuses.append(status)
        rows.append((*payload, url) if status == "ok" else None)
    for index, (status, _) in reader.report.late.items():
        statuses[index], rows[index] = status, None
    skipped: dict[str, int] = {}
    for status in statuses:
        if status != "ok":
            skipped[status] = skipped.get(status, 0) + 1
    report = reader.report
    if report.status != "ok":
        log.warning("shard %s: %s (%s)", url, report.status, report.error)
        if report.missing:
            skipped[f"shard_{report.status}"] = report.missing
    return [r for r in rows if r is not None], skipped


def json_field_by_uid(urls: Sequence[str], field: str, sizes: dict[str, int] | None = None,
                      storage: StorageOptions | None = None,
                      uid_from: Sequence[str] = DEFAULT_UID_FROM) -> dict[str, Any]:
    """The json field ``field`` of the samples of ``urls`` that have a uid (rule ``uid_from``)
    and that field, by uid (the first sample of a uid wins, as in :func:`load_pairs`). Nothing
    is decoded: for small sets such as a target set's labels."""
    values: dict[str, Any] = {}
    for url in urls:
        for raw in ShardReader(url, expected_count(url, sizes), storage):
            meta, caption, image, _ = _uid_inputs(raw.members)
            uid = sample_uid(meta, caption, image, uid_from)
            if uid is not None and field in meta:
                values.setdefault(uid, meta[field])
    return values


def sample_rank(uid: str, seed: int, salt: str = "") -> bytes:
    """A deterministic pseudo-random sort key for ``uid`` (a function of uid and seed only)."""
    return hashlib.blake2b(f"{seed}:{salt}:{uid}".encode(), digest_size=8).digest()


def rank_order(uids: Sequence[str], seed: int, salt: str = "") -> list[int]:
    """Indices of ``uids`` sorted by :func:`sample_rank` — a seeded order that depends on the
    uids alone, never on their positions."""
    return sorted(range(len(uids)), key=lambda i: sample_rank(uids[i], seed, salt))


def load_pairs(urls: Sequence[str], image_size: int, sizes: dict[str, int] | None = None,
               max_samples: int | None = None, seed: int = 0, threads: int = 4,
               storage: StorageOptions | None = None, uid_from: Sequence[str] = DEFAULT_UID_FROM) -> PairTable:
    """Read, decode and resize all pairs of ``urls`` (in shard order).

    Pairs that cannot be used (no image, no caption, no uid by the rule ``uid_from``,
    undecodable) are skipped and counted by reason. With ``max_samples``, a uniform sample
    chosen by ``sample_rank`` (uid + seed) is kept, in shard order. A pair whose uid an
    earlier pair already has is skipped too (``duplicate_uid``: one uid, one training pair).
    """
    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        results = list(pool.map(lambda u: _load_shard(u, sizes, image_size, storage, uid_from), urls))
    rows, skipped, seen = [], {}, set()
    for shard_rows, shard_skipped in results:
        for row in shard_rows:
            if row[0] in seen:
                skipped["duplicate_uid"] = skipped.get("duplicate_uid", 0) + 1
                continue
            seen.add(row[0])
            rows.append(row)
        for k, v in shard_skipped.items():
            skipped[k] = skipped.get(k, 0) + v
    if max_samples is not None and len(rows) > max_samples:
        keep = set(rank_order([r[0] for r in rows], seed, "subsample")[:max_samples])
        rows = [r for i, r in enumerate(rows) if i in keep]
    if skipped:
        log.warning("skipped pairs by reason: %s", skipped)
    return _to_table(rows, skipped, image_size)


def _to_table(rows: list[tuple], skipped: dict[str, int], image_size: int) -> PairTable:
    """Rows of (uid, key, HWC image, caption, shard) → a PairTable with NCHW uint8 images."""
    images = torch.from_numpy(np.stack([r[2] for r in rows])).permute(0, 3, 1, 2).contiguous() \
        if rows else torch.empty(0, 3, image_size, image_size, dtype=torch.uint8)
    return PairTable([r[0] for r in rows], [r[1] for r in rows], [r[4] for r in rows], images,
                     [r[3] for r in rows], skipped)


def table_from_pairs(pairs: Iterable["Pair"], image_size: int, source: str = "memory") -> PairTable:
    """A :class:`PairTable` from in-memory :class:`~pipeline.data.shards.Pair` objects
    (benchmarks and tests: same decoding as shards, no files)."""
    rows, skipped = [], {}
    for pair in pairs:
        status, payload = _decode_sample(pair.key, pair.members(), image_size)
        if status == "ok":
            rows.append((*payload, source))
        else:
            skipped[status] = skipped.get(status, 0) + 1
    return _to_table(rows, skipped, image_size)


def in_holdout(uid: str, fraction: float, seed: int) -> bool:
    """Whether ``uid`` belongs to the held-out fraction (a function of uid and seed only)."""
    value = int.from_bytes(sample_rank(uid, seed, "holdout"), "big") / 2.0**64
    return value < fraction


def sample_pairs(urls: Sequence[str], image_size: int, count: int, seed: int, salt: str,
                 sizes: dict[str, int] | None = None,
                 keep: Callable[[str], bool] | None = None, storage: StorageOptions | None = None,
                 uid_from: Sequence[str] = DEFAULT_UID_FROM) -> PairTable:
    """Up to ``count`` pairs (satisfying ``keep(uid)``) from a seeded sample of shards.

    Shards are visited in an order given by (seed, shard name) until at least twice
    ``count`` candidates are in hand; the pairs ranked first by (uid, seed, salt) win. The
    result depends on the shard list and the seed, never on positions within shards.
    """
    order = sorted(urls, key=lambda u: sample_rank(u.rsplit("/", 1)[-1], seed, "shards"))
    parts: list[PairTable] = []
    have = 0
    for url in order:
        table = load_pairs([url], image_size, sizes=sizes, threads=1, storage=storage, uid_from=uid_from)
        if keep is not None:
            table = table.subset([i for i, u in enumerate(table.uids) if keep(u)])
        parts.append(table)
        have += len(table)
        if have >= 2 * count:
            break
    merged = concat_tables(parts, image_size)
    return merged.subset(rank_order(merged.uids, seed, salt)[:count])


def concat_tables(tables: Sequence[PairTable], image_size: int) -> PairTable:
    """Several tables as one (in order)."""
    if not tables:
        return _to_table([], {}, image_size)
    skipped: dict[str, int] = {}
    for t in tables:
        for k, v in t.skipped.items():
            skipped[k] = skipped.get(k, 0) + v
    return PairTable([u for t in tables for u in t.uids], [k for t in tables for k in t.keys],
                     [s for t in tables for s in t.shards], torch.cat([t.images for t in tables]),
                     [c for t in tables for c in t.captions], skipped)
