"""The whole run, stage after stage, under any executor (each stage resumable on its own)."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from pipeline.config import RunConfig
from pipeline.data.shards import expand_shards, load_sizes
from pipeline.errors import UsageError
from pipeline.io.atomic import write_json_atomic
from pipeline.runtime.executor import Executor

log = logging.getLogger(__name__)


def run_select(config: RunConfig, run_dir: Path, urls: list[str]) -> dict[str, Any]:
    """The reducer over all score files (in input-shard order) → ``<run>/selection/``."""
    from pipeline.io.scores import score_path
    from pipeline.stages.select import select

    summary = select([score_path(run_dir, u) for u in urls], config.select, run_dir / "selection")
    return {"dir": str(run_dir / "selection"), **summary["counts"],
            "summary": str(run_dir / "selection" / "summary.json")}


def run_reshard(config: RunConfig, run_dir: Path, executor: Executor) -> dict[str, int]:
    """Copy the kept pairs into new shards (``<run>/shards/``), one task per output shard."""
    from pipeline.runtime.executor import Resources
    from pipeline.stages.reshard import reshard

    resources = Resources(num_cpus=min(config.resources.num_cpus, 1.0), num_gpus=0)
    return reshard(run_dir / "selection" / "manifest.parquet", run_dir / "shards", config.reshard,
                   executor, resources)


def run_pipeline(config: RunConfig, run_dir: str | Path, executor: Executor,
                 progress: bool = True) -> dict[str, Any]:
    """trajectory → prepare → score → select → reshard (each when configured); returns the summary."""
    from pipeline.stages.prepare import prepare_fingerprint, run_prepare
    from pipeline.stages.score import run_score
    from pipeline.stages.trajectory import ensure_trajectory

    run_dir = Path(run_dir)
    start = time.perf_counter()
    urls = expand_shards(config.data.shards)
    sizes = load_sizes(config.data.sizes) if config.data.sizes else None
    timings: dict[str, float] = {}

    def timed(name: str, fn, *args):
        t0 = time.perf_counter()
        result = fn(*args)
        timings[name] = round(time.perf_counter() - t0, 2)
        return result

    trajectory = timed("trajectory", ensure_trajectory, config, run_dir, executor)
    summary: dict[str, Any] = {
        "run_dir": str(run_dir), "shards": len(urls),
        "pairs_in": sum(sizes.get(u.rsplit("/", 1)[-1], 0) for u in urls) if sizes else None,
        "trajectory": str(Path(trajectory.root) / "trajectory.json"),
        "checkpoints": [{"step": c.step, "lr": c.lr} for c in trajectory.checkpoints],
        "train_pairs": trajectory.num_samples,
    }
    if config.target is not None:
        prepared = timed("prepare", run_prepare, config, run_dir, trajectory, executor)
        results = timed("score", run_score, config, run_dir, trajectory, prepared,
                        prepare_fingerprint(config, trajectory), executor, progress)
        failed: dict[str, int] = {}
        for r in results:
            for k, v in r.failed.items():
                failed[k] = failed.get(k, 0) + v
        summary.update(scores=str(run_dir / "scores"), shards_scored_now=len(results),
                       pairs_scored_now=sum(r.rows for r in results), failed_now=failed)
        if config.select is not None:
            summary["selection"] = timed("select", run_select, config, run_dir, urls)
        if config.reshard is not None:
            if config.select is None:
                raise UsageError("reshard: needs a select section (what to keep)")
            sizes_out = timed("reshard", run_reshard, config, run_dir, executor)
            summary["reshard"] = {"dir": str(run_dir / "shards"), "shards": len(sizes_out),
                                  "pairs": sum(sizes_out.values())}
    summary["seconds"] = round(time.perf_counter() - start, 1)
    summary["stage_seconds"] = timings
    run_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(run_dir / "run_summary.json", summary)
    return summary
