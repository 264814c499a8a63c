"""ShardWriter, shard lists, sizes.json and truncation detection."""

from __future__ import annotations

import json
import os
import tarfile
from pathlib import Path

import pytest

from pipeline.data.shards import (
    Pair, ShardWriter, check_key, expand_shards, iter_raw_samples, load_sizes,
)
from pipeline.data.uids import make_uid
from pipeline.data.scan import ShardReader
from pipeline.errors import UsageError


def pairs(n: int, prefix: str = "s") -> list[Pair]:
    return [Pair(f"{prefix}{i:04d}", bytes([i % 256]) * (100 + i), f"caption {i}",
                 {"uid": make_uid("test", str(i)), "i": i}) for i in range(n)]


def write(out: Path, items: list[Pair], max_count: int = 4) -> dict[str, int]:
    with ShardWriter(out, max_count=max_count) as writer:
        for pair in items:
            writer.write_pair(pair)
    return writer.sizes


def test_sizes_and_shard_names(tmp_path: Path) -> None:
    sizes = write(tmp_path, pairs(10), max_count=4)
    assert sizes == {"00000.tar": 4, "00001.tar": 4, "00002.tar": 2}
    assert json.loads((tmp_path / "sizes.json").read_text()) == sizes
    assert sorted(p.name for p in tmp_path.iterdir()) == [*sizes, "sizes.json"]


def test_output_is_byte_identical(tmp_path: Path) -> None:
    write(tmp_path / "a", pairs(9))
    write(tmp_path / "b", pairs(9))
    for name in ("00000.tar", "00001.tar", "00002.tar", "sizes.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_members_are_grouped_sorted_and_without_wall_clock(tmp_path: Path) -> None:
    write(tmp_path, pairs(2))
    with tarfile.open(tmp_path / "00000.tar") as tar:
        members = tar.getmembers()
    assert [m.name for m in members] == ["s0000.jpg", "s0000.json", "s0000.txt",
                                         "s0001.jpg", "s0001.json", "s0001.txt"]
    assert {m.mtime for m in members} == {0} and {m.uid for m in members} == {0}


def test_samples_read_back(tmp_path: Path) -> None:
    items = pairs(5)
    write(tmp_path, items, max_count=10)
    samples = list(iter_raw_samples(str(tmp_path / "00000.tar")))
    assert [s["__key__"] for s in samples] == [p.key for p in items]
    assert samples[3]["jpg"] == items[3].image
    assert samples[3]["txt"].decode() == "caption 3"
    assert json.loads(samples[3]["json"]) == items[3].meta


@pytest.mark.parametrize("key", ["a.b", "", "dir/key", "x.tar"])
def test_bad_keys_rejected(tmp_path: Path, key: str) -> None:
    with pytest.raises(ValueError):
        check_key(key)
    writer = ShardWriter(tmp_path)
    with pytest.raises(ValueError):
        writer.write(key, {"txt": b"x"})
    writer.abort()


def test_duplicate_key_in_a_shard_rejected_and_nothing_left(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="duplicate"):
        with ShardWriter(tmp_path, max_count=10) as writer:
            writer.write("k1", {"txt": b"a"})
            writer.write("k1", {"txt": b"b"})
    assert list(tmp_path.iterdir()) == []  # no shard, no temporary, no sizes.json


def test_same_key_in_different_shards_is_allowed(tmp_path: Path) -> None:
    # Keys identify a sample within its shard; (shard, key) and the uid identify it globally.
    with ShardWriter(tmp_path, max_count=1) as writer:
        writer.write("k1", {"txt": b"a"})
        writer.write("k1", {"txt": b"b"})
    assert writer.sizes == {"00000.tar": 1, "00001.tar": 1}


def test_max_count_must_be_positive(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        ShardWriter(tmp_path, max_count=0)


def test_expand_shards_brace_glob_list(tmp_path: Path) -> None:
    write(tmp_path, pairs(10), max_count=4)
    assert expand_shards("data/{00000..00002}.tar") == [
        "data/00000.tar", "data/00001.tar", "data/00002.tar"]
    globbed = expand_shards(str(tmp_path / "*.tar"))
    assert globbed == [str(tmp_path / f"{i:05d}.tar") for i in range(3)]
    assert expand_shards(["a.tar", "b{1..2}.tar"]) == ["a.tar", "b1.tar", "b2.tar"]
    assert expand_shards("s3://bucket/{0..1}.tar") == ["s3://bucket/0.tar", "s3://bucket/1.tar"]


@pytest.mark.parametrize("spec", [[], "nothing-here-*.tar"])
def test_expand_shards_empty_is_usage_error(spec: object, tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UsageError):
        expand_shards(spec)  # type: ignore[arg-type]


def test_no_shards_error_says_how_to_build_the_corpus(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UsageError) as missing:
        expand_shards("data/openmoji/*.tar")  # the demo config before `make demo`
    message = str(missing.value)
    assert "data/openmoji does not exist" in message
    assert "`diffin data openmoji --out data/openmoji`" in message and "make demo" in message
    (tmp_path / "mine").mkdir()
    with pytest.raises(UsageError, match="mine holds no matching shards"):
        expand_shards("mine/{0..3}*.tar")


def _truncate_before_last_sample(path: Path) -> None:
    with tarfile.open(path) as tar:
        members = tar.getmembers()
    last_key = members[-1].name.split(".", 1)[0]
    first_of_last = next(m for m in members if m.name.split(".", 1)[0] == last_key)
    with open(path, "r+b") as f:
        f.truncate(first_of_last.offset)  # a clean member boundary: tar readers stop silently


def test_truncated_tar_detected_against_sizes(tmp_path: Path) -> None:
    sizes = write(tmp_path, pairs(6), max_count=3)
    shard = tmp_path / "00001.tar"
    _truncate_before_last_sample(shard)
    assert len(list(iter_raw_samples(str(shard)))) == 2  # webdataset alone: silently short
    reader = ShardReader(str(shard), sizes["00001.tar"])
    assert len(list(reader)) == 2 and reader.report.status == "short" and reader.report.missing == 1
    intact = ShardReader(str(tmp_path / "00000.tar"), sizes["00000.tar"])
    assert len(list(intact)) == 3 and intact.report.status == "ok"
    unknown = ShardReader(str(shard))  # no sizes: cannot tell
    assert len(list(unknown)) == 2 and unknown.report.status == "ok"


def test_load_sizes_errors(tmp_path: Path) -> None:
    with pytest.raises(UsageError):
        load_sizes(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(UsageError):
        load_sizes(bad)
    bad.write_text(json.dumps({"00000.tar": "3"}))
    with pytest.raises(UsageError):
        load_sizes(bad)


def test_abort_leaves_no_partial_shard(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError):
        with ShardWriter(tmp_path, max_count=2) as writer:
            for pair in pairs(3):
                writer.write_pair(pair)
            raise RuntimeError("boom")
    assert sorted(os.listdir(tmp_path)) == ["00000.tar"]  # the completed shard only
