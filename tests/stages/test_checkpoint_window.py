"""``score.checkpoint_window: falling`` through the pipeline: the same scores as the window
picked by hand with ``score.checkpoints``, the window in the summary, resumable, and the
default leaving every fingerprint as it was."""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from pipeline.config import RunConfig, parse_config
from pipeline.errors import UsageError
from pipeline.influence.window import falling_window
from pipeline.model.trajectory import CheckpointRef, Trajectory
from pipeline.runtime.executor import LocalExecutor
from pipeline.stages.pipeline import run_pipeline, target_loss_warning
from pipeline.stages.prepare import prepare_fingerprint
from pipeline.stages.score import score_fingerprint


def window_config(corpus: Path, trajectory: Path, **score) -> dict:
    return {
        "data": {"shards": str(corpus / "*.tar"), "sizes": str(corpus / "sizes.json")},
        "trajectory": {"path": str(trajectory)},
        "target": {"holdout_fraction": 0.25, "max_pairs": 64, "bank_size": 5, "seed": 0},
        "score": {"method": "unrolled", "batch_size": 16, "proxy_batch_size": 4, "unrolled": {"lanczos_steps": 1},
                  "embeddings": {"pool_pairs": 16, "pools": 2, "pool_size": 7, "clusters": 2}, **score},
        "resources": {"num_cpus": 0.5},
    }


@pytest.fixture(scope="module")
def window_runs(tiny_corpus: Path, overfit_trajectory: Path, tmp_path_factory):
    """(falling run dir, its summary, hand-picked run dir): ``checkpoint_window: falling``, then
    ``score.checkpoints`` set by hand to the window it chose."""
    root = tmp_path_factory.mktemp("window_runs")
    falling = parse_config(window_config(tiny_corpus, overfit_trajectory, checkpoint_window="falling"))
    summary = run_pipeline(falling, root / "falling", LocalExecutor(), progress=False)
    hand = parse_config(window_config(tiny_corpus, overfit_trajectory,
                                      checkpoints=summary["checkpoint_window"]["scored"]))
    run_pipeline(hand, root / "hand", LocalExecutor(), progress=False)
    return root / "falling", summary, root / "hand"


def test_falling_window_scores_equal_the_hand_picked_window(window_runs) -> None:
    falling_dir, summary, hand_dir = window_runs
    scored = summary["checkpoint_window"]["scored"]
    files = sorted((falling_dir / "scores").glob("*.parquet"))
    assert [f.name for f in files] == sorted(f.name for f in (hand_dir / "scores").glob("*.parquet"))
    assert len(files) == 3
    for path in files:
        windowed, by_hand = pq.read_table(path).to_pydict(), pq.read_table(hand_dir / "scores" / path.name).to_pydict()
        assert set(windowed["status"]) == {"ok"}
        assert all(len(d) == len(scored) for d in windowed["d"])
        assert windowed == by_hand  # every column, exactly


def test_summary_records_the_losses_and_the_window(window_runs) -> None:
    falling_dir, summary, _ = window_runs
    losses = [c["target_loss"] for c in summary["checkpoints"]]
    assert len(losses) == 4 and None not in losses and losses[3] == losses[0]
    window = summary["checkpoint_window"]
    assert window["rule"] == "falling" and window["scored"] == falling_window(losses)
    assert 2 <= len(window["scored"]) <= 3 and window["dropped"] == list(range(len(window["scored"]), 4))
    assert window["steps"] == [[2, 4, 5, 6][i] for i in window["scored"]]
    assert target_loss_warning(losses) is not None  # over every checkpoint: L_V does not fall
    assert summary["target_loss_warning"] is None  # over the window it does
    prepared = falling_dir / "prepared"
    assert len(torch.load(prepared / "unrolled.pt", weights_only=True)["directions"]) == len(window["scored"])
    assert torch.load(prepared / "embeddings.pt", weights_only=True)["checkpoints"] == len(window["scored"])


def test_rerun_reuses_everything_and_another_window_is_refused(tiny_corpus: Path, overfit_trajectory: Path,
                                                               window_runs) -> None:
    falling_dir, _, _ = window_runs
    before = {p.name: p.stat().st_mtime_ns for p in (falling_dir / "prepared").iterdir()}
    again = run_pipeline(parse_config(window_config(tiny_corpus, overfit_trajectory, checkpoint_window="falling")),
                         falling_dir, LocalExecutor(), progress=False)
    assert again["shards_scored_now"] == 0
    assert {p.name: p.stat().st_mtime_ns for p in (falling_dir / "prepared").iterdir()} == before
    every = parse_config(window_config(tiny_corpus, overfit_trajectory))  # checkpoint_window: all
    with pytest.raises(UsageError, match="another configuration"):
        run_pipeline(every, falling_dir, LocalExecutor(), progress=False)


def test_default_window_leaves_the_fingerprints_as_they_were() -> None:
    """The fingerprints of a run without ``checkpoint_window`` (or with ``all``) are those
    recorded before the setting existed: its prepared files and score files stay valid."""
    trajectory = Trajectory(model={"name": "tiny-clip-32"}, num_samples=100, total_steps=10, batch_size=8,
                            optimizer={"name": "adamw"}, schedule={},
                            checkpoints=[CheckpointRef("a.pt", 5, 1e-3), CheckpointRef("b.pt", 10, 0.0)])
    base = {"data": {"shards": "corpus/{00000..00003}.tar"}, "trajectory": {"path": "trajectory"},
            "target": {"holdout_fraction": 0.1}}
    prints = {}
    for name, score in [("absent", {}), ("all", {"checkpoint_window": "all"}),
                        ("falling", {"checkpoint_window": "falling"})]:
        config = RunConfig.model_validate({**base, "score": score})  # no path checks: nothing is read
        prepared = prepare_fingerprint(config, trajectory)
        prints[name] = (prepared, score_fingerprint(prepared, config))
    # computed at the commit before checkpoint_window existed; a change meant to alter what runs
    # write records new values here (and in benchmarks/results/demo_outputs.sha256)
    assert prints["absent"] == prints["all"] == ("52b3beabde7427c4", "a6d4adb52ce6b1e6")
    assert prints["falling"][0] != prints["all"][0] and prints["falling"][1] != prints["all"][1]
