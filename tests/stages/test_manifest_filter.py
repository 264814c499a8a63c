"""KeptKeys: filtering the input shards at load time by a run's selection manifest."""

from __future__ import annotations

import pickle
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import webdataset as wds
from upath import UPath

from pipeline.data.shards import expand_shards
from pipeline.errors import UsageError
from pipeline.io.storage import upload
from pipeline.stages.manifest_filter import KEYS_COLUMN, SHARD_COLUMN, KeptKeys
from pipeline.stages.select import KEPT_FILE, MANIFEST_FILE, MANIFEST_SCHEMA
from tests.readme import readme_block
from tests.stages.conftest import PRUNED_KEPT


def kept_pairs(run_dir: Path) -> list[tuple[str, str]]:
    table = pq.read_table(run_dir / "selection" / KEPT_FILE, columns=["uid", "key"])
    return sorted(zip(table.column("uid").to_pylist(), table.column("key").to_pylist()))


def filtered_pairs(urls: list[str], keep: KeptKeys) -> list[tuple[str, str]]:
    dataset = (wds.WebDataset(urls, shardshuffle=False, handler=wds.reraise_exception)
               .select(keep).decode().to_tuple("json", "__key__"))
    return sorted((meta["uid"], key) for meta, key in dataset)


def write_manifest(path: Path, rows: dict[str, list[str]]) -> Path:
    """A hand-built manifest: shard URL → kept keys."""
    table = pa.table({"shard": list(rows), "n_in": [10] * len(rows), "n_scored_ok": [10] * len(rows),
                      "n_kept": [len(k) for k in rows.values()], "keys": list(rows.values())},
                     schema=MANIFEST_SCHEMA)
    pq.write_table(table, path)
    return path


def sample(url: str, key: str) -> dict[str, str]:
    return {"__url__": url, "__key__": key}


def test_columns_are_the_manifest_schema() -> None:
    assert {SHARD_COLUMN, KEYS_COLUMN} <= set(MANIFEST_SCHEMA.names)


def test_filtered_input_shards_are_exactly_the_kept_pairs(pruned_run: Path, tiny_corpus: Path,
                                                          tmp_path: Path) -> None:
    keep = KeptKeys.from_run(pruned_run)
    urls = expand_shards(str(tiny_corpus / "*.tar"))
    assert keep.shards == urls
    expected = kept_pairs(pruned_run)
    assert len(expected) == PRUNED_KEPT
    assert filtered_pairs(urls, keep) == expected
    # copies of the input shards elsewhere match by file name
    copies = tmp_path / "copies"
    shutil.copytree(tiny_corpus, copies)
    assert filtered_pairs(expand_shards(str(copies / "*.tar")), KeptKeys.from_run(pruned_run)) == expected


def test_unit_matching_cache_and_unknown_shards(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    manifest = write_manifest(tmp_path / MANIFEST_FILE, {"s3://bucket/corpus/00000.tar": ["a", "c"],
                                                         "/data/00001.tar": ["b"]})
    keep = KeptKeys(manifest)
    assert keep.shards == ["s3://bucket/corpus/00000.tar", "/data/00001.tar"]
    reads: list[str] = []
    read = KeptKeys._read_keys
    monkeypatch.setattr(KeptKeys, "_read_keys", lambda self, shard: reads.append(shard) or read(self, shard))
    stream = [("s3://bucket/corpus/00000.tar", "a"), ("s3://bucket/corpus/00000.tar", "b"),
              ("/elsewhere/00001.tar", "b"), ("/elsewhere/00001.tar", "c"),
              ("/local/00000.tar", "c"), ("/local/00000.tar", "z")]
    assert [keep(sample(u, k)) for u, k in stream] == [True, False, True, False, True, False]
    assert reads == ["s3://bucket/corpus/00000.tar", "/data/00001.tar", "s3://bucket/corpus/00000.tar"]
    assert keep.keys("/data/00001.tar") == {"b"}

    with pytest.raises(UsageError, match="shard /data/00002.tar is not in manifest") as info:
        keep(sample("/data/00002.tar", "a"))
    assert "\n" not in str(info.value)
    dropping = KeptKeys(manifest, unknown="drop")
    assert not dropping(sample("/data/00002.tar", "a")) and dropping(sample("/x/00001.tar", "b"))
    with pytest.raises(UsageError, match="without __url__"):
        keep({"__key__": "a", "jpg": b""})
    # pickles (DataLoader workers), each copy with its own cache
    assert pickle.loads(pickle.dumps(keep))(sample("/data/00001.tar", "b"))


def test_bad_manifests_are_usage_errors(tmp_path: Path, pruned_run: Path) -> None:
    with pytest.raises(UsageError, match="unknown='keep'"):
        KeptKeys(tmp_path / "any.parquet", unknown="keep")  # type: ignore[arg-type]
    with pytest.raises(UsageError, match="cannot read manifest"):
        KeptKeys.from_run(tmp_path / "no-run")
    with pytest.raises(UsageError, match="not a selection manifest"):
        KeptKeys(pruned_run / "selection" / KEPT_FILE)
    twice = write_manifest(tmp_path / "twice.parquet", {"/a/00000.tar": ["x"], "/b/00000.tar": ["y"]})
    with pytest.raises(UsageError, match="two shards with the file name 00000"):
        KeptKeys(twice)


def test_run_dir_on_fsspec_storage(pruned_run: Path, tiny_corpus: Path) -> None:
    remote = UPath("memory://manifest-filter/run")
    upload(pruned_run / "selection", remote / "selection")
    try:
        keep = KeptKeys.from_run("memory://manifest-filter/run")
        urls = expand_shards(str(tiny_corpus / "*.tar"))
        assert filtered_pairs(urls, keep) == kept_pairs(pruned_run)
    finally:
        remote.fs.rm("/manifest-filter", recursive=True)


def test_readme_example_runs_as_written(pruned_run: Path) -> None:
    code = readme_block("## Filter at load time", "python")
    first, rest = code.split("\n", 1)
    assert first == 'run_dir = "runs/demo"'
    namespace: dict = {}
    exec(compile(f"run_dir = {str(pruned_run)!r}\n{rest}", "README.md", "exec"), namespace)
    assert namespace["n"] == PRUNED_KEPT == len(kept_pairs(pruned_run))
