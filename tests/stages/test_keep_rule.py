"""The keep rule on plain arrays: order, ties, budgets, strata, threshold, random."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.config import SelectConfig
from pipeline.stages.keep_rule import Rows, keep_positions, rule_order, seeded_uid_hash


def rows(scores, *, hi=None, strata=None) -> Rows:
    n = len(scores)
    return Rows(hi=np.asarray(hi if hi is not None else np.arange(n)[::-1], np.uint64),
                lo=np.zeros(n, np.uint64), score=np.asarray(scores, np.float64),
                file=np.zeros(n, np.int32), index=np.arange(n, dtype=np.int32),
                stratum=np.asarray(strata if strata is not None else np.zeros(n), np.int32))


def test_best_first_and_ties_by_uid() -> None:
    r = rows([0.5, 0.9, 0.5, 0.1], hi=[7, 1, 3, 0])
    assert list(rule_order(r, SelectConfig(rule="top_k", k=1))) == [1, 2, 0, 3]  # 0.5 tie: uid 3 before 7


def test_top_fraction_rounds_half_up() -> None:
    r = rows(np.arange(5.0))
    kept = keep_positions(r, 1, SelectConfig(rule="top_fraction", fraction=0.5))
    assert sorted(kept) == [2, 3, 4]  # round-half-up(2.5) = 3, the highest scores


def test_stratified_fraction_per_stratum() -> None:
    r = rows([9, 8, 7, 6, 1, 2], strata=[0, 0, 0, 0, 1, 1])
    kept = keep_positions(r, 2, SelectConfig(rule="top_fraction", fraction=0.5))
    assert sorted(kept) == [0, 1, 5]  # 2 of stratum 0, 1 of stratum 1 (its best), not the global top 3


def test_threshold_keeps_every_score_at_or_above() -> None:
    r = rows([0.1, 0.5, 0.7, 0.5])
    assert sorted(keep_positions(r, 1, SelectConfig(rule="threshold", threshold=0.5))) == [1, 2, 3]


@pytest.mark.parametrize("seed", [0, 1])
def test_random_depends_on_uid_and_seed_only(seed: int) -> None:
    hi = np.arange(100, dtype=np.uint64) * np.uint64(7919)
    r = rows(np.zeros(100), hi=hi)
    cfg = SelectConfig(rule="random", k=10, seed=seed)
    kept = set(hi[keep_positions(r, 1, cfg)].tolist())
    shuffled = np.random.default_rng(3).permutation(100)
    again = set(hi[shuffled][keep_positions(r.take(shuffled), 1, cfg)].tolist())
    assert kept == again and len(kept) == 10  # row order does not matter
    best = np.argsort(seeded_uid_hash(hi, np.zeros(100, np.uint64), seed), kind="stable")[:10]
    assert kept == set(hi[best].tolist())
