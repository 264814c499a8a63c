"""``diffin bench quality``: pruning quality at an equal data budget (issue #7).

The claim users care about: a model trained on the pairs Diff-In keeps is better than one
trained on the pairs an alternative keeps, at the same budget. For each dataset and seed:

1. train the proxy trajectory on the training pairs (:func:`train_proxy`);
2. score every training pair against it (:class:`TrajectoryInfluence`: ``diffin``,
   ``diffin_eq9``, ``tracin``, ``clip_score``), the target set V being clean held-out pairs;
3. write the scores as score files and select with the real reducer,
   :func:`pipeline.stages.select.select`: ``top_fraction`` of each score column (ties by
   uid) and the seeded ``random`` rule, keeping 50 % and 30 %;
4. retrain a fresh model on each subset with the same settings and number of steps
   (:func:`train_final`: same initialisation and schedule; the subset's pairs keep their
   relative visiting order). The ``full`` model is the proxy's final checkpoint, which is
   exactly what :func:`train_final` on all pairs returns;
5. evaluate: Fashion-MNIST zero-shot accuracy on the test split (class prompts averaged
   over the caption templates, argmax cosine); Openclipart image→text and text→image
   recall@1/@5 on held-out pairs with distinct captions (``r1``/``r5`` = the mean of the
   two directions; Openclipart repeats collection titles such as "gramastar" hundreds of
   times, which would make retrieval trivial for those queries).

Noisy-pair detection (Fashion-MNIST, ground truth from the corpus json ``noisy``): ROC AUC
with label = noisy and score = −(method score). Every score is "higher = keep", so a low
score flags a likely mismatched pair and AUC > 0.5 means the method puts mismatched pairs
below clean ones. ``random``'s score is the reverse of the random rule's order (the pairs it
keeps first score highest), so it gets the same treatment.

Data splits are fixed (seed 0 of the corpus and of the split); the seed of a run sets the
proxy's and the retrained models' initialisation and visiting order, the negative bank,
the proxy batches and the random rule. Means and (sample, ddof=1) standard deviations are
over seeds; a standard deviation is null with one seed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import platform
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch import Tensor, nn

from pipeline import __version__
from pipeline.bench.metrics import class_prompts, noise_auc, retrieval_recall, unique_caption_order, zero_shot_accuracy
from pipeline.bench.protocol import load_shard_dir, ranked
from pipeline.config import SelectConfig, TrainConfig
from pipeline.data.corpora.common import CORPUS_FILE
from pipeline.data.corpora.fashion_mnist import build_fashion_mnist
from pipeline.data.corpora.openclipart import build_openclipart
from pipeline.data.pairs import PairTable
from pipeline.data.shards import SIZES_FILE, expand_shards, iter_raw_samples, load_sizes
from pipeline.data.uids import uids_to_u8u8
from pipeline.errors import UsageError
from pipeline.io.atomic import write_json_atomic
from pipeline.io.layout import shard_stem
from pipeline.influence.scores import METHOD_COMPONENTS, columns_computed
from pipeline.io.scores import COMPONENTS, SCORE_COLUMNS, write_scores
from pipeline.model.clip import build_clip, model_spec
from pipeline.influence.unrolled import UnrolledSettings
from pipeline.model.scorer import InfluenceSettings, TrajectoryInfluence
from pipeline.model.train import train_final, train_proxy
from pipeline.model.trajectory import Trajectory, load_checkpoint_state
from pipeline.stages.keep_rule import round_half_up, seeded_uid_hash
from pipeline.stages.select import KEPT_FILE, select

log = logging.getLogger(__name__)

SCORED = columns_computed(METHOD_COMPONENTS["all"])  # every score column of method all (no Adam twins)
METHODS = (*SCORED, "random")
BUDGETS = (("keep_50", 0.5), ("keep_30", 0.3))
DATASETS = ("fashion_mnist", "openclipart")
METRICS = {"fashion_mnist": ("acc",), "openclipart": ("r1", "r5")}
DEFAULT_OUT = "benchmarks/results/quality.json"
DEFAULT_QUICK_OUT = "benchmarks/results/quality_quick.json"
SPLIT_SEED = 0  # the data splits never change with --seeds
PHASES = ("proxy_train", "score", "select", "retrain", "eval")


# --------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class DatasetSettings:
    """One dataset's sizes, proxy/retraining run and scoring settings.

    Fashion-MNIST: the corpus holds the first ``num_train`` images of each split (so the
    noisy share of the training captions is exact); target and evaluation pairs come from
    the noise-free test split. Openclipart: train, target and evaluation pairs are disjoint
    uid-rank slices of the corpus, the evaluation slice keeping the first pair of each
    distinct caption (``corpus_limit``: only the corpus's first N files, for tests).
    """

    num_train: int
    num_target: int
    num_eval: int
    train: TrainConfig
    influence: InfluenceSettings
    corpus_limit: int | None = None


@dataclass(frozen=True)
class QualitySettings:
    """Everything a quality run depends on."""

    fashion_mnist: DatasetSettings
    openclipart: DatasetSettings
    seeds: tuple[int, ...] = (0, 1, 2)
    datasets: tuple[str, ...] = DATASETS
    noise: float = 0.3
    threads: int = 1
    workers: int = 1

    def dataset(self, name: str) -> DatasetSettings:
        """The settings of dataset ``name``."""
        return getattr(self, name)


def full_settings() -> QualitySettings:
    """The published run (sizes chosen to fit 45 min on 2 cores; see docs/QUALITY.md)."""
    train = TrainConfig(model="tiny-clip-32", steps=200, batch_size=128, lr=2e-3, warmup=20,
                        checkpoints=4, seed=0)
    influence = InfluenceSettings(bank_size=255, batch_size=256, proxy_batch_size=128)
    return QualitySettings(
        fashion_mnist=DatasetSettings(num_train=6000, num_target=1024, num_eval=2000, train=train,
                                      influence=influence),
        openclipart=DatasetSettings(num_train=4800, num_target=768, num_eval=500, train=train,
                                    influence=influence),
        workers=2)


def quick_settings() -> QualitySettings:
    """The same machinery on tiny data, one seed: checks the machinery, not the outcome."""
    train = TrainConfig(model="tiny-clip-32", steps=12, batch_size=32, lr=2e-3, warmup=2,
                        checkpoints=2, seed=0)
    influence = InfluenceSettings(bank_size=31, batch_size=128, proxy_batch_size=32,
                                  unrolled=UnrolledSettings(lanczos_steps=8))
    return QualitySettings(
        fashion_mnist=DatasetSettings(num_train=240, num_target=80, num_eval=100, train=train,
                                      influence=influence),
        openclipart=DatasetSettings(num_train=120, num_target=64, num_eval=40, train=train,
                                    influence=influence, corpus_limit=260),
        seeds=(0,))


def settings_for(quick: bool = False, seeds: int | None = None, workers: int | None = None,
                 datasets: Sequence[str] | None = None, threads: int = 1) -> QualitySettings:
    """The quick or full preset with these overrides (None or empty: the preset's value);
    ``seeds``: run seeds 0..seeds-1."""
    settings = quick_settings() if quick else full_settings()
    changes: dict[str, Any] = {"threads": threads}
    if seeds is not None:
        if seeds < 1:
            raise UsageError(f"--seeds must be >= 1, got {seeds}")
        changes["seeds"] = tuple(range(seeds))
    if workers is not None:
        changes["workers"] = workers
    if datasets:
        changes["datasets"] = tuple(datasets)
    return dataclasses.replace(settings, **changes)


def _check_settings(settings: QualitySettings) -> None:
    unknown = [d for d in settings.datasets if d not in DATASETS]
    if unknown or not settings.datasets:
        raise UsageError(f"unknown or no datasets {unknown or list(settings.datasets)}; choose from {list(DATASETS)}")
    if not settings.seeds or len(set(settings.seeds)) != len(settings.seeds):
        raise UsageError(f"need one or more distinct seeds, got {list(settings.seeds)}")
    if settings.threads < 1 or settings.workers < 1:
        raise UsageError(f"--threads and --workers must be >= 1, got {settings.threads} and {settings.workers}")
    for name in settings.datasets:
        spec = settings.dataset(name)
        if spec.train.checkpoint_steps()[-1] != spec.train.steps:
            raise UsageError(f"{name}: the last checkpoint must be at the final step (it is the full model)")
        if spec.num_target <= spec.influence.bank_size:
            raise UsageError(f"{name}: {spec.num_target} target pairs leave none for V beside a bank of "
                             f"{spec.influence.bank_size}")
        if name == "fashion_mnist" and spec.num_target + spec.num_eval > spec.num_train:
            raise UsageError(f"fashion_mnist: target + eval ({spec.num_target + spec.num_eval}) must not "
                             f"exceed num_train ({spec.num_train}): both come from that many test images")


# --------------------------------------------------------------------------- corpora


def _corpus_matches(directory: Path, source: str, details: dict[str, Any]) -> bool:
    """True if ``directory`` holds a finished build of ``source`` with these build ``details``."""
    try:
        info = json.loads((directory / CORPUS_FILE).read_text())
        sizes = load_sizes(directory / SIZES_FILE)
    except (OSError, ValueError, UsageError):
        return False
    built = info.get("details", {})
    return (info.get("source") == source and all(built.get(k) == v for k, v in details.items())
            and sum(sizes.values()) == info.get("num_pairs")
            and all((directory / name).is_file() for name in sizes))


def _refuse_foreign(directory: Path, what: str) -> None:
    if directory.exists() and any(directory.iterdir()):
        raise UsageError(f"{directory} exists but is not a complete {what}; remove it or pass another --data-dir")


def ensure_fashion_mnist(data_dir: str | Path, noise: float, limit: int) -> Path:
    """``<data_dir>/fashion_mnist_noise<P>_n<limit>`` (train/ and test/): reused when complete."""
    directory = Path(data_dir) / f"fashion_mnist_noise{round(noise * 100)}_n{limit}"
    wanted = {"train": {"noise": noise, "seed": 0, "limit": limit}, "test": {"noise": 0.0, "seed": 0, "limit": limit}}
    if all(_corpus_matches(directory / split, "fashion-mnist", d) for split, d in wanted.items()):
        log.info("reusing the Fashion-MNIST corpus in %s", directory)
        return directory
    _refuse_foreign(directory, f"Fashion-MNIST corpus (noise {noise}, first {limit} images)")
    log.info("building the Fashion-MNIST corpus into %s", directory)
    build_fashion_mnist(directory, noise=noise, seed=0, limit=limit)
    return directory


def ensure_openclipart(data_dir: str | Path, limit: int | None) -> Path:
    """``<data_dir>/openclipart`` (``openclipart_n<limit>`` with a limit): reused when complete."""
    directory = Path(data_dir) / ("openclipart" if limit is None else f"openclipart_n{limit}")
    if _corpus_matches(directory, "openclipart", {"limit": limit, "with_keywords": False}):
        log.info("reusing the Openclipart corpus in %s", directory)
        return directory
    _refuse_foreign(directory, "Openclipart corpus" + (f" of the first {limit} files" if limit else ""))
    log.info("building the Openclipart corpus into %s (a few minutes)", directory)
    build_openclipart(directory, limit=limit)
    return directory


def read_json_meta(directory: Path) -> dict[str, dict[str, Any]]:
    """The json metadata of every pair of a shard directory, by uid."""
    meta: dict[str, dict[str, Any]] = {}
    for url in expand_shards(str(directory / "*.tar")):
        for sample in iter_raw_samples(url):
            if "json" in sample:
                record = json.loads(sample["json"])
                meta[record["uid"]] = record
    return meta


# --------------------------------------------------------------------------- data


@dataclass
class DatasetData:
    """The pairs of one dataset: train (scored, pruned), target (V and the bank), eval."""

    name: str
    train: PairTable
    target: PairTable
    eval: PairTable
    eval_labels: np.ndarray | None = None  # Fashion-MNIST: true class of each eval image
    noisy: np.ndarray | None = None        # Fashion-MNIST: ground truth per training pair
    corpus: str = ""


def _model_size(spec: DatasetSettings) -> int:
    return int(model_spec(spec.train.model)["config"]["vision_cfg"]["image_size"])


def load_fashion_mnist(spec: DatasetSettings, data_dir: str | Path, noise: float) -> DatasetData:
    """Training pairs with noisy captions; target and eval pairs from the clean test split."""
    directory = ensure_fashion_mnist(data_dir, noise, spec.num_train)
    size = _model_size(spec)
    train, test = load_shard_dir(directory / "train", size), load_shard_dir(directory / "test", size)
    train_meta, test_meta = read_json_meta(directory / "train"), read_json_meta(directory / "test")
    order = ranked(test.uids, SPLIT_SEED, "split")
    target = test.subset(order[:spec.num_target])
    evaluation = test.subset(order[spec.num_target:spec.num_target + spec.num_eval])
    noisy = np.array([bool(train_meta[u]["noisy"]) for u in train.uids])
    labels = np.array([int(test_meta[u]["label"]) for u in evaluation.uids])
    return DatasetData("fashion_mnist", train, target, evaluation, labels, noisy, str(directory))


def load_openclipart(spec: DatasetSettings, data_dir: str | Path) -> DatasetData:
    """Disjoint train, target and eval slices of the corpus by seeded uid rank."""
    directory = ensure_openclipart(data_dir, spec.corpus_limit)
    table = load_shard_dir(directory, _model_size(spec))
    order = ranked(table.uids, SPLIT_SEED, "split")
    a, b = spec.num_train, spec.num_train + spec.num_target
    evaluation = unique_caption_order(table.captions, order[b:])[:spec.num_eval]
    if len(evaluation) < spec.num_eval:
        raise UsageError(f"openclipart: after {spec.num_train} train + {spec.num_target} target pairs the corpus "
                         f"({len(table)} pairs) has {len(evaluation)} pairs with distinct captions left, "
                         f"not {spec.num_eval} for evaluation")
    return DatasetData("openclipart", table.subset(order[:a]), table.subset(order[a:b]),
                       table.subset(evaluation), corpus=str(directory))


def load_dataset(name: str, settings: QualitySettings, data_dir: str | Path) -> DatasetData:
    """Build or reuse the corpus of ``name`` and split it."""
    spec = settings.dataset(name)
    if name == "fashion_mnist":
        return load_fashion_mnist(spec, data_dir, settings.noise)
    return load_openclipart(spec, data_dir)


# --------------------------------------------------------------------------- selection


def write_score_files(table: PairTable, scores: dict[str, Tensor], out_dir: Path,
                      fingerprint: str) -> list[Path]:
    """Scores of ``table``'s pairs as score files, one per input shard.

    ``index`` is the pair's position among the loaded pairs of its shard (the corpora
    here have no unusable pairs, so it is the position in the shard).
    """
    by_shard: dict[str, list[int]] = {}
    for i, url in enumerate(table.shards):
        by_shard.setdefault(url, []).append(i)
    paths = []
    for url, rows in by_shard.items():
        columns: dict[str, list[Any]] = {
            "uid": [table.uids[i] for i in rows], "key": [table.keys[i] for i in rows],
            "shard": [url] * len(rows), "index": list(range(len(rows))), "status": ["ok"] * len(rows),
            "error": [None] * len(rows),
            # columns and components not computed (the Adam twins) stay null, as in the pipeline
            **{c: scores[c][rows].tolist() if c in scores else [None] * len(rows) for c in SCORE_COLUMNS},
            **{c: scores[c][:, rows].T.tolist() if c in scores else [None] * len(rows) for c in COMPONENTS},
        }
        path = out_dir / f"{shard_stem(url)}.parquet"
        write_scores(path, columns, fingerprint, fingerprint, __version__)
        paths.append(path)
    return paths


def select_uids(score_files: Sequence[Path], cfg: SelectConfig, out_dir: Path) -> list[str]:
    """The uids the select stage keeps under ``cfg`` (its ``kept.parquet``, sorted by uid)."""
    select(score_files, cfg, out_dir)
    return pq.read_table(out_dir / KEPT_FILE, columns=["uid"]).column("uid").to_pylist()


def selection_config(method: str, fraction: float, seed: int) -> SelectConfig:
    """The select rule of ``method`` at ``fraction``: top fraction of its column, or random."""
    if method == "random":
        return SelectConfig(rule="random", fraction=fraction, seed=seed)
    return SelectConfig(column=method, rule="top_fraction", fraction=fraction)


def random_rule_scores(uids: Sequence[str], seed: int) -> np.ndarray:
    """A score whose order is the random rule's (the first pair it keeps scores highest)."""
    hi, lo = uids_to_u8u8(pa.array(list(uids), pa.string()))
    return -seeded_uid_hash(hi, lo, seed).astype(np.float64)


def evaluate_model(model: nn.Module, data: DatasetData) -> dict[str, float]:
    """The dataset's metrics for one trained model."""
    if data.name == "fashion_mnist":
        return {"acc": zero_shot_accuracy(model, data.eval.images, data.eval_labels, class_prompts())}
    return retrieval_recall(model, data.eval)


def final_model(trajectory: Trajectory) -> nn.Module:
    """The model at the trajectory's last checkpoint (what training on every pair gives)."""
    model = build_clip(trajectory.model)
    last = trajectory.checkpoint_path(len(trajectory.checkpoints) - 1)
    model.load_state_dict(load_checkpoint_state(last)["state_dict"])
    return model


# --------------------------------------------------------------------------- one cell


@dataclass(frozen=True)
class CellJob:
    """One (dataset, seed): proxy, scores, every subset retrained and evaluated."""

    data: DatasetData
    spec: DatasetSettings
    seed: int
    threads: int
    work_dir: str | None = None


def _seeded(spec: DatasetSettings, seed: int, threads: int) -> tuple[TrainConfig, InfluenceSettings]:
    return (spec.train.model_copy(update={"seed": seed, "threads": threads}),
            dataclasses.replace(spec.influence, seed=seed))


def score_training_pairs(trajectory: Trajectory, influence: InfluenceSettings,
                         data: DatasetData) -> dict[str, Tensor]:
    """Every score column for the training pairs, V and the bank from the target pairs."""
    scorer = TrajectoryInfluence(trajectory, influence)
    scorer.load_prepared(scorer.prepare(data.target, data.train))
    return scorer.score_table(data.train)


def run_cell(job: CellJob) -> dict[str, Any]:
    """Train, score, select and retrain for one dataset and seed; metrics and bookkeeping."""
    torch.set_num_threads(job.threads)
    data, train = job.data, job.data.train
    cfg, influence = _seeded(job.spec, job.seed, job.threads)
    seconds: dict[str, float] = {}
    cpu_seconds: dict[str, float] = {}
    clock, cpu_clock = time.perf_counter(), time.process_time()

    def lap(name: str, what: str = "") -> None:
        nonlocal clock, cpu_clock
        now, cpu_now = time.perf_counter(), time.process_time()
        seconds[name] = round(seconds.get(name, 0.0) + now - clock, 2)
        cpu_seconds[name] = round(cpu_seconds.get(name, 0.0) + cpu_now - cpu_clock, 2)
        if what:
            log.info("quality %s seed %d: %s (%.0f s)", data.name, job.seed, what, now - clock)
        clock, cpu_clock = now, cpu_now

    with tempfile.TemporaryDirectory(dir=job.work_dir, prefix=f"quality-{data.name}-s{job.seed}-") as tmp:
        trajectory = train_proxy(train, cfg, Path(tmp) / "trajectory", log_every=0)
        lap("proxy_train", f"proxy trajectory trained ({cfg.steps} steps)")
        scores = score_training_pairs(trajectory, influence, data)
        files = write_score_files(train, scores, Path(tmp) / "scores", f"quality-{data.name}-seed{job.seed}")
        lap("score", f"{len(train)} pairs scored")
        metrics: dict[str, Any] = {"full": evaluate_model(final_model(trajectory), data)}
        lap("eval")
        kept: dict[str, dict[str, list[str]]] = {}
        for budget, fraction in BUDGETS:
            metrics[budget], kept[budget] = {}, {}
            for method in METHODS:
                uids = select_uids(files, selection_config(method, fraction, job.seed),
                                   Path(tmp) / "selection" / f"{budget}_{method}")
                kept[budget][method] = uids
                lap("select")
                model = train_final(train, cfg, exclude=set(train.uids) - set(uids))
                lap("retrain", f"{budget} {method}: retrained on {len(uids)} pairs")
                metrics[budget][method] = evaluate_model(model, data)
                lap("eval", f"{budget} {method}: {metrics[budget][method]}")
    per_pair = {m: scores[m].numpy() for m in SCORED}
    per_pair["random"] = random_rule_scores(train.uids, job.seed)
    return {"dataset": data.name, "seed": job.seed, "metrics": metrics,
            "seconds": seconds, "cpu_seconds": cpu_seconds,
            "subset_sizes": {b: {m: len(u) for m, u in by.items()} for b, by in kept.items()},
            "kept_digest": {b: {m: _digest(u) for m, u in by.items()} for b, by in kept.items()},
            **_noise_report(data, per_pair, kept)}


def _digest(uids: Sequence[str]) -> str:
    """A short hash of a uid set (to compare selections across runs)."""
    return hashlib.sha256("\n".join(sorted(uids)).encode()).hexdigest()[:16]


def _noise_report(data: DatasetData, per_pair: dict[str, np.ndarray],
                  kept: dict[str, dict[str, list[str]]]) -> dict[str, Any]:
    """Noise AUC per method and the noisy share of each kept subset (Fashion-MNIST only)."""
    if data.noisy is None:
        return {}
    noisy_by_uid = dict(zip(data.train.uids, data.noisy.tolist()))
    return {"noise_auc": {m: noise_auc(data.noisy, per_pair[m]) for m in METHODS},
            "noisy_in_train": int(data.noisy.sum()),
            "kept_noisy_fraction": {b: {m: float(np.mean([noisy_by_uid[u] for u in uids])) for m, uids in by.items()}
                                    for b, by in kept.items()}}


# --------------------------------------------------------------------------- the report


def _mean_std(values: Sequence[float]) -> tuple[float, float | None]:
    arr = np.asarray(values, dtype=np.float64)
    return float(arr.mean()), (float(arr.std(ddof=1)) if arr.size > 1 else None)


def _summarise(values: Sequence[dict[str, float]], metrics: Sequence[str]) -> dict[str, float | None]:
    out: dict[str, float | None] = {}
    for metric in metrics:
        out[f"{metric}_mean"], out[f"{metric}_std"] = _mean_std([v[metric] for v in values])
    return out


def aggregate(name: str, cells: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The issue's schema for one dataset from its per-seed cells."""
    metrics = METRICS[name]
    report: dict[str, Any] = {}
    for budget, _ in BUDGETS:
        report[budget] = {m: _summarise([c["metrics"][budget][m] for c in cells], metrics) for m in METHODS}
    report["full"] = _summarise([c["metrics"]["full"] for c in cells], metrics)
    if name == "fashion_mnist":
        report["noise_auc"] = {m: float(np.mean([c["noise_auc"][m] for c in cells])) for m in METHODS}
    return report


def _run_cells(jobs: list[CellJob], workers: int) -> list[dict[str, Any]]:
    if workers <= 1 or len(jobs) <= 1:
        return [run_cell(job) for job in jobs]
    with ProcessPoolExecutor(min(workers, len(jobs)), mp_context=get_context("spawn"),
                             initializer=_worker_logging) as pool:
        return list(pool.map(run_cell, jobs))


def _worker_logging() -> None:
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s [worker {os.getpid()}] %(name)s: %(message)s")


def run_benchmark(settings: QualitySettings, out: str | Path, data_dir: str | Path = "data",
                  command: str = "", work_dir: str | Path | None = None) -> dict[str, Any]:
    """Run every (dataset, seed) cell, write the JSON report to ``out`` and return it."""
    _check_settings(settings)
    start = time.perf_counter()
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(settings.threads)
    try:
        datasets = {name: load_dataset(name, settings, data_dir) for name in settings.datasets}
        t_data = time.perf_counter() - start
        jobs = [CellJob(datasets[name], settings.dataset(name), seed, settings.threads,
                        None if work_dir is None else str(work_dir))
                for name in settings.datasets for seed in settings.seeds]
        cells = _run_cells(jobs, settings.workers)
    finally:
        torch.set_num_threads(previous_threads)
    report: dict[str, Any] = {}
    for name in settings.datasets:
        mine = [c for c in cells if c["dataset"] == name]
        report[name] = aggregate(name, mine)
        log.info("quality %s:\n%s", name, format_table({name: report[name]}))
    report["_meta"] = _meta(settings, datasets, cells, command, t_data, time.perf_counter() - start)
    write_json_atomic(Path(out), report)
    return report


def _meta(settings: QualitySettings, datasets: dict[str, DatasetData], cells: list[dict[str, Any]],
          command: str, t_data: float, total: float) -> dict[str, Any]:
    data = {}
    for name, d in datasets.items():
        spec = settings.dataset(name)
        data[name] = {"corpus": d.corpus, "train": len(d.train), "target": len(d.target), "eval": len(d.eval),
                      "bank": spec.influence.bank_size, "v": len(d.target) - spec.influence.bank_size,
                      "train_settings": spec.train.model_dump(mode="json"),
                      "influence": dataclasses.asdict(spec.influence),
                      "expected_subset_sizes": {b: round_half_up(f, len(d.train)) for b, f in BUDGETS}}
        if d.noisy is not None:
            data[name]["noisy_in_train"] = int(d.noisy.sum())
    return {
        "command": command, "seeds": list(settings.seeds), "noise": settings.noise,
        "threads": settings.threads, "workers": settings.workers, "data": data, "cells": cells,
        "selection": "pipeline.stages.select.select on per-shard score files: top_fraction of the "
                     "method's column (ties by uid), random = the seeded random rule",
        "conventions": {
            "noise_auc": "sklearn roc_auc_score(label = noisy, score = -method score); mean over seeds",
            "random_score": "-(the random rule's seeded uid hash): its order is the rule's keep order",
            "recall": "r1/r5 = mean of image->text and text->image recall@k over held-out pairs; an "
                      "item whose caption equals the query pair's counts as correct; ties count against",
            "std": "sample standard deviation over seeds (ddof=1); null with one seed",
            "full": "the proxy's final checkpoint = a retraining on every training pair",
        },
        "seconds": {"data": round(t_data, 1), "total": round(total, 1),
                    **{f"cells_{kind}": {k: round(sum(c[kind].get(k, 0.0) for c in cells), 1) for k in PHASES}
                       for kind in ("seconds", "cpu_seconds")}},
        "environment": {"torch": torch.__version__, "python": platform.python_version(),
                        "machine": platform.machine(), "cpu_count": os.cpu_count(),
                        "load_avg_at_end": list(os.getloadavg()) if hasattr(os, "getloadavg") else None},
    }


# --------------------------------------------------------------------------- tables


def format_table(report: dict[str, Any]) -> str:
    """Markdown tables of the report: per dataset, one row per method and budget."""
    lines: list[str] = []
    for name in DATASETS:
        if name not in report:
            continue
        metrics, part = METRICS[name], report[name]
        head = [f"{m} {b}" for b, _ in BUDGETS for m in metrics]
        auc = ["noise AUC"] if name == "fashion_mnist" else []
        lines += [f"**{name}**", "", "| method | " + " | ".join(head + auc) + " |",
                  "|---" * (1 + len(head) + len(auc)) + "|"]
        for method in METHODS:
            cells = [_fmt(part[b][method], m) for b, _ in BUDGETS for m in metrics]
            if auc:
                cells.append(f"{part['noise_auc'][method]:.3f}")
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
        full = [_fmt(part["full"], m) for _ in BUDGETS for m in metrics]
        lines += ["| full (100 %) | " + " | ".join(full + ["—"] * len(auc)) + " |", ""]
    return "\n".join(lines)


def _fmt(entry: dict[str, float | None], metric: str) -> str:
    mean, std = entry[f"{metric}_mean"], entry[f"{metric}_std"]
    return f"{mean:.3f}" if std is None else f"{mean:.3f} ± {std:.3f}"
