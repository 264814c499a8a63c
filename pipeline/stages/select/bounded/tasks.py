"""The bounded reducer's per-file tasks (:class:`ReducerStage`, run by an executor: in process or as Ray tasks) and
the temporary parts they write. Each task reads one score file (or its parts) and holds
only that file's rows.

Parts, in a scratch directory every worker sees (names owned here):

``rows-<file>.bin``
    The file's eligible rows as the scan read them: (uid hi, uid lo, score, index), 28
    bytes a row — what the later passes read instead of the score file; ``drop_fill`` adds
    its drop column (8 bytes, when it is not the score) and the cluster ids (8 bytes, fill
    cluster).
``rule-<file>.u64``
    The file's kept rows in the order of the ranks (:func:`.keys.rank_columns`): (lead,
    primary key, uid hi, uid lo) as raw uint64 quadruples — the runs of the driver's rank
    merge.
``kept-<file>.arrow``
    The file's kept rows in uid order (hi, lo, index, score, key) with ``position``, the
    row's place in ``rule-<file>``.
``ranks.i64``
    Written by the driver: every kept row's global rank, file after file, each file's in
    its rule order.
``final-<file>.arrow``
    ``kept-<file>`` with ``rank`` instead of ``position``, in batches: the runs of the uid
    merge that writes ``kept.parquet``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import pyarrow as pa

from pipeline.config import SelectConfig
from pipeline.io.atomic import atomic_path
from pipeline.io.storage import StoragePath
from pipeline.runtime.executor import Resources
from pipeline.stages.keep_rule import Rows
from pipeline.stages.select.bounded.keys import (DROPPED, WIDTHS, KeepOrder, descending_key, digits, keep_columns,
                                                lex_order, prefix_mask, rank_columns, rule_columns, score_key,
                                                segment_le, sparse_histogram)
from pipeline.stages.select.scan import FileStats, kept_keys, scan_one_file

RANKS_FILE = "ranks.i64"
RULE_MERGE_KEYS = ("lead", "primary", "hi", "lo", "file", "position")
UID_MERGE_KEYS = ("hi", "lo", "file", "index")
_RULE_WORDS = 4  # uint64 words per row of a rule part: lead, primary, hi, lo
_ROW_FIELDS = [("hi", "<u8"), ("lo", "<u8"), ("score", "<f8"), ("index", "<i4")]


def rows_part(parts: Path, file_no: int) -> Path:
    return parts / f"rows-{file_no:06d}.bin"


def rule_part(parts: Path, file_no: int) -> Path:
    return parts / f"rule-{file_no:06d}.u64"


def kept_part(parts: Path, file_no: int) -> Path:
    return parts / f"kept-{file_no:06d}.arrow"


def final_part(parts: Path, file_no: int) -> Path:
    return parts / f"final-{file_no:06d}.arrow"


@dataclass(frozen=True)
class FileTask:
    """One score file, the select settings, where its parts go, and the keep order (set
    once known: for ``drop_fill`` after the drop's cut is found)."""

    path: StoragePath
    file_no: int
    cfg: SelectConfig
    parts: Path
    order: KeepOrder | None = None

    @property
    def stored_columns(self) -> tuple[str, ...]:
        """The score columns besides ``score`` that the later passes read: drop_fill's drop column."""
        cfg = self.cfg
        return (cfg.drop_by,) if cfg.rule == "drop_fill" and cfg.drop_by != cfg.score_column else ()

    @property
    def row_dtype(self) -> np.dtype:
        """A row of the ``rows-`` part."""
        return np.dtype([*_ROW_FIELDS, *((f"column:{c}", "<f8") for c in self.stored_columns),
                         *([("cluster", "<i8")] if self.cfg.reads_clusters else [])])


@dataclass
class _FileRows:
    """A score file's eligible rows and, computed once each, the key columns of its orders."""

    rows: Rows
    task: FileTask
    keys: dict[str, list[np.ndarray]] = field(default_factory=dict)

    def values(self, kind: str) -> np.ndarray:
        """The values a gathered row reports: the drop column (``drop``), else the score."""
        return self.rows.values(self.task.cfg.drop_by, self.task.cfg) if kind == "drop" else self.rows.score

    def columns(self, kind: str) -> list[np.ndarray]:
        """The key columns of the ``rule`` (keep), ``drop`` or ``score`` order."""
        if kind not in self.keys:
            file_no = self.task.file_no
            if kind == "score":
                self.keys[kind] = [score_key(self.rows.score)]
            elif kind == "drop":
                self.keys[kind] = rule_columns(self.rows, descending_key(self.values("drop")), file_no)
            else:
                if self.task.order is None:
                    raise ValueError("the keep order is not known yet")
                self.keys[kind] = keep_columns(self.rows, self.task.order, file_no, self.values("drop"))
        return self.keys[kind]


def _load(task: FileTask) -> _FileRows:
    """The file's eligible rows, from the part the scan wrote."""
    table = np.fromfile(rows_part(task.parts, task.file_no), task.row_dtype)
    n = len(table)
    rows = Rows(hi=table["hi"], lo=table["lo"], score=table["score"], file=np.zeros(n, np.int32),
                index=table["index"], stratum=np.zeros(n, np.int32),
                columns={c: table[f"column:{c}"] for c in task.stored_columns},
                cluster=table["cluster"] if task.cfg.reads_clusters else None)
    return _FileRows(rows, task)


# --------------------------------------------------------------------------- pass 1: scan


@dataclass
class FileScan:
    """What the scan of one file returns: its counts, and histograms of the first digit
    after the shared prefix (:attr:`ScanTask.histograms`) of its eligible rows' keys."""

    stats: FileStats
    failed_by_status: dict[str, int]
    ok_without_score: dict[str, int]
    first_failed: str | None
    at_or_above: int  # threshold: score >= threshold; drop_fill's drop_below: drop value >= it
    below_zero: int  # drop_fill's drop_share_from: rows it scores below 0
    histograms: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)


@dataclass(frozen=True)
class ScanTask:
    file: FileTask
    histograms: tuple[tuple[str, tuple[int, ...]], ...]  # (order, the prefix all its rows share)


def scan_file(task: ScanTask) -> FileScan:
    """Counts, checks and first-digit histograms of one score file; its eligible rows go
    to its ``rows-`` part."""
    cfg = task.file.cfg
    scan, rows = scan_one_file(task.file.path, cfg)
    table = np.empty(len(rows), task.file.row_dtype)
    values = {"hi": rows.hi, "lo": rows.lo, "score": rows.score, "index": rows.index, "cluster": rows.cluster,
              **{f"column:{c}": rows.columns[c] for c in task.file.stored_columns}}
    for name in table.dtype.names:
        table[name] = values[name]
    with atomic_path(rows_part(task.file.parts, task.file.file_no)) as tmp:
        table.tofile(tmp)
    loaded = _FileRows(rows, task.file)
    threshold = cfg.threshold if cfg.rule == "threshold" else cfg.drop_below_applied
    at_or_above = int((loaded.values("drop") >= threshold).sum()) if threshold is not None else 0
    share = cfg.drop_share_from if cfg.rule == "drop_fill" else None  # another rule has no drop
    below_zero = int((rows.values(share, cfg) < 0).sum()) if share else 0
    histograms = {kind: sparse_histogram(digits(loaded.columns(kind), WIDTHS[kind], len(prefix)))
                  for kind, prefix in task.histograms}
    return FileScan(scan.files[0], dict(scan.failed_by_status), dict(scan.ok_without_score), scan.first_failed,
                    at_or_above, below_zero, histograms)


# ------------------------------------------------------------------------ pass 2: refine


@dataclass(frozen=True)
class Request:
    """For the rows of one bin (kind, prefix): the histogram of the next digit, or the rows."""

    action: str  # "histogram" | "gather"
    kind: str
    prefix: tuple[int, ...]


@dataclass(frozen=True)
class RefineTask:
    file: FileTask
    requests: tuple[Request, ...]


def refine_file(task: RefineTask) -> list[Any]:
    """Per request: a sparse histogram, or the bin's rows (rule, drop: key columns and
    values; score: the scores)."""
    loaded = _load(task.file)
    results: list[Any] = []
    for request in task.requests:
        widths = WIDTHS[request.kind]
        columns = loaded.columns(request.kind)
        mask = prefix_mask(columns, widths, request.prefix)
        if request.action == "histogram":
            results.append(sparse_histogram(digits([c[mask] for c in columns], widths,
                                                   len(request.prefix))))
        elif request.kind == "score":
            results.append(loaded.rows.score[mask])
        else:
            results.append(([c[mask] for c in columns], loaded.values(request.kind)[mask]))
    return results


@dataclass(frozen=True)
class CountTask:
    file: FileTask


def count_clusters(task: CountTask) -> tuple[np.ndarray, np.ndarray]:
    """drop_fill's fill cluster: the file's cluster ids (ascending) and, per id, its
    eligible rows and the rows that survive the drop (a 2-row array)."""
    loaded = _load(task.file)
    ids, group = np.unique(loaded.rows.cluster, return_inverse=True)
    group = group.reshape(-1)
    survives = loaded.columns("rule")[0] != np.uint64(DROPPED)
    return ids, np.stack([np.bincount(group, minlength=len(ids)),
                          np.bincount(group[survives], minlength=len(ids))]).astype(np.int64)


# ---------------------------------------------------------------------- pass 3: kept parts


@dataclass(frozen=True)
class KeptTask:
    file: FileTask
    cuts: tuple[tuple[int, ...], ...]  # per segment with kept rows, its last kept row's keep key


@dataclass
class KeptFile:
    """What writing one file's kept rows returns: how many; the last in rank order (its
    rank key and score); for fill cluster, the kept rows' cluster ids and counts."""

    count: int
    last: tuple[int, ...] | None = None
    last_score: float | None = None
    clusters: tuple[np.ndarray, np.ndarray] | None = None


def write_kept(task: KeptTask) -> KeptFile:
    """Write the file's kept rows (keep key <= its segment's cut) as ``rule-`` and ``kept-``
    parts (none when no row is kept)."""
    loaded = _load(task.file)
    rows, file_no, parts = loaded.rows, task.file.file_no, task.file.parts
    columns = loaded.columns("rule")
    kept = np.flatnonzero(segment_le(columns, np.array(task.cuts, np.uint64).reshape(len(task.cuts), -1)))
    if not len(kept):
        return KeptFile(0)
    ranked = rank_columns(columns)
    by_rule = kept[lex_order([c[kept] for c in ranked])]
    with atomic_path(rule_part(parts, file_no)) as tmp:
        np.stack([c[by_rule] for c in ranked[:_RULE_WORDS]], axis=1).tofile(tmp)
    position = np.empty(len(rows), np.int64)
    position[by_rule] = np.arange(len(by_rule))
    by_uid = kept[lex_order([rows.hi[kept], rows.lo[kept], rows.index[kept]])]
    batch = pa.record_batch({
        "hi": rows.hi[by_uid], "lo": rows.lo[by_uid], "index": pa.array(rows.index[by_uid], pa.int32()),
        "score": rows.score[by_uid], "key": kept_keys(task.file.path, rows.index[by_uid]),
        "position": position[by_uid]})
    _write_arrow(kept_part(parts, file_no), [batch])
    last = int(by_rule[-1])
    clusters = np.unique(rows.cluster[kept], return_counts=True) if rows.cluster is not None else None
    return KeptFile(len(kept), tuple(int(c[last]) for c in ranked), float(rows.score[last]), clusters)


@dataclass(frozen=True)
class RankTask:
    file_no: int
    parts: Path
    offset: int  # of the file's first rank in ranks.i64
    count: int
    batch_rows: int


def attach_ranks(task: RankTask) -> None:
    """``kept-`` part + the file's ranks → ``final-`` part (in batches of ``batch_rows``);
    the ``kept-`` part stays, so a retried task finds it."""
    source = kept_part(task.parts, task.file_no)
    table = _read_arrow(source)
    ranks = np.fromfile(task.parts / RANKS_FILE, np.int64, count=task.count, offset=task.offset * 8)
    rank = ranks[table.column("position").to_numpy()]
    final = table.drop_columns(["position"]).append_column("rank", pa.array(rank, pa.int64()))
    _write_arrow(final_part(task.parts, task.file_no), final.to_batches(max_chunksize=task.batch_rows))


# ----------------------------------------------------------------- reading parts (driver)


ReducerTask = ScanTask | RefineTask | CountTask | KeptTask | RankTask


@dataclass
class ReducerStage:
    """The reducer's per-file work as a stage: each task is one file's share of one pass."""

    resources: Resources

    def setup(self) -> None:
        """Nothing to load ahead: each task reads its own file or parts."""

    def process(self, task: ReducerTask) -> Any:
        """Run the pass the task belongs to (:func:`scan_file`, :func:`refine_file`,
        :func:`count_clusters`, :func:`write_kept`, :func:`attach_ranks`)."""
        return _PASSES[type(task)](task)


_PASSES: dict[type, Callable[[Any], Any]] = {ScanTask: scan_file, RefineTask: refine_file,
                                             CountTask: count_clusters, KeptTask: write_kept,
                                             RankTask: attach_ranks}


def rule_run(parts: Path, file_no: int, count: int, batch_rows: int) -> Iterator[pa.RecordBatch]:
    """A ``rule-`` part as sorted batches (lead, primary, hi, lo, file, position), read lazily."""
    path, row_bytes = rule_part(parts, file_no), _RULE_WORDS * 8
    for start in range(0, count, batch_rows):
        n = min(batch_rows, count - start)
        block = np.fromfile(path, np.uint64, count=n * _RULE_WORDS, offset=start * row_bytes).reshape(n, _RULE_WORDS)
        yield pa.record_batch({"lead": block[:, 0], "primary": block[:, 1], "hi": block[:, 2], "lo": block[:, 3],
                               "file": np.full(n, file_no, np.uint64),
                               "position": np.arange(start, start + n, dtype=np.uint64)})


def final_run(parts: Path, file_no: int) -> Iterator[pa.RecordBatch]:
    """A ``final-`` part as sorted batches with a ``file`` column, one batch read at a time."""
    path = final_part(parts, file_no)
    batch_no, batches = 0, 1
    while batch_no < batches:
        with pa.OSFile(str(path)) as handle:
            reader = pa.ipc.open_file(handle)
            batches, batch = reader.num_record_batches, reader.get_batch(batch_no)
        batch_no += 1
        yield batch.append_column("file", pa.array(np.full(batch.num_rows, file_no, np.uint64)))


def final_keys(parts: Path, file_no: int, count: int) -> pa.Array:
    """The file's kept keys in shard order (by index), for the manifest."""
    if not count:
        return pa.array([], pa.string())
    table = _read_arrow(final_part(parts, file_no))
    by_index = np.argsort(table.column("index").to_numpy(), kind="stable")
    return table.column("key").take(pa.array(by_index)).combine_chunks()


def _write_arrow(path: Path, batches: Any) -> None:
    batches = list(batches)
    with atomic_path(path) as tmp, pa.OSFile(str(tmp), "wb") as sink:
        with pa.ipc.new_file(sink, batches[0].schema) as writer:
            for batch in batches:
                writer.write_batch(batch)


def _read_arrow(path: Path) -> pa.Table:
    with pa.OSFile(str(path)) as handle:
        return pa.ipc.open_file(handle).read_all()

