"""The keep rule of the reducer, on plain arrays (no Parquet, no I/O).

Rows are the eligible (finite-score) pairs, column-wise. The rule's order is best first:
score descending (``random``: a seeded 64-bit hash of the uid), ties broken by uid, then
file position, then index in the shard. Budgets: ``top_fraction`` keeps
round-half-up(fraction × n) per stratum, ``top_k`` splits k over strata by largest
remainder, ``threshold`` keeps every score ≥ t, ``random`` keeps a fraction or k by the
seeded hash. :mod:`pipeline.stages.select` streams the score files into :class:`Rows` and
writes what :func:`keep_positions` returns.

``chain`` (n eligible rows: every step's column finite): step i keeps round-half-up(f_i × n)
of step i−1's survivors, best first by its own column (ties as above); the kept order is
the last step's. ``drop_fill``: drop the rows whose ``drop_column`` is below ``drop_below``
(or the bottom round-half-up(drop_fraction × n) in that column's order), then fill the
budget (fraction or k of all n) from the rest — ``random``: the seeded hash order,
``score``: best ``column`` first, ``cluster``: per-cluster quotas (:func:`cluster_quotas`),
each cluster in the seeded hash order, kept in that order. When fewer rows survive the
drop than the budget, all survivors are kept (in the fill's order) and the rest comes
from the dropped rows, least harmful (highest ``drop_column``) first. :func:`decide`
returns the kept positions with what the summary reports (the bounded reducer reaches the
same decision with cuts, sharing :func:`ranked_drop`, :func:`cluster_table` and
:func:`drop_fill_details`); :func:`rows_from_arrays` builds
:class:`Rows` from plain arrays (benchmarks: a kept set without files).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from fractions import Fraction
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import numpy as np

from pipeline.errors import UsageError

if TYPE_CHECKING:
    from pipeline.config import SelectConfig

_UINT64_MASK = (1 << 64) - 1
NULL_CLUSTER = np.iinfo(np.int64).min  # a row without a cluster id: a group of its own, ordered first


@dataclass(frozen=True)
class Rows:
    """The eligible rows, column-wise (one entry per row)."""

    hi: np.ndarray      # uint64, upper half of the uid
    lo: np.ndarray      # uint64, lower half
    score: np.ndarray   # float64, finite
    file: np.ndarray    # int32, position of the score file in the input list
    index: np.ndarray   # int32, position of the sample in its shard
    stratum: np.ndarray  # int32, canonical stratum code (0 when not stratified)
    # the rule's other score columns by name (float64, finite; chain steps, drop_fill's drop_column)
    columns: Mapping[str, np.ndarray] = field(default_factory=dict)
    cluster: np.ndarray | None = None  # int64 cluster ids (NULL_CLUSTER: none); drop_fill's fill cluster

    def __len__(self) -> int:
        return len(self.score)

    def take(self, positions: np.ndarray) -> "Rows":
        """The rows at ``positions``, in that order."""
        return Rows(*(getattr(self, f)[positions] for f in ROW_FIELDS),
                    columns={name: values[positions] for name, values in self.columns.items()},
                    cluster=None if self.cluster is None else self.cluster[positions])

    def values(self, column: str, cfg: SelectConfig) -> np.ndarray:
        """The values of a score column the rule reads: ``score`` for ``cfg.score_column``."""
        if column == cfg.score_column:
            return self.score
        if column not in self.columns:
            raise ValueError(f"rows carry no column {column!r} (rule {cfg.rule!r} reads it)")
        return self.columns[column]


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


def rows_from_arrays(hi: np.ndarray, lo: np.ndarray, score: np.ndarray, *,
                     columns: Mapping[str, np.ndarray] | None = None, cluster: np.ndarray | None = None) -> Rows:
    """:class:`Rows` from plain arrays (one file, index = position, no strata): uid halves
    (``pipeline.data.uids.uids_to_u8u8``), the score column's values, the rule's other score
    columns, cluster ids (None or a masked entry: no cluster). Rows with a non-finite value
    must be left out first."""
    n = len(score)
    return Rows(hi=np.asarray(hi, np.uint64), lo=np.asarray(lo, np.uint64), score=np.asarray(score, np.float64),
                file=np.zeros(n, np.int32), index=np.arange(n, dtype=np.int32), stratum=np.zeros(n, np.int32),
                columns={k: np.asarray(v, np.float64) for k, v in (columns or {}).items()},
                cluster=None if cluster is None else cluster_ids(cluster))


def cluster_ids(cluster: Sequence[int | None] | np.ndarray) -> np.ndarray:
    """Cluster ids as :class:`Rows` holds them: int64, a null (None, a masked entry) as NULL_CLUSTER."""
    if isinstance(cluster, np.ma.MaskedArray):
        return cluster.astype(np.int64).filled(NULL_CLUSTER)
    values = np.asarray(cluster)
    if values.dtype.kind in "iu":
        return values.astype(np.int64)
    return np.array([NULL_CLUSTER if c is None else int(c) for c in cluster], np.int64)


def rule_order(rows: Rows, cfg: SelectConfig) -> np.ndarray:
    """Positions of the eligible rows, best first (see the module docstring)."""
    if cfg.rule == "random":
        return random_order(rows, cfg.seed)
    return order_by(rows, rows.score)


def order_by(rows: Rows, values: np.ndarray) -> np.ndarray:
    """Positions of the rows, best first by ``values`` (descending), ties as the rules break them."""
    return _order(rows, -values)


def random_order(rows: Rows, seed: int) -> np.ndarray:
    """Positions of the rows in the seeded hash order of the uid (the random rule's)."""
    return _order(rows, seeded_uid_hash(rows.hi, rows.lo, seed))


def _order(rows: Rows, primary: np.ndarray) -> np.ndarray:
    """Positions by ``primary`` ascending, then uid, file, index.

    Same as ``np.lexsort((index, file, lo, hi, primary))``, but a plain sort on the primary
    key with only the rows that tie on it sorted by the rest (lexsort is ~8× slower).
    """
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


def largest_remainder(k: int, counts: Sequence[int | Fraction]) -> list[int]:
    """Split ``k`` (<= sum(counts)) in proportion to ``counts`` (integers, or exact positive
    weights): floors, then the leftover one each to the largest remainders (ties: lower
    position first)."""
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


@dataclass(frozen=True)
class Decision:
    """What a rule decided: the kept positions in its order (position i has rank i + 1) and
    the rule's own summary entries (``chain``: per step; ``drop_fill``: the drop and fill)."""

    positions: np.ndarray
    details: dict[str, Any] = field(default_factory=dict)


def keep_positions(rows: Rows, n_strata: int, cfg: SelectConfig) -> np.ndarray:
    """Positions of the kept rows in the rule's order (position i has rank i + 1)."""
    return decide(rows, n_strata, cfg).positions


def decide(rows: Rows, n_strata: int, cfg: SelectConfig) -> Decision:
    """The rule applied to the eligible rows (``n_strata`` strata codes in ``rows.stratum``)."""
    if cfg.rule == "chain":
        return _chain(rows, cfg)
    if cfg.rule == "drop_fill":
        return _drop_fill(rows, cfg)
    order = rule_order(rows, cfg)
    if cfg.rule == "threshold":
        return Decision(order[rows.score[order] >= cfg.threshold])
    quotas = _quotas(np.bincount(rows.stratum, minlength=n_strata), cfg)
    if n_strata <= 1:
        return Decision(order[:int(quotas.sum())])
    strata = rows.stratum[order]
    return Decision(order[_position_in_group(strata, n_strata) < quotas[strata]])


def _score_or_none(values: np.ndarray, positions: np.ndarray) -> float | None:
    return float(values[positions[-1]]) if len(positions) else None


def _chain(rows: Rows, cfg: SelectConfig) -> Decision:
    """Each step keeps round-half-up(fraction × n) of the previous step's survivors."""
    n = len(rows)
    alive = np.ones(n, bool)
    kept = np.arange(0)
    steps = []
    for step in cfg.steps or []:
        values = rows.values(step.column, cfg)
        order = order_by(rows, values)
        kept = order[alive[order]][:round_half_up(step.fraction, n)]
        alive = np.zeros(n, bool)
        alive[kept] = True
        steps.append({"column": step.column, "fraction": step.fraction, "kept": len(kept),
                      "threshold_applied": _score_or_none(values, kept)})
    return Decision(kept, {"chain": steps})


def _drop_fill(rows: Rows, cfg: SelectConfig) -> Decision:
    """Drop, then fill the budget from the rest (the short rest from the dropped rows)."""
    n = len(rows)
    budget = int(_quotas(np.array([n], np.int64), cfg).sum())
    drop_values = rows.values(cfg.drop_by, cfg)
    drop_order = order_by(rows, drop_values)
    survives = np.zeros(n, bool)
    share = int((rows.values(cfg.drop_share_from, cfg) < 0).sum()) if cfg.drop_share_from is not None else None
    dropped = ranked_drop(cfg, n, share)
    if dropped is not None:  # the lowest by the drop column
        survivors = drop_order[:n - dropped]
        survives[survivors] = True
        threshold = _score_or_none(drop_values, survivors)  # every survivor is at or above it
    else:
        threshold = cfg.drop_below_applied
        survives[drop_values >= threshold] = True
    n_survivors = int(survives.sum())
    if cfg.fill == "score":
        fill_order = order_by(rows, rows.score)
    else:
        fill_order = random_order(rows, cfg.seed)
    fill_order = fill_order[survives[fill_order]]
    clusters: list[dict[str, Any]] | None = None
    if cfg.fill == "cluster":
        chosen, clusters = _cluster_fill(rows, survives, fill_order, min(budget, n_survivors), cfg.cluster_power)
    else:
        chosen = fill_order[:budget]
    refill = drop_order[~survives[drop_order]][:max(budget - n_survivors, 0)]
    positions = np.concatenate([chosen, refill])
    kept_per = None if clusters is None else _cluster_counts(rows, positions, [c["cluster"] for c in clusters])
    return Decision(positions, drop_fill_details(cfg, threshold, n, n_survivors, budget, share, clusters, kept_per))


def ranked_drop(cfg: SelectConfig, n: int, below_zero: int | None) -> int | None:
    """drop_fill: how many of the ``n`` rows the drop takes from the bottom of the drop
    column's order — round-half-up(drop_fraction × n), or ``below_zero`` (the rows
    ``drop_share_from`` scores below 0); None under ``drop_below`` (a threshold decides)."""
    if cfg.drop_share_from is not None:
        return int(below_zero or 0)
    if cfg.drop_fraction is not None:
        return round_half_up(cfg.drop_fraction, n)
    return None


def drop_fill_details(cfg: SelectConfig, threshold: float | None, n: int, n_survivors: int, budget: int,
                      below_zero: int | None, clusters: list[dict[str, Any]] | None,
                      kept_per_cluster: Sequence[int] | None) -> dict[str, Any]:
    """The summary's ``drop_fill`` entry (both reducers build it here): the drop, the budget,
    the rows refilled from the dropped ones and, for ``fill: cluster``, :func:`cluster_table`
    with each cluster's kept count."""
    details: dict[str, Any] = {
        "drop_column": cfg.drop_by, "drop_threshold": threshold, "eligible": n, "dropped": n - n_survivors,
        "budget": budget, "fill": cfg.fill, "filled_from_dropped": max(budget - n_survivors, 0),
        **({"drop_share_from": cfg.drop_share_from, "below_zero": below_zero}
           if cfg.drop_share_from is not None else {})}
    if clusters is not None and kept_per_cluster is not None:
        details["clusters"] = [{**c, "kept": int(k)} for c, k in zip(clusters, kept_per_cluster)]
    return {"drop_fill": details}


def _cluster_groups(rows: Rows) -> tuple[np.ndarray, np.ndarray]:
    """Distinct cluster ids (null first, then ascending) and each row's group number."""
    if rows.cluster is None:
        raise ValueError("fill 'cluster' needs the rows' cluster ids")
    ids, group = np.unique(rows.cluster, return_inverse=True)
    return ids, group.reshape(-1)


def _cluster_counts(rows: Rows, positions: np.ndarray, ids: list[int | None]) -> list[int]:
    keys = np.array([NULL_CLUSTER if i is None else i for i in ids], np.int64)
    counts = np.bincount(np.searchsorted(keys, rows.cluster[positions]), minlength=len(keys))
    return [int(c) for c in counts]


def _cluster_fill(rows: Rows, survives: np.ndarray, fill_order: np.ndarray, budget: int,
                  power: float) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """``budget`` rows of ``fill_order`` (the survivors in the seeded order) by cluster
    quotas, in that order; and the per-cluster counts for the summary."""
    ids, group = _cluster_groups(rows)
    eligible = np.bincount(group, minlength=len(ids))
    available = np.bincount(group[survives], minlength=len(ids))
    table = cluster_table(ids, eligible, available, budget, power)
    quotas = np.array([c["quota"] for c in table], np.int64)
    groups = group[fill_order]
    chosen = fill_order[_position_in_group(groups, len(ids)) < quotas[groups]]
    return chosen, table


def cluster_table(ids: Sequence[int] | np.ndarray, eligible: Sequence[int] | np.ndarray,
                  available: Sequence[int] | np.ndarray, budget: int, power: float) -> list[dict[str, Any]]:
    """Per cluster (``ids`` ascending, NULL_CLUSTER first; every cluster of the eligible rows):
    its id (None: no cluster), eligible and not-dropped counts, and its quota of ``budget``
    (:func:`cluster_quotas`). Refuses, in one line, rows that all lack a cluster id."""
    ids = [int(i) for i in ids]
    if ids == [NULL_CLUSTER]:
        raise UsageError("select.fill: 'cluster' needs cluster ids, but the score files' cluster column is "
                         "null in every eligible row; score with clustering on (score.embeddings.clusters > 0)")
    eligible, available = [int(e) for e in eligible], [int(a) for a in available]
    quotas = cluster_quotas(budget, eligible, available, power)
    return [{"cluster": None if i == NULL_CLUSTER else i, "eligible": e, "not_dropped": a, "quota": q}
            for i, e, a, q in zip(ids, eligible, available, quotas)]


def cluster_quotas(budget: int, eligible: Sequence[int], available: Sequence[int], power: float) -> list[int]:
    """Split ``budget`` (<= sum(available)) over clusters: shares ∝ eligible^power by largest
    remainder, water-filled — a cluster with fewer ``available`` rows than its quota keeps
    them all and the rest is split again over the others, until every row is placed."""
    if budget > sum(available):
        raise ValueError(f"budget {budget} exceeds the {sum(available)} available rows")
    weights = [Fraction(float(n) ** power) for n in eligible]
    quotas = [0] * len(eligible)
    open_ = [i for i, n in enumerate(eligible) if n > 0]
    remaining = budget
    while remaining and open_:
        shares = largest_remainder(remaining, [weights[i] for i in open_])
        full = [i for i, q in zip(open_, shares) if q > available[i]]
        if not full:
            for i, q in zip(open_, shares):
                quotas[i] = q
            break
        for i in full:
            quotas[i] = available[i]
            remaining -= available[i]
        open_ = [i for i in open_ if i not in full]
    return quotas
