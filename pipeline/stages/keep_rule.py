"""The keep rule of the reducer, on plain arrays (no Parquet, no I/O).

Rows are the eligible (finite-score) pairs, column-wise. The rule's order is best first:
score descending (``random``: a seeded 64-bit hash of the uid), ties broken by uid, then
file position, then index in the shard. Budgets: ``top_fraction`` keeps
round-half-up(fraction × n) per stratum, ``top_k`` splits k over strata by largest
remainder, ``threshold`` keeps every score ≥ t, ``random`` keeps a fraction or k by the
seeded hash. :mod:`pipeline.stages.select` streams the score files into :class:`Rows` and
writes what :func:`keep_positions` returns.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction
from typing import TYPE_CHECKING, Sequence

import numpy as np

if TYPE_CHECKING:
    from pipeline.config import SelectConfig

_UINT64_MASK = (1 << 64) - 1


@dataclass(frozen=True)
class Rows:
    """The eligible rows, column-wise (one entry per row)."""

    hi: np.ndarray      # uint64, upper half of the uid
    lo: np.ndarray      # uint64, lower half
    score: np.ndarray   # float64, finite
    file: np.ndarray    # int32, position of the score file in the input list
    index: np.ndarray   # int32, position of the sample in its shard
    stratum: np.ndarray  # int32, canonical stratum code (0 when not stratified)

    def __len__(self) -> int:
        return len(self.score)

    def take(self, positions: np.ndarray) -> "Rows":
        """The rows at ``positions``, in that order."""
        return Rows(*(getattr(self, f)[positions] for f in ROW_FIELDS))


ROW_DTYPES = {"hi": np.uint64, "lo": np.uint64, "score": np.float64, "file": np.int32,
               "index": np.int32, "stratum": np.int32}
ROW_FIELDS = tuple(ROW_DTYPES)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    x = x ^ (x >> np.uint64(30))
    x = x * np.uint64(0xBF58476D1CE4E5B9)
    x = x ^ (x >> np.uint64(27))
    x = x * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def seeded_uid_hash(hi: np.ndarray, lo: np.ndarray, seed: int) -> np.ndarray:
    """The random rule's key: a 64-bit hash of (seed, uid), independent of row position."""
    seed_word = _splitmix64(np.array([(seed + 0x9E3779B97F4A7C15) & _UINT64_MASK], np.uint64))
    return _splitmix64(_splitmix64(hi ^ seed_word) ^ lo)


def rule_order(rows: Rows, cfg: SelectConfig) -> np.ndarray:
    """Positions of the eligible rows, best first (see the module docstring).

    Same as ``np.lexsort((index, file, lo, hi, primary))``, but a plain sort on the primary
    key with only the rows that tie on it sorted by the rest (lexsort is ~8× slower).
    """
    primary = seeded_uid_hash(rows.hi, rows.lo, cfg.seed) if cfg.rule == "random" else -rows.score
    order = np.argsort(primary, kind="stable")
    ranked = primary[order]
    same_as_previous = np.concatenate([[False], ranked[1:] == ranked[:-1]])
    del ranked
    tied = same_as_previous.copy()
    tied[:-1] |= same_as_previous[1:]
    positions = np.flatnonzero(tied)
    if len(positions):
        group = np.cumsum(~same_as_previous)[positions]
        tied_rows = order[positions]
        by_rest = np.lexsort((rows.index[tied_rows], rows.file[tied_rows], rows.lo[tied_rows],
                              rows.hi[tied_rows], group))
        order[positions] = tied_rows[by_rest]
    return order


def round_half_up(fraction: float, n: int) -> int:
    """round-half-up(fraction × n), the fraction taken as its shortest decimal form."""
    return math.floor(Fraction(repr(fraction)) * n + Fraction(1, 2))


def largest_remainder(k: int, counts: Sequence[int]) -> list[int]:
    """Split ``k`` (<= sum(counts)) in proportion to ``counts``: floors, then the leftover one
    each to the largest remainders (ties: lower position first)."""
    total = sum(counts)
    if total == 0:
        return [0] * len(counts)
    shares = [divmod(k * n, total) for n in counts]
    quotas = [q for q, _ in shares]
    by_remainder = sorted(range(len(counts)), key=lambda i: (-shares[i][1], i))
    for i in by_remainder[:k - sum(quotas)]:
        quotas[i] += 1
    return quotas


def _quotas(eligible: np.ndarray, cfg: SelectConfig) -> np.ndarray:
    counts = [int(n) for n in eligible]
    if cfg.budget_is_count:
        quotas = largest_remainder(min(cfg.k, sum(counts)), counts)
    else:
        quotas = [round_half_up(cfg.fraction, n) for n in counts]
    return np.asarray(quotas, dtype=np.int64)


def kept_count(n_eligible: int, n_at_or_above: int, cfg: SelectConfig) -> int:
    """Rows kept without strata: the budget of ``top_fraction`` / ``top_k`` / ``random`` over
    ``n_eligible`` rows, or ``n_at_or_above`` (eligible rows with score >= threshold)."""
    if cfg.rule == "threshold":
        return n_at_or_above
    return int(_quotas(np.array([n_eligible], np.int64), cfg).sum())


def _position_in_group(groups: np.ndarray, n_groups: int) -> np.ndarray:
    """For a sequence of group codes, each element's 0-based position within its group."""
    perm = np.argsort(groups, kind="stable")
    starts = np.concatenate([[0], np.cumsum(np.bincount(groups, minlength=n_groups))[:-1]])
    position = np.empty(len(groups), np.int64)
    position[perm] = np.arange(len(groups)) - starts[groups[perm]]
    return position


def keep_positions(rows: Rows, n_strata: int, cfg: SelectConfig) -> np.ndarray:
    """Positions of the kept rows in the rule's order (position i has rank i + 1)."""
    order = rule_order(rows, cfg)
    if cfg.rule == "threshold":
        return order[rows.score[order] >= cfg.threshold]
    quotas = _quotas(np.bincount(rows.stratum, minlength=n_strata), cfg)
    if n_strata <= 1:
        return order[:int(quotas.sum())]
    strata = rows.stratum[order]
    return order[_position_in_group(strata, n_strata) < quotas[strata]]
