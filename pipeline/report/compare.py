"""The run's selections side by side: ``selection/`` (shown as ``(default)``) and every
``selections/NAME/`` — what the report compares when a run has two or more.

A selection is compared when it is complete: its ``summary.json`` and ``kept_uids.npy`` are
there, a named one also has ``done.json`` (the unnamed one is shown by the report whenever its
summary is, as before), and its summary's score fingerprints are those of the run's score
files (else it is *stale*: selected from other scores). The others are listed, not compared.

How it scales (nothing here holds a selection in memory):

- overlap: each ``kept_uids.npy`` is memory-mapped (sorted ``u8,u8``, 16 bytes a kept pair).
  The pairs two selections share are counted by walking the smaller array in chunks of
  :data:`CHUNK` uids and binary-searching the larger one (``np.searchsorted``): O(n_a log n_b)
  time and O(CHUNK) memory per pair of selections; Jaccard = shared / (n_a + n_b − shared)
  over distinct uids.
- scores and coverage: one streaming pass over the score files, reading only ``uid``,
  ``status``, the compared score columns and the field column, in record batches. Each
  batch's uids are looked up in every selection's mapped uids (binary search again). Per set
  (the scored pool and each selection's kept rows) it counts rows per histogram bin of the
  pool's range and per field value, sums values (exact counts and means) and keeps an evenly
  strided sample of at most ``max_points`` rows, from which the quantiles come (exact when the
  set has at most ``max_points`` rows). Memory: one batch, S × columns × ``max_points`` floats
  and S × (distinct field values) counts for S sets.
"""

from __future__ import annotations

import collections
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Hashable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.errors import UsageError
from pipeline.io.layout import SELECTION_DIR, SELECTIONS_DIR, RunLayout, check_selection_name
from pipeline.io.scores import CLUSTER_COLUMN, META_CONFIG, META_TRAJECTORY, SCORE_COLUMNS, read_file_metadata
from pipeline.report.gather import (ScoreScan, float_values, is_kept, iter_batches, load_kept_uids, ok_mask,
                                    read_json, schema_names)
from pipeline.stages.select.files import DONE_FILE, KEPT_UIDS_FILE, SUMMARY_FILE

DEFAULT_LABEL = "(default)"  # the unnamed selection/ (a selection name cannot hold parentheses)
POOL_LABEL = "scored pool"  # the rows with status ok
CHUNK = 1 << 20  # uids read at once from the smaller array of a pair
QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)
MAX_VALUES = 20  # field values shown; the rest are summed as "other"
JSON_PREFIX = "json."


# ----------------------------------------------------------------------------- the selections


@dataclass(frozen=True)
class SelectionRef:
    """One selection directory of the run and whether it can be compared."""

    label: str
    directory: str  # relative to the run directory
    path: Path
    summary: dict[str, Any] | None
    problem: str | None = None  # why it is not compared; None: complete

    @property
    def column(self) -> str | None:
        """The selection's score column (kept.parquet's ``score``)."""
        column = (self.summary or {}).get("column")
        return column if column in SCORE_COLUMNS else None

    @property
    def rule(self) -> str | None:
        return (self.summary or {}).get("rule")

    @property
    def budget(self) -> str:
        """``fraction 0.3``, ``k 100``, ``threshold 0.1``, or a chain's steps."""
        summary = self.summary or {}
        if summary.get("chain"):
            return " then ".join(f"{s.get('column')} {s.get('fraction')}" for s in summary["chain"])
        config = summary.get("config") or {}
        return next((f"{k} {config[k]}" for k in ("fraction", "k", "threshold") if config.get(k) is not None), "")

    @property
    def kept(self) -> int | None:
        """The summary's kept count."""
        value = ((self.summary or {}).get("counts") or {}).get("kept")
        return int(value) if isinstance(value, int) else None


def run_fingerprints(files: list[Path]) -> tuple[str, str] | None:
    """The (configuration, trajectory) fingerprints of the run's score files (of the first)."""
    meta = read_file_metadata(files[0]) if files else None
    if not meta or META_CONFIG not in meta:
        return None
    return meta[META_CONFIG].decode(), meta.get(META_TRAJECTORY, b"").decode()


def _problem(path: Path, summary: Any, needs_done: bool, prints: tuple[str, str] | None) -> str | None:
    if needs_done and not (path / DONE_FILE).is_file():
        return "incomplete: no done.json"
    if not isinstance(summary, dict):
        return "incomplete: no summary.json"
    if not (path / KEPT_UIDS_FILE).is_file():
        return "incomplete: no kept_uids.npy"
    recorded = summary.get("fingerprints") or {}
    if prints and recorded and (recorded.get("config"), recorded.get("trajectory")) != prints:
        return "stale: selected from other scores than the run's"
    return None


def find_selections(layout: RunLayout, prints: tuple[str, str] | None) -> list[SelectionRef]:
    """``selection/`` (when there) then ``selections/*/`` by name, each with its problem."""
    refs = []
    if layout.selection.is_dir():
        summary = read_json(layout.selection / SUMMARY_FILE)
        refs.append(SelectionRef(DEFAULT_LABEL, f"{SELECTION_DIR}/", layout.selection,
                                 summary if isinstance(summary, dict) else None,
                                 _problem(layout.selection, summary, False, prints)))
    for name in layout.selection_names():
        directory = f"{SELECTIONS_DIR}/{name}/"
        try:
            path = layout.selection_dir(check_selection_name(name))
        except UsageError:
            refs.append(SelectionRef(name, directory, layout.root / SELECTIONS_DIR / name, None,
                                     "not a selection name"))
            continue
        summary = read_json(path / SUMMARY_FILE)
        refs.append(SelectionRef(name, directory, path, summary if isinstance(summary, dict) else None,
                                 _problem(path, summary, True, prints)))
    return refs


# ------------------------------------------------------------------------------------ overlap


def _differs(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Element-wise ``x != y`` of two ``u8,u8`` arrays."""
    return (x["f0"] != y["f0"]) | (x["f1"] != y["f1"])


def _distinct_chunks(uids: np.ndarray, chunk: int):
    """The distinct uids of a sorted ``u8,u8`` array, chunk by chunk."""
    previous = None
    for start in range(0, len(uids), chunk):
        part = np.asarray(uids[start:start + chunk])
        first = np.ones(len(part), bool)
        first[1:] = _differs(part[1:], part[:-1])
        if previous is not None:
            first[0] = bool(_differs(part[:1], previous)[0])
        previous = part[-1:]
        yield part[first]


def distinct_count(uids: np.ndarray, chunk: int = CHUNK) -> int:
    """Distinct uids of a sorted ``u8,u8`` array (kept_uids.npy may repeat a uid)."""
    return sum(len(part) for part in _distinct_chunks(uids, chunk))


def shared_count(a: np.ndarray, b: np.ndarray, chunk: int = CHUNK) -> int:
    """Distinct uids in both sorted ``u8,u8`` arrays (the smaller walked, the larger searched)."""
    small, large = (a, b) if len(a) <= len(b) else (b, a)
    if len(small) == 0:
        return 0
    shared = 0
    for part in _distinct_chunks(small, chunk):
        at = np.minimum(np.searchsorted(large, part), len(large) - 1)
        shared += int((~_differs(np.asarray(large[at]), part)).sum())
    return shared


def overlap(uids: list[np.ndarray], chunk: int = CHUNK) -> tuple[np.ndarray, np.ndarray]:
    """(shared distinct uids, Jaccard) of every pair; Jaccard of two empty sets is NaN."""
    n = len(uids)
    shared = np.zeros((n, n), np.int64)
    for i in range(n):
        shared[i, i] = distinct_count(uids[i], chunk)
        for j in range(i):
            shared[i, j] = shared[j, i] = shared_count(uids[i], uids[j], chunk)
    sizes = np.diag(shared)
    union = sizes[:, None] + sizes[None, :] - shared
    with np.errstate(invalid="ignore", divide="ignore"):
        jaccard = np.where(union > 0, shared / np.maximum(union, 1), math.nan)
    return shared, jaccard


# ------------------------------------------------------------------- scores and field coverage


@dataclass
class SetScores:
    """One set's values in one score column: exact count, sum and histogram, sampled quantiles."""

    counts: np.ndarray  # rows per bin of the pool's histogram range
    n: int = 0  # rows with a finite value
    total: float = 0.0
    outside: int = 0  # finite values outside the range
    parts: list[np.ndarray] = field(default_factory=list)  # the strided sample's finite values
    sampled: bool = False  # quantiles from a sample (the set has more than max_points rows)

    @property
    def mean(self) -> float | None:
        return self.total / self.n if self.n else None

    def quantiles(self) -> list[float] | None:
        """The values at :data:`QUANTILES` (linear interpolation), None without values."""
        values = np.concatenate(self.parts) if self.parts else np.empty(0)
        return [float(q) for q in np.quantile(values, QUANTILES)] if len(values) else None


@dataclass
class ColumnComparison:
    """One score column: the pool and each compared selection (labels in order, pool first)."""

    column: str
    edges: np.ndarray
    sets: dict[str, SetScores]


@dataclass
class Coverage:
    """Rows per value of one field (the ``cluster`` column or ``json.FIELD``) for each set."""

    column: str
    counts: dict[str, collections.Counter]  # set label (pool first) -> value -> rows

    def values(self) -> list[Hashable]:
        """Every value, by the pool's count (most first), then by value (null last)."""
        pool = self.counts[POOL_LABEL]
        return sorted(pool, key=lambda v: (-pool[v], v is None, str(v)))


def resolve_field(name: str, columns: set[str]) -> str:
    """The score files' column of ``--field NAME`` (``cluster``, ``json.X`` or ``X`` for
    ``json.X``); UsageError in one line when they have none."""
    wanted = name if name == CLUSTER_COLUMN or name.startswith(JSON_PREFIX) else JSON_PREFIX + name
    if wanted not in columns:
        known = sorted(c for c in columns if c == CLUSTER_COLUMN or c.startswith(JSON_PREFIX))
        raise UsageError(f"--field {name}: the score files have no column {wanted!r} "
                         f"(fields there: {', '.join(known) or 'none'})")
    return wanted


def score_file_columns(files: list[Path]) -> set[str]:
    """Every column name of the score files (schemas only)."""
    return {name for path in files for name in schema_names(path)}


class _Pass:
    """The streaming pass: scores and field values per set."""

    def __init__(self, kept: dict[str, np.ndarray], strides: dict[str, int], edges: dict[str, np.ndarray],
                 field_column: str | None) -> None:
        self.kept, self.strides, self.field_column = kept, strides, field_column
        labels = [POOL_LABEL, *kept]
        self.position = dict.fromkeys(labels, 0)
        self.columns = {c: ColumnComparison(c, e, {label: SetScores(np.zeros(len(e) - 1, np.int64),
                                                                    sampled=strides[label] > 1)
                                                   for label in labels})
                        for c, e in edges.items()}
        self.coverage = Coverage(field_column, {label: collections.Counter() for label in labels}) \
            if field_column else None

    def batch(self, batch: pa.RecordBatch) -> None:
        ok = ok_mask(batch)
        values = {c: float_values(batch, c) for c in self.columns if c in batch.schema.names}
        field_values = (batch.column(self.field_column) if self.field_column in batch.schema.names
                        else pa.nulls(batch.num_rows))
        for label, mask in self._members(batch, ok):
            take = self._take(label, mask)
            for column, array in values.items():
                self._add(self.columns[column].sets[label], self.columns[column].edges, array[mask], array[take])
            if self.coverage is not None:
                counts = pc.value_counts(field_values.filter(pa.array(mask))).to_pylist()
                self.coverage.counts[label].update({c["values"]: c["counts"] for c in counts})

    def _members(self, batch: pa.RecordBatch, ok: np.ndarray):
        yield POOL_LABEL, ok
        uids = batch.column("uid")
        for label, kept in self.kept.items():
            yield label, ok & is_kept(uids, kept)

    def _take(self, label: str, mask: np.ndarray) -> np.ndarray:
        """Rows of the set's strided sample in this batch (every stride-th member overall)."""
        rows = np.flatnonzero(mask)
        stride = self.strides[label]
        take = rows[(-self.position[label]) % stride::stride]
        self.position[label] += len(rows)
        return take

    @staticmethod
    def _add(scores: SetScores, edges: np.ndarray, values: np.ndarray, sample: np.ndarray) -> None:
        finite = values[np.isfinite(values)]
        scores.n += len(finite)
        scores.total += float(finite.sum())
        inside = (finite >= edges[0]) & (finite <= edges[-1])
        scores.outside += int((~inside).sum())
        scores.counts += np.histogram(finite[inside], bins=edges)[0]
        scores.parts.append(sample[np.isfinite(sample)])


# --------------------------------------------------------------------------------- the result


@dataclass
class Comparison:
    """What the report's comparison view shows."""

    selections: list[SelectionRef]  # every selection directory found
    labels: list[str] = field(default_factory=list)  # the compared ones, in order
    distinct: list[int] = field(default_factory=list)  # distinct kept uids per compared selection
    shared: np.ndarray | None = None  # distinct uids in both, per pair
    jaccard: np.ndarray | None = None
    columns: list[ColumnComparison] = field(default_factory=list)
    empty_columns: list[str] = field(default_factory=list)  # compared columns without scores
    coverage: Coverage | None = None
    max_points: int = 0

    @property
    def compared(self) -> list[SelectionRef]:
        return [ref for ref in self.selections if ref.problem is None and ref.label in self.labels]


def compared_columns(refs: list[SelectionRef], common: str) -> list[str]:
    """``common`` first, then each compared selection's own column (once each)."""
    columns = [common]
    for ref in refs:
        if ref.column and ref.column not in columns:
            columns.append(ref.column)
    return columns


def compare_selections(layout: RunLayout, files: list[Path], scan: ScoreScan | None, *, common_column: str,
                       field_name: str | None, max_points: int) -> Comparison | None:
    """The comparison of the run's selections; None when the run has fewer than two.

    ``field_name`` (``--field``) is checked against the score files whenever it is given;
    without it the ``cluster`` column is used when the score files have one with values.
    """
    refs = find_selections(layout, run_fingerprints(files))
    if len(refs) < 2 and not field_name:
        return None
    columns_there = score_file_columns(files)
    if field_name:
        field_column = resolve_field(field_name, columns_there) if files else None
    else:
        field_column = CLUSTER_COLUMN if CLUSTER_COLUMN in columns_there else None
    if len(refs) < 2:
        return None
    kept = {ref.label: uids for ref in refs if ref.problem is None
            for uids in [load_kept_uids(ref.path)] if uids is not None}
    refs = [ref if ref.problem or ref.label in kept else
            SelectionRef(ref.label, ref.directory, ref.path, ref.summary, "unreadable kept_uids.npy")
            for ref in refs]
    result = Comparison(refs, max_points=max_points)
    if len(kept) < 2:
        return result
    result.labels = list(kept)
    result.shared, result.jaccard = overlap(list(kept.values()))
    result.distinct = [int(n) for n in np.diag(result.shared)]
    if scan is not None:
        _score_pass(result, files, scan, kept, compared_columns(result.compared, common_column), field_column,
                    bool(field_name))
    return result


def _score_pass(result: Comparison, files: list[Path], scan: ScoreScan, kept: dict[str, np.ndarray],
                columns: list[str], field_column: str | None, explicit: bool) -> None:
    """Fill ``result.columns`` and ``result.coverage`` in one pass over the score files."""
    edges = {c: scan.columns[c].edges for c in columns if scan.columns[c].edges is not None}
    result.empty_columns = [c for c in columns if c not in edges]
    sizes = {POOL_LABEL: int(scan.status.get("ok", 0)), **{label: len(uids) for label, uids in kept.items()}}
    strides = {label: max(1, math.ceil(n / result.max_points)) for label, n in sizes.items()}
    scores_pass = _Pass(kept, strides, edges, field_column)
    for path in files:
        names = set(schema_names(path))
        wanted = ["uid", "status", *(c for c in edges if c in names),
                  *([field_column] if field_column in names else [])]
        for batch in iter_batches(path, wanted):
            scores_pass.batch(batch)
    result.columns = list(scores_pass.columns.values())
    coverage = scores_pass.coverage
    if coverage is not None and (explicit or any(v is not None for v in coverage.counts[POOL_LABEL])):
        result.coverage = coverage  # the default cluster column only when clustering wrote values
