"""The target-loss rule: a trajectory that does not reduce L_V is flagged, in the summary and the log."""

from __future__ import annotations

import logging
import math

import pytest

from pipeline.stages.pipeline import TARGET_LOSS_MIN_DROP, _record_target_loss, target_loss_warning


@pytest.mark.parametrize("losses", [[4.45, 2.98, 2.67, 2.66], [3.0, 3.1, 2.0], [1.0, 0.94]])
def test_falling_target_loss_gives_no_warning(losses: list[float]) -> None:
    assert target_loss_warning(losses) is None


@pytest.mark.parametrize("losses", [
    [2.782, 2.773, 2.762, 2.792],  # the old demo: flat, the last a little above the first
    [2.0, 2.0],                    # flat
    [2.0, 2.5, 3.0],               # rising
    [3.0, 1.0, 2.9],               # falls in between, not at the end
    [1.0, 0.96],                   # 4 %: less than the margin
    [2.0, math.nan],               # diverged
])
def test_flat_or_rising_target_loss_warns(losses: list[float]) -> None:
    warning = target_loss_warning(losses)
    assert warning is not None
    assert "does not fall" in warning and "training does not reduce" in warning
    assert "lower learning rate" in warning


def test_margin_and_single_checkpoint() -> None:
    assert TARGET_LOSS_MIN_DROP == 0.05
    assert target_loss_warning([1.0, 0.94], min_drop=0.05) is None
    assert target_loss_warning([1.0, 0.94], min_drop=0.1) is not None
    assert target_loss_warning([2.0]) is None  # one checkpoint: nothing to compare
    assert target_loss_warning([]) is None


def test_summary_and_log(caplog: pytest.LogCaptureFixture) -> None:
    summary = {"checkpoints": [{"step": 10, "lr": 1e-3}, {"step": 20, "lr": 5e-4}, {"step": 30, "lr": 0.0}]}
    with caplog.at_level(logging.WARNING, logger="pipeline.stages.pipeline"):
        _record_target_loss(summary, {0: 2.78, 2: 2.79}, warn=True)  # checkpoint 1 not scored
    assert [c["target_loss"] for c in summary["checkpoints"]] == [2.78, None, 2.79]
    assert summary["target_loss_warning"] == target_loss_warning([2.78, 2.79])
    assert [r.levelno for r in caplog.records] == [logging.WARNING]
    assert "does not fall" in caplog.records[0].getMessage()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="pipeline.stages.pipeline"):
        _record_target_loss(summary, {0: 4.4, 1: 3.0, 2: 2.7}, warn=True)
    assert [c["target_loss"] for c in summary["checkpoints"]] == [4.4, 3.0, 2.7]
    assert summary["target_loss_warning"] is None and caplog.records == []


def test_run_output_shows_target_loss(capsys: pytest.CaptureFixture) -> None:
    from jobs._stagejob import print_summary

    summary = {"seconds": 1.0, "stages": ["prepare"], "pairs_in": 8, "shards": 1, "train_pairs": 8,
               "trajectory": "t/trajectory.json", "checkpoints": [{"step": 1, "lr": 1e-3}, {"step": 2, "lr": 0.0}]}
    print_summary(summary, "run")
    assert "target loss" not in capsys.readouterr().out  # not prepared: nothing to show
    _record_target_loss(summary, {0: 2.0, 1: 2.1}, warn=False)
    print_summary(summary, "run")
    assert "target loss L_V per checkpoint: 2.0000, 2.1000  (does NOT fall" in capsys.readouterr().out
    _record_target_loss(summary, {0: 2.0, 1: 1.5}, warn=False)
    print_summary(summary, "run")
    assert "target loss L_V per checkpoint: 2.0000, 1.5000  (falls)" in capsys.readouterr().out


def test_a_checkpoint_window_is_recorded_and_judged(caplog: pytest.LogCaptureFixture,
                                                    capsys: pytest.CaptureFixture) -> None:
    """With ``score.checkpoint_window``: every L_V is recorded, the window too, and the
    verdict is on the scored checkpoints only."""
    from jobs._stagejob import print_summary

    def summary() -> dict:
        return {"seconds": 1.0, "stages": ["prepare"], "pairs_in": 8, "shards": 1, "train_pairs": 8,
                "trajectory": "t/trajectory.json",
                "checkpoints": [{"step": s, "lr": 1e-3} for s in (10, 20, 30, 40)]}

    losses = {0: 3.0, 1: 2.0, 2: 1.5, 3: 3.0}  # back at the first's L_V: the proxy overfits
    every = summary()
    _record_target_loss(every, losses, warn=False)
    assert every["target_loss_warning"] is not None and "checkpoint_window" not in every
    windowed = summary()
    with caplog.at_level(logging.WARNING, logger="pipeline.stages.pipeline"):
        _record_target_loss(windowed, losses, warn=True, window=("falling", [0, 1, 2]))
    assert caplog.records == [] and windowed["target_loss_warning"] is None
    assert [c["target_loss"] for c in windowed["checkpoints"]] == [3.0, 2.0, 1.5, 3.0]
    assert windowed["checkpoint_window"] == {"rule": "falling", "scored": [0, 1, 2], "steps": [10, 20, 30],
                                             "dropped": [3]}
    print_summary(windowed, "run")
    out = capsys.readouterr().out
    assert "target loss L_V per checkpoint: 3.0000, 2.0000, 1.5000, 3.0000  (falls over the scored checkpoints)" in out
    assert "scored checkpoints (score.checkpoint_window: falling): [0, 1, 2] (steps [10, 20, 30]); dropped" in out
