"""The score stage: an actor pool over input shards → one Parquet per shard.

Each worker loads the model, the m checkpoints and the prepared vectors once (``setup``),
then takes one shard at a time: streams it, decodes each image once, evaluates every
checkpoint on it and writes ``<run>/scores/<stem>.parquet`` atomically. Every sample gets a
row, in shard order; samples that cannot be scored carry their failure status.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import resource
import socket
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from pipeline import __version__
from pipeline.config import RunConfig
from pipeline.data.pairs import NO_UID_STATUSES, parse_sample
from pipeline.data.scan import ShardReader, ShardReport
from pipeline.data.shards import expected_count
from pipeline.data.uids import DEFAULT_UID_FROM, UID_SETTING, make_uid
from pipeline.errors import DataError, UsageError
from pipeline.influence.scores import COMPONENTS, SCORE_COLUMNS, columns_computed
from pipeline.io.atomic import remove_stale_temporaries, write_json_atomic
from pipeline.io.storage import StoragePath
from pipeline.io.layout import RunLayout
from pipeline.io.scores import (CLUSTER_COLUMN, META_CONFIG, META_SHARD, SCHEMA, read_file_metadata, read_shard_meta,
                                write_scores)
from pipeline.runtime.executor import Executor, Resources
from pipeline.stages.context import RunContext

log = logging.getLogger(__name__)


def score_fingerprint(prepare_fp: str, config: RunConfig) -> str:
    """Configuration fingerprint of score files: prepared vectors + scoring settings."""
    score = config.score.model_dump(mode="json")
    for key in ("batch_size", "device"):  # do not change what is computed
        score.pop(key)
    from pipeline.model.scorer import OPT_IN_DEFAULTS  # the model stack loads lazily, as in the workers

    for name, default in OPT_IN_DEFAULTS.items():  # opt-in: the fingerprints of earlier runs stay as they were
        if name in score and score[name] == default:  # (zero_shot is the target section's: in prepare_fp)
            score.pop(name)
    payload = json.dumps({"prepare": prepare_fp, "score": score, "uid_from": list(config.data.uid_from)},
                         sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class ShardTask:
    """One input shard to score."""

    url: str
    expected: int | None = None


@dataclass
class ShardResult:
    """What scoring one shard produced (also written to ``<run>/stats/<stem>.json``)."""

    url: str
    path: str
    rows: int
    ok: int
    failed: dict[str, int]
    seconds: float
    shard_status: str = "ok"
    shard_error: str | None = None
    expected: int | None = None
    missing: int = 0
    peak_rss_mb: float = 0.0
    pid: int = 0
    host: str = ""
    retries: int = 0  # earlier attempts whose worker died (set by the driver)

    def stats(self) -> dict[str, Any]:
        """The per-shard stats record."""
        return {"shard": self.url, "scores": self.path, "status": self.shard_status, "error": self.shard_error,
                "expected": self.expected, "rows": self.rows, "ok": self.ok, "failed": self.failed,
                "missing": self.missing, "retries": self.retries, "seconds": round(self.seconds, 3),
                "pairs_per_s": round(self.rows / self.seconds, 1) if self.seconds > 0 else None,
                "worker": {"pid": self.pid, "host": self.host, "peak_rss_mb": round(self.peak_rss_mb, 1)}}


@dataclass
class ScoreStage:
    """Scores shards; heavy state (model, checkpoints, prepared vectors) loaded in ``setup``."""

    trajectory_dir: str
    prepared_dir: str
    settings: Any  # InfluenceSettings
    device: str
    run_dir: str
    fingerprint: str
    trajectory_fingerprint: str
    keep_json_fields: tuple[str, ...] = ()
    threads: int | None = None
    resources: Resources = field(default_factory=Resources)
    uid_from: tuple[str, ...] = DEFAULT_UID_FROM
    storage: dict[str, dict[str, Any]] = field(default_factory=dict)

    def setup(self) -> None:
        from pipeline.model.scorer import TrajectoryInfluence
        from pipeline.stages.prepare import load_prepared_dir
        from pipeline.stages.trajectory import load_trajectory

        if self.threads:
            torch.set_num_threads(self.threads)
        trajectory = load_trajectory(self.trajectory_dir, self.storage)
        self.influence = TrajectoryInfluence(trajectory, self.settings, self.device)
        prepared, _ = load_prepared_dir(self.prepared_dir, len(self.influence.params), self.storage)
        self.influence.load_prepared(prepared)
        self._components = tuple(c for c in COMPONENTS if c in self.settings.computed_components)  # others null
        self._columns_written = columns_computed(self._components)

    def process(self, task: ShardTask) -> ShardResult:
        """Stream one shard, scoring decodable pairs batch by batch; commit its score file."""
        start = time.perf_counter()
        reader = ShardReader(task.url, task.expected, self.storage)
        rows: list[dict] = []
        batch: list[tuple[dict, np.ndarray, str]] = []
        for raw in reader:
            parsed = parse_sample(raw.key, raw.members, self.influence.image_size, uid_from=self.uid_from,
                                  problem=raw.problem, detail=raw.detail)
            # A failed row the uid rule gives no uid carries a placeholder of (shard, key): never kept.
            row = {"uid": parsed.uid or make_uid(task.url, parsed.key), "key": parsed.key,
                   "status": parsed.status, "error": parsed.error,
                   "extra": [_json_field(parsed.meta, f) for f in self.keep_json_fields]}
            rows.append(row)
            if parsed.status == "ok":
                batch.append((row, parsed.image, parsed.caption))
                if len(batch) == self.settings.batch_size:
                    self._score_batch(batch)
                    batch = []
        if batch:
            self._score_batch(batch)
        for index, (status, error) in sorted(reader.report.late.items()):
            rows[index].update(status=status, error=error, scores=None, components=None)
        return self._commit(task, rows, reader.report, time.perf_counter() - start)

    def _commit(self, task: ShardTask, rows: list[dict], report: ShardReport, seconds: float) -> ShardResult:
        """Write the per-shard stats, then the score file (its existence marks the shard done)."""
        failed: dict[str, int] = {}
        for row in rows:
            if row["status"] != "ok":
                failed[row["status"]] = failed.get(row["status"], 0) + 1
        layout = RunLayout.of(self.run_dir, self.storage)
        path = layout.score_file(task.url)
        result = ShardResult(task.url, str(path), len(rows), len(rows) - sum(failed.values()), dict(sorted(failed.items())),
                             seconds, report.status, report.error, report.expected, report.missing,
                             peak_rss_mb(), os.getpid(), socket.gethostname())
        write_json_atomic(layout.stats_file(task.url), result.stats())
        shard_meta = {**report.as_dict(), "rows": result.rows, "ok": result.ok, "failed": result.failed}
        write_scores(path, self._columns(rows, task.url), self.fingerprint, self.trajectory_fingerprint, __version__,
                     extra={f"json.{f}": [r["extra"][i] for r in rows] for i, f in enumerate(self.keep_json_fields)},
                     shard=shard_meta)
        return result

    def _score_batch(self, batch: list[tuple[dict, np.ndarray, str]]) -> None:
        """Score one batch of decoded pairs; a row with any non-finite value becomes ``non_finite``."""
        images = torch.from_numpy(np.stack([image for _, image, _ in batch])).permute(0, 3, 1, 2)
        out = self.influence.score_inputs(*self.influence.inputs(images, [caption for _, _, caption in batch]),
                                          uids=[row["uid"] for row, _, _ in batch])
        for j, (row, _, _) in enumerate(batch):
            row["scores"] = {k: float(out[k][j]) for k in self._columns_written}
            row[CLUSTER_COLUMN] = int(out[CLUSTER_COLUMN][j]) if CLUSTER_COLUMN in out else None
            row["components"] = {k: out[k][:, j].tolist() for k in self._components}
            values = list(row["scores"].values()) + [x for k in self._components for x in row["components"][k]]
            if not all(math.isfinite(v) for v in values):
                row.update(status="non_finite", error="non-finite score", scores=None, components=None)

    def _columns(self, rows: list[dict], url: str) -> dict[str, list]:
        cols: dict[str, list] = {f.name: [] for f in SCHEMA}
        for index, row in enumerate(rows):
            scores, comps = row.get("scores"), row.get("components")
            cols["uid"].append(row["uid"])
            cols["key"].append(row["key"])
            cols["shard"].append(url)
            cols["index"].append(index)
            cols["status"].append(row["status"])
            cols["error"].append(None if row["status"] == "ok" else row["error"])
            for name in SCORE_COLUMNS:
                cols[name].append(scores.get(name) if scores else None)
            cols[CLUSTER_COLUMN].append(row.get(CLUSTER_COLUMN) if scores else None)
            for name in COMPONENTS:
                cols[name].append(comps.get(name) if comps else None)
        return cols


def _json_field(meta: dict[str, Any], name: str) -> str | None:
    value = meta.get(name)
    return None if value is None else str(value)


def peak_rss_mb() -> float:
    """This process's peak resident set size so far, in MiB (Linux ``ru_maxrss`` is in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def plan_score(ctx: RunContext, fingerprint: str) -> tuple[list[ShardTask], int]:
    """The shards with no score file of this configuration yet, and how many are done. A shard
    recorded as ``unreadable`` is planned again; a score file of another configuration is
    refused with one line."""
    todo, done = [], 0
    for url in ctx.urls:
        path = ctx.layout.score_file(url)
        if path.is_file():
            meta = read_file_metadata(path) or {}  # one read: fingerprint and shard record
            found = (meta.get(META_CONFIG) or b"").decode() or None
            if found != fingerprint:
                raise UsageError(f"{path} was scored under another configuration ({found} != {fingerprint}); "
                                 "use a new --run-dir or delete the scores")
            if json.loads(meta.get(META_SHARD, b"{}")).get("status") != "unreadable":
                done += 1
                continue
        todo.append(ShardTask(url, expected_count(url, ctx.sizes)))
    return todo, done


def run_score(ctx: RunContext, trajectory, prepare_fp: str, executor: Executor,
              progress: bool = True) -> list[ShardResult]:
    """Score every input shard of ``ctx`` that has no score file of this configuration yet
    (resumable, :func:`plan_score`) on a pool of ``resources.actors`` workers, over the
    checkpoints of the checkpoint window (:func:`pipeline.stages.prepare.scoring_settings`).

    A shard whose worker died (its process or its node) is scored again by another worker; its
    result and its stats file record how many attempts were lost (``retries``). When the
    scoring is complete, the failed and missing pairs over all shards are checked against
    ``data.max_failed_fraction`` (:func:`check_failed_fraction`).
    """
    from pipeline.runtime.progress import ShardProgress
    from pipeline.stages.prepare import scoring_settings
    from pipeline.stages.trajectory import trajectory_location

    config, layout = ctx.config, ctx.layout
    if not layout.bank_file().is_file():
        raise UsageError(f"no prepared vectors in {layout.prepared}; "
                         "run `diffin prepare` (or `diffin run`) with this config and run dir first")
    fingerprint = score_fingerprint(prepare_fp, config)
    stale = sum(remove_stale_temporaries(d) for d in (layout.scores, layout.stats))
    if stale:
        log.info("score: removed %d temporary file(s) left by an interrupted run", stale)
    todo, done = plan_score(ctx, fingerprint)
    log.info("score: %d shards, %d already done, %d to score", len(ctx.urls), done, len(todo))
    stage = ScoreStage(trajectory_dir=trajectory_location(trajectory), prepared_dir=str(layout.prepared),
                       settings=scoring_settings(ctx, trajectory), device=ctx.device, run_dir=str(layout.root),
                       fingerprint=fingerprint, trajectory_fingerprint=trajectory.fingerprint(),
                       keep_json_fields=tuple(config.score.keep_json_fields), threads=ctx.threads,
                       resources=ctx.model_resources, uid_from=config.data.uid_from, storage=ctx.storage)
    total = sum(t.expected or 0 for t in todo) or None
    retries: dict[str, int] = {}

    def retried(task: ShardTask, error: BaseException) -> None:
        retries[task.url] = retries.get(task.url, 0) + 1

    with ShardProgress(len(todo), total, enabled=progress) as bar:
        def finished(task: ShardTask, result: ShardResult) -> None:
            if task.url in retries:  # the worker could not know: record it in its stats file
                result.retries = retries[task.url]
                write_json_atomic(layout.stats_file(task.url), result.stats())
            bar.update(task, result)

        results = executor.run_stage(stage, todo, config.resources.actors, on_result=finished, on_retry=retried)
    # Every task has returned: what is left was written by a worker that died mid-commit.
    stale = sum(remove_stale_temporaries(d) for d in (layout.scores, layout.stats))
    if stale:
        log.info("score: removed %d temporary file(s) left by worker(s) that died", stale)
    for result in results:
        if result.shard_status != "ok":
            log.warning("shard %s: %s (%s)", result.url, result.shard_status, result.shard_error)
    check_failed_fraction([layout.score_file(u) for u in ctx.urls], config.data.max_failed_fraction)
    return results


def failure_totals(score_files: list[StoragePath]) -> dict[str, Any]:
    """Pairs expected, read, ok, failed by reason and missing, summed over score files' shard records."""
    totals: dict[str, Any] = {"rows": 0, "ok": 0, "missing": 0, "failed": {}, "shards": {}}
    for path in score_files:
        meta = read_shard_meta(path) or {}
        totals["rows"] += meta.get("rows", 0)
        totals["ok"] += meta.get("ok", 0)
        totals["missing"] += meta.get("missing", 0)
        status = meta.get("status", "unknown")
        totals["shards"][status] = totals["shards"].get(status, 0) + 1
        for reason, n in (meta.get("failed") or {}).items():
            totals["failed"][reason] = totals["failed"].get(reason, 0) + n
    return totals


def check_failed_fraction(score_files: list[StoragePath], limit: float) -> dict[str, Any]:
    """Raise :class:`DataError` when failed + missing pairs exceed ``limit`` of all pairs."""
    totals = failure_totals(score_files)
    bad = sum(totals["failed"].values()) + totals["missing"]
    total = totals["rows"] + totals["missing"]
    if total and bad / total > limit:
        reasons = dict(sorted(totals["failed"].items()), **({"missing": totals["missing"]} if totals["missing"] else {}))
        no_uid = sum(totals["failed"].get(s, 0) for s in NO_UID_STATUSES)
        hint = (f"; {no_uid} pair(s) have no uid by {UID_SETTING}: add a source to it (json, url, image)"
                if no_uid else "")
        raise DataError(f"{bad} of {total} pairs ({bad / total:.1%}) failed or are missing, more than "
                        f"data.max_failed_fraction={limit}: {reasons}; shards by status {totals['shards']}{hint}; "
                        "the score files are kept (fix the data or raise the limit, then rerun)")
    return totals
