"""128-bit sample ids in the DataComp convention (32 lowercase hex characters)."""

from __future__ import annotations

import hashlib
import re

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
