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
    - ``drop_fill`` (the default rule, with the default recipe: :class:`SelectConfig`): drop
      as many rows as ``drop_share_from`` scores below 0, the lowest by ``drop_column``
      (default), or the rows whose ``drop_column`` is below ``drop_below`` (0.0 as applied on
      an influence estimate), or the bottom ``drop_fraction`` of them, then fill
      the budget (a fraction or k of all eligible rows) from the rest by ``fill``: the
      seeded order (``random``), best ``column`` first (``score``), or per-cluster quotas
      from the score files' ``cluster`` column, each cluster in the seeded order
      (``cluster``). Too few rest rows: all are kept, then the dropped rows, highest
      ``drop_column`` first. ``rank`` is the order of keeping. The summary's ``drop_fill``:
      drop_column, drop_threshold (every row not dropped is at or above it), eligible,
      dropped, budget, fill, filled_from_dropped, with ``drop_share_from`` that column and its
      below_zero count, and, for ``fill: cluster``, per cluster
      (null first) its eligible, not_dropped, quota and kept counts.

Outputs in ``out_dir``: ``kept.parquet``, ``kept_uids.npy``, ``manifest.parquet``,
``summary.json`` (written last) and the completion marker ``done.json`` — each written
atomically, byte-identical for identical inputs (:mod:`.files` owns them: names, schemas,
writers, the summary).

Two strategies, byte-identical outputs (``select(..., strategy=)``)
    ``bounded`` (default without ``stratify_by``; every rule but ``chain``, ``drop_fill``
    included): :mod:`.bounded` — per-file tasks on the executor, a search for the cuts over
    histograms, k-way merges of per-file parts; its memory does not grow with the row count
    (``select.max_rows_in_memory`` bounds what it sorts at once). ``memory`` (always with
    ``stratify_by`` and the rule ``chain``, which the bounded reducer refuses; any rule on
    request): :mod:`.memory`, every eligible row in this process.

The package, one job a module (no module imports another's private names)
    ``__init__`` (this module): the stage — :func:`select` picks the strategy,
    :func:`run_select` runs it on a run's score files behind the completion marker (into
    ``selection/``; :func:`run_named_select`: a ``selections:`` entry into ``selections/NAME/``).
    :mod:`.files`: the selection files' contract. :mod:`.scan`: reading and checking score
    files (pass 1, the kept rows' keys). :mod:`.memory` and :mod:`.bounded`: the reducers.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from typing import Any, Literal, Sequence

from pipeline.config import SelectConfig
from pipeline.errors import UsageError
from pipeline.io.atomic import write_json_atomic
from pipeline.io.scores import read_fingerprint
from pipeline.io.storage import StoragePath, as_path
from pipeline.runtime.executor import Executor, LocalExecutor, Resources
from pipeline.stages.context import RunContext
from pipeline.stages.derived import remove_stale_shards, selection_done
from pipeline.stages.select import files
from pipeline.stages.select.bounded import select_bounded
from pipeline.stages.select.files import (DONE_FILE, KEPT_FILE, KEPT_UIDS_FILE, MANIFEST_FILE, MANIFEST_SCHEMA,
                                          META_SELECT, QUANTILES, SUMMARY_FILE, UID_DTYPE, kept_schema,
                                          quantile_dict, shard_summary)
from pipeline.stages.select.memory import select_in_memory

__all__ = ["DONE_FILE", "KEPT_FILE", "KEPT_UIDS_FILE", "MANIFEST_FILE", "MANIFEST_SCHEMA", "META_SELECT", "QUANTILES",
           "SUMMARY_FILE", "UID_DTYPE", "SelectConfig", "kept_schema", "quantile_dict", "run_named_select", "run_select",
           "select", "select_into", "selection_fingerprint", "shard_summary"]

log = logging.getLogger(__name__)


def select(score_files: Sequence[str | os.PathLike], cfg: SelectConfig, out_dir: str | os.PathLike,
           executor: Executor | None = None, resources: Resources | None = None,
           strategy: Literal["auto", "bounded", "memory"] = "auto") -> dict[str, Any]:
    """Select the pairs to keep from per-shard score files; write ``out_dir``'s outputs.

    ``score_files`` are the run's score files in input-shard order (that order is the
    manifest's): local paths or remote path objects from :func:`pipeline.io.storage.as_path`.
    ``strategy``: ``bounded`` (:mod:`.bounded`: memory independent of the row
    count, per-file work as ``executor`` tasks with ``resources``; no ``stratify_by``, no
    ``chain``), ``memory`` (every eligible row in this process), ``auto`` (bounded unless
    stratified or the rule is ``chain``).
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
        return select_in_memory(paths, cfg, out_dir)
    return select_bounded(paths, cfg, as_path(out_dir), executor or LocalExecutor(),
                          resources or Resources(num_cpus=1.0), files.WRITE_BATCH_ROWS)


def selection_fingerprint(cfg: SelectConfig, score_files: Sequence[StoragePath]) -> str:
    """Inputs of the reducer: the select settings and each score file's identity."""
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
    return select_into(ctx, cfg, None, executor)


def run_named_select(ctx: RunContext, name: str, executor: Executor | None = None) -> dict[str, Any]:
    """The ``selections:`` entry ``name`` → ``<run>/selections/NAME/``, as :func:`run_select`."""
    entry = ctx.config.selection_entry(name)
    if entry is None:
        raise UsageError(f"select: no selections: entry named {name!r} in this run's config")
    return select_into(ctx, entry.resolve(ctx.config.select), name, executor)


def select_into(ctx: RunContext, cfg: SelectConfig, name: str | None,
                executor: Executor | None = None) -> dict[str, Any]:
    """Select with ``cfg`` into ``layout.selection_dir(name)`` behind its completion marker.

    When the selection is recomputed, the shards derived from the one it replaces (a different
    fingerprint) are removed first (:func:`pipeline.stages.derived.remove_stale_shards`), and the
    old marker is removed before the new files are written: an interrupted rewrite is never
    taken for a complete selection."""
    files = [ctx.layout.score_file(u) for u in ctx.urls]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise UsageError(f"select: {len(missing)} shard(s) not scored yet, e.g. {missing[0]}; "
                         "run `diffin score` (or `diffin run`: every stage) with this config and run dir first")
    out = ctx.layout.selection_dir(name)
    fingerprint = selection_fingerprint(cfg, files)
    marker = out / DONE_FILE
    if selection_done(ctx.layout, name) == fingerprint:
        log.info("selection in %s is complete for these scores; reusing it", out)
        summary = json.loads((out / SUMMARY_FILE).read_text())
        recomputed = False
    else:
        remove_stale_shards(ctx.layout, name, fingerprint)
        if marker.exists():
            marker.unlink()
        summary = select(files, cfg, out, executor=executor, resources=ctx.io_resources)
        write_json_atomic(marker, {"fingerprint": fingerprint})
        recomputed = True
    return {"dir": str(out), **summary["counts"], "summary": str(out / SUMMARY_FILE), "recomputed": recomputed}
