"""The bounded reducer's driver: plans the per-file tasks, finds the cut and the quantiles,
merges the parts into the outputs (see :mod:`pipeline.stages.select.bounded`)."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import pyarrow as pa

from pipeline.config import SelectConfig
from pipeline.data.uids import u8u8_to_uids
from pipeline.io.atomic import atomic_path
from pipeline.io.storage import StoragePath, is_remote
from pipeline.runtime.executor import Executor, LocalExecutor, Resources
from pipeline.stages.keep_rule import cluster_table, drop_fill_details, kept_count, ranked_drop
from pipeline.stages.select.bounded.keys import (DIGITS, DROPPED, SCORE_WIDTHS, KeepOrder, Search, Survival,
                                                cluster_segment, dense, interpolate, lex_order, prefix_value,
                                                quantile_positions, score_from_key, score_key, segment_prefix)
from pipeline.stages.select.bounded.merge import merge_sorted
from pipeline.stages.select.bounded.tasks import (RANKS_FILE, RULE_MERGE_KEYS, UID_MERGE_KEYS, CountTask, FileScan,
                                                 FileTask, KeptFile, KeptTask, RankTask, ReducerStage, ReducerTask,
                                                 RefineTask, Request, ScanTask, final_keys, final_run, rule_run)
from pipeline.stages.select.files import (KEPT_FILE, KEPT_UIDS_FILE, MANIFEST_FILE, QUANTILES, UID_DTYPE,
                                          finish_summary, kept_schema, quantile_dict, selection_metadata,
                                          start_summary, write_manifest, write_parquet)
from pipeline.stages.select.scan import (RowBuffer, Scan, check_distinct_shards, check_failed, check_score_files,
                                         required_columns)

_HISTOGRAM_ROWS = 16384  # what one file's histogram result counts against the budget, in rows
_MIN_WAVE = 8
_MIN_RUN_BATCH, _MAX_RUN_BATCH = 16, 65536
_ALL = (1 << 64) - 1  # a key column's largest value: a segment kept whole has this cut after its segment

Target = tuple[str, int]  # (order, 0-based position)


@dataclass(frozen=True)
class _Plan:
    """Where and how the per-file tasks run."""

    executor: Executor
    resources: Resources
    budget: int  # rows sorted or buffered at once
    files: list[FileTask]

    def run(self, tasks: Sequence[ReducerTask], fold: Callable[[Any], None], wave: int | None = None) -> None:
        """Run ``tasks`` (one Ray task each) in waves of ``wave`` (all at once by default),
        folding each wave's results in task order before the next starts."""
        wave = wave or max(len(tasks), 1)
        stage = ReducerStage(self.resources)
        for start in range(0, len(tasks), wave):
            for result in self.executor.run_stage(stage, tasks[start:start + wave]):
                fold(result)

    @property
    def wave(self) -> int:
        """Tasks per wave when each returns histograms (at most 65,536 bins each)."""
        return max(_MIN_WAVE, self.budget // _HISTOGRAM_ROWS)

    def run_batch(self, runs: int) -> int:
        """Rows a merge reads from a run at a time: all runs together buffer at most about
        1.5 batches each, so about 3/8 of the budget."""
        return int(np.clip(self.budget // (4 * max(runs, 1)), _MIN_RUN_BATCH, _MAX_RUN_BATCH))

    def ordered(self, order: KeepOrder) -> "_Plan":
        """The plan with the keep order known to every file's tasks."""
        return replace(self, files=[replace(f, order=order) for f in self.files])


def select_bounded(paths: list[StoragePath], cfg: SelectConfig, out: StoragePath, executor: Executor,
                   resources: Resources, write_rows: int) -> dict[str, Any]:
    """The reducer with memory independent of the row count; outputs byte-identical to the
    in-memory reducer's. ``write_rows``: rows per row group of ``kept.parquet``."""
    prints, _ = check_score_files(paths, required_columns(cfg))
    executor = LocalExecutor() if is_remote(out) else executor  # parts live on a local disk
    meta = selection_metadata(cfg, prints)
    with _scratch(out) as parts:
        order = None if cfg.rule == "drop_fill" else KeepOrder(cfg.rule, cfg.seed)  # drop_fill's: after the drop
        plan = _Plan(executor, resources, cfg.max_rows_in_memory,
                     [FileTask(p, i, cfg, parts, order) for i, p in enumerate(paths)])
        totals = _scan(plan, cfg)
        scan, eligible = totals.scan, [s.n_eligible for s in totals.scan.files]
        n_ok = int(sum(eligible))
        decision = (_decide_drop_fill if cfg.rule == "drop_fill" else _decide)(plan, cfg, totals, eligible)
        kept = _write_parts(decision.plan, eligible, decision.cuts)
        per_file = kept.per_file
        summary = start_summary(cfg, scan, sum(s.n_in for s in scan.files), n_ok, sum(per_file), kept.last_score,
                                _quantiles(n_ok, decision.found), prints)
        if decision.drop is not None:
            summary.update(decision.drop.details(cfg, kept.clusters))
        _rank(plan, per_file, parts)
        shards = pa.array([s.shard or "" for s in scan.files], pa.string())
        duplicates = _write_kept(out, parts, per_file, shards,
                                 kept_schema(None).with_metadata(meta), write_rows)
        write_manifest(out / MANIFEST_FILE, meta, scan.files, per_file,
                       lambda i: final_keys(parts, i, per_file[i]))
    return finish_summary(summary, paths, duplicates, out)


@dataclass
class _Counts:
    """Sparse per-id counts (ids ascending; a row of counts per kind) summed over files."""

    ids: np.ndarray
    values: np.ndarray  # (kinds, ids)

    @classmethod
    def empty(cls, kinds: int) -> "_Counts":
        return cls(np.empty(0, np.int64), np.zeros((kinds, 0), np.int64))

    def add(self, ids: np.ndarray, values: np.ndarray) -> None:
        merged = np.union1d(self.ids, ids)
        total = np.zeros((len(self.values), len(merged)), np.int64)
        total[:, np.searchsorted(merged, self.ids)] += self.values
        total[:, np.searchsorted(merged, ids)] += np.reshape(values, (len(self.values), -1))
        self.ids, self.values = merged, total

    def at(self, ids: np.ndarray) -> np.ndarray:
        """The first kind's counts at ``ids`` (a superset of this object's ids, ascending)."""
        counts = np.zeros(len(ids), np.int64)
        counts[np.searchsorted(ids, self.ids)] = self.values[0]
        return counts


# --------------------------------------------------------------------------- pass 1: scan


@dataclass
class _Totals:
    """The scan's results merged in file order: counts (as the in-memory scan keeps them),
    first-digit histograms, rows at or above the threshold, rows below zero."""

    scan: Scan
    histograms: dict[str, np.ndarray] = field(default_factory=dict)
    at_or_above: int = 0
    below_zero: int = 0

    def add(self, result: FileScan) -> None:
        scan = self.scan
        scan.files.append(result.stats)
        scan.failed_by_status.update(result.failed_by_status)
        scan.ok_without_score.update(result.ok_without_score)
        scan.first_failed = scan.first_failed or result.first_failed
        self.at_or_above += result.at_or_above
        self.below_zero += result.below_zero
        for kind, histogram in result.histograms.items():
            self.histograms.setdefault(kind, np.zeros(DIGITS, np.int64))
            self.histograms[kind] += dense([histogram])


def _scan(plan: _Plan, cfg: SelectConfig) -> _Totals:
    """Scan every file; refuse failed rows under ``failed: error`` and shards scored twice.
    Histograms: score order (quantiles) and the first searched order — a plain rule's keep
    order after its one segment, or drop_fill's drop order when a rank decides the drop."""
    totals = _Totals(Scan(cfg.score_column, None, RowBuffer.allocate(0)))
    histograms: list[tuple[str, tuple[int, ...]]] = [("score", ())]
    if cfg.rule != "drop_fill":
        histograms.append(("rule", segment_prefix(0)))
    elif cfg.drop_below_applied is None:
        histograms.append(("drop", ()))
    plan.run([ScanTask(f, tuple(histograms)) for f in plan.files], totals.add, plan.wave)
    check_failed(totals.scan, cfg)
    check_distinct_shards(totals.scan.files)
    return totals


# ------------------------------------------------------------- pass 2: the cuts, quantiles


@dataclass(frozen=True)
class _Segment:
    """Rows of the keep order that share a segment: ``rows`` of them, the first ``keep`` kept."""

    segment: int
    rows: int
    keep: int


@dataclass(frozen=True)
class _Drop:
    """What drop_fill decided besides the cuts (the summary's ``drop_fill``)."""

    threshold: float | None
    eligible: int
    survivors: int
    budget: int
    below_zero: int | None
    cluster_ids: np.ndarray | None = None  # fill cluster: every cluster id, ascending (null first)
    clusters: list[dict[str, Any]] | None = None  # and keep_rule.cluster_table of them

    def details(self, cfg: SelectConfig, kept: _Counts) -> dict[str, Any]:
        """The summary's entry, with the kept rows per cluster (``kept``: from pass 3)."""
        kept_per = kept.at(self.cluster_ids) if self.cluster_ids is not None else None
        return drop_fill_details(cfg, self.threshold, self.eligible, self.survivors, self.budget, self.below_zero,
                                 self.clusters, kept_per)


@dataclass(frozen=True)
class _Decision:
    """The plan with the keep order, each kept segment's cut (:func:`_cuts`), the order
    statistics found (the quantiles'), and drop_fill's own results."""

    plan: _Plan
    cuts: tuple[tuple[int, ...], ...]
    found: dict[Target, Any]
    drop: _Drop | None = None


def _decide(plan: _Plan, cfg: SelectConfig, totals: _Totals, eligible: list[int]) -> _Decision:
    """A plain rule: one segment, its first K rows kept — the K-th row searched with the
    quantiles, from the scan's histograms."""
    n_ok = int(sum(eligible))
    segments = [_Segment(0, n_ok, kept_count(n_ok, totals.at_or_above, cfg))]
    found = _find(plan, eligible, {**_quantile_searches(n_ok, totals.histograms),
                                   **_segment_searches(segments, totals.histograms.get("rule"))})
    return _Decision(plan, _cuts(segments, found), found)


def _decide_drop_fill(plan: _Plan, cfg: SelectConfig, totals: _Totals, eligible: list[int]) -> _Decision:
    """drop_fill: the drop (a threshold, or the drop order's last survivor searched with the
    quantiles), then the keep order's segments — the survivors (one segment, or one per
    cluster with its quota) and the dropped rows (the short rest) — and their cuts."""
    n_ok = int(sum(eligible))
    budget = kept_count(n_ok, 0, cfg)
    below_zero = totals.below_zero if cfg.drop_share_from is not None else None
    dropped = ranked_drop(cfg, n_ok, below_zero)
    searches = _quantile_searches(n_ok, totals.histograms)
    last_survivor: Target = ("drop", n_ok - (dropped or 0) - 1)
    if dropped is not None and dropped < n_ok:
        searches[last_survivor] = Search("drop", last_survivor[1], (), n_ok).descend(totals.histograms["drop"])
    found = _find(plan, eligible, searches)
    if dropped is None:
        threshold, survivors, survival = cfg.drop_below_applied, totals.at_or_above, Survival(cfg.drop_below_applied)
    elif dropped < n_ok:
        cut, threshold = found[last_survivor]
        survivors, survival = n_ok - dropped, Survival(cut=cut)
    else:
        threshold, survivors, survival = None, 0, Survival()
    plan = plan.ordered(KeepOrder("top_fraction" if cfg.fill == "score" else "random", cfg.seed, survival,
                                  cfg.fill == "cluster"))
    filled = min(budget, survivors)
    drop = _Drop(threshold, n_ok, survivors, budget, below_zero)
    if cfg.fill == "cluster":
        counts = _count_clusters(plan, eligible)
        clusters = cluster_table(counts.ids, counts.values[0], counts.values[1], filled, cfg.cluster_power)
        segments = [_Segment(int(s), int(a), c["quota"])
                    for s, a, c in zip(cluster_segment(counts.ids), counts.values[1], clusters)]
        drop = replace(drop, cluster_ids=counts.ids, clusters=clusters)
    else:
        segments = [_Segment(0, survivors, filled)]
    segments.append(_Segment(DROPPED, n_ok - survivors, budget - filled))
    found.update(_find(plan, eligible, _segment_searches(segments)))
    return _Decision(plan, _cuts(segments, found), found, drop)


def _count_clusters(plan: _Plan, eligible: list[int]) -> _Counts:
    """Per cluster id: eligible rows, rows that survive the drop (a pass over the files)."""
    counts = _Counts.empty(2)
    plan.run([CountTask(f) for f, n in zip(plan.files, eligible) if n], lambda r: counts.add(*r), plan.wave)
    return counts


def _quantile_searches(n_ok: int, histograms: dict[str, np.ndarray]) -> dict[Target, Search]:
    """The neighbours of every quantile in score order, narrowed by the scan's histogram."""
    if not n_ok:
        return {}
    lower, upper, _ = quantile_positions(n_ok, QUANTILES)
    return {("score", int(k)): Search("score", int(k), (), n_ok).descend(histograms["score"])
            for k in sorted(set(lower.tolist()) | set(upper.tolist()))}


def _segment_searches(segments: Sequence[_Segment], histogram: np.ndarray | None = None) -> dict[Target, Search]:
    """The last kept row of every segment kept in part (segments ascending), as a target
    at its position in the whole keep order; ``histogram``: of the digit after the segment,
    given when there is one segment."""
    searches, offset = {}, 0
    for s in segments:
        if 0 < s.keep < s.rows:
            search = Search("rule", s.keep - 1, segment_prefix(s.segment), s.rows)
            searches[("rule", offset + s.keep - 1)] = search.descend(histogram) if histogram is not None else search
        offset += s.rows
    return searches


def _cuts(segments: Sequence[_Segment], found: dict[Target, Any]) -> tuple[tuple[int, ...], ...]:
    """Per segment with kept rows (ascending): the keep key of its last kept row."""
    cuts, offset = [], 0
    for s in segments:
        if s.keep and s.keep == s.rows:
            cuts.append((s.segment, *[_ALL] * 5))
        elif s.keep:
            cuts.append(found[("rule", offset + s.keep - 1)][0])
        offset += s.rows
    return tuple(cuts)


def _find(plan: _Plan, eligible: list[int], searches: dict[Target, Search]) -> dict[Target, Any]:
    """Narrow every search until its bin fits the budget, then sort the bin: the rule target
    gives (its key, its score), a score target its score."""
    found: dict[Target, Any] = {}
    pending = dict(searches)
    while pending:
        for target, search in list(pending.items()):
            if search.kind == "score" and search.complete:  # every row of the bin has this score
                found[target] = score_from_key(prefix_value(SCORE_WIDTHS, search.prefix)[0])
                del pending[target]
        if not pending:
            break
        results = _refine(plan, eligible, _requests(pending.values(), plan.budget))
        for target, search in list(pending.items()):
            action, result = results.get(search.bin, (None, None))
            if action == "histogram":
                pending[target] = search.descend(result)
            elif action == "gather":
                found[target] = _pick(search, result)
                del pending[target]
    return found


def _requests(searches: Iterable[Search], budget: int) -> list[Request]:
    """One request per bin: its next digit's histogram when it holds more than ``budget``
    rows, else its rows — as many bins as fit the budget together."""
    bins = sorted({s.bin: s.count for s in searches}.items())
    requests, gathered = [], 0
    for (kind, prefix), count in bins:
        if count > budget:
            requests.append(Request("histogram", kind, prefix))
        elif gathered + count <= budget:
            requests.append(Request("gather", kind, prefix))
            gathered += count
    return requests


def _refine(plan: _Plan, eligible: list[int],
            requests: list[Request]) -> dict[tuple[str, tuple[int, ...]], tuple[str, Any]]:
    """One pass over the files with eligible rows: per bin, its action and the result (a
    dense histogram, or the bin's rows)."""
    histograms = {i: np.zeros(DIGITS, np.int64) for i, r in enumerate(requests) if r.action == "histogram"}
    gathered: dict[int, list[Any]] = {i: [] for i, r in enumerate(requests) if r.action == "gather"}

    def fold(result: list[Any]) -> None:
        for i, value in enumerate(result):
            if i in histograms:
                histograms[i] += dense([value])
            else:
                gathered[i].append(value)

    tasks = [RefineTask(f, tuple(requests)) for f, n in zip(plan.files, eligible) if n]
    plan.run(tasks, fold, plan.wave)
    results = {i: _concatenate(requests[i].kind, parts) for i, parts in gathered.items()}
    results.update(histograms)
    return {(r.kind, r.prefix): (r.action, results[i]) for i, r in enumerate(requests)}


def _concatenate(kind: str, parts: list[Any]) -> Any:
    """A gathered bin's rows from the files' parts: scores, or (key columns, scores)."""
    if kind == "score":
        return np.concatenate(parts)
    columns = [np.concatenate([p[0][c] for p in parts]) for c in range(len(parts[0][0]))]
    return columns, np.concatenate([p[1] for p in parts])


def _pick(search: Search, rows: Any) -> Any:
    """Position ``search.k`` of a gathered bin."""
    if search.kind == "score":
        return float(rows[np.argsort(score_key(rows), kind="stable")[search.k]])
    columns, scores = rows
    row = lex_order(columns)[search.k]
    return tuple(int(c[row]) for c in columns), float(scores[row])


def _quantiles(n_ok: int, found: dict[Target, Any]) -> dict[str, float] | None:
    if not n_ok:
        return None
    lower, upper, gamma = quantile_positions(n_ok, QUANTILES)
    values = [np.array([found[("score", int(k))] for k in side], np.float64) for side in (lower, upper)]
    return quantile_dict(interpolate(values[0], values[1], gamma))


# ------------------------------------------------------------------ pass 3: parts, ranks


@contextlib.contextmanager
def _scratch(out: StoragePath) -> Iterator[Path]:
    """A temporary directory for the parts, removed at the end: beside ``out`` when local
    (every worker must see it: a shared filesystem on a multi-node cluster), else in the
    system's temporary directory."""
    base = None if is_remote(out) else Path(out).parent
    if base is not None:
        base.mkdir(parents=True, exist_ok=True)
    path = Path(tempfile.mkdtemp(prefix=f".{Path(str(out)).name}-parts-", dir=base))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@dataclass
class _Kept:
    """Pass 3's results merged: kept rows per file, the score of the last kept row in rank
    order, kept rows per cluster id (fill cluster)."""

    per_file: list[int]
    last: tuple[int, ...] | None = None
    last_score: float | None = None
    clusters: _Counts = field(default_factory=lambda: _Counts.empty(1))

    def add(self, file_no: int, result: KeptFile) -> None:
        self.per_file[file_no] = result.count
        if result.last is not None and (self.last is None or result.last > self.last):
            self.last, self.last_score = result.last, result.last_score
        if result.clusters is not None:
            self.clusters.add(*result.clusters)


def _write_parts(plan: _Plan, eligible: list[int], cuts: tuple[tuple[int, ...], ...]) -> _Kept:
    """Every file's kept rows (keep key <= its segment's cut) as parts."""
    kept = _Kept([0] * len(plan.files))
    if not cuts:
        return kept
    tasks = [KeptTask(f, cuts) for f, n in zip(plan.files, eligible) if n]
    files = iter(tasks)
    wave = plan.wave if plan.files[0].cfg.reads_clusters else None  # results with per-cluster counts: in waves
    plan.run(tasks, lambda result: kept.add(next(files).file.file_no, result), wave)
    return kept


def _rank(plan: _Plan, per_file: list[int], parts: Path) -> None:
    """Merge the rule parts in the rule's order to number the kept rows (``ranks.i64``, each
    file's ranks together), then attach them to the files' kept rows (``final-`` parts)."""
    files = [i for i, n in enumerate(per_file) if n]
    offsets = np.concatenate([[0], np.cumsum(per_file)]).astype(np.int64)
    batch_rows = plan.run_batch(len(files))
    with open(parts / RANKS_FILE, "wb") as handle:
        handle.truncate(int(offsets[-1]) * 8)
        _write_ranks(handle.fileno(), offsets, merge_sorted(
            (rule_run(parts, i, per_file[i], batch_rows) for i in files), RULE_MERGE_KEYS))
    tasks = [RankTask(i, parts, int(offsets[i]), per_file[i], batch_rows) for i in files]
    plan.run(tasks, lambda _: None)


def _write_ranks(fd: int, offsets: np.ndarray, batches: Iterable[pa.RecordBatch]) -> None:
    """Number the merged rows 1, 2, … and write each file's run of them at its place."""
    done = 0
    for batch in batches:
        file = batch.column("file").to_numpy().astype(np.int64)
        position = batch.column("position").to_numpy().astype(np.int64)
        rank = np.arange(done + 1, done + 1 + len(file), dtype=np.int64)
        done += len(file)
        by_file = np.argsort(file, kind="stable")  # each file's rows: consecutive positions
        starts = np.flatnonzero(np.diff(file[by_file], prepend=-1))
        for start, stop in zip(starts, [*starts[1:], len(file)]):
            rows = by_file[start:stop]
            os.pwrite(fd, rank[rows].tobytes(), int(offsets[file[rows[0]]] + position[rows[0]]) * 8)


# ------------------------------------------------------------------------------- outputs


def _write_kept(out: StoragePath, parts: Path, per_file: list[int], shards: pa.Array,
                schema: pa.Schema, write_rows: int) -> int:
    """``kept.parquet`` and ``kept_uids.npy`` from the merge of the final parts in uid order;
    return the number of kept rows that repeat the uid before them."""
    files = [i for i, n in enumerate(per_file) if n]
    merged = merge_sorted((final_run(parts, i) for i in files), UID_MERGE_KEYS)
    duplicates = _Duplicates()
    with atomic_path(out / KEPT_UIDS_FILE) as tmp, open(tmp, "wb") as uids:
        header = np.lib.format.header_data_from_array_1_0(np.empty(0, UID_DTYPE))
        np.lib.format.write_array_header_1_0(uids, {**header, "shape": (sum(per_file),)})

        def tables() -> Iterator[pa.Table]:
            for batch in _row_groups(merged, write_rows):
                hi, lo = batch.column("hi").to_numpy(), batch.column("lo").to_numpy()
                pairs = np.empty(len(hi), UID_DTYPE)
                pairs["f0"], pairs["f1"] = hi, lo
                uids.write(pairs.tobytes())
                duplicates.add(hi, lo)
                yield _kept_table(batch, hi, lo, shards, schema)

        write_parquet(out / KEPT_FILE, schema, tables(), ["shard"])
    return duplicates.count


def _row_groups(batches: Iterable[pa.RecordBatch], rows: int) -> Iterator[pa.RecordBatch]:
    """The rows of ``batches`` re-cut into batches of exactly ``rows`` (the last shorter)."""
    held: list[pa.RecordBatch] = []
    size = 0
    for batch in batches:
        held.append(batch)
        size += batch.num_rows
        while size >= rows:
            whole, held = pa.concat_batches(held), []  # the pieces are freed before the yield
            held, size = [whole.slice(rows)], size - rows
            yield whole.slice(0, rows)
            del whole
    if size:
        whole, held = pa.concat_batches(held), []
        yield whole


def _kept_table(batch: pa.RecordBatch, hi: np.ndarray, lo: np.ndarray, shards: pa.Array,
                schema: pa.Schema) -> pa.Table:
    return pa.table({"uid": u8u8_to_uids(hi, lo), "key": batch.column("key"),
                     "shard": shards.take(batch.column("file")), "index": batch.column("index"),
                     "score": batch.column("score"), "rank": batch.column("rank")}, schema=schema)


@dataclass
class _Duplicates:
    """Counts uids equal to the one before them, over a stream of sorted batches."""

    count: int = 0
    last: tuple[int, int] | None = None

    def add(self, hi: np.ndarray, lo: np.ndarray) -> None:
        if not len(hi):
            return
        self.count += int(((hi[1:] == hi[:-1]) & (lo[1:] == lo[:-1])).sum())
        self.count += int(self.last == (int(hi[0]), int(lo[0])))
        self.last = (int(hi[-1]), int(lo[-1]))
