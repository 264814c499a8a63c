"""128-bit sample ids in the DataComp convention (32 lowercase hex characters), and the uid
rule: which uid a pair of a shard has (the one owner of that rule; every reader derives from it).

The rule (``data.uid_from``, an ordered list of sources; the first that applies gives the uid):

- ``json``: the json member's ``uid`` when it is 32 lowercase hex characters (DataComp);
- ``url``: ``make_uid("url", url + "\\x00" + caption)`` — BLAKE2b-128 of ``url\\x00<url>\\x00<caption>``
  (UTF-8), with the json member's ``url`` (img2dataset writes it) and the ``txt`` member as
  text (img2dataset's ``caption``; empty when there is none);
- ``image``: BLAKE2b-128 of ``image\\x00`` + the image member's bytes + ``\\x00`` + the caption.

Every source is a function of the pair's own content, never of where it is stored: shard name
and key change when shards are resharded, a uid must not. The default is ``json`` then
``url``: DataComp shards keep their uids, img2dataset shards (no uid, a url per pair) work as
they are. ``image`` is opt-in: web corpora hold many byte-identical placeholder images, and a
pair whose image and caption equal another's gets its uid. A pair for which no source applies
has no uid: a failed row (``missing_json``, ``bad_json`` or ``missing_uid``) whose error names
``data.uid_from``.
"""

from __future__ import annotations

import hashlib
import re
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

_UID_RE = re.compile(r"^[0-9a-f]{32}$")


def make_uid(namespace: str, ident: str) -> str:
    """A stable 128-bit uid for the item ``ident`` of the source ``namespace``."""
    digest = hashlib.blake2b(f"{namespace}\x00{ident}".encode("utf-8"), digest_size=16)
    return digest.hexdigest()


UID_SOURCES = ("json", "url", "image")
DEFAULT_UID_FROM = ("json", "url")
UID_SETTING = "data.uid_from"
LEGACY_REQUIRE_UID = {True: ("json",), False: ("json", "url", "image")}  # data.require_uid (deprecated)


def check_uid_from(value: str | Iterable[str]) -> tuple[str, ...]:
    """``value`` (one source or a list) as a tuple of sources; ValueError when empty, unknown or repeated."""
    sources = (value,) if isinstance(value, str) else tuple(value)
    if not sources:
        raise ValueError(f"name at least one uid source ({', '.join(UID_SOURCES)})")
    unknown = [s for s in sources if s not in UID_SOURCES]
    if unknown:
        raise ValueError(f"unknown uid source {unknown[0]!r} (use {', '.join(UID_SOURCES)})")
    if len(set(sources)) != len(sources):
        raise ValueError(f"uid source listed twice in {list(sources)}")
    return sources


def url_uid(url: str, caption: str) -> str:
    """The ``url`` rule's uid of a pair: its url and caption (img2dataset's parquet columns)."""
    return make_uid("url", f"{url}\x00{caption}")


def image_uid(image: bytes, caption: str) -> str:
    """The ``image`` rule's uid of a pair: its image bytes and caption."""
    digest = hashlib.blake2b(digest_size=16)
    for part in (b"image\x00", image, b"\x00", caption.encode("utf-8")):
        digest.update(part)
    return digest.hexdigest()


def sample_uid(meta: Mapping[str, Any] | None, caption: str | None, image: bytes | None,
               uid_from: Sequence[str] = DEFAULT_UID_FROM) -> str | None:
    """The uid of a pair by the rule ``uid_from`` (first source that applies), or None.

    ``meta``: the parsed json member (None when absent or unusable); ``caption``: the txt
    member as text; ``image``: the image member's bytes.
    """
    for source in uid_from:
        if source == "json":
            uid = meta.get("uid") if meta else None
            if is_uid(uid):
                return uid
        elif source == "url":
            url = meta.get("url") if meta else None
            if isinstance(url, str) and url:
                return url_uid(url, caption or "")
        elif source == "image":
            if image is not None:
                return image_uid(image, caption or "")
        else:
            raise ValueError(f"unknown uid source {source!r}")
    return None


def no_uid_reason(uid_from: Sequence[str]) -> str:
    """The error text of a pair without a uid: what each source lacked, and the setting."""
    lacks = {"json": "no valid 32-hex json uid", "url": "no json url", "image": "no image"}
    return (f"no uid by {UID_SETTING} {list(uid_from)} ({', '.join(lacks[s] for s in uid_from)}); "
            f"add a source to {UID_SETTING} ({', '.join(UID_SOURCES)})")


def is_uid(value: object) -> bool:
    """True if ``value`` is a 32-character lowercase hex string."""
    return isinstance(value, str) and bool(_UID_RE.match(value))


def uid_to_u8u8(uid: str) -> tuple[int, int]:
    """Split a uid into its upper and lower 64 bits (DataComp's ``"u8,u8"`` subset format)."""
    value = int(uid, 16)
    return value >> 64, value & ((1 << 64) - 1)


def _hex_digit_table() -> np.ndarray:
    table = np.full(256, 255, dtype=np.uint8)
    for value, char in enumerate(b"0123456789abcdef"):
        table[char] = value
    table.setflags(write=False)
    return table


_HEX_VALUE = _hex_digit_table()  # byte → nibble value; 255 marks a byte that is not [0-9a-f]
_HEX_CHARS = np.frombuffer(b"0123456789abcdef", dtype=np.uint8)  # read-only view of bytes


def uids_to_u8u8(uids: pa.Array | pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
    """Vectorised :func:`uid_to_u8u8`: a string array of uids → (upper, lower) uint64 arrays.

    Reads the Arrow buffers directly (no Python object per row). Raises ``ValueError``
    naming the first value that is null or not 32 lowercase hex characters.
    """
    if isinstance(uids, pa.ChunkedArray):
        parts = [uids_to_u8u8(chunk) for chunk in uids.chunks]
        if not parts:
            return np.empty(0, np.uint64), np.empty(0, np.uint64)
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
    arr = uids.cast(pa.string()) if uids.type != pa.string() else uids
    n = len(arr)
    if n == 0:
        return np.empty(0, np.uint64), np.empty(0, np.uint64)
    lengths = pc.binary_length(arr).fill_null(-1).to_numpy(zero_copy_only=False)
    bad = np.flatnonzero(lengths != 32)
    if bad.size:
        raise ValueError(f"uid {arr[int(bad[0])].as_py()!r} is not 32 lowercase hex characters")
    offsets = np.frombuffer(arr.buffers()[1], dtype=np.int32, count=n + 1, offset=arr.offset * 4)
    chars = np.frombuffer(arr.buffers()[2], dtype=np.uint8)[offsets[0]:offsets[-1]].reshape(n, 32)
    nibbles = _HEX_VALUE[chars]
    bad_rows = np.flatnonzero((nibbles == 255).any(axis=1))
    if bad_rows.size:
        raise ValueError(f"uid {arr[int(bad_rows[0])].as_py()!r} is not 32 lowercase hex characters")
    octets = np.ascontiguousarray((nibbles[:, 0::2] << 4) | nibbles[:, 1::2])
    words = octets.view(">u8")  # (n, 2): big-endian upper and lower halves
    return words[:, 0].astype(np.uint64), words[:, 1].astype(np.uint64)


def u8u8_to_uids(upper: np.ndarray, lower: np.ndarray) -> pa.StringArray:
    """Inverse of :func:`uids_to_u8u8`: uint64 halves → string array of 32 lowercase hex uids."""
    n = len(upper)
    if n * 32 >= 2**31:
        raise ValueError(f"{n} uids do not fit one string array; convert them in batches")
    octets = np.empty((n, 2), dtype=">u8")
    octets[:, 0], octets[:, 1] = upper, lower
    octets = octets.view(np.uint8).reshape(n, 16)
    chars = np.empty((n, 32), dtype=np.uint8)
    chars[:, 0::2] = _HEX_CHARS[octets >> 4]
    chars[:, 1::2] = _HEX_CHARS[octets & 15]
    offsets = np.arange(0, 32 * n + 1, 32, dtype=np.int32)
    return pa.StringArray.from_buffers(n, pa.py_buffer(offsets), pa.py_buffer(chars))
