"""Scale benchmark (issue #5 item 6): a large synthetic run's throughput and memory, and the
reducer over millions of score rows.

``diffin bench scale`` does two measurements and merges them into one results JSON
(``benchmarks/results/scale.json``; entries are keyed by method and size, so several runs
accumulate):

Pipeline (``--parts pipeline``)
    A synthetic corpus of ``--pairs`` pairs at 32 px (shards of ``--shard-size``, with
    ``sizes.json``), a short proxy trajectory of the tiny model trained on a separate small
    synthetic corpus (2 checkpoints), and a separate synthetic target set — all built once
    into ``--work-dir`` and reused while their parameters match. Then the real pipeline
    (prepare → score → select) runs on an embedded local Ray with ``--actors`` scoring
    actors (one torch thread each). A sampler thread in the driver polls every
    ``--interval`` s: the actors' pids (``ray.util.state.list_actors``), their and the
    driver's ``VmRSS`` / ``VmHWM`` from ``/proc/<pid>/status``, the actors' CPU seconds
    (``/proc/<pid>/stat``), and the number of pairs scored so far (completed score files ×
    shard sizes). When scoring passes each of ``--checkpoint-pairs`` the running peaks are
    recorded, and again at the end — so one long run gives the peak RSS per role at, e.g.,
    10k and 100k pairs and at the final N. Pairs per actor CPU-second is reported beside
    pairs/s: on a shared machine it depends much less on what else runs. The peaks so far
    are also kept in ``<run>/scale_progress.json`` while the run goes.

Reducer (``--parts reducer``)
    ``--reducer-rows`` synthetic score rows in ``--reducer-files`` files written with the
    real score writer (seeded random scores, 0.1 % failed rows), once; then
    :func:`pipeline.stages.select.select` (top 30 % of ``tracin``) in a fresh Python
    process, reporting its wall time and ``VmHWM`` (and the ``VmHWM`` right after imports).
    ``--reducer-strategy`` picks the in-memory or the bounded reducer; with ``bounded``,
    ``--reducer-executor ray`` runs its per-file tasks on an embedded local Ray with the
    plan's ``ray_cpus`` CPUs (1 a task) and reports every Ray worker's ``VmHWM`` too.

Every measurement records the machine (CPU model, cores, memory) and the load average, since
the rates depend on what else runs on the machine.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from pipeline.errors import UsageError
from pipeline.influence.scores import METHOD_COMPONENTS, columns_computed
from pipeline.bench.sampler import MB, RssSampler, proc_memory, reset_peak
from pipeline.io.atomic import write_json_atomic
from pipeline.io.layout import RunLayout, shard_stem

log = logging.getLogger(__name__)

DEFAULT_OUT = "benchmarks/results/scale.json"
QUICK_OUT = "benchmarks/results/scale_quick.json"
DEFAULT_WORK = "runs/bench_scale"
TRAIN_SEED, TARGET_SEED, CORPUS_SEED = 1, 2, 0
PARTS = ("pipeline", "reducer")


@dataclass(frozen=True)
class ScalePlan:
    """Everything a scale measurement depends on."""

    pairs: int = 1_000_000
    checkpoint_pairs: tuple[int, ...] = (10_000, 100_000)
    shard_size: int = 10_000
    image_size: int = 32
    method: str = "unrolled"  # the default score: one JVP per checkpoint
    batch_size: int = 256
    bank_size: int = 63
    target_pairs: int = 256
    proxy_batch_size: int = 128
    train_pairs: int = 2048
    train_steps: int = 20
    train_batch_size: int = 64
    actors: int = 2
    actor_cpus: float = 1.0
    ray_cpus: float = 2.0
    fraction: float = 0.3
    reducer_rows: int = 10_000_000
    reducer_files: int = 1000
    reducer_strategy: str = "memory"  # memory | bounded
    reducer_executor: str = "local"   # local | ray (bounded only)
    interval: float = 0.5
    seed: int = 0


QUICK = ScalePlan(pairs=3000, checkpoint_pairs=(1000,), shard_size=500, batch_size=128, bank_size=15,
                  target_pairs=64, proxy_batch_size=32, train_pairs=256, train_steps=4,
                  train_batch_size=32, actor_cpus=0.5, ray_cpus=1.0, reducer_rows=200_000,
                  reducer_files=20)


# ------------------------------------------------------------------------------ inputs


def _corpus_details(pairs: int, image_size: int, shard_size: int, seed: int) -> dict[str, Any]:
    return {"num_pairs": pairs, "image_size": image_size, "noise": 0.0, "seed": seed,
            "num_noisy": 0, "shard_size": shard_size}


def ensure_corpus(directory: Path, pairs: int, image_size: int, shard_size: int,
                  seed: int) -> dict[str, Any]:
    """A synthetic corpus in ``directory``, built unless one with these parameters is there.

    Returns ``{"dir", "shards", "sizes", "pairs", "build_s"}`` (``build_s`` is None when reused).
    """
    from pipeline.data.corpora.common import CORPUS_FILE
    from pipeline.data.corpora.synthetic import build_synthetic

    wanted = _corpus_details(pairs, image_size, shard_size, seed)
    marker = directory / CORPUS_FILE
    build_s = None
    if not _corpus_matches(marker, wanted):
        start = time.perf_counter()
        info = build_synthetic(directory, num_pairs=pairs, image_size=image_size, seed=seed,
                               shard_size=shard_size, overwrite=True)
        build_s = round(time.perf_counter() - start, 1)
        write_json_atomic(directory / "scale_corpus.json", wanted)
        log.info("built %d synthetic pairs in %s (%.1f s)", info.num_pairs, directory, build_s)
    meta = json.loads(marker.read_text())
    return {"dir": str(directory), "shards": str(directory / meta["shards"].removeprefix("./")),
            "sizes": str(directory / "sizes.json"), "pairs": meta["num_pairs"], "build_s": build_s}


def _corpus_matches(marker: Path, wanted: dict[str, Any]) -> bool:
    stamp = marker.parent / "scale_corpus.json"
    return marker.is_file() and stamp.is_file() and json.loads(stamp.read_text()) == wanted


def _train_settings(plan: ScalePlan) -> dict[str, Any]:
    return {"model": "tiny-clip-32", "steps": plan.train_steps, "batch_size": plan.train_batch_size,
            "warmup": max(1, plan.train_steps // 10), "checkpoints": 2, "seed": plan.seed}


def ensure_trajectory(plan: ScalePlan, work: Path, executor) -> tuple[Path, float | None]:
    """The proxy trajectory (tiny model, 2 checkpoints, trained on a small separate corpus)."""
    from pipeline.config import parse_config
    from pipeline.model.trajectory import MANIFEST
    from pipeline.stages.context import RunContext
    from pipeline.stages.trajectory import ensure_trajectory as ensure

    train = ensure_corpus(work / f"train-{plan.train_pairs}-{plan.image_size}px", plan.train_pairs,
                          plan.image_size, plan.train_pairs, TRAIN_SEED)
    config = parse_config({"data": {"shards": train["shards"], "sizes": train["sizes"]},
                           "trajectory": {"train": _train_settings(plan)},
                           "resources": {"num_cpus": plan.actor_cpus, "threads": 1}}, "scale proxy")
    run_dir = work / f"proxy-{plan.train_pairs}-{plan.train_steps}"
    existed = (RunLayout.of(run_dir).trajectory / MANIFEST).is_file()
    start = time.perf_counter()
    trajectory = ensure(RunContext.resolve(config, run_dir), executor)
    return Path(trajectory.root), None if existed else round(time.perf_counter() - start, 1)


def scale_config(plan: ScalePlan, corpus: dict[str, Any], target: dict[str, Any], trajectory: Path):
    """The run configuration of the measured pipeline (prepare → score → select → reshard)."""
    from pipeline.config import parse_config

    return parse_config({
        "data": {"shards": corpus["shards"], "sizes": corpus["sizes"]},
        "trajectory": {"path": str(trajectory)},
        "target": {"shards": target["shards"], "sizes": target["sizes"], "max_pairs": plan.target_pairs,
                   "bank_size": plan.bank_size, "seed": plan.seed},
        "score": {"method": plan.method, "c_mode": "fd", "batch_size": plan.batch_size,
                  "proxy_batch_size": plan.proxy_batch_size},
        "select": {"column": columns_computed(METHOD_COMPONENTS[plan.method])[0], "rule": "top_fraction",
                   "fraction": plan.fraction},
        "reshard": {"shard_size": plan.shard_size},
        "resources": {"actors": plan.actors, "num_cpus": plan.actor_cpus, "threads": 1},
    }, "scale run")


# ---------------------------------------------------------------------------- pipeline


def _scored_pairs_counter(scores_dir: Path, sizes: dict[str, int]) -> Callable[[], int]:
    by_stem = {shard_stem(name): count for name, count in sizes.items()}

    def count() -> int:
        if not scores_dir.is_dir():
            return 0
        return sum(by_stem.get(p.stem, 0) for p in scores_dir.glob("*.parquet"))
    return count


def measure_pipeline(plan: ScalePlan, work: Path, progress: bool = True) -> dict[str, Any]:
    """Run prepare → score → select → reshard over ``plan.pairs`` synthetic pairs; time and memory."""
    from pipeline.data.shards import load_sizes
    from pipeline.runtime.executor import RayExecutor
    from pipeline.stages.pipeline import run_pipeline

    corpus = ensure_corpus(work / f"corpus-{plan.pairs}-{plan.image_size}px-{plan.shard_size}",
                           plan.pairs, plan.image_size, plan.shard_size, CORPUS_SEED)
    target = ensure_corpus(work / f"target-{plan.target_pairs}-{plan.image_size}px",
                           2 * plan.target_pairs, plan.image_size, 2 * plan.target_pairs, TARGET_SEED)
    run_dir = work / f"run-{plan.method}-{plan.pairs}"
    shutil.rmtree(run_dir, ignore_errors=True)  # a fresh run: scores of an earlier one would be reused
    executor = RayExecutor(num_cpus=plan.ray_cpus, num_gpus=0)
    try:
        trajectory, train_s = ensure_trajectory(plan, work, executor)
        config = scale_config(plan, corpus, target, trajectory)
        sampler = RssSampler(_scored_pairs_counter(RunLayout.of(run_dir).scores, load_sizes(corpus["sizes"])),
                             plan.checkpoint_pairs, plan.interval, progress_path=run_dir / "scale_progress.json",
                             expected_actors=plan.actors)  # the only actors: prepare, select, reshard are tasks
        driver_reset = reset_peak()
        load_start = os.getloadavg()
        sampler.start()
        start = time.perf_counter()
        try:
            summary = run_pipeline(config, run_dir, executor, progress=progress,
                                   stages=("prepare", "score", "select", "reshard"))
        finally:
            sampler.stop()
        wall = time.perf_counter() - start
    finally:
        executor.shutdown()
    return _pipeline_result(plan, corpus, train_s, summary, sampler, wall, driver_reset,
                            load_start, run_dir)


def _prepare_finished(run_dir: Path) -> float | None:
    times = [p.stat().st_mtime for p in RunLayout.of(run_dir).prepared_checkpoints()]
    return max(times) if times else None


def _pipeline_result(plan: ScalePlan, corpus: dict[str, Any], train_s: float | None, summary: dict[str, Any],
                     sampler: RssSampler, wall: float, driver_reset: bool, load_start: tuple[float, ...],
                     run_dir: Path) -> dict[str, Any]:
    from pipeline.stages.keep_rule import round_half_up

    stages = summary["stage_seconds"]
    selection = summary["selection"]
    prepared_at = _prepare_finished(run_dir)
    fresh = {str(pid): (t is not None and prepared_at is not None and t >= prepared_at - 1.0)
             for pid, t in sampler.actor_started.items()}
    at_end = sampler.snapshot()
    ratios = {str(n): round(at_end["actor_hwm_max_mb"] / snap["actor_hwm_max_mb"], 4)
              for n, snap in sampler.at_checkpoints.items()
              if snap["actor_hwm_max_mb"] and at_end["actor_hwm_max_mb"]}
    return {
        "plan": asdict(plan), "corpus": corpus, "trajectory_train_s": train_s,
        "stage_seconds": stages, "wall_s": round(wall, 1),
        "pairs_scored": summary["pairs_scored_now"], "failed": summary["failed_now"],
        "score_pairs_per_s": round(summary["pairs_scored_now"] / stages["score"], 2),
        "selection": {k: selection[k] for k in ("in", "scored_ok", "failed", "kept")},
        "expected_kept": round_half_up(plan.fraction, selection["scored_ok"]),
        "reshard": summary.get("reshard"),
        "rss_at_checkpoints": {str(n): snap for n, snap in sampler.at_checkpoints.items()},
        "rss_at_end": at_end, "actor_hwm_end_over_checkpoint": ratios,
        "actors_started_after_prepare": fresh, "driver_peak_reset": driver_reset,
        "timeline": sampler.timeline, "sampler_errors": sampler.errors,
        "load_avg_start": [round(x, 2) for x in load_start],
        "load_avg_end": [round(x, 2) for x in os.getloadavg()],
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }


def extrapolate(result: dict[str, Any], pairs: int = 1_000_000,
                reducer: dict[str, Any] | None = None) -> dict[str, Any]:
    """Estimated time for ``pairs`` from a measured run: prepare as measured (it does not
    depend on the corpus), score at the measured pairs/s, select scaled linearly from the
    reducer measurement when given (else from the run's own select)."""
    measured = result["pairs_scored"]
    stages = result["stage_seconds"]
    score_s = pairs / result["score_pairs_per_s"]
    if reducer:
        select_s, select_from = reducer["select_s"] * pairs / reducer["rows"], f"reducer {reducer['rows']} rows"
    else:
        select_s, select_from = stages["select"] * pairs / measured, f"this run ({measured} rows)"
    return {"pairs": pairs, "from_pairs": measured, "extrapolated": True,
            "prepare_s": stages["prepare"], "score_s": round(score_s), "select_s": round(select_s, 1),
            "select_scaled_from": select_from, "total_s": round(stages["prepare"] + score_s + select_s)}


# ----------------------------------------------------------------------------- reducer


def write_reducer_rows(directory: Path, rows: int, files: int, seed: int) -> float | None:
    """``rows`` synthetic score rows in ``files`` score files (real writer), unless present.

    Scores are seeded normal values; one row in 1000 is a ``decode_error`` with null scores.
    Returns the seconds spent writing, or None when the files were already there.
    """
    from pipeline.io.scores import write_scores

    wanted = {"rows": rows, "files": files, "seed": seed}
    marker = directory / "reducer_rows.json"
    if marker.is_file() and json.loads(marker.read_text()) == wanted:
        return None
    shutil.rmtree(directory, ignore_errors=True)
    start = time.perf_counter()
    rng = np.random.default_rng(seed)
    bounds = np.linspace(0, rows, files + 1).astype(np.int64)
    for f in range(files):
        n = int(bounds[f + 1] - bounds[f])
        write_scores(RunLayout.of(directory).scores / f"{f:05d}.parquet", _synthetic_rows(rng, f, n),
                     "scale-bench", "scale-bench", "scale-bench")
    write_json_atomic(marker, wanted)
    return round(time.perf_counter() - start, 1)


def _synthetic_rows(rng: np.random.Generator, file_no: int, n: int) -> dict[str, Any]:
    """One score file's columns: random 128-bit uids, seeded scores, 0.1 % failed rows."""
    from pipeline.io.scores import COMPONENTS, SCORE_COLUMNS

    halves = rng.integers(0, np.iinfo(np.uint64).max, size=(n, 2), dtype=np.uint64, endpoint=True)
    uids = [f"{hi:016x}{lo:016x}" for hi, lo in halves.tolist()]
    failed = rng.random(n) < 0.001
    scores = {name: rng.standard_normal(n) for name in SCORE_COLUMNS}
    comps = {name: rng.standard_normal((n, 2)).tolist() for name in COMPONENTS}
    cols: dict[str, Any] = {
        "uid": uids, "key": [f"s{file_no:05d}_{i:06d}" for i in range(n)],
        "shard": [f"synthetic/{file_no:05d}.tar"] * n, "index": np.arange(n, dtype=np.int32),
        "status": np.where(failed, "decode_error", "ok").tolist(),
        "error": [("synthetic failure" if bad else None) for bad in failed.tolist()]}
    for name, values in scores.items():
        cols[name] = [None if bad else v for bad, v in zip(failed.tolist(), values.tolist())]
    for name, values in comps.items():
        cols[name] = [None if bad else v for bad, v in zip(failed.tolist(), values)]
    return cols


def reducer_child(argv: list[str]) -> None:
    """Body of the fresh reducer process: ``SCORES_DIR OUT_DIR FRACTION [STRATEGY EXECUTOR
    RAY_CPUS]`` → one JSON line."""
    from pipeline.config import SelectConfig
    from pipeline.runtime.executor import LocalExecutor, RayExecutor, Resources
    from pipeline.stages.select import select

    scores_dir, out_dir, fraction = Path(argv[0]), Path(argv[1]), float(argv[2])
    strategy, kind, ray_cpus = (argv[3], argv[4], float(argv[5])) if len(argv) > 3 else ("memory", "local", 1.0)
    executor = RayExecutor(num_cpus=ray_cpus, num_gpus=0) if kind == "ray" else LocalExecutor()
    baseline = proc_memory()
    files = sorted(scores_dir.glob("*.parquet"))
    start = time.perf_counter()
    try:
        summary = select(files, SelectConfig(rule="top_fraction", fraction=fraction), out_dir,
                         executor=executor, resources=Resources(num_cpus=1.0), strategy=strategy)
        seconds = time.perf_counter() - start
        peak, workers = proc_memory(), ray_worker_peaks()
    finally:
        executor.shutdown()
    print(json.dumps({"select_s": round(seconds, 2), "strategy": strategy, "executor": kind,
                      "files": len(files), "counts": summary["counts"],
                      "baseline_hwm_mb": round(baseline["VmHWM"] / MB, 1),
                      "peak_hwm_mb": round(peak["VmHWM"] / MB, 1),
                      "above_baseline_mb": round((peak["VmHWM"] - baseline["VmHWM"]) / MB, 1),
                      "worker_hwm_mb": sorted((round(w / MB, 1) for w in workers), reverse=True)}))


def ray_worker_peaks() -> list[int]:
    """``VmHWM`` (bytes) of every Ray worker process descended from this process (an
    embedded local Ray's python workers, titled ``ray::<task>``; none without Ray)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            pid, rest = stat.read_text().split(" (", 1)
            children.setdefault(int(rest.rsplit(") ", 1)[1].split()[1]), []).append(int(pid))
        except (OSError, IndexError, ValueError):
            continue
    peaks, todo = [], list(children.get(os.getpid(), []))
    while todo:
        pid = todo.pop()
        todo += children.get(pid, [])
        try:
            command = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        memory, name = proc_memory(pid), command.split(b"\0", 1)[0]
        if memory and name.startswith(b"ray::") and not name.endswith(b"Agent"):  # ray::IDLE, ray::_run_one
            peaks.append(memory["VmHWM"])
    return peaks


def measure_reducer(plan: ScalePlan, work: Path) -> dict[str, Any]:
    """Write (or reuse) the synthetic score rows, then time ``select`` in a fresh process."""
    from pipeline.stages.keep_rule import round_half_up

    directory = work / f"reducer-{plan.reducer_rows}-{plan.reducer_files}"
    write_s = write_reducer_rows(directory, plan.reducer_rows, plan.reducer_files, plan.seed)
    layout = RunLayout.of(directory)  # the synthetic score files sit where a run's would
    out_dir = layout.selection
    shutil.rmtree(out_dir, ignore_errors=True)
    code = "import sys; from pipeline.bench.scale import reducer_child; reducer_child(sys.argv[1:])"
    load_start = os.getloadavg()
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", code, str(layout.scores), str(out_dir),
                           repr(plan.fraction), plan.reducer_strategy, plan.reducer_executor,
                           repr(plan.ray_cpus)], capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"reducer process failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}")
    child = json.loads(proc.stdout.strip().splitlines()[-1])
    return {"rows": plan.reducer_rows, "files": plan.reducer_files, "fraction": plan.fraction,
            "write_s": write_s, **child, "process_wall_s": round(wall, 1),
            "expected_kept": round_half_up(plan.fraction, child["counts"]["scored_ok"]),
            "load_avg_start": [round(x, 2) for x in load_start],
            "load_avg_end": [round(x, 2) for x in os.getloadavg()],
            "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S")}


def reducer_key(plan: ScalePlan) -> str:
    """A reducer entry's key: ``<rows>_rows`` (in-memory), ``_bounded`` / ``_bounded_ray`` added."""
    key = f"{plan.reducer_rows}_rows"
    if plan.reducer_strategy != "memory":
        key += f"_{plan.reducer_strategy}" + ("_ray" if plan.reducer_executor == "ray" else "")
    return key


# ------------------------------------------------------------------------------ report


def _add_extrapolations(results: dict[str, Any], pairs: int = 1_000_000) -> None:
    """Every pipeline entry smaller than ``pairs`` gets its (labelled) extrapolation."""
    reducers = list(results.get("reducer", {}).values())
    reducer = max(reducers, key=lambda r: r["rows"]) if reducers else None
    for entry in results.get("pipeline", {}).values():
        if entry["pairs_scored"] < pairs:
            entry["extrapolated_1m"] = extrapolate(entry, pairs, reducer)


def machine_info() -> dict[str, Any]:
    """CPU model, core count, memory and software versions of this machine."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    mem = next((int(line.split()[1]) * 1024 for line in Path("/proc/meminfo").read_text().splitlines()
                if line.startswith("MemTotal")), 0) if Path("/proc/meminfo").is_file() else 0
    return {"cpu_model": cpu, "cores": os.cpu_count(), "mem_total_gb": round(mem / 1024 ** 3, 1),
            "torch": torch.__version__, "torch_threads_driver": torch.get_num_threads(),
            "torch_threads_actor": 1, "python": platform.python_version()}


def format_table(results: dict[str, Any]) -> str:
    """The measured entries as a plain-text table."""
    lines = []
    for key, r in sorted(results.get("pipeline", {}).items()):
        st = r["stage_seconds"]
        lines.append(
            f"pipeline {key}: {r['pairs_scored']} pairs, prepare {st['prepare']} s, score {st['score']} s "
            f"({r['score_pairs_per_s']} pairs/s, {r['rss_at_end'].get('pairs_per_actor_cpu_s', '-')} per actor "
            f"CPU-second), select {st['select']} s; kept {r['selection']['kept']}")
        snaps = [(f"@{n}", snap) for n, snap in r["rss_at_checkpoints"].items()] + [("@end", r["rss_at_end"])]
        lines.append("  peak RSS (VmHWM, MB): " + ", ".join(
            f"{label} ({snap['pairs']} pairs) driver {snap['driver']['hwm_mb']}, actors {snap['actor_hwm_max_mb']}"
            for label, snap in snaps) + f"; actors end/checkpoint {r['actor_hwm_end_over_checkpoint']}")
    for key, r in sorted(results.get("reducer", {}).items()):
        workers = f", Ray workers' peaks {r['worker_hwm_mb']} MB" if r.get("worker_hwm_mb") else ""
        lines.append(f"reducer {key}: {r['rows']} rows in {r['files']} files ({r.get('strategy', 'memory')}): "
                     f"select {r['select_s']} s, peak {r['peak_hwm_mb']} MB (import baseline "
                     f"{r['baseline_hwm_mb']} MB, +{r['above_baseline_mb']} MB){workers}; kept {r['counts']['kept']}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------- run


def plan_for(quick: bool = False, *, pairs: int | None = None, checkpoint_pairs: tuple[int, ...] | None = None,
             shard_size: int | None = None, method: str | None = None, batch_size: int | None = None,
             bank_size: int | None = None, actors: int | None = None, reducer_rows: int | None = None,
             reducer_files: int | None = None, reducer_strategy: str | None = None,
             reducer_executor: str | None = None) -> ScalePlan:
    """The quick or full plan with these fields overridden (None: the preset's), checked by
    :func:`check_plan`."""
    overrides = {"pairs": pairs, "checkpoint_pairs": checkpoint_pairs, "shard_size": shard_size,
                 "method": method, "batch_size": batch_size, "bank_size": bank_size, "actors": actors,
                 "reducer_rows": reducer_rows, "reducer_files": reducer_files,
                 "reducer_strategy": reducer_strategy, "reducer_executor": reducer_executor}
    plan = replace(QUICK if quick else ScalePlan(), **{k: v for k, v in overrides.items() if v is not None})
    check_plan(plan)
    return plan


def check_plan(plan: ScalePlan) -> None:
    """A UsageError (naming the command-line option) for a plan that cannot run."""
    if not plan.checkpoint_pairs or min(plan.checkpoint_pairs) < 1:
        raise UsageError(f"--checkpoint-pairs must be positive counts, got {plan.checkpoint_pairs}")
    for name in ("pairs", "shard_size", "batch_size", "bank_size", "actors", "reducer_rows", "reducer_files"):
        if getattr(plan, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(plan, name)}")
    if plan.reducer_executor == "ray" and plan.reducer_strategy != "bounded":
        raise UsageError("--reducer-executor ray needs --reducer-strategy bounded")
    if plan.reducer_files > plan.reducer_rows:
        raise UsageError(f"--reducer-files ({plan.reducer_files}) exceeds --reducer-rows ({plan.reducer_rows})")


def run_benchmark(plan: ScalePlan, out: str | Path, work_dir: str | Path | None = None,
                  parts: Sequence[str] = PARTS, command: str = "", progress: bool = True) -> dict[str, Any]:
    """Measure ``parts`` (of :data:`PARTS`), merge the entries into the results JSON ``out``
    (created if missing) and return the merged results.

    ``work_dir``: where corpora, trajectory and runs are built and reused; None: a temporary
    directory, removed at the end. ``progress``: a progress bar while scoring.
    """
    unknown = [p for p in parts if p not in PARTS]
    if unknown or not parts:
        raise ValueError(f"parts must be some of {PARTS}, got {list(parts)}")
    temp = tempfile.mkdtemp(prefix="diffin-scale-") if not work_dir else None
    work = Path(work_dir or temp).resolve()
    out = Path(out)
    new: dict[str, dict[str, Any]] = {"pipeline": {}, "reducer": {}}
    try:
        meta = {"command": command, "machine": machine_info(), "work_dir": str(work)}
        if "pipeline" in parts:
            entry = measure_pipeline(plan, work, progress=progress)
            entry["command"] = meta["command"]
            new["pipeline"][f"{plan.method}_{plan.pairs}"] = entry
        if "reducer" in parts:
            entry = measure_reducer(plan, work)
            entry["command"] = meta["command"]
            new["reducer"][reducer_key(plan)] = entry
    finally:
        if temp:
            shutil.rmtree(temp, ignore_errors=True)
    results = json.loads(out.read_text()) if out.is_file() else {}  # read now: merge with runs since
    for part, entries in new.items():
        results.setdefault(part, {}).update(entries)
    _add_extrapolations(results)
    results["_meta"] = meta
    write_json_atomic(out, results)
    return results
