"""The score stage (DESIGN §3.2, §4): an actor pool over input shards → one Parquet per shard.

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
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline import __version__
from pipeline.config import RunConfig
from pipeline.data.pairs import parse_sample
from pipeline.data.shards import expected_count, iter_raw_samples
from pipeline.data.uids import make_uid
from pipeline.errors import DataError, UsageError
from pipeline.io.scores import SCHEMA, read_fingerprint, score_path, write_scores
from pipeline.runtime.executor import Executor, Resources

log = logging.getLogger(__name__)
COMPONENTS = ("a", "b", "c")


def score_fingerprint(prepare_fp: str, config: RunConfig) -> str:
    """Configuration fingerprint of score files: prepared vectors + scoring settings."""
    score = config.score.model_dump(mode="json")
    for key in ("batch_size", "device"):  # do not change what is computed
        score.pop(key)
    payload = json.dumps({"prepare": prepare_fp, "score": score}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class ShardTask:
    """One input shard to score."""

    url: str
    expected: int | None = None


@dataclass
class ShardResult:
    """What scoring one shard produced."""

    url: str
    path: str
    rows: int
    ok: int
    failed: dict[str, int]
    seconds: float


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

    def setup(self) -> None:
        from pipeline.model.scorer import TrajectoryInfluence
        from pipeline.model.trajectory import Trajectory
        from pipeline.stages.prepare import load_prepared_dir

        if self.threads:
            torch.set_num_threads(self.threads)
        self.influence = TrajectoryInfluence(Trajectory.load(self.trajectory_dir), self.settings, self.device)
        prepared, _ = load_prepared_dir(self.prepared_dir, len(self.influence.params))
        self.influence.load_prepared(prepared)

    def process(self, task: ShardTask) -> ShardResult:
        start = time.perf_counter()
        rows = [self._row(sample, task.url) for sample in iter_raw_samples(task.url)]
        if task.expected is not None and len(rows) != task.expected:
            raise DataError(f"shard {task.url} holds {len(rows)} samples but sizes.json says {task.expected}")
        self._score_rows(rows)
        columns = self._columns(rows, task.url)
        path = score_path(self.run_dir, task.url)
        write_scores(path, columns, self.fingerprint, self.trajectory_fingerprint, __version__,
                     extra={f"json.{f}": values for f, values in self._extra(rows).items()})
        failed: dict[str, int] = {}
        for row in rows:
            if row["status"] != "ok":
                failed[row["status"]] = failed.get(row["status"], 0) + 1
        return ShardResult(task.url, str(path), len(rows), len(rows) - sum(failed.values()), failed,
                           time.perf_counter() - start)

    def _row(self, sample: dict, url: str) -> dict:
        """A row's identity (json uid, else a stable hash of shard URL and key) and decoded pair."""
        parsed = parse_sample(sample, self.influence.image_size)
        return {"uid": parsed.json_uid or make_uid(url, parsed.key), "key": parsed.key, "meta": parsed.meta,
                "status": parsed.status, "error": parsed.error,
                "decoded": (parsed.image, parsed.caption) if parsed.status == "ok" else None}

    def _score_rows(self, rows: list[dict]) -> None:
        """Score the decodable rows in batches; a row with any non-finite value becomes ``non_finite``."""
        full = "b" in self.settings.components  # diffin; otherwise tracin only (b, c, diffin* null)
        score_names = ("diffin", "diffin_eq9", "tracin", "clip_score") if full else ("tracin", "clip_score")
        comp_names = COMPONENTS if full else ("a",)
        ok = [r for r in rows if r["status"] == "ok"]
        size = self.settings.batch_size
        for lo in range(0, len(ok), size):
            batch = ok[lo:lo + size]
            images = torch.from_numpy(np.stack([r["decoded"][0] for r in batch])).permute(0, 3, 1, 2)
            out = self.influence.score_inputs(*self.influence.inputs(images, [r["decoded"][1] for r in batch]))
            for j, row in enumerate(batch):
                row["scores"] = {k: float(out[k][j]) for k in score_names}
                row["components"] = {k: out[k][:, j].tolist() for k in comp_names}
                values = list(row["scores"].values()) + [x for k in comp_names for x in row["components"][k]]
                if not all(math.isfinite(v) for v in values):
                    row.update(status="non_finite", error="non-finite score", scores=None, components=None)
        for row in rows:
            row.pop("decoded", None)

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
            for name in ("diffin", "diffin_eq9", "tracin", "clip_score"):
                cols[name].append(scores.get(name) if scores else None)
            for name in COMPONENTS:
                cols[name].append(comps.get(name) if comps else None)
        return cols

    def _extra(self, rows: list[dict]) -> dict[str, list]:
        return {f: [None if r["meta"].get(f) is None else str(r["meta"].get(f)) for r in rows]
                for f in self.keep_json_fields}


def run_score(config: RunConfig, run_dir: str | Path, trajectory, prepared_dir: Path, prepare_fp: str,
              executor: Executor, progress: bool = True) -> list[ShardResult]:
    """Score every shard that has no score file of this configuration yet (resumable)."""
    from pipeline.data.shards import expand_shards, load_sizes
    from pipeline.stages.prepare import influence_settings, score_device, worker_threads
    from pipeline.runtime.progress import ShardProgress

    urls = expand_shards(config.data.shards)
    sizes = load_sizes(config.data.sizes) if config.data.sizes else None
    fingerprint = score_fingerprint(prepare_fp, config)
    todo, done = [], 0
    for url in urls:
        path = score_path(run_dir, url)
        if path.is_file():
            found = read_fingerprint(path)
            if found == fingerprint:
                done += 1
                continue
            raise UsageError(f"{path} was scored under another configuration ({found} != {fingerprint}); "
                             "use a new --run-dir or delete the scores")
        todo.append(ShardTask(url, expected_count(url, sizes)))
    log.info("score: %d shards, %d already done, %d to score", len(urls), done, len(todo))
    resources = Resources(config.resources.num_cpus, config.resources.num_gpus)
    stage = ScoreStage(str(trajectory.root), str(prepared_dir), influence_settings(config), score_device(config),
                       str(run_dir), fingerprint, trajectory.fingerprint(),
                       tuple(config.score.keep_json_fields), worker_threads(config), resources)
    total = sum(t.expected or 0 for t in todo) or None
    with ShardProgress(len(todo), total, enabled=progress) as bar:
        return executor.run_stage(stage, todo, config.resources.actors, on_result=bar.update)
