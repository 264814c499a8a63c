"""The selection files: their names, schemas, metadata and byte-stable writers, and the
summary (the one contract both reducers write; readers: the pipeline, reshard, the report,
the load-time filter).

Outputs in ``out_dir`` (each written atomically; byte-identical for identical inputs)
    ``kept.parquet`` (uid, key, shard, index, score, rank [, json.FIELD]; sorted by uid),
    ``kept_uids.npy`` (DataComp subset: sorted ``np.dtype("u8,u8")``), ``manifest.parquet``
    (per input shard in the order the score files are given: shard, n_in, n_scored_ok,
    n_kept, keys in shard order; a score file with no rows names no shard and is left out),
    ``summary.json`` (written last): rule, column, config, counts (in, scored_ok, failed,
    kept, missing — in = scored_ok + failed; missing = pairs sizes.json promised that no
    score file holds), shards by status with the problem shards listed, failed rows by
    status and ok rows without a score, ``threshold_applied`` (the score of the last kept
    row in the rule's order; null if none), score quantiles of the scored-ok rows (linear
    interpolation), per-stratum counts, fingerprints, and the number of kept rows that
    repeat a uid. ``done.json`` (the stage's completion marker) records the inputs'
    fingerprint.
"""

from __future__ import annotations

import collections
import json
import logging
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.config import SelectConfig
from pipeline.io.atomic import atomic_path, write_json_atomic
from pipeline.io.scores import META_CONFIG, META_TRAJECTORY, read_shard_meta
from pipeline.stages.select.scan import FileStats, Scan

log = logging.getLogger(__name__)

KEPT_FILE = "kept.parquet"
KEPT_UIDS_FILE = "kept_uids.npy"
MANIFEST_FILE = "manifest.parquet"
SUMMARY_FILE = "summary.json"
DONE_FILE = "done.json"  # the selection's completion marker: its inputs' fingerprint
UID_DTYPE = np.dtype("u8,u8")
QUANTILES = (0.0, 0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99, 1.0)
META_SELECT = b"diffin.select"

WRITE_BATCH_ROWS = 1 << 20  # rows per row group of kept.parquet, keys per manifest table


def kept_schema(stratum_column: str | None) -> pa.Schema:
    fields = [pa.field("uid", pa.string(), nullable=False), pa.field("key", pa.string(), nullable=False),
              pa.field("shard", pa.string(), nullable=False), pa.field("index", pa.int32(), nullable=False),
              pa.field("score", pa.float64(), nullable=False), pa.field("rank", pa.int64(), nullable=False)]
    if stratum_column:
        fields.append(pa.field(stratum_column, pa.string()))
    return pa.schema(fields)


MANIFEST_SCHEMA = pa.schema([
    pa.field("shard", pa.string(), nullable=False),
    pa.field("n_in", pa.int64(), nullable=False),
    pa.field("n_scored_ok", pa.int64(), nullable=False),
    pa.field("n_kept", pa.int64(), nullable=False),
    pa.field("keys", pa.list_(pa.string()), nullable=False),
])


def selection_metadata(cfg: SelectConfig, prints: tuple[str, str]) -> dict[bytes, bytes]:
    """File metadata of kept.parquet and manifest.parquet."""
    return {META_CONFIG: prints[0].encode(), META_TRAJECTORY: prints[1].encode(),
            META_SELECT: json.dumps(cfg.effective(), sort_keys=True).encode()}


def write_parquet(path: Path, schema: pa.Schema, tables: Iterable[pa.Table],
                   dictionary_columns: list[str]) -> None:
    """Write tables (batches of one file) atomically with byte-stable settings."""
    with atomic_path(path) as tmp:
        with pq.ParquetWriter(tmp, schema, compression="zstd", use_dictionary=dictionary_columns,
                              write_statistics=True) as writer:
            for table in tables:
                writer.write_table(table, row_group_size=WRITE_BATCH_ROWS)


def write_npy(path: Path, array: np.ndarray) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        np.save(handle, array, allow_pickle=False)


def write_manifest(path: Any, meta: dict[bytes, bytes], files: Sequence[FileStats],
                   n_kept: Sequence[int], keys: Callable[[int], pa.Array]) -> None:
    """``manifest.parquet`` (see :func:`_manifest_tables`), atomically."""
    write_parquet(path, MANIFEST_SCHEMA.with_metadata(meta),
                   (t.replace_schema_metadata(meta) for t in _manifest_tables(files, n_kept, keys)), ["shard"])


def _manifest_tables(files: Sequence[FileStats], n_kept: Sequence[int],
                     keys: Callable[[int], pa.Array]) -> Iterable[pa.Table]:
    """Manifest rows (files without rows have no shard and are left out), ~1M keys a table.

    ``keys(i)``: file i's kept keys in shard order, asked for one table at a time."""
    rows = [(stats, int(n_kept[i]), i) for i, stats in enumerate(files) if stats.shard is not None]
    start = 0
    while start < len(rows):
        stop, total = start, 0
        while stop < len(rows) and (stop == start or total + rows[stop][1] <= WRITE_BATCH_ROWS):
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


def quantile_dict(values: Sequence[float] | np.ndarray | None) -> dict[str, float] | None:
    """The summary's ``score_quantiles``: the values at :data:`QUANTILES`, keyed by ``f"{q:g}"``."""
    if values is None:
        return None
    return dict(zip((f"{q:g}" for q in QUANTILES), (float(v) for v in values)))


def start_summary(cfg: SelectConfig, scan: Scan, n_in: int, n_ok: int, n_kept: int,
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
