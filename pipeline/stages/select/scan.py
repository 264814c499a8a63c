"""Reading and checking score files: the select stage's pass 1 and the checks both reducers
apply (same run, needed columns, one shard per file, unique indices, shards scored once,
``failed: error``), and the keys of kept rows (pass 2). Pure reading: writes nothing.

A row is *eligible* when its ``status`` is ``ok`` and its value in every score column the
rule reads is finite; every other row is *failed* and counted (:class:`Scan`).
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.config import SelectConfig
from pipeline.data.uids import uids_to_u8u8
from pipeline.errors import UsageError
from pipeline.io.scores import CLUSTER_COLUMN, META_CONFIG, META_TRAJECTORY
from pipeline.io.storage import arrow_source
from pipeline.stages.keep_rule import NULL_CLUSTER, ROW_DTYPES, Rows

_SCAN_BATCH_ROWS = 1 << 16


@dataclass
class RowBuffer:
    """Preallocated columns for the eligible rows (capacity: all rows of all files), so
    collecting them never holds two copies."""

    arrays: dict[str, np.ndarray]
    size: int = 0
    columns: tuple[str, ...] = ()  # the rule's other score columns (``column:<name>`` arrays)

    @classmethod
    def allocate(cls, capacity: int, columns: Sequence[str] = (), cluster: bool = False) -> "RowBuffer":
        """Room for ``capacity`` rows: the :class:`Rows` fields, ``columns`` and the cluster ids."""
        dtypes = {**ROW_DTYPES, **{f"column:{c}": np.float64 for c in columns},
                  **({CLUSTER_COLUMN: np.int64} if cluster else {})}
        return cls({name: np.empty(capacity, dtype) for name, dtype in dtypes.items()}, 0, tuple(columns))

    def append(self, part: dict[str, np.ndarray]) -> None:
        n = len(part["hi"])
        if self.size + n > len(self.arrays["hi"]):
            raise UsageError("a score file grew while it was being read")
        for name, values in self.arrays.items():
            values[self.size:self.size + n] = part[name]
        self.size += n

    def rows(self) -> Rows:
        held = {name: values[:self.size] for name, values in self.arrays.items()}
        return Rows(**{name: held[name] for name in ROW_DTYPES},
                    columns={c: held[f"column:{c}"] for c in self.columns}, cluster=held.get(CLUSTER_COLUMN))


@dataclass
class _StratumCodes:
    """Dense int32 codes for stratum values (str or None), in order of first appearance."""

    codes: dict[str | None, int] = field(default_factory=dict)

    def _code(self, value: str | None) -> int:
        return self.codes.setdefault(value, len(self.codes))

    def encode(self, column: pa.Array) -> np.ndarray:
        """Codes for one batch's stratum column."""
        encoded = pc.dictionary_encode(column.cast(pa.string()))
        values = encoded.dictionary.to_pylist()
        mapping = [self._code(v) for v in values]
        if encoded.null_count:
            mapping.append(self._code(None))
        indices = encoded.indices.fill_null(len(values)).to_numpy(zero_copy_only=False)
        return np.asarray(mapping, dtype=np.int32)[indices] if len(indices) else np.empty(0, np.int32)

    def canonical(self) -> tuple[list[str | None], np.ndarray]:
        """Values sorted (null first, then ascending) and old code → sorted position."""
        values = sorted(self.codes, key=lambda v: (v is not None, v or ""))
        remap = np.empty(max(len(values), 1), dtype=np.int32)
        for position, value in enumerate(values):
            remap[self.codes[value]] = position
        return values, remap


@dataclass
class FileStats:
    """What pass 1 learned about one score file."""

    path: str
    shard: str | None = None
    n_in: int = 0
    n_eligible: int = 0


@dataclass
class Scan:
    """Pass 1 over the score files: counts everything, keeps the eligible rows."""

    column: str  # the score column (Rows.score)
    stratum_column: str | None
    buffer: RowBuffer
    more_columns: tuple[str, ...] = ()  # the rule's other score columns: a row needs all finite
    cluster: bool = False  # read the cluster ids
    strata: _StratumCodes = field(default_factory=_StratumCodes)
    files: list[FileStats] = field(default_factory=list)
    failed_by_status: collections.Counter = field(default_factory=collections.Counter)
    ok_without_score: collections.Counter = field(default_factory=collections.Counter)
    stratum_in: collections.Counter = field(default_factory=collections.Counter)
    first_failed: str | None = None

    @property
    def read_columns(self) -> list[str]:
        return read_columns(self.column, self.stratum_column, self.more_columns, self.cluster)

    @property
    def n_failed(self) -> int:
        return sum(self.failed_by_status.values()) + sum(self.ok_without_score.values())

    def scan_file(self, path: str) -> None:
        """Read one score file's needed columns batch by batch."""
        stats = FileStats(path)
        file_no = len(self.files)
        self.files.append(stats)
        shards: set[str] = set()
        indices: list[np.ndarray] = []
        where, filesystem = arrow_source(path)
        with pq.ParquetFile(where, filesystem=filesystem) as parquet:
            for batch in parquet.iter_batches(batch_size=_SCAN_BATCH_ROWS, columns=self.read_columns):
                shards.update(pc.unique(batch.column("shard")).to_pylist())
                index = batch.column("index").to_numpy(zero_copy_only=False).astype(np.int32)
                indices.append(index)
                stats.n_in += batch.num_rows
                stats.n_eligible += self._scan_batch(path, file_no, batch, index)
        stats.shard = _single_shard(path, shards)
        _check_unique_index(path, indices)

    def _scan_batch(self, path: str, file_no: int, batch: pa.RecordBatch, index: np.ndarray) -> int:
        status = pc.fill_null(batch.column("status"), "missing_status")
        ok = pc.fill_null(pc.equal(status, "ok"), False).to_numpy(zero_copy_only=False)
        scores = {c: batch.column(c).cast(pa.float64()) for c in (self.column, *self.more_columns)}
        values = {c: v.to_numpy(zero_copy_only=False) for c, v in scores.items()}
        eligible = ok & np.logical_and.reduce([np.isfinite(v) for v in values.values()])
        null = np.logical_or.reduce([v.is_null().to_numpy(zero_copy_only=False) for v in scores.values()])
        self._count_failed(batch, status, ok, null, eligible)
        strata = (self.strata.encode(batch.column(self.stratum_column)) if self.stratum_column
                  else np.zeros(batch.num_rows, np.int32))
        self.stratum_in.update(dict(zip(*np.unique(strata, return_counts=True))))
        try:
            hi, lo = uids_to_u8u8(batch.column("uid").filter(pa.array(eligible)))
        except ValueError as exc:
            raise UsageError(f"score file {path}: {exc}") from None
        part = {"hi": hi, "lo": lo, "score": values[self.column][eligible], "index": index[eligible],
                "file": np.full(int(eligible.sum()), file_no, np.int32), "stratum": strata[eligible],
                **{f"column:{c}": values[c][eligible] for c in self.more_columns}}
        if self.cluster:
            ids = pc.fill_null(batch.column(CLUSTER_COLUMN).cast(pa.int64()), NULL_CLUSTER)
            part[CLUSTER_COLUMN] = ids.to_numpy(zero_copy_only=False)[eligible]
        self.buffer.append(part)
        return len(hi)

    def _count_failed(self, batch: pa.RecordBatch, status: pa.Array, ok: np.ndarray,
                      null: np.ndarray, eligible: np.ndarray) -> None:
        bad = ~eligible
        if not bad.any():
            return
        for item in pc.value_counts(status.filter(pa.array(~ok))).to_pylist():
            self.failed_by_status[item["values"]] += item["counts"]
        self.ok_without_score["null"] += int((ok & null).sum())
        self.ok_without_score["non_finite"] += int((ok & ~null & bad).sum())
        if self.first_failed is None:
            row = int(np.flatnonzero(bad)[0])
            values = ", ".join(f"{c} {batch.column(c)[row].as_py()}" for c in (self.column, *self.more_columns))
            self.first_failed = (f"shard {batch.column('shard')[row].as_py()} index "
                                 f"{batch.column('index')[row].as_py()} (status "
                                 f"{status[row].as_py()!r}, {values})")

    def rows(self) -> tuple[Rows, list[str | None], np.ndarray]:
        """The eligible rows (strata recoded canonically, in place), stratum values and
        counts in. Call once."""
        values, remap = self.strata.canonical() if self.stratum_column else ([None], np.zeros(1, np.int32))
        rows, self.buffer = self.buffer.rows(), RowBuffer.allocate(0)  # the caller owns them now
        if self.stratum_column:
            np.take(remap, rows.stratum, out=rows.stratum)
        n_in = np.zeros(len(values), np.int64)
        for code, count in self.stratum_in.items():
            n_in[remap[code]] += count
        return rows, values, n_in


def read_columns(column: str, stratum_column: str | None, more_columns: Sequence[str] = (),
                  cluster: bool = False) -> list[str]:
    """The score-file columns pass 1 reads."""
    return ["uid", "shard", "index", "status", column, *more_columns,
            *([stratum_column] if stratum_column else []), *([CLUSTER_COLUMN] if cluster else [])]


def _single_shard(path: str, shards: set[str]) -> str | None:
    if len(shards) > 1:
        raise UsageError(f"score file {path} holds rows of {len(shards)} shards; "
                         "expected one file per input shard")
    return next(iter(shards), None)


def _check_unique_index(path: str, indices: list[np.ndarray]) -> None:
    index = np.concatenate(indices) if indices else np.empty(0, np.int32)
    if len(index) and index.min() < 0:
        raise UsageError(f"score file {path} has a negative index")
    if len(np.unique(index)) != len(index):
        raise UsageError(f"score file {path} repeats an index (a sample is scored twice)")


def check_score_files(paths: Sequence[str], columns: Sequence[str]) -> tuple[tuple[str, str], int]:
    """Check every file is a score file of the same run with the needed columns; return
    the run's (configuration, trajectory) fingerprints and the total row count."""
    if not paths:
        raise UsageError("no score files to select from")
    if len(set(paths)) != len(paths):
        raise UsageError("a score file is listed twice")
    first, total = _file_metadata(paths[0], columns)
    for path in paths[1:]:
        prints, rows = _file_metadata(path, columns)
        if prints != first:
            raise UsageError(
                f"score files come from different runs: {paths[0]} has fingerprints "
                f"{first[0][:12]}/{first[1][:12]}, {path} has {prints[0][:12]}/{prints[1][:12]}")
        total += rows
    return first, total


def _file_metadata(path: str, columns: Sequence[str]) -> tuple[tuple[str, str], int]:
    """(configuration, trajectory) fingerprints and row count of a score file that has ``columns``."""
    try:
        where, filesystem = arrow_source(path)
        metadata = pq.read_metadata(where, filesystem=filesystem)
    except (OSError, pa.ArrowInvalid) as exc:
        raise UsageError(f"cannot read score file {path}: {exc}") from None
    meta = metadata.metadata or {}
    if META_CONFIG not in meta:
        raise UsageError(f"{path} is not a score file (no configuration fingerprint in its metadata)")
    missing = [c for c in columns if c not in metadata.schema.to_arrow_schema().names]
    if missing:
        raise UsageError(f"score file {path} has no column {missing[0]!r}")
    return (meta[META_CONFIG].decode(), meta.get(META_TRAJECTORY, b"").decode()), metadata.num_rows


def check_failed(scan: Scan, cfg: SelectConfig) -> None:
    if cfg.failed == "error" and scan.n_failed:
        counts = {**scan.failed_by_status, **{f"ok but {k} score": v
                                               for k, v in scan.ok_without_score.items() if v}}
        detail = ", ".join(f"{k}: {v}" for k, v in sorted(counts.items()))
        raise UsageError(f"{scan.n_failed} rows are not scored ok ({detail}); first: "
                         f"{scan.first_failed}. Set select.failed: drop to drop them")


def check_distinct_shards(files: Sequence[FileStats]) -> None:
    seen: dict[str, str] = {}
    for stats in files:
        if stats.shard is not None and stats.shard in seen:
            raise UsageError(f"shard {stats.shard} is scored by two files: {seen[stats.shard]} "
                             f"and {stats.path}")
        if stats.shard is not None:
            seen[stats.shard] = stats.path


def required_columns(cfg: SelectConfig) -> list[str]:
    """The columns every score file must have for ``cfg``: what pass 1 reads, and ``key``."""
    return [*read_columns(cfg.score_column, cfg.stratum_column, cfg.score_columns[1:], cfg.reads_clusters), "key"]


def _new_scan(cfg: SelectConfig, capacity: int) -> Scan:
    more = cfg.score_columns[1:]
    return Scan(cfg.score_column, cfg.stratum_column, RowBuffer.allocate(capacity, more, cfg.reads_clusters),
                more, cfg.reads_clusters)


def scan_files(paths: list[str], cfg: SelectConfig) -> tuple[tuple[str, str], Scan]:
    """Check the score files and run pass 1; refuse failed rows under ``failed: error``."""
    prints, n_rows = check_score_files(paths, required_columns(cfg))
    scan = _new_scan(cfg, n_rows)
    for path in paths:
        scan.scan_file(path)
    check_failed(scan, cfg)
    check_distinct_shards(scan.files)
    return prints, scan


def scan_one_file(path: str, cfg: SelectConfig) -> tuple[Scan, Rows]:
    """Pass 1 over one score file on its own (a task of the bounded reducer, no strata): its
    counts and checks, and its eligible rows (``file`` 0, ``stratum`` 0) with the rule's
    other score columns and the cluster ids it reads."""
    where, filesystem = arrow_source(path)
    scan = _new_scan(cfg, pq.read_metadata(where, filesystem=filesystem).num_rows)
    scan.scan_file(path)
    return scan, scan.buffer.rows()


def kept_keys(path: str, index: np.ndarray) -> pa.Array:
    """The keys of the rows of one score file at the given indices (in that order)."""
    if not len(index):
        return pa.array([], pa.string())
    where, filesystem = arrow_source(path)
    table = pq.read_table(where, columns=["key", "index"], filesystem=filesystem)
    file_index = table.column("index").to_numpy()
    by_index = np.argsort(file_index, kind="stable")
    located = by_index[np.searchsorted(file_index[by_index], index)]
    return table.column("key").take(pa.array(located)).combine_chunks().cast(pa.string())
