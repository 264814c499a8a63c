"""The bounded reducer's orders as unsigned integer keys, their 16-bit digits, and the
search for the row at a given position of an order (pure numpy, no I/O).

Three orders are searched:

``rule``
    The keep order (:func:`keep_columns`): a 64-bit *segment*, then the rule's order, best
    first (:mod:`pipeline.stages.keep_rule`): the primary key (:func:`rule_key`), uid (hi,
    lo), file number, index — six columns of 64, 64, 64, 64, 32 and 32 bits, compared left
    to right. The key is unique per row (a file's indices are). A plain rule has one segment
    (0). ``drop_fill`` (:class:`KeepOrder`): the rows that survive the drop are in segment 0
    (``fill: cluster``: their cluster's segment, :func:`cluster_segment`) ordered by the
    fill's primary key; the dropped rows are in segment :data:`DROPPED`, last, ordered by the
    drop column descending. Each segment keeps its first rows, so each has its own cut.
``drop``
    ``drop_fill``'s drop column descending, then uid, file, index (:data:`RULE_WIDTHS`): the
    order whose bottom the ``drop_fraction`` / ``drop_share_from`` drop removes.
``score``
    The score ascending (:func:`score_key`, one 64-bit column), for the summary's quantiles.

A key is read as a string of 16-bit digits. A :class:`Search` for position ``k`` narrows,
one digit at a time, the *bin* of rows whose key starts with a prefix, from the bin's
histogram of the next digit, until the bin is small enough to sort.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from pipeline.stages.keep_rule import Rows, seeded_uid_hash

DIGIT_BITS = 16
DIGITS = 1 << DIGIT_BITS
_SIGN = np.uint64(1 << 63)
_DIGIT_MASK = np.uint64(DIGITS - 1)
RULE_WIDTHS = (64, 64, 64, 32, 32)  # primary, hi, lo, file, index
KEEP_WIDTHS = (64, *RULE_WIDTHS)  # segment, then the rule's order
SCORE_WIDTHS = (64,)
WIDTHS = {"rule": KEEP_WIDTHS, "drop": RULE_WIDTHS, "score": SCORE_WIDTHS}
DROPPED = (1 << 64) - 1  # drop_fill: the segment of the dropped rows, after every fill segment


# ------------------------------------------------------------------------------- the keys


def score_key(score: np.ndarray) -> np.ndarray:
    """Finite float64 → uint64 in the same order (-0.0 just before +0.0)."""
    bits = np.ascontiguousarray(score, np.float64).view(np.uint64)
    return np.where(bits & _SIGN, ~bits, bits | _SIGN)


def score_from_key(key: int) -> float:
    """Inverse of :func:`score_key` for one key."""
    value = np.uint64(key)
    bits = value ^ _SIGN if value & _SIGN else ~value
    return float(np.array([bits], np.uint64).view(np.float64)[0])


def descending_key(values: np.ndarray) -> np.ndarray:
    """Finite float64 → uint64 ascending as the values descend, -0.0 equal to 0.0 (as
    ``order_by`` compares ``-values``)."""
    return ~score_key(values + 0.0)  # + 0.0 turns -0.0 into 0.0


def rule_key(rows: Rows, rule: str, seed: int) -> np.ndarray:
    """The rule's primary key, ascending = best first: the seeded uid hash (``random``), else
    the score descending (:func:`descending_key`)."""
    if rule == "random":
        return seeded_uid_hash(rows.hi, rows.lo, seed)
    return descending_key(rows.score)


def rule_columns(rows: Rows, primary: np.ndarray, file_no: int) -> list[np.ndarray]:
    """The rule order's key columns of one file's rows, as uint64."""
    return [primary, rows.hi, rows.lo, np.full(len(rows), file_no, np.uint64),
            rows.index.astype(np.uint64)]


def lex_le(columns: Sequence[np.ndarray], bound: Sequence[int] | Sequence[np.ndarray]) -> np.ndarray:
    """Rows whose key (``columns``, most significant first) is <= ``bound`` (one key, or a
    key per row: a column each)."""
    n = len(columns[0])
    below, equal = np.zeros(n, bool), np.ones(n, bool)
    for column, value in zip(columns, bound):
        value = np.asarray(value, np.uint64)
        below |= equal & (column < value)
        equal &= column == value
    return below | equal


# ------------------------------------------------------------------- the keep order's segments


def cluster_segment(cluster: np.ndarray) -> np.ndarray:
    """Cluster ids (int64, ``NULL_CLUSTER`` for none) → their segments, in the same order
    (none → 0). Ids come from int32 columns, so none reaches :data:`DROPPED`."""
    return np.asarray(cluster, np.int64).view(np.uint64) ^ _SIGN


def segment_prefix(segment: int) -> tuple[int, ...]:
    """The digits of a segment: the keep order's prefix shared by the segment's rows."""
    return tuple((segment >> (64 - DIGIT_BITS * (i + 1))) & (DIGITS - 1) for i in range(64 // DIGIT_BITS))


@dataclass(frozen=True)
class Survival:
    """``drop_fill``: the rows that survive the drop — drop value >= ``threshold``
    (``drop_below``), or drop key <= ``cut``, the key of the drop order's last survivor
    (``drop_fraction``, ``drop_share_from``); neither: no row survives."""

    threshold: float | None = None
    cut: tuple[int, ...] | None = None

    def survives(self, values: np.ndarray, drop_columns: Sequence[np.ndarray]) -> np.ndarray:
        """Per row (its drop value and its drop order key): does it survive?"""
        if self.threshold is not None:
            return values >= self.threshold
        if self.cut is not None:
            return lex_le(drop_columns, self.cut)
        return np.zeros(len(values), bool)


@dataclass(frozen=True)
class KeepOrder:
    """How a file's rows get their keep order key (:func:`keep_columns`)."""

    rule: str  # the survivors' primary key: "random" (the seeded uid hash), any other: score descending
    seed: int
    survival: Survival | None = None  # drop_fill: the drop (None: a plain rule, one segment)
    clusters: bool = False  # drop_fill's fill cluster: a segment per cluster


def keep_columns(rows: Rows, order: KeepOrder, file_no: int, drop_values: np.ndarray) -> list[np.ndarray]:
    """The keep order's key columns of one file's rows (segment, primary, hi, lo, file,
    index), as uint64; ``drop_values``: the rows' drop column (drop_fill)."""
    primary = rule_key(rows, order.rule, order.seed)
    if order.survival is None:
        return [np.zeros(len(rows), np.uint64), *rule_columns(rows, primary, file_no)]
    drop_primary = descending_key(drop_values)
    dropped = ~order.survival.survives(drop_values, rule_columns(rows, drop_primary, file_no))
    segment = cluster_segment(rows.cluster) if order.clusters else np.zeros(len(rows), np.uint64)
    segment[dropped] = np.uint64(DROPPED)
    return [segment, *rule_columns(rows, np.where(dropped, drop_primary, primary), file_no)]


def rank_columns(keep: Sequence[np.ndarray]) -> list[np.ndarray]:
    """The order of the ranks from the keep order's columns: survivors (lead 0) before the
    dropped rows (lead 1), then primary, hi, lo, file, index — the fill's order across the
    clusters, where the keep order groups the survivors by cluster."""
    return [(keep[0] == np.uint64(DROPPED)).astype(np.uint64), *keep[1:]]


def segment_le(columns: Sequence[np.ndarray], cuts: np.ndarray) -> np.ndarray:
    """Rows whose key is <= the cut of their segment: ``cuts`` holds one key a row (the
    segment first), sorted by segment; rows of a segment without a cut: False."""
    if not len(cuts):
        return np.zeros(len(columns[0]), bool)
    at = np.minimum(np.searchsorted(cuts[:, 0], columns[0]), len(cuts) - 1)
    return (cuts[at, 0] == columns[0]) & lex_le(columns, [cuts[at, c] for c in range(cuts.shape[1])])


def count_le(columns: Sequence[np.ndarray], start: int, bound: Sequence[int]) -> int:
    """How many rows from ``start`` on have key <= ``bound``, the rows being sorted by key:
    binary searches, column by column, within the rows equal so far."""
    low, high = start, len(columns[0])
    for column, value in zip(columns, bound):
        part, value = column[low:high], np.uint64(value)
        left = low + int(np.searchsorted(part, value, side="left"))
        right = low + int(np.searchsorted(part, value, side="right"))
        if left == right:
            return left - start
        low, high = left, right
    return high - start


def lex_order(columns: Sequence[np.ndarray]) -> np.ndarray:
    """Positions that sort the rows by their key (``columns``, most significant first)."""
    return np.lexsort(tuple(columns[::-1]))


# ----------------------------------------------------------------------------- the digits


def _digit_place(widths: Sequence[int], level: int) -> tuple[int, int]:
    """(column, right shift) of digit ``level`` of a key with these column widths."""
    for column, width in enumerate(widths):
        per_column = width // DIGIT_BITS
        if level < per_column:
            return column, width - DIGIT_BITS * (level + 1)
        level -= per_column
    raise ValueError("digit level beyond the key")


def depth(widths: Sequence[int]) -> int:
    """Digits in a key with these column widths."""
    return sum(widths) // DIGIT_BITS


def digits(columns: Sequence[np.ndarray], widths: Sequence[int], level: int) -> np.ndarray:
    """Digit ``level`` (0 = most significant) of each row's key, as intp."""
    column, shift = _digit_place(widths, level)
    return ((columns[column] >> np.uint64(shift)) & _DIGIT_MASK).astype(np.intp)


def prefix_mask(columns: Sequence[np.ndarray], widths: Sequence[int], prefix: Sequence[int]) -> np.ndarray:
    """Rows whose key starts with the digits ``prefix``."""
    mask = np.ones(len(columns[0]), bool)
    level = 0
    for column, width in zip(columns, widths):
        take = min(len(prefix) - level, width // DIGIT_BITS)
        if take <= 0:
            break
        value = 0
        for digit in prefix[level:level + take]:
            value = (value << DIGIT_BITS) | digit
        mask &= (column >> np.uint64(width - DIGIT_BITS * take)) == np.uint64(value)
        level += take
    return mask


def prefix_value(widths: Sequence[int], prefix: Sequence[int]) -> list[int]:
    """The full key of a complete prefix, column by column."""
    values, level = [], 0
    for width in widths:
        value = 0
        for digit in prefix[level:level + width // DIGIT_BITS]:
            value = (value << DIGIT_BITS) | digit
        values.append(value)
        level += width // DIGIT_BITS
    return values


def sparse_histogram(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(digits present, their counts) of an intp digit array."""
    counts = np.bincount(values, minlength=DIGITS)
    present = np.flatnonzero(counts)
    return present.astype(np.uint16), counts[present]


# ----------------------------------------------------------------------------- the search


@dataclass(frozen=True)
class Search:
    """Looking for the row at position ``k`` (0-based) of the ``kind`` order within the bin
    of rows whose key starts with ``prefix``; ``count`` rows are in the bin."""

    kind: str
    k: int
    prefix: tuple[int, ...]
    count: int

    @property
    def bin(self) -> tuple[str, tuple[int, ...]]:
        return self.kind, self.prefix

    @property
    def complete(self) -> bool:
        """The prefix is the whole key: every row of the bin has the same key."""
        return len(self.prefix) == depth(WIDTHS[self.kind])

    def descend(self, histogram: np.ndarray) -> "Search":
        """The sub-bin (one more digit) holding position ``k``, from the bin's dense
        histogram of the next digit."""
        cumulative = np.cumsum(histogram)
        digit = int(np.searchsorted(cumulative, self.k, side="right"))
        below = int(cumulative[digit - 1]) if digit else 0
        return Search(self.kind, self.k - below, self.prefix + (digit,), int(histogram[digit]))


def dense(histograms: Sequence[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
    """Sum sparse histograms (:func:`sparse_histogram`) into one dense histogram."""
    total = np.zeros(DIGITS, np.int64)
    for present, counts in histograms:
        total[present.astype(np.intp)] += counts
    return total


# -------------------------------------------------------------------------- the quantiles


def quantile_positions(n: int, quantiles: Sequence[float]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """numpy's ``linear`` quantile of n sorted values, step by step as numpy computes it: for
    each quantile the positions of its two neighbours (0-based, ascending) and the weight."""
    virtual = (n - 1) * np.asarray(quantiles, np.float64)
    previous = np.floor(virtual)
    following = previous + 1
    above = virtual >= n - 1
    previous[above] = -1
    following[above] = -1
    previous_i, following_i = previous.astype(np.intp), following.astype(np.intp)
    gamma = np.asarray(virtual - previous_i, dtype=virtual.dtype)
    return previous_i % n, following_i % n, gamma


def interpolate(lower: np.ndarray, upper: np.ndarray, gamma: np.ndarray) -> np.ndarray:
    """numpy's ``_lerp`` (the same operations, so the same bits)."""
    difference = upper - lower
    result = np.add(lower, difference * gamma)
    np.subtract(upper, difference * (1 - gamma), out=result, where=gamma >= 0.5, casting="unsafe")
    return result
