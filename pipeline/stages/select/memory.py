"""The in-memory reducer: every eligible row in this process (``strategy: memory``; always
with ``stratify_by`` and the rule ``chain``).

Memory: the driver holds 36 bytes per input row (two uint64 uid halves, score, file number,
index, stratum; preallocated from the files' row counts; 8 more bytes a row per extra score
column and for the cluster ids), sort temporaries of about 24 bytes per row while deciding,
then only the kept rows and their keys; keys of rows that are not kept are never held. Score
files are read twice, only the needed columns, in record batches. Measured on 2 CPU cores:
1M rows in 100 files, top 30 %: ~1.2 s, ~160 MB above the import baseline; 10M rows in 1000
files: 14.6 s, 690 MB above the baseline (``diffin bench scale --parts reducer``,
docs/SCALE.md).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import numpy as np
import pyarrow as pa

from pipeline.config import SelectConfig
from pipeline.data.uids import u8u8_to_uids
from pipeline.io.storage import as_path
from pipeline.stages.keep_rule import Rows, decide
from pipeline.stages.select import files
from pipeline.stages.select.files import (KEPT_FILE, KEPT_UIDS_FILE, MANIFEST_FILE, QUANTILES, UID_DTYPE,
                                          finish_summary, kept_schema, quantile_dict, selection_metadata,
                                          start_summary, write_manifest, write_npy, write_parquet)
from pipeline.stages.select.scan import kept_keys, scan_files


def select_in_memory(paths: list[str], cfg: SelectConfig, out_dir: str | os.PathLike) -> dict[str, Any]:
    """The reducer with every eligible row in this process (see the module docstring)."""
    prints, scan = scan_files(paths, cfg)
    rows, strata, n_in = scan.rows()
    decision = decide(rows, len(strata), cfg)
    kept = decision.positions
    quantiles = quantile_dict(np.quantile(rows.score, QUANTILES) if len(rows) else None)
    summary = start_summary(cfg, scan, int(n_in.sum()), len(rows), len(kept), _last_kept_score(rows, kept),
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
    write_parquet(out / KEPT_FILE, schema,
                   kept_rows.tables(shards, pa.array(strata, pa.string()), schema), ["shard"])
    uids = kept_rows.uids()
    write_npy(out / KEPT_UIDS_FILE, uids)
    write_manifest(out / MANIFEST_FILE, meta, scan.files, n_kept, per_file_keys.__getitem__)
    return finish_summary(summary, paths, _count_duplicates(uids), out)


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
        for start in range(0, len(self.by_uid), files.WRITE_BATCH_ROWS):
            part = self.by_uid[start:start + files.WRITE_BATCH_ROWS]
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
    per_file = [kept_keys(p, in_order.index[bounds[i]:bounds[i + 1]]) for i, p in enumerate(paths)]
    by_uid = np.lexsort((in_order.lo, in_order.hi))  # stable: duplicate uids stay in input order
    kept_rows = _Kept(in_order, pa.chunked_array(per_file, pa.string()), rank, by_uid)
    return kept_rows, np.diff(bounds), per_file


def _last_kept_score(rows: Rows, kept: np.ndarray) -> float | None:
    return float(rows.score[kept[-1]]) if len(kept) else None


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
