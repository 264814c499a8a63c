"""128-bit sample ids in the DataComp convention (32 lowercase hex characters)."""

from __future__ import annotations

import hashlib
import re

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

_UID_RE = re.compile(r"^[0-9a-f]{32}$")


def make_uid(namespace: str, ident: str) -> str:
    """A stable 128-bit uid for the item ``ident`` of the source ``namespace``."""
    digest = hashlib.blake2b(f"{namespace}\x00{ident}".encode("utf-8"), digest_size=16)
    return digest.hexdigest()


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
