"""What the report shows, gathered from a run directory cheaply.

The score files are streamed in record batches, reading only the columns needed, twice:
pass 1 counts statuses, finds each score column's extent and keeps a deterministic,
evenly strided sample of at most ``max_points`` rows (for the scatter and the histogram
ranges); pass 2 bins every scored row into the histograms and keeps the few lowest rows
of the selection column (candidates for the "pruned" examples). Memory is bounded by the
sample and the batch size, not by the size of the run.
"""

from __future__ import annotations

import collections
import io
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.data.uids import uids_to_u8u8
from pipeline.errors import UsageError
from pipeline.io.layout import CONFIG_FILE, SCORES_DIR, STATS_DIR, SUMMARY_FILE
from pipeline.io.scores import SCORE_COLUMNS
from pipeline.io.storage import StoragePath, arrow_source, is_remote

log = logging.getLogger(__name__)

HIST_BINS = 60
_BATCH_ROWS = 1 << 16
_RANGE_QUANTILES = (0.005, 0.995)  # histogram / scatter range unless the full extent is compact
_COMPACT_FACTOR = 1.5  # show the full extent when it is at most this times the quantile range
_MIN_SAMPLE_FOR_RANGE = 200


def read_json(path: Path) -> Any | None:
    """A JSON file's content, or None when it is absent or unreadable (logged)."""
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        log.warning("report: cannot read %s: %s", path, exc)
        return None


def check_run_dir(run_dir: StoragePath) -> None:
    """Raise :class:`UsageError` unless ``run_dir`` (local or remote) looks like a run directory."""
    try:
        found = run_dir.is_dir()
    except Exception as exc:  # noqa: BLE001  (a remote store: credentials, network, permissions)
        raise UsageError(f"cannot read run directory {run_dir}: {type(exc).__name__}: {exc}"
                         .splitlines()[0]) from None
    if not found:
        raise UsageError(f"run directory {run_dir} not found; "
                         f"`diffin run --config FILE --run-dir {run_dir}` writes one")
    markers = (SUMMARY_FILE, CONFIG_FILE, SCORES_DIR)
    if not any((run_dir / m).exists() for m in markers):
        raise UsageError(f"{run_dir} is not a run directory (no run_summary.json, config.json or scores/)")


@dataclass
class ColumnStats:
    """One score column over the rows whose status is ok."""

    name: str
    n: int = 0            # ok rows with a finite value
    n_null: int = 0       # ok rows without a value
    n_nonfinite: int = 0  # ok rows with NaN / inf
    lo: float = math.inf  # exact extent of the finite values
    hi: float = -math.inf
    edges: np.ndarray | None = None   # histogram bin edges (the range shown)
    counts: np.ndarray | None = None  # rows per bin
    below: int = 0        # finite values left / right of the range shown
    above: int = 0

    @property
    def shown_range(self) -> tuple[float, float] | None:
        """The (low, high) range of the histogram, None when the column has no values."""
        return None if self.edges is None else (float(self.edges[0]), float(self.edges[-1]))


@dataclass
class Sample:
    """Evenly strided rows of all score files (every ``stride``-th row): score values
    (NaN when null or not ok) and whether the row was kept (None without a selection)."""

    stride: int
    values: dict[str, np.ndarray]
    kept: np.ndarray | None

    def __len__(self) -> int:
        return len(next(iter(self.values.values()))) if self.values else 0


@dataclass(frozen=True)
class Candidate:
    """A row of a score file: where it is and its score (for the example grids)."""

    file: int
    row: int
    score: float


@dataclass
class ScoreScan:
    """Everything the report takes from the score files."""

    files: list[Path]
    rows: int = 0
    status: collections.Counter = field(default_factory=collections.Counter)
    columns: dict[str, ColumnStats] = field(default_factory=dict)
    sample: Sample | None = None
    lowest: list[Candidate] = field(default_factory=list)  # lowest scores of the selection column


def score_files(run_dir: Path) -> list[Path]:
    """The run's committed score files, by name (temporary dot-files are skipped)."""
    return sorted((run_dir / SCORES_DIR).glob("[!.]*.parquet"))


def iter_batches(path: Path, columns: list[str]) -> Iterator[pa.RecordBatch]:
    """The file's ``columns`` in record batches of at most 65,536 rows."""
    where, filesystem = arrow_source(path)
    with pq.ParquetFile(where, filesystem=filesystem) as parquet:
        yield from parquet.iter_batches(batch_size=_BATCH_ROWS, columns=columns)


_REQUIRED = ("uid", "key", "shard", "index", "status")


def schema_names(path: Path) -> list[str]:
    """The column names of a score file; UsageError if it is not readable Parquet."""
    try:
        where, filesystem = arrow_source(path)
        return pq.read_schema(where, filesystem=filesystem).names
    except (OSError, pa.ArrowInvalid) as exc:
        raise UsageError(f"score file {path} is not readable Parquet: {exc}") from None


def present_columns(path: Path, wanted: tuple[str, ...]) -> list[str]:
    """The score columns of ``wanted`` that the file has; UsageError if it is no score file."""
    names = set(schema_names(path))
    missing = [c for c in _REQUIRED if c not in names]
    if missing:
        raise UsageError(f"score file {path} lacks column(s) {missing}; is it a score file?")
    return [c for c in wanted if c in names]


def ok_mask(batch: pa.RecordBatch) -> np.ndarray:
    """Rows whose status is ok."""
    status = pc.fill_null(batch.column("status"), "")
    return pc.equal(status, "ok").to_numpy(zero_copy_only=False)


def float_values(batch: pa.RecordBatch, name: str) -> np.ndarray:
    """A score column as float64 with NaN for nulls."""
    return batch.column(name).cast(pa.float64()).fill_null(math.nan).to_numpy(zero_copy_only=False)


class _Pass1:
    """Counts, extents and the strided sample."""

    def __init__(self, scan: ScoreScan, stride: int, kept_uids: np.ndarray | None) -> None:
        self.scan, self.stride, self.kept_uids = scan, stride, kept_uids
        self.position = 0
        self.parts: dict[str, list[np.ndarray]] = collections.defaultdict(list)
        self.kept_parts: list[np.ndarray] = []

    def batch(self, batch: pa.RecordBatch, columns: list[str]) -> None:
        n = batch.num_rows
        self.scan.status.update(dict(zip(*_value_counts(batch.column("status")))))
        ok = ok_mask(batch)
        first = (-self.position) % self.stride
        take = np.arange(first, n, self.stride)
        self.position += n
        for name in SCORE_COLUMNS:
            stats = self.scan.columns[name]
            if name not in columns:
                stats.n_null += int(ok.sum())
                self.parts[name].append(np.full(len(take), math.nan))
                continue
            values = float_values(batch, name)
            null = batch.column(name).is_null().to_numpy(zero_copy_only=False)
            finite = ok & np.isfinite(values)
            stats.n += int(finite.sum())
            stats.n_null += int((ok & null).sum())
            stats.n_nonfinite += int((ok & ~null & ~finite).sum())
            if finite.any():
                stats.lo = min(stats.lo, float(values[finite].min()))
                stats.hi = max(stats.hi, float(values[finite].max()))
            self.parts[name].append(np.where(finite, values, math.nan)[take])
        if self.kept_uids is not None:
            self.kept_parts.append(is_kept(batch.column("uid").take(pa.array(take)), self.kept_uids))

    def sample(self) -> Sample:
        values = {name: np.concatenate(self.parts[name]) if self.parts[name] else np.empty(0)
                  for name in SCORE_COLUMNS}
        kept = None
        if self.kept_uids is not None:
            kept = np.concatenate(self.kept_parts) if self.kept_parts else np.zeros(0, bool)
        return Sample(self.stride, values, kept)


def _value_counts(column: pa.Array) -> tuple[list[str], list[int]]:
    counts = pc.value_counts(pc.fill_null(column, "missing_status")).to_pylist()
    return [c["values"] for c in counts], [c["counts"] for c in counts]


def is_kept(uids: pa.Array | pa.ChunkedArray, kept_uids: np.ndarray) -> np.ndarray:
    """Membership of ``uids`` in the sorted ``u8,u8`` array (False for unreadable uids)."""
    if len(kept_uids) == 0 or len(uids) == 0:
        return np.zeros(len(uids), bool)
    try:
        hi, lo = uids_to_u8u8(uids)
    except ValueError:
        return np.zeros(len(uids), bool)
    wanted = np.empty(len(hi), dtype=kept_uids.dtype)
    wanted["f0"], wanted["f1"] = hi, lo
    at = np.minimum(np.searchsorted(kept_uids, wanted), len(kept_uids) - 1)
    return np.asarray(kept_uids[at] == wanted)


def _shown_edges(stats: ColumnStats, sample: np.ndarray) -> np.ndarray | None:
    """Histogram edges: the full extent when compact, else the sample's central quantiles."""
    if stats.n == 0:
        return None
    lo, hi = stats.lo, stats.hi
    finite = sample[np.isfinite(sample)]
    if len(finite) >= _MIN_SAMPLE_FOR_RANGE:
        q_lo, q_hi = (float(v) for v in np.quantile(finite, _RANGE_QUANTILES))
        if q_hi > q_lo and (hi - lo) > _COMPACT_FACTOR * (q_hi - q_lo):
            margin = 0.05 * (q_hi - q_lo)
            lo, hi = max(lo, q_lo - margin), min(hi, q_hi + margin)
    if hi <= lo:
        pad = abs(lo) * 0.01 or 1.0
        lo, hi = lo - pad, hi + pad
    return np.linspace(lo, hi, HIST_BINS + 1)


class _Pass2:
    """Exact histograms over the shown ranges and the lowest rows of one column."""

    def __init__(self, scan: ScoreScan, lowest_column: str | None, n_lowest: int) -> None:
        self.scan, self.lowest_column, self.n_lowest = scan, lowest_column, n_lowest
        self.lowest: list[Candidate] = []

    def batch(self, batch: pa.RecordBatch, columns: list[str], file_no: int, offset: int) -> None:
        ok = ok_mask(batch)
        for name in columns:
            stats = self.scan.columns[name]
            if stats.edges is None:
                continue
            values = float_values(batch, name)
            finite = values[ok & np.isfinite(values)]
            stats.below += int((finite < stats.edges[0]).sum())
            stats.above += int((finite > stats.edges[-1]).sum())
            stats.counts += np.histogram(finite, bins=stats.edges)[0]
            if name == self.lowest_column and self.n_lowest:
                self._keep_lowest(values, ok, file_no, offset)

    def _keep_lowest(self, values: np.ndarray, ok: np.ndarray, file_no: int, offset: int) -> None:
        rows = np.flatnonzero(ok & np.isfinite(values))
        if len(rows) > self.n_lowest:
            part = np.argpartition(values[rows], self.n_lowest - 1)[:self.n_lowest]
            rows = rows[part]
        merged = self.lowest + [Candidate(file_no, offset + int(r), float(values[r])) for r in rows]
        merged.sort(key=lambda c: (c.score, c.file, c.row))
        self.lowest = merged[:self.n_lowest]


def scan_scores(files: list[Path], *, max_points: int, kept_uids: np.ndarray | None,
                lowest_column: str | None, n_lowest: int) -> ScoreScan:
    """Stream the score files twice (see the module docstring)."""
    scan = ScoreScan(files, columns={name: ColumnStats(name) for name in SCORE_COLUMNS})
    present = [present_columns(p, SCORE_COLUMNS) for p in files]
    scan.rows = sum(pq.read_metadata(arrow_source(p)[0], filesystem=arrow_source(p)[1]).num_rows for p in files)
    stride = max(1, math.ceil(scan.rows / max(1, max_points)))
    first = _Pass1(scan, stride, kept_uids)
    for path, columns in zip(files, present):
        uid = ["uid"] if kept_uids is not None else []
        for batch in iter_batches(path, ["status", *columns, *uid]):
            first.batch(batch, columns)
    scan.sample = first.sample()
    for name, stats in scan.columns.items():
        stats.edges = _shown_edges(stats, scan.sample.values[name])
        stats.counts = None if stats.edges is None else np.zeros(HIST_BINS, np.int64)
    second = _Pass2(scan, lowest_column, n_lowest)
    for file_no, (path, columns) in enumerate(zip(files, present)):
        offset = 0
        for batch in iter_batches(path, ["status", *columns]):
            second.batch(batch, columns, file_no, offset)
            offset += batch.num_rows
    scan.lowest = second.lowest
    return scan


def read_rows(path: Path, rows: list[int], columns: list[str]) -> pa.Table:
    """The rows at ``rows`` (positions in the file) of one Parquet file, in that order."""
    where, filesystem = arrow_source(path)
    table = pq.read_table(where, columns=columns, filesystem=filesystem)
    return table.take(pa.array(rows, pa.int64()))


def load_kept_uids(selection: Path) -> np.ndarray | None:
    """``kept_uids.npy`` memory-mapped (sorted ``u8,u8``), None when absent or unreadable."""
    path = selection / "kept_uids.npy"
    if not path.is_file():
        return None
    try:
        uids = (np.load(io.BytesIO(path.read_bytes()), allow_pickle=False) if is_remote(path)
                else np.load(path, mmap_mode="r", allow_pickle=False))
    except (OSError, ValueError) as exc:
        log.warning("report: cannot read %s: %s", path, exc)
        return None
    return uids if uids.dtype.names == ("f0", "f1") else None


def load_shards(run_dir: StoragePath, name: str | None = None) -> dict[str, int] | None:
    """The ``sizes.json`` of the shards made from selection ``name`` (None: ``shards/``), None when
    there are none; UsageError in one line when they are stale (made from another selection than
    the current one, or recording none): the report never shows them as the selection's
    (:func:`pipeline.stages.derived.current_shards`)."""
    from pipeline.io.layout import RunLayout
    from pipeline.stages.derived import current_shards

    layout = RunLayout(run_dir)
    if not layout.shards_dir(name).exists():
        return None
    return current_shards(layout, name)


def load_shard_stats(run_dir: Path) -> list[dict[str, Any]] | None:
    """The per-shard stats files (``stats/<stem>.json``) by name; None without the directory."""
    directory = run_dir / STATS_DIR
    if not directory.is_dir():
        return None
    stats = []
    for path in sorted(directory.glob("[!.]*.json")):
        data = read_json(path)
        if isinstance(data, dict):
            stats.append({"shard": path.stem, **data})
    return stats
