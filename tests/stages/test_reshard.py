"""The reshard stage: kept pairs copied byte for byte into new shards; plan, resume, Ray."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pydantic import ValidationError

from pipeline.data.scan import ShardReader
from pipeline.data.shards import ShardWriter, add_member, split_member
from pipeline.data.uids import make_uid
from pipeline.errors import DataError, UsageError
from pipeline.runtime.executor import LocalExecutor, Resources
from pipeline.stages.reshard import PLAN_FILE, ReshardConfig, member_key, reshard
from pipeline.stages.select import KEPT_FILE, MANIFEST_FILE, SelectConfig, select
from tests.stages.scorefiles import write_score_file

N_SHARDS, PER_SHARD = 3, 10


def sample_members(shard: int, i: int) -> dict[str, bytes]:
    rng = np.random.default_rng(shard * 1000 + i)
    return {"jpg": rng.bytes(200 + i), "txt": f"caption {shard}/{i}".encode(),
            "json": json.dumps({"uid": make_uid("reshard", f"{shard}/{i}")}).encode(),
            "seg.png": rng.bytes(50), "Cls": str(i % 3).encode()}


def raw_members(tar_path: Path) -> list[tuple[str, bytes]]:
    """Every member of a tar, in order, with its bytes."""
    with tarfile.open(tar_path) as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]


@pytest.fixture(scope="module")
def selection(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """3 input shards of 10 samples (5 members each), scored, top 50 % selected (15 pairs)."""
    root = tmp_path_factory.mktemp("reshard")
    with ShardWriter(root / "in", max_count=PER_SHARD) as writer:
        for s in range(N_SHARDS):
            for i in range(PER_SHARD):
                writer.write(f"k{s}x{i:03d}", sample_members(s, i))
    files = []
    for s in range(N_SHARDS):
        url = str(root / "in" / f"{s:05d}.tar")
        files.append(write_score_file(
            root / "scores" / f"{s:05d}.parquet", url, [float((7 * i + s) % PER_SHARD) for i in range(PER_SHARD)],
            uids=[make_uid("reshard", f"{s}/{i}") for i in range(PER_SHARD)],
            keys=[f"k{s}x{i:03d}" for i in range(PER_SHARD)]))
    select(files, SelectConfig(rule="top_fraction", fraction=0.5), root / "selection")
    return root


def manifest_keys(selection: Path) -> list[tuple[str, str]]:
    manifest = pq.read_table(selection / "selection" / MANIFEST_FILE).to_pylist()
    return [(m["shard"], k) for m in manifest for k in m["keys"]]


def input_members(selection: Path) -> dict[str, list[tuple[str, bytes]]]:
    """Key → its members (name, bytes) in the input shards."""
    out: dict[str, list[tuple[str, bytes]]] = {}
    for s in range(N_SHARDS):
        for name, data in raw_members(selection / "in" / f"{s:05d}.tar"):
            out.setdefault(member_key(name), []).append((name, data))
    return out


class RecordingExecutor(LocalExecutor):
    """Runs locally and remembers which tasks it ran."""

    def __init__(self) -> None:
        self.items: list[Any] = []

    def run_stage(self, stage: Any, tasks: Sequence[Any], workers: int | None = None, **kwargs: Any) -> list[Any]:
        self.items.extend(tasks)
        return super().run_stage(stage, tasks, workers, **kwargs)


def check_output(selection: Path, out: Path, sizes: dict[str, int], shard_size: int) -> None:
    wanted = manifest_keys(selection)
    assert len(wanted) == 15
    expected_sizes = {f"{i:05d}.tar": min(shard_size, len(wanted) - i * shard_size)
                      for i in range(-(-len(wanted) // shard_size))}
    assert sizes == expected_sizes == json.loads((out / "sizes.json").read_text())
    assert sorted(p.name for p in out.iterdir()) == sorted([*expected_sizes, "sizes.json", PLAN_FILE])
    source = input_members(selection)
    copied = [m for name in expected_sizes for m in raw_members(out / name)]
    # exactly the kept samples, in global order, every member with its original name and bytes
    assert copied == [m for _, key in wanted for m in source[key]]
    for name, count in expected_sizes.items():
        with tarfile.open(out / name) as tar:
            members = tar.getmembers()
        assert len({member_key(m.name) for m in members}) == count
        assert {(m.mtime, m.mode, m.uid, m.gid, m.uname, m.gname) for m in members} == {(0, 0o444, 0, 0, "", "")}


def test_reshard_copies_the_kept_members_unchanged(selection: Path, tmp_path: Path) -> None:
    manifest = selection / "selection" / MANIFEST_FILE
    sizes = reshard(manifest, tmp_path / "a", ReshardConfig(shard_size=4), LocalExecutor())
    check_output(selection, tmp_path / "a", sizes, 4)
    # byte-identical on a second run; the kept table gives the same shards as the manifest
    reshard(manifest, tmp_path / "b", ReshardConfig(shard_size=4), LocalExecutor())
    reshard(selection / "selection" / KEPT_FILE, tmp_path / "c", ReshardConfig(shard_size=4), LocalExecutor())
    for name in [*sizes, "sizes.json", PLAN_FILE]:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes() \
            == (tmp_path / "c" / name).read_bytes()


def test_reshard_resumes_and_refuses_another_plan(selection: Path, tmp_path: Path) -> None:
    manifest = selection / "selection" / MANIFEST_FILE
    cfg = ReshardConfig(shard_size=4)
    reshard(manifest, tmp_path, cfg, LocalExecutor())
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    (tmp_path / "00002.tar").unlink()
    (tmp_path / "sizes.json").unlink()
    executor = RecordingExecutor()
    reshard(manifest, tmp_path, cfg, executor)
    assert [task.shard.name for task in executor.items] == ["00002.tar"]
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    with pytest.raises(UsageError, match="different selection"):
        reshard(manifest, tmp_path, ReshardConfig(shard_size=5), LocalExecutor())
    other = pq.read_table(manifest).slice(0, 2)
    with pytest.raises(UsageError, match="different selection"):
        reshard(other, tmp_path, cfg, LocalExecutor())
    # A run directory's own shards follow its changed selection: replaced whole, never mixed.
    fresh = tmp_path.parent / f"{tmp_path.name}-fresh"
    expected = reshard(other, fresh, cfg, LocalExecutor())
    assert reshard(other, tmp_path, cfg, LocalExecutor(), replace_stale=True) == expected
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == {p.name: p.read_bytes() for p in fresh.iterdir()}
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "00000.tar").write_bytes(b"not ours")
    with pytest.raises(UsageError, match="not empty"):
        reshard(manifest, foreign, cfg, LocalExecutor())


def test_missing_kept_key_names_shard_and_key(selection: Path, tmp_path: Path) -> None:
    url = str(selection / "in" / "00001.tar")
    table = pa.table({"shard": [url], "keys": [["k1x000", "nope", "k1x004"]]})
    with pytest.raises(DataError, match=f"input shard {url}: 1 of 3 kept pairs not found, e.g. key 'nope'"):
        reshard(table, tmp_path, ReshardConfig(shard_size=10), LocalExecutor())
    assert sorted(p.name for p in tmp_path.iterdir()) == [PLAN_FILE]  # no shard, no temporary


def _cut_after(src: Path, dst: Path, samples: int, extra: int) -> None:
    """``dst``: ``src`` cut ``extra`` bytes into the member after the first ``samples`` samples
    (5 members each) — a tar whose stream breaks off there."""
    end = 0
    with tarfile.open(src) as tar:
        members = tar.getmembers()
    end = members[samples * 5].offset + extra
    dst.write_bytes(src.read_bytes()[:end])


@pytest.mark.parametrize("extra", [700, 100, 0], ids=["mid-data", "mid-header", "at-a-header"])
def test_truncated_source_copies_the_kept_pairs_before_the_cut(selection: Path, tmp_path: Path, extra: int,
                                                               caplog) -> None:
    """The score stage read the pairs before the cut; reshard copies those kept and stops at the cut."""
    src = tmp_path / "cut.tar"
    _cut_after(selection / "in" / "00001.tar", src, 4, extra)
    keys = ["k1x000", "k1x002", "k1x003"]
    table = pa.table({"shard": [str(src)], "keys": [keys]})
    sizes = reshard(table, tmp_path / "out", ReshardConfig(shard_size=10), LocalExecutor())
    assert sizes == {"00000.tar": 3}
    source = dict(input_members(selection))
    assert raw_members(tmp_path / "out" / "00000.tar") == [m for k in keys for m in source[k]]


@pytest.mark.parametrize("damage", ["shorter", "cut-in-kept-sample", "gone", "empty", "garbage"])
def test_changed_source_is_one_line_and_no_output_shard(selection: Path, tmp_path: Path, damage: str) -> None:
    """A source that lost kept pairs after scoring: one DataError naming the shard and the missing
    count, no output shard and no temporary; the rerun once the source is back completes."""
    src = tmp_path / "src.tar"
    original = (selection / "in" / "00001.tar").read_bytes()
    if damage == "shorter":
        _cut_after(selection / "in" / "00001.tar", src, 2, 300)
    elif damage == "cut-in-kept-sample":  # inside k1x003's members: that sample is incomplete
        _cut_after(selection / "in" / "00001.tar", src, 3, 512 + 300)
    elif damage == "empty":
        src.write_bytes(b"")
    elif damage == "garbage":
        src.write_bytes(b"not a tar at all" * 100)
    keys = ["k1x000", "k1x003", "k1x005", "k1x006"]
    table = pa.table({"shard": [str(src)], "keys": [keys]})
    missing = {"shorter": 3, "cut-in-kept-sample": 3, "gone": 4, "empty": 4, "garbage": 4}[damage]
    with pytest.raises(DataError, match=rf"input shard {src}: {missing} of 4 kept pairs not found") as info:
        reshard(table, tmp_path / "out", ReshardConfig(shard_size=10), LocalExecutor())
    assert "\n" not in str(info.value)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [PLAN_FILE]  # no shard, no temporary
    src.write_bytes(original)  # the source is restored: the rerun completes
    assert reshard(table, tmp_path / "out", ReshardConfig(shard_size=10), LocalExecutor()) == {"00000.tar": 4}


def test_duplicate_kept_key_refused(selection: Path, tmp_path: Path) -> None:
    table = pa.table({"shard": [str(selection / "in" / "00000.tar")], "keys": [["k0x001", "k0x001"]]})
    with pytest.raises(UsageError, match="twice"):
        reshard(table, tmp_path, ReshardConfig(), LocalExecutor())


def test_non_contiguous_sample_refused(tmp_path: Path) -> None:
    with tarfile.open(tmp_path / "in.tar", "w", format=tarfile.USTAR_FORMAT) as tar:
        for name in ("a.jpg", "b.jpg", "a.txt"):
            add_member(tar, name, b"x")
    table = pa.table({"shard": [str(tmp_path / "in.tar")], "keys": [["a"]]})
    with pytest.raises(DataError, match="not contiguous"):
        reshard(table, tmp_path / "out", ReshardConfig(), LocalExecutor())


def test_empty_selection_gives_empty_sizes(tmp_path: Path) -> None:
    table = pa.table({"shard": ["x.tar"], "keys": pa.array([[]], pa.list_(pa.string()))})
    assert reshard(table, tmp_path, ReshardConfig(), LocalExecutor()) == {}
    assert json.loads((tmp_path / "sizes.json").read_text()) == {}


def test_member_key_follows_webdataset() -> None:
    assert member_key("abc.jpg") == "abc"
    assert member_key("abc.seg.png") == "abc"
    assert member_key("dir.v1/abc.txt") == "dir.v1/abc"
    assert member_key("noext") is None and member_key(".hidden.jpg") is None
    assert member_key("abc.") is None  # no field: the reader ignores it, so reshard must too
    for name in ("abc.jpg", "a/b.c.txt", "abc.", ".x", "x", "d.v/.y", "d.v/y", "K.JSON"):
        parts = split_member(name)  # the reader's rule
        assert member_key(name) == (parts[0] if parts else None), name


def test_reshard_skips_members_the_reader_skips(tmp_path: Path) -> None:
    """A member named ``abc.`` inside sample abc: not part of the sample for the reader, so
    not copied (and it does not break the sample's contiguity)."""
    members = sample_members(0, 0)
    src = tmp_path / "in.tar"
    with tarfile.open(src, "w", format=tarfile.USTAR_FORMAT) as tar:
        add_member(tar, "abc.jpg", members["jpg"])
        add_member(tar, "abc.", b"stray")
        add_member(tar, "abc.txt", members["txt"])
    table = pa.table({"shard": [str(src)], "keys": pa.array([["abc"]], pa.list_(pa.string()))})
    assert reshard(table, tmp_path / "out", ReshardConfig(), LocalExecutor()) == {"00000.tar": 1}
    assert raw_members(tmp_path / "out" / "00000.tar") == [("abc.jpg", members["jpg"]), ("abc.txt", members["txt"])]
    read = list(ShardReader(str(src)))
    assert [(r.key, sorted(r.members)) for r in read] == [("abc", ["jpg", "txt"])]


@pytest.mark.parametrize("fmt", ["shard.tar", "{a}.tar", "{}/{}.tar", "sub/{:05d}.tar", "{:s}", ".{:05d}.tar"])
def test_bad_name_format_refused(fmt: str) -> None:
    with pytest.raises(ValidationError, match="name_format"):
        ReshardConfig(name_format=fmt)


def test_config_defaults() -> None:
    cfg = ReshardConfig()
    assert (cfg.shard_size, cfg.name_format) == (10000, "{:05d}.tar")
    assert ReshardConfig(name_format="part-{:06d}.tar").name_format == "part-{:06d}.tar"
    with pytest.raises(ValidationError):
        ReshardConfig(shard_size=0)


@pytest.mark.ray
@pytest.mark.slow  # the default suite compares a Ray run's shards with an in-process reshard: tests/stages/test_e2e_ray.py
def test_reshard_under_local_ray(selection: Path, tmp_path: Path) -> None:
    """The same stage as Ray tasks (one per output shard) gives the same bytes.

    ``address="local"`` starts a fresh embedded Ray even when another cluster runs on this
    machine (a plain ``ray.init()`` would attach to it); the executor then uses it.
    """
    import ray

    from pipeline.runtime.executor import RayExecutor

    manifest = selection / "selection" / MANIFEST_FILE
    ray.init(address="local", num_cpus=2, include_dashboard=False)
    try:
        sizes = reshard(manifest, tmp_path / "ray", ReshardConfig(shard_size=8), RayExecutor(),
                        Resources(num_cpus=0.5))
    finally:
        ray.shutdown()
    check_output(selection, tmp_path / "ray", sizes, 8)  # 2 tasks: fewer worker start-ups
    reshard(manifest, tmp_path / "local", ReshardConfig(shard_size=8), LocalExecutor())
    for name in [*sizes, "sizes.json"]:
        assert (tmp_path / "ray" / name).read_bytes() == (tmp_path / "local" / name).read_bytes()


def test_a_full_disk_while_copying_is_not_taken_for_a_damaged_source(selection: Path, tmp_path: Path,
                                                                      monkeypatch) -> None:
    import errno

    from pipeline.stages import reshard as reshard_module

    def full(*args) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(reshard_module, "add_member", full)
    table = pa.table({"shard": [str(selection / "in" / "00001.tar")], "keys": [["k1x000"]]})
    with pytest.raises(DataError, match="no space left") as info:
        reshard(table, tmp_path / "out", ReshardConfig(shard_size=10), LocalExecutor())
    assert "kept pairs not found" not in str(info.value)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [PLAN_FILE]
