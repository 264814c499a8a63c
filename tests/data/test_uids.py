"""uids: 128-bit, 32 lowercase hex, stable, namespaced (DataComp convention)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from pipeline.data.uids import is_uid, make_uid, u8u8_to_uids, uid_to_u8u8, uids_to_u8u8


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


def test_vectorised_uids_match_the_scalar_conversion() -> None:
    uids = [make_uid("v", str(i)) for i in range(300)] + ["0" * 32, "f" * 32, "0" * 31 + "1"]
    array = pa.chunked_array([pa.array(uids[:100]), pa.array(uids[100:]).slice(0)])
    hi, lo = uids_to_u8u8(array)
    assert hi.dtype == lo.dtype == np.uint64
    assert list(zip(hi.tolist(), lo.tolist())) == [uid_to_u8u8(u) for u in uids]
    assert u8u8_to_uids(hi, lo).to_pylist() == uids
    sliced = pa.array(uids).slice(5, 7)  # a slice starts inside the buffers
    assert u8u8_to_uids(*uids_to_u8u8(sliced)).to_pylist() == uids[5:12]
    assert [len(a) for a in uids_to_u8u8(pa.array([], pa.string()))] == [0, 0]


@pytest.mark.parametrize("bad", ["A" * 32, "0" * 31, "0" * 33, "g" * 32, None])
def test_vectorised_uids_reject_non_uids(bad: object) -> None:
    with pytest.raises(ValueError, match="not 32 lowercase hex"):
        uids_to_u8u8(pa.array(["0" * 32, bad], pa.string()))


def test_the_uid_rule_sources_in_order() -> None:
    """json uid, else hash of (url, caption), else hash of (image bytes, caption): content only."""
    import hashlib

    from pipeline.data.uids import image_uid, sample_uid, url_uid

    uid = make_uid("x", "1")
    meta = {"uid": uid, "url": "https://a.example/1.jpg"}
    assert sample_uid(meta, "a cat", b"img", ("json", "url")) == uid
    assert sample_uid({"url": meta["url"]}, "a cat", b"img", ("json", "url")) == url_uid(meta["url"], "a cat")
    assert url_uid(meta["url"], "a cat") == hashlib.blake2b(
        f"url\x00{meta['url']}\x00a cat".encode(), digest_size=16).hexdigest()
    assert url_uid(meta["url"], "a cat") != url_uid(meta["url"], "a dog")  # one url, two captions: two pairs
    assert sample_uid({"uid": "not-hex"}, "a cat", b"img", ("json", "url")) is None
    assert sample_uid(None, "a cat", b"img", ("json", "url", "image")) == image_uid(b"img", "a cat") == \
        hashlib.blake2b(b"image\x00img\x00a cat", digest_size=16).hexdigest()
    assert sample_uid(meta, "a cat", b"img", ("url",)) == url_uid(meta["url"], "a cat")  # order is the rule
    assert is_uid(url_uid("u", "")) and is_uid(image_uid(b"", ""))


@pytest.mark.parametrize("value,error", [([], "at least one"), (["json", "sha"], "unknown uid source 'sha'"),
                                         (["url", "url"], "twice")])
def test_bad_uid_sources(value, error) -> None:
    from pipeline.data.uids import check_uid_from

    with pytest.raises(ValueError, match=error):
        check_uid_from(value)
    assert check_uid_from("url") == ("url",)
