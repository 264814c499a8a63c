"""uids: 128-bit, 32 lowercase hex, stable, namespaced (DataComp convention)."""

from __future__ import annotations

import pytest

from pipeline.data.uids import is_uid, make_uid, uid_to_u8u8


def test_make_uid_is_stable_32_hex() -> None:
    uid = make_uid("openmoji", "1F596-1F3FD")
    assert is_uid(uid) and len(uid) == 32
    assert uid == make_uid("openmoji", "1F596-1F3FD")
    # Pinned: a change here silently changes every corpus's ids.
    assert make_uid("test", "0") == "d310621dcf91d96f89699b905735fb23"


def test_namespaces_and_idents_do_not_collide() -> None:
    assert make_uid("a", "bc") != make_uid("ab", "c")
    assert make_uid("synthetic-0", "1") != make_uid("synthetic-1", "1")
    uids = {make_uid("x", str(i)) for i in range(10_000)}
    assert len(uids) == 10_000


@pytest.mark.parametrize("value, ok", [
    ("0" * 32, True), ("abcdef0123456789" * 2, True), ("A" * 32, False), ("0" * 31, False),
    ("0" * 33, False), ("g" * 32, False), (None, False), (123, False),
])
def test_is_uid(value: object, ok: bool) -> None:
    assert is_uid(value) is ok


def test_uid_to_u8u8_round_trip() -> None:
    uid = make_uid("test", "42")
    hi, lo = uid_to_u8u8(uid)
    assert 0 <= hi < 2**64 and 0 <= lo < 2**64
    assert f"{hi:016x}{lo:016x}" == uid
    assert uid_to_u8u8("0" * 31 + "1") == (0, 1)
    assert uid_to_u8u8("f" * 16 + "0" * 16) == (2**64 - 1, 0)
