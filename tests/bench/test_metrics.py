"""Retraining-quality metrics of the benchmarks (zero-shot accuracy prompts, recall, noise AUC)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from pipeline.bench import metrics


def test_noise_auc_sign_convention() -> None:
    noisy = np.array([True, True, False, False, False])
    helps = np.array([-2.0, -1.0, 0.5, 1.0, 3.0])  # mismatched pairs score lowest
    assert metrics.noise_auc(noisy, helps) == pytest.approx(1.0)
    assert metrics.noise_auc(noisy, -helps) == pytest.approx(0.0)
    rng = np.random.default_rng(0)
    scores, labels = rng.standard_normal(50), rng.random(50) < 0.3
    assert metrics.noise_auc(labels, scores) == pytest.approx(roc_auc_score(labels, -scores))
    with pytest.raises(ValueError):
        metrics.noise_auc(np.zeros(3, bool), np.arange(3.0))


# --------------------------------------------------------------------------- evaluation


def test_recall_by_hand() -> None:
    sim = torch.tensor([[0.9, 0.1, 0.2], [0.5, 0.4, 0.3], [0.1, 0.2, 0.3]])
    groups = torch.tensor([0, 1, 2])
    # row 0: correct first; row 1: one wrong item above; row 2: correct first
    assert metrics.recall_at(sim, groups, (1, 2)) == {1: pytest.approx(2 / 3), 2: 1.0}
    assert metrics.recall_at(torch.zeros(3, 3), groups, (1, 2)) == {1: 0.0, 2: 0.0}  # ties count against
    # the same caption twice: item 0 is a right answer for query 1 too
    assert metrics.recall_at(sim, metrics.caption_groups(["A star ", "a star", "moon"]), (1,)) == {1: 1.0}


def test_class_prompts_cover_every_template() -> None:
    prompts = metrics.class_prompts()
    assert len(prompts) == 10 and {len(p) for p in prompts} == {len(metrics.TEMPLATES)}
    assert prompts[9][0] == metrics.TEMPLATES[0].format("an ankle boot")


# --------------------------------------------------------------------------- data
