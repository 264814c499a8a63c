"""`diffin run` on Ray over shards in img2dataset's exact layout (no uid; issue #23).

One shard is also truncated, with its surviving pairs kept: the Ray half of the damaged-input
run (the in-process half, and a source changed before reshard: tests/jobs/test_damaged_input.py).
The first run is on Ray; its no-op rerun and the rescoring of its output run in process.
"""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from jobs import prune
from pipeline.data.uids import url_uid
from tests.img2dataset import build_img2dataset_corpus, truncate_after

pytestmark = pytest.mark.ray

FAST = {"trajectory": {"train": {"model": "tiny-clip-32", "steps": 3, "batch_size": 8, "warmup": 1,
                                 "checkpoints": 2, "seed": 0}},
        "target": {"holdout_fraction": 0.25, "max_pairs": 8, "bank_size": 3, "seed": 0},
        "score": {"method": "tracin", "batch_size": 8, "proxy_batch_size": 8},
        "select": {"column": "tracin", "rule": "top_fraction", "fraction": 1.0},
        "reshard": {"shard_size": 7},
        "resources": {"actors": 1, "num_cpus": 0.5}}


def fast_config(path: Path, shards: str, **sections) -> Path:
    """A cheap every-stage config over ``shards`` (default uid rule: no ``data.uid_from``)."""
    path.write_text(yaml.safe_dump({"data": {"shards": shards}, **FAST, **sections}))
    return path


@pytest.fixture(scope="module")
def local_ray():
    """One embedded Ray for the module (`diffin run` joins a Ray this process started)."""
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False)
    try:
        yield
    finally:
        ray.shutdown()


def _uids_by_key(run_dir: Path) -> dict[str, str]:
    table = pq.read_table(sorted((run_dir / "scores").glob("*.parquet")), columns=["key", "uid", "status"])
    assert set(table.column("status").to_pylist()) == {"ok"}, "every pair scored"
    return dict(zip(table.column("key").to_pylist(), table.column("uid").to_pylist()))


def _keys(tar_path: Path) -> list[str]:
    with tarfile.open(tar_path) as tar:
        return list(dict.fromkeys(m.name.split(".", 1)[0] for m in tar.getmembers()))


def test_img2dataset_shards_run_on_ray_and_uids_survive_resharding(local_ray, tmp_path: Path, capsys) -> None:
    corpus = tmp_path / "img2dataset"
    rows = build_img2dataset_corpus(corpus)  # 3 shards × 8 successes of 10 urls
    truncate_after(corpus / "00002.tar", 5)  # 5 pairs survive in 00002.tar
    survivors = {k for k in rows if not k.startswith("00002") or k in _keys_before_cut(corpus / "00002.tar")}
    assert len(survivors) == 21
    run1 = tmp_path / "run1"
    args = ["--config", str(fast_config(tmp_path / "run.yaml", str(corpus / "*.tar"))), "--run-dir", str(run1),
            "--no-progress"]
    assert prune.main(args) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert "damaged input shard" in out and "00002.tar (truncated)" in out

    # Every surviving pair scored, under the url rule, computable from img2dataset's own parquet.
    uids = _uids_by_key(run1)
    assert set(uids) == survivors
    assert uids == {k: url_uid(rows[k]["url"], rows[k]["caption"]) for k in survivors}
    stats = json.loads((run1 / "stats" / "00002.json").read_text())
    assert stats["status"] == "truncated" and stats["ok"] == 5
    summary = json.loads((run1 / "run_summary.json").read_text())
    assert [(s["shard"], s["status"], s["kept"]) for s in summary["reshard"]["damaged_sources"]] == [
        (str(corpus / "00002.tar"), "truncated", 5)]
    assert summary["reshard"]["pairs"] == 21
    shards = sorted((run1 / "shards").glob("*.tar"))
    out_keys = [k for s in shards for k in _keys(s)]
    assert sorted(out_keys) == sorted(survivors)  # the truncated shard's kept pairs included
    mtimes = {p.name: p.stat().st_mtime_ns for p in shards}
    assert prune.main([*args, "--executor", "local"]) == 0  # the rerun is a no-op
    assert {p.name: p.stat().st_mtime_ns for p in sorted((run1 / "shards").glob("*.tar"))} == mtimes

    # The resharded pairs (other shard names, other grouping) scored again: the same uids.
    run2 = tmp_path / "run2"
    again = fast_config(tmp_path / "again.yaml", str(run1 / "shards" / "*.tar"),
                        trajectory={"path": str(run1 / "trajectory")})
    assert prune.main(["--config", str(again), "--run-dir", str(run2), "--no-progress", "--executor", "local"]) == 0
    assert _uids_by_key(run2) == uids


def _keys_before_cut(path: Path) -> set[str]:
    """Keys whose three members lie wholly before the cut of a truncated tar."""
    from pipeline.data.scan import ShardReader

    return {raw.key for raw in ShardReader(str(path)) if len(raw.members) == 3}
