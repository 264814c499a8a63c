"""End to end on a real local Ray: 20 shards, 2 scoring actors, select, reshard."""

from __future__ import annotations

import json
import math
import tarfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from pipeline.data.uids import uid_to_u8u8

pytestmark = pytest.mark.ray


def _members(path: Path) -> dict[str, bytes]:
    with tarfile.open(path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}


@pytest.fixture(scope="module")
def ray_run(ray_runs):
    """The first of the two Ray runs (``tests/stages/conftest.py``): run dir and summary."""
    return ray_runs[0], ray_runs[1]


def test_rows_files_and_uids(ray_run) -> None:
    run_dir, summary = ray_run
    files = sorted((run_dir / "scores").glob("*.parquet"))
    assert len(files) == 20
    table = pq.read_table(files)
    assert table.num_rows == summary["pairs_in"] == 160
    assert len(set(table.column("uid").to_pylist())) == 160


def test_selection_outputs(ray_run) -> None:
    run_dir, summary = ray_run
    scores = pq.read_table(sorted((run_dir / "scores").glob("*.parquet"))).to_pydict()
    ok = [i for i, s in enumerate(scores["status"]) if s == "ok"]
    expected = math.floor(0.3 * len(ok) + 0.5)  # round half up
    kept = pq.read_table(run_dir / "selection" / "kept.parquet").to_pydict()
    assert len(kept["uid"]) == expected == summary["selection"]["kept"]
    assert kept["uid"] == sorted(kept["uid"])
    # The kept pairs are the top scores, ties by uid.
    order = sorted(ok, key=lambda i: (-scores["diffin_unrolled"][i], scores["uid"][i]))
    assert set(kept["uid"]) == {scores["uid"][i] for i in order[:expected]}
    arr = np.load(run_dir / "selection" / "kept_uids.npy")
    assert arr.dtype == np.dtype("u8,u8")
    assert arr.tolist() == sorted(arr.tolist())
    assert arr.tolist() == [uid_to_u8u8(u) for u in kept["uid"]]
    summary_json = json.loads((run_dir / "selection" / "summary.json").read_text())
    assert summary_json["counts"]["kept"] == expected


def test_resharded_members_are_byte_identical(ray_run, corpus: Path) -> None:
    run_dir, summary = ray_run
    kept = pq.read_table(run_dir / "selection" / "kept.parquet").to_pydict()
    sources: dict[str, bytes] = {}
    for shard in sorted(set(kept["shard"])):
        sources.update(_members(Path(shard)))
    out: dict[str, bytes] = {}
    sizes = json.loads((run_dir / "shards" / "sizes.json").read_text())
    for name, count in sizes.items():
        members = _members(run_dir / "shards" / name)
        assert len({m.split(".", 1)[0] for m in members}) == count
        out.update(members)
    assert {m.split(".", 1)[0] for m in out} == set(kept["key"])
    assert all(out[name] == sources[name] for name in out)
    assert sum(sizes.values()) == len(kept["key"]) == summary["reshard"]["pairs"]


def test_ray_outputs_equal_in_process_ones(ray_run, tmp_path: Path) -> None:
    """The selection (the bounded reducer's tasks on Ray) and the shards (reshard's tasks on Ray)
    equal, byte for byte, what the in-memory reducer and an in-process reshard write from the
    same score files."""
    from pipeline.config import parse_config
    from pipeline.runtime.executor import LocalExecutor
    from pipeline.stages.reshard import reshard
    from pipeline.stages.select import KEPT_FILE, KEPT_UIDS_FILE, MANIFEST_FILE, SUMMARY_FILE, select

    run_dir, _ = ray_run
    config = parse_config(json.loads((run_dir / "config.json").read_text()))
    select(sorted((run_dir / "scores").glob("*.parquet")), config.select, tmp_path / "selection", strategy="memory")
    for name in (KEPT_FILE, KEPT_UIDS_FILE, MANIFEST_FILE, SUMMARY_FILE):
        assert (tmp_path / "selection" / name).read_bytes() == (run_dir / "selection" / name).read_bytes(), name
    from pipeline.io.layout import RunLayout
    from pipeline.stages.derived import selection_done

    reshard(run_dir / "selection" / MANIFEST_FILE, tmp_path / "shards", config.reshard, LocalExecutor(),
            selection=selection_done(RunLayout.of(run_dir)))  # the plan records the selection it came from
    names = sorted(p.name for p in (run_dir / "shards").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "shards").iterdir()) and len(names) > 2
    for name in names:
        assert (tmp_path / "shards" / name).read_bytes() == (run_dir / "shards" / name).read_bytes(), name
