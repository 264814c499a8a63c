"""Dirty data (issue #5): one shard per kind of damage; every pair gets a status, nothing crashes.

The shards are hand-made tars (member order and contents chosen per case), scored by the
real score stage with a trajectory trained on a clean corpus, then selected; the test checks
the status of every pair and the reconciliation in ``selection/summary.json``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from pipeline.config import parse_config
from pipeline.data.shards import SIZES_FILE
from pipeline.errors import DataError
from pipeline.model.scorer import TrajectoryInfluence
from pipeline.runtime.executor import LocalExecutor
from pipeline.stages.pipeline import run_pipeline
from tests.conftest import make_tiny_corpus
from tests.dirtydata import GONE, build_dirty_corpus


@pytest.fixture(scope="module")
def clean_trajectory(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny trajectory trained on a clean corpus (the dirty shards are only scored)."""
    corpus = make_tiny_corpus(tmp_path_factory.mktemp("clean"), n=32, shard_size=16)
    run_dir = tmp_path_factory.mktemp("clean_run")
    config = parse_config({
        "data": {"shards": str(corpus / "*.tar")},
        "trajectory": {"train": {"model": "tiny-clip-32", "steps": 4, "batch_size": 8, "warmup": 1,
                                 "checkpoints": 2, "seed": 0}},
    })
    run_pipeline(config, run_dir, LocalExecutor(), progress=False, stages=("trajectory",))
    return corpus, run_dir / "trajectory"


def dirty_config(urls: list[str], root: Path, clean: Path, trajectory: Path, **data) -> dict:
    return {
        "data": {"shards": urls, "sizes": str(root / SIZES_FILE), **data},
        "trajectory": {"path": str(trajectory)},
        "target": {"shards": str(clean / "*.tar"), "max_pairs": 16, "bank_size": 7, "seed": 0},
        "score": {"batch_size": 4, "proxy_batch_size": 8, "unrolled": {"lanczos_steps": 4}},
        "select": {"column": "diffin_unrolled", "rule": "top_fraction", "fraction": 1.0, "failed": "drop"},
        "resources": {"actors": 1, "num_cpus": 0.5},
    }


@pytest.fixture
def nan_on_trigger(monkeypatch):
    """Make the estimator return NaN for pairs whose caption holds NAN-TRIGGER (as a
    diverged checkpoint would), so the non_finite path runs through the real stage."""
    original_inputs, original_score = TrajectoryInfluence.inputs, TrajectoryInfluence.score_inputs

    def inputs(self, images, captions):
        self._nan_rows = [i for i, c in enumerate(captions) if "NAN-TRIGGER" in c]
        return original_inputs(self, images, captions)

    def score_inputs(self, *args, **kwargs):
        out = original_score(self, *args, **kwargs)
        for rows in (self._nan_rows,):
            for name in ("diffin_unrolled", "diffin", "tracin"):
                if name in out and rows:
                    out[name] = torch.as_tensor(out[name]).clone()
                    out[name][rows] = float("nan")
        return out

    monkeypatch.setattr(TrajectoryInfluence, "inputs", inputs)
    monkeypatch.setattr(TrajectoryInfluence, "score_inputs", score_inputs)


def _score_rows(run_dir: Path) -> dict[str, dict[str, str]]:
    out: dict[str, dict[str, str]] = {}
    for path in sorted((run_dir / "scores").glob("*.parquet")):
        table = pq.read_table(path, columns=["key", "status", "diffin_unrolled", "index"]).to_pylist()
        out[path.stem + ".tar"] = {}
        for row in table:
            out[path.stem + ".tar"].setdefault(row["key"], row["status"])
            assert out[path.stem + ".tar"][row["key"]] == row["status"], "a repeated key got two statuses"
            assert (row["diffin_unrolled"] is None) == (row["status"] != "ok")
    return out


def test_every_pair_gets_a_status_and_the_summary_reconciles(tmp_path, clean_trajectory, nan_on_trigger) -> None:
    clean, trajectory = clean_trajectory
    urls, expected_rows, expected_shards = build_dirty_corpus(tmp_path / "dirty")
    config = parse_config(dirty_config(urls, tmp_path / "dirty", clean, trajectory, max_failed_fraction=1.0))
    run_dir = tmp_path / "run"
    run_pipeline(config, run_dir, LocalExecutor(), progress=False, stages=("prepare", "score", "select"))

    assert _score_rows(run_dir) == expected_rows
    stats = {p.stem + ".tar": json.loads(p.read_text()) for p in (run_dir / "stats").glob("*.json")}
    assert {name: s["status"] for name, s in stats.items()} == expected_shards
    assert stats["gone.tar"]["error"].startswith("FileNotFoundError")

    summary = json.loads((run_dir / "selection" / "summary.json").read_text())
    counts = summary["counts"]
    statuses = [s for shard in expected_rows.values() for s in shard.values()]
    # a repeated key is two rows with one status each
    n_rows = sum(len(shard) for shard in expected_rows.values()) + 2  # u0 twice, k1 twice
    assert counts["in"] == n_rows == counts["scored_ok"] + counts["failed"]
    assert counts["scored_ok"] == statuses.count("ok") == counts["kept"]
    failed = {**summary["failed_by_status"]}
    failed["non_finite"] = failed.get("non_finite", 0) + summary["ok_without_score"]["non_finite"]
    assert sum(failed.values()) == counts["failed"]
    assert failed == {"bad_json": 1, "decode_error": 1, "dotted_key": 1, "duplicate_key": 2, "empty_text": 1,
                      "missing_json": 1, "missing_text": 1, "missing_uid": 1, "non_contiguous": 2,
                      "non_finite": 1, "not_image": 1}
    # sizes.json promised 4 + 5 + 3 pairs in truncated, short and gone: 2, 2 and 0 were read
    assert counts["missing"] == summary["shards"]["missing"] == 2 + 3 + 3
    assert summary["shards"]["by_status"] == {"empty": 1, "long": 1, "ok": 7, "short": 1, "truncated": 1, "unreadable": 1}
    assert {p["shard"].rsplit("/", 1)[-1]: p["status"] for p in summary["shards"]["problems"]} == {
        name: s for name, s in expected_shards.items() if s != "ok"}
    kept = pq.read_table(run_dir / "selection" / "kept.parquet").column("key").to_pylist()
    assert "x1" not in kept and "x0" in kept


def test_too_many_failures_stop_the_run_and_keep_the_scores(tmp_path, clean_trajectory) -> None:
    clean, trajectory = clean_trajectory
    urls, expected_rows, _ = build_dirty_corpus(tmp_path / "dirty")
    config = parse_config(dirty_config(urls, tmp_path / "dirty", clean, trajectory, max_failed_fraction=0.2))
    run_dir = tmp_path / "run"
    with pytest.raises(DataError, match=r"data.max_failed_fraction=0.2.*'missing': 8"):
        run_pipeline(config, run_dir, LocalExecutor(), progress=False, stages=("prepare", "score", "select"))
    assert len(list((run_dir / "scores").glob("*.parquet"))) == len(expected_rows)
    assert not (run_dir / "selection").exists()


def test_unreadable_shard_is_retried_on_the_next_run(tmp_path, clean_trajectory) -> None:
    clean, trajectory = clean_trajectory
    urls, _, _ = build_dirty_corpus(tmp_path / "dirty")
    urls = [u for u in urls if u.endswith(("corrupt_jpeg.tar", "caption.tar"))] + [GONE]
    config = parse_config(dirty_config(urls, tmp_path / "dirty", clean, trajectory, max_failed_fraction=1.0))
    run_dir = tmp_path / "run"
    stages = ("prepare", "score")
    run_pipeline(config, run_dir, LocalExecutor(), progress=False, stages=stages)
    first = json.loads((run_dir / "stats" / "gone.json").read_text())
    assert first["status"] == "unreadable" and first["rows"] == 0
    import fsspec

    with fsspec.open(GONE, "wb") as f:  # the shard appears (e.g. storage came back)
        f.write((tmp_path / "dirty" / "json.tar").read_bytes())
    try:
        before = (run_dir / "scores" / "caption.parquet").stat().st_mtime_ns
        summary = run_pipeline(config, run_dir, LocalExecutor(), progress=False, stages=stages)
    finally:
        fsspec.filesystem("memory").rm(GONE)
    assert summary["shards_scored_now"] == 1  # only the shard that was unreadable
    assert (run_dir / "scores" / "caption.parquet").stat().st_mtime_ns == before
    again = json.loads((run_dir / "stats" / "gone.json").read_text())
    assert again["status"] == "long" and again["rows"] == 4  # sizes.json says 3 for gone.tar


def test_temporaries_of_a_killed_writer_are_removed_on_restart(tmp_path, clean_trajectory) -> None:
    clean, trajectory = clean_trajectory
    urls, _, _ = build_dirty_corpus(tmp_path / "dirty")
    urls = [u for u in urls if u.endswith("caption.tar")]
    config = parse_config(dirty_config(urls, tmp_path / "dirty", clean, trajectory, max_failed_fraction=1.0))
    run_dir = tmp_path / "run"
    for sub in ("scores", "stats"):  # what a SIGKILL during a commit leaves behind
        (run_dir / sub).mkdir(parents=True)
        (run_dir / sub / ".caption.parquet.tmp-123-abcdef01").write_bytes(b"half a file")
    run_pipeline(config, run_dir, LocalExecutor(), progress=False, stages=("prepare", "score"))
    assert sorted(p.name for p in (run_dir / "scores").iterdir()) == ["caption.parquet"]
    assert sorted(p.name for p in (run_dir / "stats").iterdir()) == ["caption.json"]
