"""Hand-made damaged shards: one per kind of dirty data (issue #5), with the expected statuses."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.data.shards import SIZES_FILE, add_member
from pipeline.data.uids import make_uid

GONE = "memory://dirty-data-test/gone.tar"  # an fsspec URL that cannot be opened


def _jpeg(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _good(key: str, caption: str = "a photo of a square") -> list[tuple[str, bytes]]:
    """The members of a well-formed pair (image, json with uid, caption)."""
    return [(f"{key}.jpg", _jpeg(len(key) + sum(map(ord, key)))),
            (f"{key}.json", json.dumps({"uid": make_uid("dirty", key)}).encode()),
            (f"{key}.txt", caption.encode())]


def _tar(path: Path, members: list[tuple[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            add_member(tar, name, data)
    path.write_bytes(buf.getvalue())
    return buf.getvalue()


def _span(members: list[tuple[str, bytes]]) -> int:
    """Bytes these members take in a tar (a 512-byte header each, data padded to 512)."""
    return sum(512 + -(-len(data) // 512) * 512 for _, data in members)


def _without(members: list[tuple[str, bytes]], suffix: str) -> list[tuple[str, bytes]]:
    return [(n, d) for n, d in members if not n.endswith(suffix)]


def _replace(members: list[tuple[str, bytes]], suffix: str, data: bytes) -> list[tuple[str, bytes]]:
    return [(n, data if n.endswith(suffix) else d) for n, d in members]


def build_dirty_corpus(root: Path) -> tuple[list[str], dict[str, dict[str, str]], dict[str, str]]:
    """Write one shard per case; return (shard URLs, expected status by shard and key,
    expected shard-level status by shard file name)."""
    root.mkdir(parents=True, exist_ok=True)
    rows: dict[str, dict[str, str]] = {}
    shard_status: dict[str, str] = {}
    sizes: dict[str, int] = {}

    def shard(name: str, members: list[tuple[str, bytes]], expect: dict[str, str], count: int,
              status: str = "ok") -> None:
        _tar(root / name, members)
        rows[name], shard_status[name], sizes[name] = expect, status, count

    corrupt = _jpeg(1)[:120]  # a JPEG header and the start of its data: recognised, cannot decode
    shard("corrupt_jpeg.tar", _good("c0") + _replace(_good("c1"), ".jpg", corrupt),
          {"c0": "ok", "c1": "decode_error"}, 2)
    shard("non_image.tar", _good("n0") + _replace(_good("n1"), ".jpg", b"<html>not an image</html>"),
          {"n0": "ok", "n1": "not_image"}, 2)
    shard("caption.tar", _good("t0") + _without(_good("t1"), ".txt") + _good("t2", caption="  \n "),
          {"t0": "ok", "t1": "missing_text", "t2": "empty_text"}, 3)
    shard("json.tar", _good("j0") + _without(_good("j1"), ".json")
          + _replace(_good("j2"), ".json", b'{"source": "no uid here"}')
          + _replace(_good("j3"), ".json", b"{not json"),
          {"j0": "ok", "j1": "missing_json", "j2": "missing_uid", "j3": "bad_json"}, 4)
    # "d1.v2": a key with a dot; WebDataset sees key "d1" with fields "v2.jpg", "v2.json", "v2.txt".
    shard("dotted_key.tar", _good("d0") + _good("d1.v2"), {"d0": "ok", "d1": "dotted_key"}, 2)
    shard("duplicate_key.tar", _good("u0") + _good("u1") + _good("u0"),
          {"u0": "duplicate_key", "u1": "ok"}, 3)
    k1, k2 = _good("k1"), _good("k2")
    # k1's image, then k2, then the rest of k1: readers see three samples where two were meant
    shard("non_contiguous.tar", k1[:1] + k2 + k1[1:], {"k1": "non_contiguous", "k2": "ok"}, 2, "long")
    shard("empty.tar", [], {}, 0, "empty")
    shard("nan.tar", _good("x0") + _good("x1", caption="NAN-TRIGGER square"), {"x0": "ok", "x1": "non_finite"}, 2)
    # truncated mid-member: the tar stream breaks off inside the third sample's image
    full = _tar(root / "truncated.tar", _good("r0") + _good("r1") + _good("r2") + _good("r3"))
    (root / "truncated.tar").write_bytes(full[:_span(_good("r0") + _good("r1")) + 700])
    rows["truncated.tar"], shard_status["truncated.tar"], sizes["truncated.tar"] = \
        {"r0": "ok", "r1": "ok"}, "truncated", 4
    # cut exactly after two samples (no end-of-archive blocks): reads cleanly, only sizes.json tells
    short = _tar(root / "short.tar", _good("s0") + _good("s1"))
    (root / "short.tar").write_bytes(short[:_span(_good("s0") + _good("s1"))])
    rows["short.tar"], shard_status["short.tar"], sizes["short.tar"] = {"s0": "ok", "s1": "ok"}, "short", 5
    rows["gone.tar"], shard_status["gone.tar"], sizes["gone.tar"] = {}, "unreadable", 3
    (root / SIZES_FILE).write_text(json.dumps(sizes))
    urls = [str(root / name) for name in sorted(rows) if name != "gone.tar"] + [GONE]
    return urls, rows, shard_status
