"""The whole run, stage after stage, under any executor (each stage resumable on its own).

``run_pipeline(..., stages=STAGES)`` runs every stage (``diffin run``); a stage's own job
runs just that stage and requires the outputs of the stages before it. Each stage lives in
its own module with the same shape — a task type, a stage object (resources as fields,
``setup()``, ``process(task)``) and a driver-side ``run_<stage>(ctx, ...)`` (for the
trajectory: ``ensure_trajectory``) that plans the tasks still to do and hands them to the
executor; docs/ARCHITECTURE.md ("One stage shape") lists them.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from typing import Any, Sequence

from pipeline.config import RunConfig
from pipeline.errors import UsageError
from pipeline.io.atomic import write_json_atomic
from pipeline.io.layout import RunLayout
from pipeline.runtime.executor import Executor
from pipeline.stages.context import RunContext
from pipeline.stages.prepare import (prepare_fingerprint, prepared_target_losses, run_prepare, scored_checkpoints,
                                     selected_checkpoints)
from pipeline.stages.reshard import damaged_sources, run_reshard
from pipeline.stages.score import run_score
from pipeline.stages.select import run_named_select, run_select
from pipeline.stages.trajectory import ensure_trajectory, existing_trajectory, trajectory_location

log = logging.getLogger(__name__)
STAGES = ("trajectory", "prepare", "score", "select", "reshard")
SELECTIONS_KEY = "selections"  # run_summary.json: {NAME: {dir, kept, scored_ok, failed, recomputed, shards?}}
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
            f"(trajectory.train.save_steps, score.checkpoints, score.checkpoint_window: falling).")


def _record_target_loss(summary: dict[str, Any], losses: dict[int, float], warn: bool,
                        window: tuple[str, Sequence[int]] | None = None) -> None:
    """Put L_V into the summary's checkpoint entries (None where not prepared) and the rule's
    verdict into ``target_loss_warning``; log the warning when ``warn``.

    ``window``: (rule, scored trajectory indices) of a checkpoint window, recorded as
    ``checkpoint_window``; the verdict is then on the scored checkpoints' L_V only.
    """
    if not losses:
        return
    for index, entry in enumerate(summary["checkpoints"]):
        entry["target_loss"] = losses.get(index)
    judged = sorted(losses)
    if window is not None:
        rule, scored = window
        judged = [i for i in scored if i in losses]
        summary["checkpoint_window"] = {"rule": rule, "scored": list(scored),
                                        "steps": [summary["checkpoints"][i]["step"] for i in scored],
                                        "dropped": [i for i in sorted(losses) if i not in scored]}
    warning = target_loss_warning([losses[i] for i in judged])
    summary["target_loss_warning"] = warning
    if warning and warn:
        log.warning("%s", warning)


def check_selection_names(ctx: RunContext, names: Sequence[str], stage: str) -> list[str]:
    """The named selections ``names`` (``--only`` of select, ``--selection`` of reshard), checked
    before anything runs: valid names; for ``select`` each a ``selections:`` entry of the config,
    for ``reshard`` each selected already (``selections/NAME/done.json``) or an entry. UsageError
    in one line naming the unknown one and the known ones."""
    from pipeline.io.layout import check_selection_name

    configured = [entry.name for entry in ctx.config.selections]
    known = configured if stage == "select" else sorted(set(configured) | set(ctx.layout.selection_names()))
    for name in names:
        check_selection_name(name)
        if name not in known:
            where = "this config's selections:" if stage == "select" else "this config's selections: or the run dir"
            raise UsageError(f"{stage}: unknown selection {name!r}; {where} has "
                             f"{', '.join(known) if known else 'none'}")
    return list(dict.fromkeys(names))


def _run_select_stage(ctx: RunContext, executor: Executor, unnamed: bool,
                      names: Sequence[str]) -> tuple[dict[str, Any] | None, dict[str, dict[str, Any]]]:
    """The select stage: ``selection/`` when ``unnamed``, then each named selection in ``names``."""
    selection = run_select(ctx, executor) if unnamed else None
    return selection, {name: run_named_select(ctx, name, executor) for name in names}


def _reshard_entry(ctx: RunContext, sizes: dict[str, int], name: str | None) -> dict[str, Any]:
    """The run summary's record of a reshard (``reshard``, or a named selection's ``shards``)."""
    entry = {"dir": str(ctx.layout.shards_dir(name)), "shards": len(sizes), "pairs": sum(sizes.values()),
             "damaged_sources": damaged_sources(ctx, name)}
    for source in entry["damaged_sources"]:
        log.warning("reshard: %d kept pair(s) copied from damaged input shard %s (%s: %s)",
                    source["kept"], source["shard"], source["status"], source["error"])
    return entry


def _run_reshard_stage(ctx: RunContext, executor: Executor, unnamed: bool,
                       names: Sequence[str]) -> tuple[dict[str, Any] | None, dict[str, dict[str, Any]]]:
    """The reshard stage: ``shards/`` when ``unnamed``, then the shards of each named selection."""
    unnamed_entry = _reshard_entry(ctx, run_reshard(ctx, executor), None) if unnamed else None
    return unnamed_entry, {name: _reshard_entry(ctx, run_reshard(ctx, executor, name), name) for name in names}


def run_pipeline(config: RunConfig, run_dir: str | os.PathLike, executor: Executor,
                 progress: bool = True, stages: Sequence[str] = STAGES,
                 context: RunContext | None = None, selections: Sequence[str] | None = None) -> dict[str, Any]:
    """Run ``stages`` (in pipeline order) into ``run_dir``; returns (and writes) the summary.

    Stages whose config section is absent are skipped when running everything; asking for
    such a stage explicitly is a usage error. ``context`` (:meth:`RunContext.resolve` of
    ``config`` and ``run_dir``: jobs resolve it before starting an executor) is resolved here
    when not given.

    Named selections: select writes ``selection/`` (the ``select:`` section) and every
    ``selections:`` entry; reshard writes ``shards/`` (the ``reshard:`` section) and the shards
    of every entry with ``reshard: true``. ``selections`` (names) restricts both stages to those
    named selections, without ``selection/`` (``diffin select --only``, ``diffin reshard
    --selection``: then reshard takes any selection present, whatever its ``reshard`` flag).
    """
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        raise UsageError(f"unknown stage(s) {unknown}; stages are {list(STAGES)}")
    everything = tuple(stages) == STAGES
    ctx = context or RunContext.resolve(config, run_dir)  # before anything is trained or scored
    config, layout = ctx.config, ctx.layout
    chosen = None
    if selections is not None:
        chosen = check_selection_names(ctx, selections, "reshard" if tuple(stages) == ("reshard",) else "select")
    named_select = chosen if chosen is not None else [entry.name for entry in config.selections]
    named_reshard = chosen if chosen is not None else [entry.name for entry in config.selections if entry.reshard]
    start = time.perf_counter()
    timings: dict[str, float] = {}

    def timed(name: str, fn, *args):
        t0 = time.perf_counter()
        result = fn(*args)
        timings[name] = round(time.perf_counter() - t0, 2)
        return result

    if "trajectory" in stages:
        trajectory = timed("trajectory", ensure_trajectory, ctx, executor)
    else:
        trajectory = existing_trajectory(ctx)
    summary: dict[str, Any] = {
        "run_dir": str(layout.root), "stages": list(stages), "shards": len(ctx.urls),
        "pairs_in": ctx.pairs_in,
        "trajectory": trajectory_location(trajectory) + "/trajectory.json",
        "checkpoints": [{"step": c.step, "lr": c.lr} for c in trajectory.checkpoints],
        "train_pairs": trajectory.num_samples,
    }
    scoring = config.target is not None or not everything
    if "prepare" in stages and scoring:
        timed("prepare", run_prepare, ctx, trajectory, executor)
    if scoring and config.target is not None:
        losses = prepared_target_losses(ctx, trajectory)
        window = None
        if config.score.checkpoint_window != "all" and \
                set(selected_checkpoints(ctx.influence_settings(), trajectory)) <= set(losses):
            window = (config.score.checkpoint_window, scored_checkpoints(ctx, trajectory, losses))
        _record_target_loss(summary, losses, warn="prepare" in stages, window=window)
    if "score" in stages and scoring:
        results = timed("score", run_score, ctx, trajectory, prepare_fingerprint(config, trajectory),
                        executor, progress)
        failed: dict[str, int] = {}
        for r in results:
            for k, v in r.failed.items():
                failed[k] = failed.get(k, 0) + v
        summary.update(scores=str(layout.scores), shards_scored_now=len(results),
                       pairs_scored_now=sum(r.rows for r in results), failed_now=failed,
                       retried_shards=[{"shard": r.url, "retries": r.retries} for r in results if r.retries])
    drop: list[str | tuple[str, ...]] = []  # summary keys of outputs this job removed
    named: dict[str, dict[str, Any]] = {}
    if "select" in stages:
        # selection/ runs when the config has a select: section, or when this job asks for the
        # stage and names nothing else to select (then run_select says what is missing)
        unnamed = chosen is None and (config.select is not None or (not everything and not config.selections))
        if unnamed or named_select:
            selection, named = timed("select", _run_select_stage, ctx, executor, unnamed, named_select)
            if selection is not None:
                summary["selection"] = selection
                if selection["recomputed"] and not layout.shards.exists():
                    drop.append("reshard")  # its shards were made from the selection replaced
            for name, result in named.items():
                if result["recomputed"] and not layout.shards_dir(name).exists():
                    drop.append((SELECTIONS_KEY, name, "shards"))
    if "reshard" in stages:
        unnamed = chosen is None and (config.reshard is not None or (not everything and not named_reshard))
        if unnamed or named_reshard:
            shards, named_shards = timed("reshard", _run_reshard_stage, ctx, executor, unnamed, named_reshard)
            if shards is not None:
                summary["reshard"] = shards
            for name, entry in named_shards.items():
                named.setdefault(name, {})["shards"] = entry
    if named:
        summary[SELECTIONS_KEY] = named
    summary["seconds"] = round(time.perf_counter() - start, 1)
    summary["stage_seconds"] = timings
    write_json_atomic(layout.config, config.model_dump(mode="json"))
    return update_run_summary(layout, summary, drop)


def _without(summary: dict[str, Any], path: tuple[str, ...]) -> dict[str, Any]:
    """``summary`` without the nested key at ``path`` (a copy where it changes)."""
    if not path or not isinstance(summary, dict) or path[0] not in summary:
        return summary
    if len(path) == 1:
        return {k: v for k, v in summary.items() if k != path[0]}
    return {**summary, path[0]: _without(summary[path[0]], path[1:])}


def merge_summaries(previous: dict[str, Any], current: dict[str, Any],
                    drop: Sequence[str | tuple[str, ...]] = ()) -> dict[str, Any]:
    """``run_summary.json`` after a job: every key an earlier job wrote stays unless this job
    wrote it again (a stage job keeps the other stages' keys: ``diffin select`` after
    ``diffin run`` still shows the score stage's); ``stages`` and ``seconds`` are this job's,
    ``stage_seconds`` and ``stages_run`` (every stage that ever ran here, in pipeline order)
    accumulate; ``selections`` merges per name (each name's entry key by key); ``drop`` names
    keys whose outputs this job invalidated (a key, or a path of keys: ``("selections", NAME,
    "shards")``)."""
    for key in drop:
        previous = _without(previous, (key,) if isinstance(key, str) else tuple(key))
    merged = dict(previous)
    merged.update(current)
    if SELECTIONS_KEY in current:
        earlier = previous.get(SELECTIONS_KEY) or {}
        merged[SELECTIONS_KEY] = {**earlier, **{name: {**earlier.get(name, {}), **entry}
                                                for name, entry in current[SELECTIONS_KEY].items()}}
    merged["stage_seconds"] = {**previous.get("stage_seconds", {}), **current.get("stage_seconds", {})}
    ran = set(previous.get("stages_run", previous.get("stages", []))) | set(current.get("stages", []))
    merged["stages_run"] = [s for s in STAGES if s in ran]
    return merged


def update_run_summary(layout: RunLayout, current: dict[str, Any],
                       drop: Sequence[str | tuple[str, ...]] = ()) -> dict[str, Any]:
    """Merge ``current`` into the run's ``run_summary.json`` (:func:`merge_summaries`) and write
    it atomically; returns the merged summary."""
    previous: dict[str, Any] = {}
    if layout.summary.is_file():
        try:
            previous = json.loads(layout.summary.read_text())
        except json.JSONDecodeError:
            log.warning("%s is not valid JSON; starting a new summary", layout.summary)
    merged = merge_summaries(previous, current, drop)
    write_json_atomic(layout.summary, merged)
    return merged
