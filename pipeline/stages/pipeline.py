"""The whole run, stage after stage, under any executor (each stage resumable on its own).

``run_pipeline(..., stages=STAGES)`` runs every stage (``diffin run``); a stage's own job
runs just that stage and requires the outputs of the stages before it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from pipeline.config import RunConfig
from pipeline.data.shards import expand_shards, load_sizes
from pipeline.errors import UsageError
from pipeline.io.atomic import write_json_atomic
from pipeline.io.layout import RunLayout, check_unique_stems
from pipeline.io.storage import StoragePath, as_path
from pipeline.runtime.executor import Executor, Resources

log = logging.getLogger(__name__)
STAGES = ("trajectory", "prepare", "score", "select", "reshard")
TARGET_LOSS_MIN_DROP = 0.05  # L_V must fall by at least this fraction, first to last checkpoint


def target_loss_warning(losses: Sequence[float], min_drop: float = TARGET_LOSS_MIN_DROP) -> str | None:
    """Why the scores may be meaningless, or None: the rule on the target loss per checkpoint.

    ``losses`` are L_V at the scored checkpoints in step order. Every score estimates the
    change of L_V at the last checkpoint, so it only means something when the trajectory
    reduces L_V. The rule: the last checkpoint's L_V must be below ``(1 - min_drop)`` times
    the first's (default: at least 5 % lower). A flat, rising or non-finite L_V gives the
    warning text; fewer than two checkpoints compare nothing (None). Dips between the first
    and the last checkpoint are not judged.
    """
    if len(losses) < 2:
        return None
    first, last = float(losses[0]), float(losses[-1])
    shown = ", ".join(f"{x:.4g}" for x in losses)
    if math.isfinite(first) and math.isfinite(last) and last < (1.0 - min_drop) * first:
        return None
    return (f"the target loss L_V does not fall over the trajectory (per checkpoint: {shown}; the last "
            f"is not {min_drop:.0%} below the first): the scores measure influence on a loss that "
            f"training does not reduce (the proxy model overfits or has not started learning). "
            f"Train longer or with a lower learning rate, or choose checkpoints where L_V still falls "
            f"(trajectory.train.save_steps, score.checkpoints).")


def prepared_target_losses(config: RunConfig, run_dir: StoragePath, trajectory) -> dict[int, float]:
    """L_V per trajectory checkpoint index, from ``<run>/prepared/ckpt_XXX.pt`` (written by the
    prepare stage); checkpoints not prepared (yet, or under another configuration) are absent."""
    import torch

    from pipeline.io.storage import is_remote, read_torch
    from pipeline.stages.prepare import influence_settings, prepare_fingerprint

    settings = influence_settings(config)
    indices = settings.checkpoints or tuple(range(len(trajectory.checkpoints)))
    fingerprint = prepare_fingerprint(config, trajectory)
    losses: dict[int, float] = {}
    for k, index in enumerate(indices):
        path = RunLayout(run_dir).prepared_checkpoint(k)
        if not path.is_file():
            continue
        # memory-mapped when local: only the scalar is read, not u, g, w
        obj = read_torch(path) if is_remote(path) else torch.load(path, map_location="cpu",
                                                                   weights_only=True, mmap=True)
        if obj.get("fingerprint") == fingerprint and obj.get("target_loss") is not None:
            losses[index] = float(obj["target_loss"])
    return losses


def _selection_fingerprint(config: RunConfig, score_files: Sequence[Path]) -> str:
    """Inputs of the reducer: the select settings and each score file's identity."""
    from pipeline.io.scores import read_fingerprint

    files = [(p.name, read_fingerprint(p), p.stat().st_size) for p in score_files]
    settings = config.select.model_dump(mode="json", exclude={"max_rows_in_memory"})  # no effect on outputs
    payload = json.dumps({"select": settings, "files": files}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def run_select(config: RunConfig, run_dir: StoragePath, urls: list[str],
               executor: Executor | None = None) -> dict[str, Any]:
    """The reducer over all score files (in input-shard order) → ``<run>/selection/``; its
    per-file tasks run on ``executor`` (default: in this process).

    Skipped when ``selection/done.json`` records the same inputs (completion marker).
    """
    from pipeline.stages.select import SUMMARY_FILE, select

    if config.select is None:
        raise UsageError("select: this run's config has no select section")
    layout = RunLayout(run_dir)
    files = [layout.score_file(u) for u in urls]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise UsageError(f"select: {len(missing)} shard(s) not scored yet, e.g. {missing[0]}; "
                         "run `diffin score` (or `diffin run`: every stage) with this config and run dir first")
    out = layout.selection
    fingerprint = _selection_fingerprint(config, files)
    marker = out / "done.json"
    if marker.is_file() and json.loads(marker.read_text()).get("fingerprint") == fingerprint:
        log.info("selection in %s is complete for these scores; reusing it", out)
        summary = json.loads((out / SUMMARY_FILE).read_text())
        recomputed = False
    else:
        summary = select(files, config.select, out, executor=executor,
                         resources=Resources(num_cpus=min(config.resources.num_cpus, 1.0), num_gpus=0))
        write_json_atomic(marker, {"fingerprint": fingerprint})
        recomputed = True
    return {"dir": str(out), **summary["counts"], "summary": str(out / SUMMARY_FILE), "recomputed": recomputed}


def run_reshard(config: RunConfig, run_dir: StoragePath, executor: Executor) -> dict[str, int]:
    """Copy the kept pairs into new shards (``<run>/shards/``), one task per output shard."""
    from pipeline.stages.reshard import reshard
    from pipeline.stages.select import MANIFEST_FILE

    if config.reshard is None:
        raise UsageError("reshard: this run's config has no reshard section")
    layout = RunLayout(run_dir)
    manifest = layout.selection / MANIFEST_FILE
    if not manifest.is_file():
        raise UsageError(f"reshard: {manifest} not found; "
                         "run `diffin select` (or `diffin run`) with this config and run dir first")
    resources = Resources(num_cpus=min(config.resources.num_cpus, 1.0), num_gpus=0)
    # The run's own shards follow its own selection: when a rerun changed the selection (a shard
    # that was unreadable now scored), the old output is replaced, never mixed.
    return reshard(manifest, layout.shards, config.reshard, executor, resources, config.storage,
                   replace_stale=True)


def _existing_trajectory(config: RunConfig, run_dir: StoragePath):
    from pipeline.stages.trajectory import load_trajectory

    path = as_path(config.trajectory.path, config.storage) if config.trajectory.path else RunLayout(run_dir).trajectory
    if not (path / "trajectory.json").is_file() and not path.name == "trajectory.json":
        raise UsageError(f"no trajectory at {path}; run `diffin run` with this config and run dir (it trains "
                         "the proxy trajectory first), or name an existing one in trajectory.path")
    return load_trajectory(path, config.storage)


def _record_target_loss(summary: dict[str, Any], losses: dict[int, float], warn: bool) -> None:
    """Put L_V into the summary's checkpoint entries (None where not prepared) and the rule's
    verdict into ``target_loss_warning``; log the warning when ``warn``."""
    if not losses:
        return
    for index, entry in enumerate(summary["checkpoints"]):
        entry["target_loss"] = losses.get(index)
    warning = target_loss_warning([losses[i] for i in sorted(losses)])
    summary["target_loss_warning"] = warning
    if warning and warn:
        log.warning("%s", warning)


@dataclass(frozen=True)
class RunInputs:
    """The input shards of a run, resolved once: URLs (in order) and sizes.json counts."""

    urls: list[str]
    sizes: dict[str, int] | None


def resolve_inputs(config: RunConfig, source: str = "config") -> RunInputs:
    """Expand ``data.shards`` and read ``data.sizes``; refuse shards whose score files would
    collide; check the proxy-training model. Cheap, touches no Ray: jobs call it before
    starting an executor."""
    from pipeline.stages.trajectory import check_train_model

    check_train_model(config, source)
    urls = expand_shards(config.data.shards)
    check_unique_stems(urls)
    return RunInputs(urls, load_sizes(config.data.sizes, config.storage) if config.data.sizes else None)


def run_pipeline(config: RunConfig, run_dir: str | Path, executor: Executor,
                 progress: bool = True, stages: Sequence[str] = STAGES,
                 inputs: RunInputs | None = None) -> dict[str, Any]:
    """Run ``stages`` (in pipeline order) into ``run_dir``; returns (and writes) the summary.

    Stages whose config section is absent are skipped when running everything; asking for
    such a stage explicitly is a usage error. ``inputs`` (from :func:`resolve_inputs`) is
    resolved here when not given.
    """
    from pipeline.stages.prepare import prepare_fingerprint, run_prepare
    from pipeline.stages.score import run_score
    from pipeline.stages.trajectory import ensure_trajectory, trajectory_location

    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        raise UsageError(f"unknown stage(s) {unknown}; stages are {list(STAGES)}")
    everything = tuple(stages) == STAGES
    layout = RunLayout.of(run_dir, config.storage)
    run_dir = layout.root
    start = time.perf_counter()
    inputs = inputs or resolve_inputs(config)  # before anything is trained or scored
    urls, sizes = inputs.urls, inputs.sizes
    timings: dict[str, float] = {}

    def timed(name: str, fn, *args):
        t0 = time.perf_counter()
        result = fn(*args)
        timings[name] = round(time.perf_counter() - t0, 2)
        return result

    if "trajectory" in stages:
        trajectory = timed("trajectory", ensure_trajectory, config, run_dir, executor)
    else:
        trajectory = _existing_trajectory(config, run_dir)
    summary: dict[str, Any] = {
        "run_dir": str(run_dir), "stages": list(stages), "shards": len(urls),
        "pairs_in": sum(sizes.get(u.rsplit("/", 1)[-1], 0) for u in urls) if sizes else None,
        "trajectory": trajectory_location(trajectory) + "/trajectory.json",
        "checkpoints": [{"step": c.step, "lr": c.lr} for c in trajectory.checkpoints],
        "train_pairs": trajectory.num_samples,
    }
    scoring = config.target is not None or not everything
    if "prepare" in stages and scoring:
        timed("prepare", run_prepare, config, run_dir, trajectory, executor)
    if scoring and config.target is not None:
        _record_target_loss(summary, prepared_target_losses(config, run_dir, trajectory), warn="prepare" in stages)
    if "score" in stages and scoring:
        prepared = layout.prepared
        if not (prepared / "bank.pt").is_file():
            raise UsageError(f"no prepared vectors in {prepared}; "
                             "run `diffin prepare` (or `diffin run`) with this config and run dir first")
        results = timed("score", run_score, config, run_dir, trajectory, prepared,
                        prepare_fingerprint(config, trajectory), executor, urls, sizes, progress)
        failed: dict[str, int] = {}
        for r in results:
            for k, v in r.failed.items():
                failed[k] = failed.get(k, 0) + v
        summary.update(scores=str(layout.scores), shards_scored_now=len(results),
                       pairs_scored_now=sum(r.rows for r in results), failed_now=failed,
                       retried_shards=[{"shard": r.url, "retries": r.retries} for r in results if r.retries])
    if "select" in stages and (config.select is not None or not everything):
        summary["selection"] = timed("select", run_select, config, run_dir, urls, executor)
    if "reshard" in stages and (config.reshard is not None or not everything):
        sizes_out = timed("reshard", run_reshard, config, run_dir, executor)
        summary["reshard"] = {"dir": str(layout.shards), "shards": len(sizes_out),
                              "pairs": sum(sizes_out.values())}
    summary["seconds"] = round(time.perf_counter() - start, 1)
    summary["stage_seconds"] = timings
    write_json_atomic(layout.config, config.model_dump(mode="json"))
    write_json_atomic(layout.summary, summary)
    return summary
