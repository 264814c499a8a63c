"""prepare → score on a 20-shard corpus: rows, resume, refusal, equality with in-process scoring."""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from pipeline.config import parse_config
from pipeline.data.pairs import load_pairs
from pipeline.data.shards import expand_shards
from pipeline.errors import UsageError
from pipeline.influence.scores import COMPONENTS, SCORE_COLUMNS
from pipeline.model.scorer import TrajectoryInfluence
from pipeline.model.trajectory import Trajectory
from pipeline.runtime.executor import LocalExecutor
from pipeline.stages.pipeline import run_pipeline
from pipeline.stages.context import influence_settings
from pipeline.stages.prepare import load_prepared_dir


def pipeline_config(corpus: Path, **score) -> dict:
    return {
        "data": {"shards": str(corpus / "*.tar"), "sizes": str(corpus / "sizes.json")},
        "trajectory": {"train": {"model": "tiny-clip-32", "steps": 6, "batch_size": 8, "warmup": 2,
                                 "checkpoints": 2, "seed": 0}},
        "target": {"holdout_fraction": 0.15, "max_pairs": 64, "bank_size": 7, "seed": 0},
        "score": {"batch_size": 16, "proxy_batch_size": 8, "unrolled": {"lanczos_steps": 4}, **score},
        "resources": {"actors": 2, "num_cpus": 0.5},
    }


@pytest.fixture(scope="module")
def scored_run(corpus: Path, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("run")
    config = parse_config(pipeline_config(corpus, method="all", adam=True))  # every column
    summary = run_pipeline(config, run_dir, LocalExecutor(), progress=False)
    return config, run_dir, summary


def test_one_row_per_pair_one_file_per_shard(corpus: Path, scored_run) -> None:
    _, run_dir, summary = scored_run
    files = sorted((run_dir / "scores").glob("*.parquet"))
    assert len(files) == 20 == summary["shards_scored_now"]
    tables = [pq.read_table(f) for f in files]
    assert sum(t.num_rows for t in tables) == 160 == summary["pairs_in"]
    uids = [u for t in tables for u in t.column("uid").to_pylist()]
    assert len(set(uids)) == 160
    for f, t in zip(files, tables):
        assert t.column("index").to_pylist() == list(range(8))  # shard order
        assert set(t.column("status").to_pylist()) == {"ok"}
        for name in COMPONENTS:
            assert all(len(x) == 2 for x in t.column(name).to_pylist()), name
        assert t.schema.metadata[b"diffin.config_fingerprint"]


def test_summary_records_target_loss_per_checkpoint(scored_run) -> None:
    import json

    from pipeline.stages.pipeline import target_loss_warning

    _, run_dir, summary = scored_run
    prepared = [torch.load(run_dir / "prepared" / f"ckpt_{k:03d}.pt", weights_only=True) for k in range(2)]
    expected = [p["target_loss"] for p in prepared]
    assert all(isinstance(x, float) and x > 0 for x in expected)
    on_disk = json.loads((run_dir / "run_summary.json").read_text())
    for written in (summary, on_disk):
        assert [c["step"] for c in written["checkpoints"]] == [p["step"] for p in prepared] == [3, 6]
        assert [c["target_loss"] for c in written["checkpoints"]] == pytest.approx(expected, rel=1e-12)
        assert written["target_loss_warning"] == target_loss_warning(expected)


def test_scores_equal_in_process_estimator(corpus: Path, scored_run) -> None:
    config, run_dir, _ = scored_run
    trajectory = Trajectory.load(run_dir / "trajectory")
    influence = TrajectoryInfluence(trajectory, influence_settings(config))
    prepared, _ = load_prepared_dir(run_dir / "prepared", 2)
    influence.load_prepared(prepared)
    urls = expand_shards(str(corpus / "*.tar"))
    table = load_pairs(urls[3:5], influence.image_size)
    direct = influence.score_table(table)
    written = pq.read_table([run_dir / "scores" / "00003.parquet", run_dir / "scores" / "00004.parquet"]).to_pydict()
    assert written["uid"] == table.uids
    for name in COMPONENTS:  # method all + score.adam: every component and column is written
        assert torch.allclose(torch.tensor(written[name], dtype=torch.float64).T, direct[name],
                              rtol=1e-5, atol=1e-12), name
    for column in SCORE_COLUMNS:
        assert torch.allclose(torch.tensor(written[column], dtype=torch.float64), direct[column],
                              rtol=1e-5, atol=1e-12), column


def test_resume_recomputes_exactly_what_is_missing(corpus: Path, scored_run) -> None:
    config, run_dir, _ = scored_run
    files = sorted((run_dir / "scores").glob("*.parquet"))
    before = {f.name: f.stat().st_mtime_ns for f in files}
    again = run_pipeline(config, run_dir, LocalExecutor(), progress=False)
    assert again["shards_scored_now"] == 0
    assert {f.name: f.stat().st_mtime_ns for f in files} == before
    victims = [files[1], files[7], files[19]]
    for f in victims:
        f.unlink()
    third = run_pipeline(config, run_dir, LocalExecutor(), progress=False)
    assert third["shards_scored_now"] == 3
    after = {f.name: f.stat().st_mtime_ns for f in sorted((run_dir / "scores").glob("*.parquet"))}
    changed = {name for name in after if after[name] != before.get(name)}
    assert changed == {f.name for f in victims}


def test_changed_configuration_is_refused(corpus: Path, scored_run) -> None:
    _, run_dir, _ = scored_run
    changed = parse_config(pipeline_config(corpus, eps=2e-3))
    with pytest.raises(UsageError, match="another configuration"):
        run_pipeline(changed, run_dir, LocalExecutor(), progress=False)


@pytest.mark.slow  # compiles the JVP (about a minute on 2 CPU cores)
def test_compiled_scoring_equals_eager(corpus: Path, tmp_path: Path) -> None:
    """score.compile: the same rows and, to float rounding, the same scores as eager scoring."""
    runs = {}
    for compiled in (False, True):
        config = parse_config(pipeline_config(corpus, method="unrolled", compile=compiled))
        run_pipeline(config, tmp_path / str(compiled), LocalExecutor(), progress=False,
                     stages=("trajectory", "prepare", "score"))
        runs[compiled] = pq.read_table(sorted((tmp_path / str(compiled) / "scores").glob("*.parquet"))).to_pydict()
    assert runs[True]["uid"] == runs[False]["uid"]
    eager, compiled = (torch.tensor(runs[k]["diffin_unrolled"], dtype=torch.float64) for k in (False, True))
    assert torch.allclose(compiled, eager, rtol=1e-4, atol=1e-4 * float(eager.abs().max()))


def test_summaries_merge_across_jobs() -> None:
    """A later job keeps the earlier jobs' keys, overrides its own, and can drop invalidated ones."""
    from pipeline.stages.pipeline import merge_summaries

    run = {"stages": ["trajectory", "prepare", "score", "select", "reshard"], "scores": "s", "pairs_scored_now": 9,
           "selection": {"kept": 4}, "reshard": {"pairs": 4}, "seconds": 10.0,
           "stage_seconds": {"score": 8.0, "select": 1.0, "reshard": 1.0}}
    select = {"stages": ["select"], "selection": {"kept": 6}, "seconds": 1.5, "stage_seconds": {"select": 1.5}}
    merged = merge_summaries(run, select, drop=("reshard",))
    assert merged["pairs_scored_now"] == 9 and merged["scores"] == "s"  # the score stage's keys stay
    assert merged["selection"] == {"kept": 6} and "reshard" not in merged
    assert merged["stages"] == ["select"] and merged["seconds"] == 1.5
    assert merged["stage_seconds"] == {"score": 8.0, "select": 1.5, "reshard": 1.0}
    assert merged["stages_run"] == ["trajectory", "prepare", "score", "select", "reshard"]
    assert merge_summaries({}, select)["stages_run"] == ["select"]
