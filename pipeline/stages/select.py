"""The select stage: a pure, deterministic reducer from score files to a kept subset.

Which rows can be kept
    A row is *eligible* when its ``status`` is ``ok`` and its value in every score column the
    rule reads is finite (``column``; ``chain``: every step's column; ``drop_fill``: also
    ``drop_column``). Every other row is *failed* and is never kept: ``failed: drop`` drops
    and counts them (non-ok rows by status; ok rows by ``null`` / ``non_finite`` score),
    ``failed: error`` refuses to select while any exist.

The rule's order (best first), which also gives ``rank``
    - ``top_fraction``, ``top_k``, ``threshold``: score descending, then **uid ascending**
      (among equal scores the numerically smaller uid wins), then input position (score-file
      order, then ``index``) — the last key only matters for duplicate uids.
    - ``random``: a seeded 64-bit hash of the uid ascending (splitmix64 of the seed and the
      uid's two 64-bit halves), then uid ascending. It depends on the uid and the seed only,
      never on where a row sits in the files.

How many rows are kept (per stratum with ``stratify_by``, else over all eligible rows)
    - ``top_fraction`` (and ``random`` with a fraction): round half up of
      fraction × eligible, with the fraction taken exactly as its shortest decimal form
      (``0.15`` means 15/100, so 0.15 × 10 keeps 2). A stratum may keep 0 rows.
    - ``top_k`` (and ``random`` with ``k``): min(k, eligible) rows. Stratified, k is split in
      proportion to each stratum's eligible count: each stratum gets the floor of its exact
      share, and the rows left over go one each to the strata with the largest remainders,
      ties to the stratum that sorts first (null first, then by value).
    - ``threshold``: every eligible row with score >= threshold (stratifying only adds
      per-stratum counts to the summary).
    With ``stratify_by: FIELD`` the score files carry a string column ``json.FIELD`` (null
    is a stratum of its own); the rule is applied within each stratum and ``rank`` stays the
    global position in the rule's order.

Rules of several columns (docs/METHOD.md, "Selection rules"; :mod:`.keep_rule`)
    - ``chain``: step i keeps round half up of f_i × eligible of step i−1's survivors, best
      first by its own column; ``score`` and ``rank`` are the last step's. The summary's
      ``chain`` lists each step's column, fraction, kept count and threshold_applied.
    - ``drop_fill``: drop the rows whose ``drop_column`` is below ``drop_below`` (0.0 by
      default on an influence estimate) or the bottom ``drop_fraction`` of them, then fill
      the budget (a fraction or k of all eligible rows) from the rest by ``fill``: the
      seeded order (``random``), best ``column`` first (``score``), or per-cluster quotas
      from the score files' ``cluster`` column, each cluster in the seeded order
      (``cluster``). Too few rest rows: all are kept, then the dropped rows, highest
      ``drop_column`` first. ``rank`` is the order of keeping. The summary's ``drop_fill``:
      drop_column, drop_threshold (every row not dropped is at or above it), eligible,
      dropped, budget, fill, filled_from_dropped and, for ``fill: cluster``, per cluster
      (null first) its eligible, not_dropped, quota and kept counts.

Outputs in ``out_dir`` (each written atomically; byte-identical for identical inputs)
    ``kept.parquet`` (uid, key, shard, index, score, rank [, json.FIELD]; sorted by uid),
    ``kept_uids.npy`` (DataComp subset: sorted ``np.dtype("u8,u8")``), ``manifest.parquet``
    (per input shard in the order the score files are given: shard, n_in, n_scored_ok,
    n_kept, keys in shard order; a score file with no rows names no shard and is left out),
    ``summary.json`` (written last): rule, column, config, counts (in, scored_ok, failed,
    kept, missing — in = scored_ok + failed; missing = pairs sizes.json promised that no
    score file holds), shards by status with the problem shards listed, failed rows by status and ok rows without a score, ``threshold_applied`` (the
    score of the last kept row in the rule's order; null if none), score quantiles of the
    scored-ok rows (linear interpolation), per-stratum counts, fingerprints, and the number
    of kept rows that repeat a uid.

Two strategies, byte-identical outputs (``select(..., strategy=)``)
    ``bounded`` (default without ``stratify_by``): :mod:`pipeline.stages.reducer` — per-file
    tasks on the executor, a search for the cut over histograms, k-way merges of per-file
    parts; its memory does not grow with the row count (``select.max_rows_in_memory`` bounds
    what it sorts at once). ``memory`` (always with ``stratify_by`` and the rules ``chain``
    and ``drop_fill``, which the bounded reducer refuses): this module's passes below, every
    eligible row in this process (8 more bytes a row per extra score column and for the
    cluster ids).

Memory of the ``memory`` strategy: the driver holds 36 bytes per input row (two uint64 uid
halves, score, file number, index, stratum; preallocated from the files' row counts), sort
temporaries of about 24 bytes per row while deciding, then only the kept rows and their
keys; keys of rows that are not kept are never held. Score files are read twice, only the
needed columns, in record batches. Measured on 2 CPU cores: 1M rows in 100 files, top 30 %:
~1.2 s, ~160 MB above the import baseline; 10M rows in 1000 files: 14.6 s, 690 MB above
the baseline (``diffin bench scale --parts reducer``, docs/SCALE.md).
"""

from __future__ import annotations

import collections
import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Literal, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pipeline.config import SelectConfig
from pipeline.data.uids import u8u8_to_uids, uids_to_u8u8
from pipeline.errors import UsageError
from pipeline.io.atomic import atomic_path, write_json_atomic
from pipeline.io.scores import CLUSTER_COLUMN, META_CONFIG, META_TRAJECTORY, read_shard_meta
from pipeline.io.storage import StoragePath, arrow_source, as_path
from pipeline.runtime.executor import Executor, LocalExecutor, Resources
from pipeline.stages.context import RunContext
from pipeline.stages.keep_rule import NULL_CLUSTER, ROW_DTYPES, Rows, decide

log = logging.getLogger(__name__)

KEPT_FILE = "kept.parquet"
KEPT_UIDS_FILE = "kept_uids.npy"
MANIFEST_FILE = "manifest.parquet"
SUMMARY_FILE = "summary.json"
UID_DTYPE = np.dtype("u8,u8")
QUANTILES = (0.0, 0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99, 1.0)
META_SELECT = b"diffin.select"

_SCAN_BATCH_ROWS = 1 << 16
_WRITE_BATCH_ROWS = 1 << 20


# ---------------------------------------------------------------------------- pass 1: scan




@dataclass
class _RowBuffer:
    """Preallocated columns for the eligible rows (capacity: all rows of all files), so
    collecting them never holds two copies."""

    arrays: dict[str, np.ndarray]
    size: int = 0
    columns: tuple[str, ...] = ()  # the rule's other score columns (``column:<name>`` arrays)

    @classmethod
    def allocate(cls, capacity: int, columns: Sequence[str] = (), cluster: bool = False) -> "_RowBuffer":
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
class _FileStats:
    """What pass 1 learned about one score file."""

    path: str
    shard: str | None = None
    n_in: int = 0
    n_eligible: int = 0


@dataclass
class _Scan:
    """Pass 1 over the score files: counts everything, keeps the eligible rows."""

    column: str  # the score column (Rows.score)
    stratum_column: str | None
    buffer: _RowBuffer
    more_columns: tuple[str, ...] = ()  # the rule's other score columns: a row needs all finite
    cluster: bool = False  # read the cluster ids
    strata: _StratumCodes = field(default_factory=_StratumCodes)
    files: list[_FileStats] = field(default_factory=list)
    failed_by_status: collections.Counter = field(default_factory=collections.Counter)
    ok_without_score: collections.Counter = field(default_factory=collections.Counter)
    stratum_in: collections.Counter = field(default_factory=collections.Counter)
    first_failed: str | None = None

    @property
    def read_columns(self) -> list[str]:
        return _read_columns(self.column, self.stratum_column, self.more_columns, self.cluster)

    @property
    def n_failed(self) -> int:
        return sum(self.failed_by_status.values()) + sum(self.ok_without_score.values())

    def scan_file(self, path: str) -> None:
        """Read one score file's needed columns batch by batch."""
        stats = _FileStats(path)
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
        rows, self.buffer = self.buffer.rows(), _RowBuffer.allocate(0)  # the caller owns them now
        if self.stratum_column:
            np.take(remap, rows.stratum, out=rows.stratum)
        n_in = np.zeros(len(values), np.int64)
        for code, count in self.stratum_in.items():
            n_in[remap[code]] += count
        return rows, values, n_in


def _read_columns(column: str, stratum_column: str | None, more_columns: Sequence[str] = (),
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


def _check_score_files(paths: Sequence[str], columns: Sequence[str]) -> tuple[tuple[str, str], int]:
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


def _check_failed(scan: _Scan, cfg: SelectConfig) -> None:
    if cfg.failed == "error" and scan.n_failed:
        counts = {**scan.failed_by_status, **{f"ok but {k} score": v
                                               for k, v in scan.ok_without_score.items() if v}}
        detail = ", ".join(f"{k}: {v}" for k, v in sorted(counts.items()))
        raise UsageError(f"{scan.n_failed} rows are not scored ok ({detail}); first: "
                         f"{scan.first_failed}. Set select.failed: drop to drop them")


def _check_distinct_shards(files: Sequence[_FileStats]) -> None:
    seen: dict[str, str] = {}
    for stats in files:
        if stats.shard is not None and stats.shard in seen:
            raise UsageError(f"shard {stats.shard} is scored by two files: {seen[stats.shard]} "
                             f"and {stats.path}")
        if stats.shard is not None:
            seen[stats.shard] = stats.path


# ------------------------------------------------------------------------ pass 2: outputs


def _kept_keys(path: str, index: np.ndarray) -> pa.Array:
    """The keys of the rows of one score file at the given indices (in that order)."""
    if not len(index):
        return pa.array([], pa.string())
    where, filesystem = arrow_source(path)
    table = pq.read_table(where, columns=["key", "index"], filesystem=filesystem)
    file_index = table.column("index").to_numpy()
    by_index = np.argsort(file_index, kind="stable")
    located = by_index[np.searchsorted(file_index[by_index], index)]
    return table.column("key").take(pa.array(located)).combine_chunks().cast(pa.string())


def _write_parquet(path: Path, schema: pa.Schema, tables: Iterable[pa.Table],
                   dictionary_columns: list[str]) -> None:
    """Write tables (batches of one file) atomically with byte-stable settings."""
    with atomic_path(path) as tmp:
        with pq.ParquetWriter(tmp, schema, compression="zstd", use_dictionary=dictionary_columns,
                              write_statistics=True) as writer:
            for table in tables:
                writer.write_table(table, row_group_size=_WRITE_BATCH_ROWS)


MANIFEST_SCHEMA = pa.schema([
    pa.field("shard", pa.string(), nullable=False),
    pa.field("n_in", pa.int64(), nullable=False),
    pa.field("n_scored_ok", pa.int64(), nullable=False),
    pa.field("n_kept", pa.int64(), nullable=False),
    pa.field("keys", pa.list_(pa.string()), nullable=False),
])


def _manifest_tables(files: Sequence[_FileStats], n_kept: Sequence[int],
                     keys: Callable[[int], pa.Array]) -> Iterable[pa.Table]:
    """Manifest rows (files without rows have no shard and are left out), ~1M keys a table.

    ``keys(i)``: file i's kept keys in shard order, asked for one table at a time."""
    rows = [(stats, int(n_kept[i]), i) for i, stats in enumerate(files) if stats.shard is not None]
    start = 0
    while start < len(rows):
        stop, total = start, 0
        while stop < len(rows) and (stop == start or total + rows[stop][1] <= _WRITE_BATCH_ROWS):
            total += rows[stop][1]
            stop += 1
        batch = rows[start:stop]
        offsets = np.concatenate([[0], np.cumsum([n for _, n, _ in batch])]).astype(np.int32)
        values = pa.concat_arrays([keys(i) for _, _, i in batch]) if batch else pa.array([], pa.string())
        yield pa.table({
            "shard": pa.array([s.shard for s, _, _ in batch], pa.string()),
            "n_in": pa.array([s.n_in for s, _, _ in batch], pa.int64()),
            "n_scored_ok": pa.array([s.n_eligible for s, _, _ in batch], pa.int64()),
            "n_kept": pa.array([n for _, n, _ in batch], pa.int64()),
            "keys": pa.ListArray.from_arrays(pa.array(offsets), values),
        }, schema=MANIFEST_SCHEMA)
        start = stop


def kept_schema(stratum_column: str | None) -> pa.Schema:
    fields = [pa.field("uid", pa.string(), nullable=False), pa.field("key", pa.string(), nullable=False),
              pa.field("shard", pa.string(), nullable=False), pa.field("index", pa.int32(), nullable=False),
              pa.field("score", pa.float64(), nullable=False), pa.field("rank", pa.int64(), nullable=False)]
    if stratum_column:
        fields.append(pa.field(stratum_column, pa.string()))
    return pa.schema(fields)


@dataclass(frozen=True)
class _Kept:
    """The kept rows in input order (score file, index) with their keys and ranks, and the
    permutation that puts them in uid order."""

    rows: Rows
    keys: pa.ChunkedArray
    rank: np.ndarray
    by_uid: np.ndarray

    def uids(self) -> np.ndarray:
        """The kept uids, sorted, in DataComp's ``u8,u8`` format."""
        uids = np.empty(len(self.by_uid), dtype=UID_DTYPE)
        uids["f0"], uids["f1"] = self.rows.hi[self.by_uid], self.rows.lo[self.by_uid]
        return uids

    def tables(self, shards: pa.Array, strata: pa.Array, schema: pa.Schema) -> Iterable[pa.Table]:
        """``kept.parquet``'s rows in uid order, about 1M rows a table."""
        for start in range(0, len(self.by_uid), _WRITE_BATCH_ROWS):
            part = self.by_uid[start:start + _WRITE_BATCH_ROWS]
            rows = self.rows.take(part)
            columns = {
                "uid": u8u8_to_uids(rows.hi, rows.lo),
                "key": self.keys.take(pa.array(part)).combine_chunks(),
                "shard": shards.take(pa.array(rows.file)),
                "index": pa.array(rows.index, pa.int32()),
                "score": pa.array(rows.score, pa.float64()),
                "rank": pa.array(self.rank[part], pa.int64()),
            }
            if len(schema) > 6:
                columns[schema.names[6]] = strata.take(pa.array(rows.stratum))
            yield pa.table(columns, schema=schema)


def _in_input_order(rows: Rows, kept: np.ndarray) -> tuple[Rows, np.ndarray]:
    """The kept rows in input order (score file, index), and their ranks."""
    position = (rows.file[kept].astype(np.int64) << 32) | rows.index[kept].astype(np.int64)
    by_input = np.argsort(position, kind="stable")
    return rows.take(kept[by_input]), (by_input + 1).astype(np.int64)


def _collect_kept(paths: Sequence[str], in_order: Rows,
                  rank: np.ndarray) -> tuple[_Kept, np.ndarray, list[pa.Array]]:
    """Pass 2: fetch the kept rows' keys file by file.

    Also returns the kept count per file and each file's kept keys in shard order.
    """
    bounds = np.searchsorted(in_order.file, np.arange(len(paths) + 1), side="left")
    per_file = [_kept_keys(p, in_order.index[bounds[i]:bounds[i + 1]]) for i, p in enumerate(paths)]
    by_uid = np.lexsort((in_order.lo, in_order.hi))  # stable: duplicate uids stay in input order
    kept_rows = _Kept(in_order, pa.chunked_array(per_file, pa.string()), rank, by_uid)
    return kept_rows, np.diff(bounds), per_file


def _write_npy(path: Path, array: np.ndarray) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        np.save(handle, array, allow_pickle=False)


# -------------------------------------------------------------------------------- summary


def _last_kept_score(rows: Rows, kept: np.ndarray) -> float | None:
    return float(rows.score[kept[-1]]) if len(kept) else None


def quantile_dict(values: Sequence[float] | np.ndarray | None) -> dict[str, float] | None:
    """The summary's ``score_quantiles``: the values at :data:`QUANTILES`, keyed by ``f"{q:g}"``."""
    if values is None:
        return None
    return dict(zip((f"{q:g}" for q in QUANTILES), (float(v) for v in values)))


def _summary(cfg: SelectConfig, scan: _Scan, n_in: int, n_ok: int, n_kept: int,
             threshold_applied: float | None, quantiles: dict[str, float] | None,
             prints: tuple[str, str]) -> dict[str, Any]:
    """The summary's counts and settings (strata, duplicates and shards are added after)."""
    return {
        "rule": cfg.rule, "column": cfg.score_column, "config": cfg.effective(),
        "counts": {"in": n_in, "scored_ok": n_ok, "failed": scan.n_failed, "kept": n_kept},
        "failed_by_status": dict(sorted(scan.failed_by_status.items())),
        "ok_without_score": {"null": scan.ok_without_score["null"],
                             "non_finite": scan.ok_without_score["non_finite"]},
        "threshold_applied": threshold_applied,
        "score_quantiles": quantiles,
        "score_files": len(scan.files),
        "fingerprints": {"config": prints[0], "trajectory": prints[1]},
    }


def _strata_summary(rows: Rows, kept: np.ndarray, values: list[str | None],
                    n_in: np.ndarray) -> list[dict[str, Any]]:
    eligible = np.bincount(rows.stratum, minlength=len(values))
    kept_strata = rows.stratum[kept]
    n_kept = np.bincount(kept_strata, minlength=len(values))
    last = np.full(len(values), -1, np.int64)  # position in rule order of each stratum's last kept row
    np.maximum.at(last, kept_strata, np.arange(len(kept)))
    return [{"value": value, "in": int(n_in[code]), "scored_ok": int(eligible[code]),
             "kept": int(n_kept[code]),
             "threshold_applied": float(rows.score[kept[last[code]]]) if last[code] >= 0 else None}
            for code, value in enumerate(values)]


def _count_duplicates(uids: np.ndarray) -> int:
    """Adjacent equal entries of a sorted uid array."""
    return int((uids[1:] == uids[:-1]).sum()) if len(uids) > 1 else 0


def finish_summary(summary: dict[str, Any], paths: Sequence[str], duplicate_kept_uids: int,
                   out: Any) -> dict[str, Any]:
    """Add duplicates and the shard reconciliation, write ``summary.json`` (last), log."""
    summary["duplicate_kept_uids"] = duplicate_kept_uids
    summary["shards"] = shard_summary(paths)
    summary["counts"]["missing"] = summary["shards"]["missing"]
    write_json_atomic(out / SUMMARY_FILE, summary)
    counts = summary["counts"]
    log.info("select: kept %d of %d pairs (%d scored ok, %d failed) by %s on %s", counts["kept"],
             counts["in"], counts["scored_ok"], counts["failed"], summary["rule"], summary["column"])
    return summary


def shard_summary(paths: Sequence[str], limit: int = 1000) -> dict[str, Any]:
    """Shard-level reconciliation from the score files' shard records: shards by status,
    pairs sizes.json expected but never read (``missing``), and the problem shards (at most
    ``limit`` listed, in input order)."""
    by_status: dict[str, int] = collections.Counter()
    problems, missing = [], 0
    for path in paths:
        meta = read_shard_meta(path)
        status = meta.get("status", "ok") if meta else "unknown"
        by_status[status] += 1
        if meta:
            missing += int(meta.get("missing") or 0)
        if status != "ok" and len(problems) < limit:
            problems.append({k: (meta or {}).get(k) for k in ("shard", "status", "error", "expected", "read")})
    return {"total": len(paths), "by_status": dict(sorted(by_status.items())), "missing": missing,
            "problems": problems, "problems_listed": len(problems)}


# ----------------------------------------------------------------------------- public API


def select(score_files: Sequence[str | os.PathLike], cfg: SelectConfig, out_dir: str | os.PathLike,
           executor: Executor | None = None, resources: Resources | None = None,
           strategy: Literal["auto", "bounded", "memory"] = "auto") -> dict[str, Any]:
    """Select the pairs to keep from per-shard score files; write ``out_dir``'s outputs.

    ``score_files`` are the run's score files in input-shard order (that order is the
    manifest's): local paths or remote path objects from :func:`pipeline.io.storage.as_path`.
    ``strategy``: ``bounded`` (:mod:`pipeline.stages.reducer`: memory independent of the row
    count, per-file work as ``executor`` tasks with ``resources``; no ``stratify_by``),
    ``memory`` (every eligible row in this process), ``auto`` (bounded unless stratified or
    the rule is ``chain`` or ``drop_fill``).
    Both write byte-identical outputs. Returns the summary (also written as
    ``summary.json``). Raises :class:`UsageError` for files of different runs, missing
    columns, bad uids, or failed rows under ``failed: error``.
    """
    paths = [as_path(p) for p in score_files]
    if strategy not in ("auto", "bounded", "memory"):
        raise ValueError(f"unknown select strategy {strategy!r}")
    if strategy == "bounded" and cfg.stratify_by:
        raise UsageError("select: the bounded reducer does not stratify; use strategy 'memory'")
    if strategy == "bounded" and cfg.rule in cfg.MEMORY_ONLY_RULES:
        raise UsageError(f"select: the bounded reducer does not run rule '{cfg.rule}'; use strategy "
                         "'memory' or 'auto'")
    if strategy == "memory" or cfg.stratify_by or cfg.rule in cfg.MEMORY_ONLY_RULES:
        return _select_in_memory(paths, cfg, out_dir)
    from pipeline.stages.reducer import select_bounded

    return select_bounded(paths, cfg, as_path(out_dir), executor or LocalExecutor(),
                          resources or Resources(num_cpus=1.0), _WRITE_BATCH_ROWS)


DONE_FILE = "done.json"  # the selection's completion marker: its inputs' fingerprint


def selection_fingerprint(cfg: SelectConfig, score_files: Sequence[StoragePath]) -> str:
    """Inputs of the reducer: the select settings and each score file's identity."""
    from pipeline.io.scores import read_fingerprint

    files = [(p.name, read_fingerprint(p), p.stat().st_size) for p in score_files]
    settings = cfg.settings()
    payload = json.dumps({"select": settings, "files": files}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def run_select(ctx: RunContext, executor: Executor | None = None) -> dict[str, Any]:
    """The reducer over the run's score files (in input-shard order) → ``<run>/selection/``;
    its per-file tasks run on ``executor`` (default: in this process).

    Skipped when ``selection/done.json`` records the same inputs (completion marker).
    """
    cfg = ctx.config.select
    if cfg is None:
        raise UsageError("select: this run's config has no select section")
    files = [ctx.layout.score_file(u) for u in ctx.urls]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise UsageError(f"select: {len(missing)} shard(s) not scored yet, e.g. {missing[0]}; "
                         "run `diffin score` (or `diffin run`: every stage) with this config and run dir first")
    out = ctx.layout.selection
    fingerprint = selection_fingerprint(cfg, files)
    marker = out / DONE_FILE
    if marker.is_file() and json.loads(marker.read_text()).get("fingerprint") == fingerprint:
        log.info("selection in %s is complete for these scores; reusing it", out)
        summary = json.loads((out / SUMMARY_FILE).read_text())
        recomputed = False
    else:
        summary = select(files, cfg, out, executor=executor, resources=ctx.io_resources)
        write_json_atomic(marker, {"fingerprint": fingerprint})
        recomputed = True
    return {"dir": str(out), **summary["counts"], "summary": str(out / SUMMARY_FILE), "recomputed": recomputed}


def _select_in_memory(paths: list[str], cfg: SelectConfig, out_dir: str | os.PathLike) -> dict[str, Any]:
    """The reducer with every eligible row in this process (see the module docstring)."""
    prints, scan = _scan(paths, cfg)
    rows, strata, n_in = scan.rows()
    decision = decide(rows, len(strata), cfg)
    kept = decision.positions
    quantiles = quantile_dict(np.quantile(rows.score, QUANTILES) if len(rows) else None)
    summary = _summary(cfg, scan, int(n_in.sum()), len(rows), len(kept), _last_kept_score(rows, kept),
                       quantiles, prints)
    summary.update(decision.details)
    if cfg.stratify_by:
        summary["strata"] = _strata_summary(rows, kept, strata, n_in)
    in_order, rank = _in_input_order(rows, kept)
    del rows, kept  # free the eligible rows before pass 2
    kept_rows, n_kept, per_file_keys = _collect_kept(paths, in_order, rank)
    meta = selection_metadata(cfg, prints)
    out = as_path(out_dir)
    shards = pa.array([s.shard or "" for s in scan.files], pa.string())
    schema = kept_schema(cfg.stratum_column).with_metadata(meta)
    _write_parquet(out / KEPT_FILE, schema,
                   kept_rows.tables(shards, pa.array(strata, pa.string()), schema), ["shard"])
    uids = kept_rows.uids()
    _write_npy(out / KEPT_UIDS_FILE, uids)
    write_manifest(out / MANIFEST_FILE, meta, scan.files, n_kept, per_file_keys.__getitem__)
    return finish_summary(summary, paths, _count_duplicates(uids), out)


def selection_metadata(cfg: SelectConfig, prints: tuple[str, str]) -> dict[bytes, bytes]:
    """File metadata of kept.parquet and manifest.parquet."""
    return {META_CONFIG: prints[0].encode(), META_TRAJECTORY: prints[1].encode(),
            META_SELECT: json.dumps(cfg.effective(), sort_keys=True).encode()}


def write_manifest(path: Any, meta: dict[bytes, bytes], files: Sequence[_FileStats],
                   n_kept: Sequence[int], keys: Callable[[int], pa.Array]) -> None:
    """``manifest.parquet`` (see :func:`_manifest_tables`), atomically."""
    _write_parquet(path, MANIFEST_SCHEMA.with_metadata(meta),
                   (t.replace_schema_metadata(meta) for t in _manifest_tables(files, n_kept, keys)), ["shard"])


def _scan(paths: list[str], cfg: SelectConfig) -> tuple[tuple[str, str], _Scan]:
    """Check the score files and run pass 1; refuse failed rows under ``failed: error``."""
    more = cfg.score_columns[1:]
    prints, n_rows = _check_score_files(
        paths, [*_read_columns(cfg.score_column, cfg.stratum_column, more, cfg.reads_clusters), "key"])
    scan = _Scan(cfg.score_column, cfg.stratum_column, _RowBuffer.allocate(n_rows, more, cfg.reads_clusters),
                 more, cfg.reads_clusters)
    for path in paths:
        scan.scan_file(path)
    _check_failed(scan, cfg)
    _check_distinct_shards(scan.files)
    return prints, scan


def scan_one_file(path: str, column: str) -> tuple[_Scan, Rows]:
    """Pass 1 over one score file on its own (a task of the bounded reducer): its counts
    and checks, and its eligible rows (``file`` 0, ``stratum`` 0)."""
    where, filesystem = arrow_source(path)
    scan = _Scan(column, None, _RowBuffer.allocate(pq.read_metadata(where, filesystem=filesystem).num_rows))
    scan.scan_file(path)
    return scan, scan.buffer.rows()
