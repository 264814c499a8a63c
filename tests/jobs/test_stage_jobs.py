"""Each stage's own job runs just that stage and needs the earlier stages' outputs."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from jobs import prepare, reshard, score, select
from tests.conftest import make_tiny_corpus
from tests.stages.test_pipeline import pipeline_config


def test_stage_jobs_in_order(tmp_path: Path, capsys) -> None:
    corpus = make_tiny_corpus(tmp_path / "corpus", n=96, shard_size=8)
    cfg = pipeline_config(corpus)
    cfg["select"] = {"rule": "top_k", "k": 10}
    cfg["reshard"] = {"shard_size": 4}
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(cfg))
    args = ["--config", str(config), "--run-dir", str(tmp_path / "run"), "--executor", "local", "--no-progress"]
    # Nothing before it: prepare refuses with one line, exit 2, nothing written.
    assert prepare.main(args) == 2
    assert "no trajectory" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
    from jobs import train

    assert train.main(["--config", str(config), "--out", str(tmp_path / "run" / "trajectory")]) == 0
    assert score.main(args) == 2 and "run `diffin prepare` (or `diffin run`)" in capsys.readouterr().err
    assert prepare.main(args) == 0
    assert select.main(args) == 2 and "not scored yet" in capsys.readouterr().err
    assert score.main(args) == 0
    assert select.main(args) == 0
    summary = json.loads((tmp_path / "run" / "run_summary.json").read_text())
    assert summary["stages"] == ["select"] and summary["selection"]["kept"] == 10
    # the stage jobs before it keep their keys: the score stage's counts are still there
    assert summary["stages_run"] == ["prepare", "score", "select"] and summary["pairs_scored_now"] == 96
    assert set(summary["stage_seconds"]) == {"prepare", "score", "select"}
    assert summary["selection"]["recomputed"] is True
    assert select.main(args) == 0  # complete: reused, not recomputed
    assert json.loads((tmp_path / "run" / "run_summary.json").read_text())["selection"]["recomputed"] is False
    assert reshard.main(args) == 0
    sizes = json.loads((tmp_path / "run" / "shards" / "sizes.json").read_text())
    assert list(sizes.values()) == [4, 4, 2]
