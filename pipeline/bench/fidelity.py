"""``diffin bench fidelity``: estimated vs actual effects of removing samples.

Ground truth comes from deterministic retraining on real data, for two datasets:

- ``openmoji`` — the proxy CLIP (tiny-clip-32, AdamW) on OpenMoji pairs
  (:mod:`pipeline.bench.openmoji_clip`);
- ``digits`` — an MLP trained by plain mini-batch SGD on scikit-learn's digits
  (:mod:`pipeline.bench.digits`), the setting of Diff-In's derivation.

For each: true leave-one-out effects and LDS over random half-subsets (:mod:`.protocol`),
compared with each method's scores (:mod:`.metrics`). The result is a JSON file
``{dataset: {method: {spearman_loo, pearson_loo, relerr_loo, lds}}}`` (null where a method
does not apply), plus ``_meta`` with the settings, counts, timings and the command.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from pipeline.bench.digits import DigitsSettings, MLPConfig, run_digits
from pipeline.bench.metrics import method_metrics
from pipeline.bench.openmoji_clip import OpenMojiSettings, run_openmoji
from pipeline.bench.protocol import DatasetResult
from pipeline.errors import UsageError
from pipeline.io.atomic import write_json_atomic
from pipeline.influence.unrolled import UnrolledSettings
from pipeline.influence.scores import ESTIMATE_COLUMNS, SCORE_COLUMNS
from pipeline.model.scorer import InfluenceSettings

log = logging.getLogger(__name__)

METHODS = (*SCORE_COLUMNS, "random")
ESTIMATES = ESTIMATE_COLUMNS  # in units of L_V (their magnitudes are compared too)
DATASETS = ("openmoji", "digits")
DEFAULT_OUT = "benchmarks/results/fidelity.json"
DEFAULT_QUICK_OUT = "benchmarks/results/fidelity_quick.json"


@dataclass(frozen=True)
class FidelitySettings:
    """Everything a fidelity run depends on."""

    openmoji: OpenMojiSettings = OpenMojiSettings()
    digits: DigitsSettings = DigitsSettings()
    datasets: tuple[str, ...] = DATASETS
    threads: int = 1
    seed: int = 0


def full_settings() -> FidelitySettings:
    """The published run: ≥ 40 leave-one-out samples and ≥ 32 subsets per dataset."""
    return FidelitySettings()


def quick_settings() -> FidelitySettings:
    """A short run of the same machinery (≈ 1–2 min on 2 cores); numbers are indicative only."""
    openmoji = OpenMojiSettings(
        num_train=128, num_target=95,
        train=OpenMojiSettings().train.model_copy(update={"steps": 30, "warmup": 5, "checkpoints": 3}),
        influence=InfluenceSettings(bank_size=63, adam=True, unrolled=UnrolledSettings(lanczos_steps=8)),
        loo=6, lds_subsets=6, noise=2)
    digits = DigitsSettings(mlp=MLPConfig(steps=300), loo=40, lds_subsets=16, noise=5)
    return FidelitySettings(openmoji=openmoji, digits=digits)


def _with_seed(settings: FidelitySettings, seed: int) -> FidelitySettings:
    """``settings`` with every seed (splits, order, init, bank, subsets) set to ``seed``."""
    om = settings.openmoji
    openmoji = dataclasses.replace(
        om, seed=seed, train=om.train.model_copy(update={"seed": seed}),
        influence=dataclasses.replace(om.influence, seed=seed))
    digits = dataclasses.replace(settings.digits, seed=seed, mlp=dataclasses.replace(settings.digits.mlp, seed=seed))
    return dataclasses.replace(settings, openmoji=openmoji, digits=digits, seed=seed)


def random_scores(uids: Sequence[str], seed: int) -> dict[str, float]:
    """Seeded standard-normal scores, one per uid (the random baseline)."""
    values = np.random.default_rng(seed).standard_normal(len(uids))
    return dict(zip(uids, values.tolist()))


def evaluate(result: DatasetResult, seed: int) -> dict[str, dict[str, float | None]]:
    """The metrics of every method (all-null rows for methods that do not apply)."""
    truth = result.truth
    scores = dict(result.scores)
    some = next(s for s in scores.values() if s is not None)
    scores["random"] = random_scores(sorted(some), seed)
    return {m: method_metrics(scores.get(m), truth.loo_uids, truth.loo_actual, truth.removed_sets,
                              truth.lds_actual, is_estimate=m in ESTIMATES) for m in METHODS}


def evaluate_variants(result: DatasetResult) -> dict[str, dict[str, float | None]]:
    """The metrics of the extra estimators (e.g. the unrolled score's f, K, Hessian and m sweep)."""
    truth = result.truth
    return {name: method_metrics(scores, truth.loo_uids, truth.loo_actual, truth.removed_sets, truth.lds_actual,
                                 is_estimate=True) for name, scores in result.variants.items()}


def score_stats(result: DatasetResult) -> dict[str, dict[str, float]]:
    """Mean, standard deviation and RMS of each method's scores over the training set."""
    stats = {}
    for method, scores in result.scores.items():
        if scores is not None:
            values = np.fromiter(scores.values(), dtype=np.float64)
            stats[method] = {"mean": float(values.mean()), "std": float(values.std()),
                             "rms": float(np.sqrt((values ** 2).mean()))}
    return stats


def run_benchmark(settings: FidelitySettings, out: str | Path, data_dir: str | Path = "data",
                  command: str = "") -> dict:
    """Run the datasets of ``settings``, write the JSON report to ``out`` and return it."""
    unknown = [d for d in settings.datasets if d not in DATASETS]
    if unknown or not settings.datasets:
        raise UsageError(f"unknown or no datasets {unknown or list(settings.datasets)}; choose from {list(DATASETS)}")
    runners: dict[str, Callable[[], DatasetResult]] = {
        "openmoji": lambda: run_openmoji(settings.openmoji, data_dir),
        "digits": lambda: run_digits(settings.digits),
    }
    report: dict = {}
    meta: dict = {"command": command, "datasets": {}, "environment": _environment(settings.threads)}
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(settings.threads)
    start = time.perf_counter()
    try:
        for name in settings.datasets:
            log.info("fidelity: %s", name)
            result = runners[name]()
            report[name] = evaluate(result, settings.seed)
            meta["datasets"][name] = {**result.meta, "score_stats": score_stats(result),
                                      "variants": evaluate_variants(result)}
            log.info("fidelity %s: %s", name, _one_line(report[name]))
    finally:
        torch.set_num_threads(previous_threads)
    meta["seconds_total"] = round(time.perf_counter() - start, 1)
    meta["notes"] = ("scores estimate L_V(θ_T without z) − L_V(θ_T); relerr_loo is null for "
                     "clip_score and random (not in units of L_V; an all-zero estimate has relerr 1.0)")
    report["_meta"] = meta
    write_json_atomic(Path(out), report)
    return report


def _environment(threads: int) -> dict:
    return {"torch": torch.__version__, "python": platform.python_version(), "threads": threads,
            "machine": platform.machine(), "cpu_count": os.cpu_count()}


def _one_line(metrics: dict[str, dict[str, float | None]]) -> str:
    def fmt(v: float | None) -> str:
        return "  -  " if v is None else f"{v:+.2f}"

    return "; ".join(f"{m} ρ={fmt(v['spearman_loo'])} lds={fmt(v['lds'])}" for m, v in metrics.items())


def settings_for(quick: bool = False, seed: int | None = None, datasets: Sequence[str] | None = None,
                 threads: int = 1, digits_steps: int | None = None, lds_fraction: float | None = None,
                 loo: int | None = None, sweep: bool = True) -> FidelitySettings:
    """The quick or full preset with these overrides (None: the preset's value).

    ``seed`` sets every seed (splits, order, init, bank, subsets); ``lds_fraction``, ``loo``
    and ``sweep`` (False: skip the unrolled variants) apply to OpenMoji, ``digits_steps`` to
    the digits MLP; ``datasets`` empty or None: the preset's.
    """
    settings = quick_settings() if quick else full_settings()
    if seed is not None:
        settings = _with_seed(settings, seed)
    if lds_fraction is not None or loo is not None or not sweep:
        om = settings.openmoji
        settings = dataclasses.replace(settings, openmoji=dataclasses.replace(
            om, lds_fraction=lds_fraction if lds_fraction is not None else om.lds_fraction,
            loo=loo if loo is not None else om.loo, sweep=om.sweep and sweep))
    if digits_steps is not None:
        mlp = dataclasses.replace(settings.digits.mlp, steps=digits_steps)
        settings = dataclasses.replace(settings, digits=dataclasses.replace(settings.digits, mlp=mlp))
    return dataclasses.replace(settings, datasets=tuple(datasets) if datasets else settings.datasets,
                               threads=threads)


def format_table(report: dict) -> str:
    """A Markdown table of the report (one row per dataset and method)."""
    lines = ["| dataset | method | Spearman (LOO) | Pearson (LOO) | rel. error (LOO) | LDS |",
             "|---|---|---:|---:|---:|---:|"]
    for dataset, methods in report.items():
        if dataset.startswith("_"):
            continue
        for method, m in methods.items():
            cells = ["n/a" if m[k] is None else f"{m[k]:.3f}" for k in ("spearman_loo", "pearson_loo", "relerr_loo", "lds")]
            lines.append(f"| {dataset} | {method} | " + " | ".join(cells) + " |")
    for dataset, meta in report.get("_meta", {}).get("datasets", {}).items():
        for variant, m in (meta.get("variants") or {}).items():
            cells = ["n/a" if m[k] is None else f"{m[k]:.3f}" for k in ("spearman_loo", "pearson_loo", "relerr_loo", "lds")]
            lines.append(f"| {dataset} | {variant} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
