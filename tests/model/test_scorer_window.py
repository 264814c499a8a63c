"""TrajectoryInfluence with ``checkpoint_window: falling``: the scores of the hand-picked window."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from pipeline.data.pairs import PairTable, in_holdout, load_pairs
from pipeline.data.shards import expand_shards
from pipeline.errors import UsageError
from pipeline.influence.embeddings import EmbeddingSettings
from pipeline.influence.window import falling_window
from pipeline.model.scorer import InfluenceSettings, TrajectoryInfluence
from pipeline.model.trajectory import Trajectory

# tracin only: the window logic, not the unrolled recursion (tests/stages/test_checkpoint_window.py)
SETTINGS = InfluenceSettings(bank_size=5, batch_size=16, proxy_batch_size=4, components=("a",),
                             embeddings=EmbeddingSettings(pool_pairs=16, pools=2, pool_size=7, clusters=2))


def _split(corpus: Path) -> tuple[PairTable, PairTable]:
    """(train, target): the target the pipeline's ``target.holdout_fraction: 0.25`` holds out."""
    table = load_pairs(expand_shards(str(corpus / "*.tar")), 32)
    held = [in_holdout(uid, 0.25, 0) for uid in table.uids]
    return (table.subset([i for i, h in enumerate(held) if not h]), table.subset([i for i, h in enumerate(held) if h]))


def _scores(trajectory: Trajectory, settings: InfluenceSettings, target, train) -> tuple[TrajectoryInfluence, dict]:
    influence = TrajectoryInfluence(trajectory, settings)
    influence.load_prepared(influence.prepare(target, train))
    return influence, influence.score_table(train)


def test_falling_window_scores_equal_the_hand_picked_window(tiny_corpus: Path, overfit_trajectory: Path) -> None:
    train, target = _split(tiny_corpus)
    trajectory = Trajectory.load(overfit_trajectory)
    falling, windowed = _scores(trajectory, replace(SETTINGS, checkpoint_window="falling"), target, train)
    losses = falling.target_losses
    assert len(losses) == 4 and losses[3] == losses[0]  # the last checkpoint holds the first's weights
    assert falling.indices == falling_window(losses) and 2 <= len(falling.indices) <= 3
    hand, by_hand = _scores(trajectory, replace(SETTINGS, checkpoints=tuple(falling.indices)), target, train)
    assert hand.target_losses == losses[:len(falling.indices)]
    assert windowed["a"].shape == (len(falling.indices), len(train))
    assert windowed.keys() == by_hand.keys()
    for key in windowed:
        assert torch.equal(windowed[key], by_hand[key]), key


def test_a_window_of_one_checkpoint_is_refused(tiny_corpus: Path, overfit_trajectory: Path) -> None:
    train, target = _split(tiny_corpus)
    settings = replace(SETTINGS, checkpoints=(2, 3), checkpoint_window="falling")  # L_V rises from 2 to 3
    influence = TrajectoryInfluence(Trajectory.load(overfit_trajectory), settings)
    with pytest.raises(UsageError, match="score.checkpoint_window: 'falling' keeps 1 checkpoint"):
        influence.prepare(target, train)
