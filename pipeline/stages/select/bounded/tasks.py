"""The bounded reducer's per-file tasks (:class:`ReducerStage`, run by an executor: in process or as Ray tasks) and
the temporary parts they write. Each task reads one score file (or its parts) and holds
only that file's rows.

Parts, in a scratch directory every worker sees (names owned here):

``rows-<file>.bin``
    The file's eligible rows as the scan read them: (uid hi, uid lo, score, index), 28
    bytes a row — what the later passes read instead of the score file.
``rule-<file>.u64``
    The file's kept rows in the rule's order: (primary key, uid hi, uid lo) as raw uint64
    triples — the runs of the driver's rank merge.
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

from pipeline.io.atomic import atomic_path
from pipeline.io.storage import StoragePath
from pipeline.runtime.executor import Resources
from pipeline.stages.keep_rule import Rows
from pipeline.stages.select.bounded.keys import (RULE_WIDTHS, SCORE_WIDTHS, digits, lex_le, lex_order,
                                                prefix_mask, rule_columns, rule_key, score_key, sparse_histogram)
from pipeline.stages.select.scan import FileStats, kept_keys, scan_one_file

RANKS_FILE = "ranks.i64"
RULE_MERGE_KEYS = ("primary", "hi", "lo", "file", "position")
UID_MERGE_KEYS = ("hi", "lo", "file", "index")
_RULE_WORDS = 3  # uint64 words per row of a rule part


_ROW_DTYPE = np.dtype([("hi", "<u8"), ("lo", "<u8"), ("score", "<f8"), ("index", "<i4")])


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
    """One score file, how its rows are ordered, and where its parts go."""

    path: StoragePath
    file_no: int
    column: str
    rule: str
    seed: int
    parts: Path


@dataclass(frozen=True)
class _FileRows:
    """A score file's eligible rows and their keys."""

    rows: Rows
    primary: np.ndarray

    def columns(self, kind: str, file_no: int) -> list[np.ndarray]:
        """The key columns of the ``rule`` or ``score`` order."""
        if kind == "rule":
            return rule_columns(self.rows, self.primary, file_no)
        return [score_key(self.rows.score)]


def _keyed(rows: Rows, task: FileTask) -> _FileRows:
    return _FileRows(rows, rule_key(rows, task.rule, task.seed))


def _load(task: FileTask) -> _FileRows:
    """The file's eligible rows, from the part the scan wrote."""
    table = np.fromfile(rows_part(task.parts, task.file_no), _ROW_DTYPE)
    n = len(table)
    rows = Rows(hi=table["hi"], lo=table["lo"], score=table["score"], file=np.zeros(n, np.int32),
                index=table["index"], stratum=np.zeros(n, np.int32))
    return _keyed(rows, task)


# --------------------------------------------------------------------------- pass 1: scan


@dataclass
class FileScan:
    """What the scan of one file returns: its counts, and histograms of the top digit of
    the ``rule`` and ``score`` keys of its eligible rows."""

    stats: FileStats
    failed_by_status: dict[str, int]
    ok_without_score: dict[str, int]
    first_failed: str | None
    at_or_above: int
    histograms: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)


@dataclass(frozen=True)
class ScanTask:
    file: FileTask
    threshold: float | None


def scan_file(task: ScanTask) -> FileScan:
    """Counts, checks and top-digit histograms of one score file; its eligible rows go to
    its ``rows-`` part."""
    scan, rows = scan_one_file(task.file.path, task.file.column)
    table = np.empty(len(rows), _ROW_DTYPE)
    for name in _ROW_DTYPE.names:
        table[name] = getattr(rows, name)
    with atomic_path(rows_part(task.file.parts, task.file.file_no)) as tmp:
        table.tofile(tmp)
    loaded = _keyed(rows, task.file)
    stats = scan.files[0]
    at_or_above = int((loaded.rows.score >= task.threshold).sum()) if task.threshold is not None else 0
    histograms = {kind: sparse_histogram(digits(loaded.columns(kind, task.file.file_no), widths, 0))
                  for kind, widths in (("rule", RULE_WIDTHS), ("score", SCORE_WIDTHS))}
    return FileScan(stats, dict(scan.failed_by_status), dict(scan.ok_without_score), scan.first_failed,
                    at_or_above, histograms)


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
    """Per request: a sparse histogram, or the bin's rows (rule: key columns and score;
    score: the scores)."""
    loaded = _load(task.file)
    results: list[Any] = []
    for request in task.requests:
        widths = RULE_WIDTHS if request.kind == "rule" else SCORE_WIDTHS
        columns = loaded.columns(request.kind, task.file.file_no)
        mask = prefix_mask(columns, widths, request.prefix)
        if request.action == "histogram":
            results.append(sparse_histogram(digits([c[mask] for c in columns], widths,
                                                   len(request.prefix))))
        elif request.kind == "rule":
            results.append(([c[mask] for c in columns], loaded.rows.score[mask]))
        else:
            results.append(loaded.rows.score[mask])
    return results


# ---------------------------------------------------------------------- pass 3: kept parts


@dataclass(frozen=True)
class KeptTask:
    file: FileTask
    cut: tuple[int, ...]  # the rule key of the last kept row


def write_kept(task: KeptTask) -> int:
    """Write the file's kept rows (rule key <= cut) as ``rule-`` and ``kept-`` parts; return
    how many there are (no parts when none)."""
    loaded = _load(task.file)
    rows, file_no, parts = loaded.rows, task.file.file_no, task.file.parts
    columns = loaded.columns("rule", file_no)
    kept = np.flatnonzero(lex_le(columns, task.cut))
    if not len(kept):
        return 0
    by_rule = kept[lex_order([c[kept] for c in columns])]
    with atomic_path(rule_part(parts, file_no)) as tmp:
        np.stack([loaded.primary[by_rule], rows.hi[by_rule], rows.lo[by_rule]], axis=1).tofile(tmp)
    position = np.empty(len(rows), np.int64)
    position[by_rule] = np.arange(len(by_rule))
    by_uid = kept[lex_order([rows.hi[kept], rows.lo[kept], rows.index[kept]])]
    batch = pa.record_batch({
        "hi": rows.hi[by_uid], "lo": rows.lo[by_uid], "index": pa.array(rows.index[by_uid], pa.int32()),
        "score": rows.score[by_uid], "key": kept_keys(task.file.path, rows.index[by_uid]),
        "position": position[by_uid]})
    _write_arrow(kept_part(parts, file_no), [batch])
    return len(kept)


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


ReducerTask = ScanTask | RefineTask | KeptTask | RankTask


@dataclass
class ReducerStage:
    """The reducer's per-file work as a stage: each task is one file's share of one pass."""

    resources: Resources

    def setup(self) -> None:
        """Nothing to load ahead: each task reads its own file or parts."""

    def process(self, task: ReducerTask) -> Any:
        """Run the pass the task belongs to (:func:`scan_file`, :func:`refine_file`,
        :func:`write_kept`, :func:`attach_ranks`)."""
        return _PASSES[type(task)](task)


_PASSES: dict[type, Callable[[Any], Any]] = {ScanTask: scan_file, RefineTask: refine_file,
                                             KeptTask: write_kept, RankTask: attach_ranks}


def rule_run(parts: Path, file_no: int, count: int, batch_rows: int) -> Iterator[pa.RecordBatch]:
    """A ``rule-`` part as sorted batches (primary, hi, lo, file, position), read lazily."""
    path, row_bytes = rule_part(parts, file_no), _RULE_WORDS * 8
    for start in range(0, count, batch_rows):
        n = min(batch_rows, count - start)
        block = np.fromfile(path, np.uint64, count=n * _RULE_WORDS, offset=start * row_bytes).reshape(n, _RULE_WORDS)
        yield pa.record_batch({"primary": block[:, 0], "hi": block[:, 1], "lo": block[:, 2],
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

