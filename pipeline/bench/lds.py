"""``diffin bench lds``: a CLIP ground truth that can rank the estimators (issue #24).

The OpenMoji half of ``diffin bench fidelity`` cannot rank anything: 512 pairs put leave-one-out
below the order-noise floor, and removing half of them is far outside the linear regime every
estimator assumes. This benchmark measures the linear datamodeling score (LDS) where it can:

- **A CLIP that learns clearly.** The quality bench's Fashion-MNIST caption corpus (30 % of the
  training captions name a wrong class; target and evaluation images from the clean test split),
  the proxy ``tiny-clip-32`` under AdamW, scored with the pipeline's own settings
  (:class:`TrajectoryInfluence`, bank 255, the rest of the 1,024 target pairs = V). The proxy
  trains on ``num_train`` = 1,000 pairs for 400 steps of batch 32 (12.8 epochs, lr 1e-3, warmup
  20, cosine, 8 checkpoints): at seed 0 L_V falls from 5.82 (init) to 4.52 and the full model's
  zero-shot accuracy reaches 0.61.
- **A counterfactual above its noise.** Retraining from step 0 is chaotic at this scale: the
  first design (``--from-scratch``: stream exclusion, 47 subsets measured) put two orders'
  effects of the same subset at Spearman 0.12 and the LDS ceiling at 0.48. Every retrain
  therefore continues the proxy from its checkpoint at ``warm_start`` (default step 300) with the
  removed pairs taken out of the batches they fall in (:func:`pipeline.model.train.run_training`),
  and the scores use the checkpoints from that step on — the change a trajectory estimator over
  those checkpoints models. A pilot (``benchmarks/studies/lds_noise_pilot.py``, 20 subsets) put
  the order split at 0.93 and the ceiling at 0.96 there.
- **The linear regime.** Each of ``subsets`` (default 200) removal sets holds ``fraction``
  (default 10 %) of the training pairs, drawn by seeded uid rank (:func:`half_subsets`).
- **Order noise measured and divided out.** Every subset, and the full set, is retrained under
  ``orders`` (default 2) visiting orders; order o renames every uid (:func:`reordered_uid`),
  which redraws the trainer's order after the warm start and leaves the warm state, schedule and
  steps alone. The effect of subset S under order o is L_V(without S, o) − L_V(full, o) — a
  paired difference — and the ground truth is its mean over the orders.
- **Two targets.** Every retrain records the bank L_V (the pipeline's default target, with the
  scores' bank) and the zero-shot loss on V's images (``target.zero_shot``: the classifier of the
  class prompts), so the zero-shot-target columns are measured against their own target too.

Metrics per seed, target and column (:func:`column_metrics`): LDS = Spearman over subsets of
(Σ_{z∈S} score(z), mean effect); its standard error by a seeded bootstrap over subsets; the
LDS against each order alone; the gap to the default column with a paired-bootstrap standard
error. The ground truth (:func:`truth_summary`) carries the noise floor — how well one order's
effects predict another's (the order-split Spearman/Pearson and the Spearman–Brown reliability
of the mean) — and the LDS ceiling √(1 − σ²_noise/O / σ²_effects) (:func:`lds_ceiling`), σ²_noise the
two-way residual variance of the effects (:func:`order_noise_variance`).

Resumable and parallel: every scoring (one per seed) and every retrain is one JSON line in a
results file beside the report (``fidelity_clip_cells.jsonl``), appended as it finishes; a rerun
computes only what is missing, ``--workers`` processes share the work (each loads the data
once), and ``--report-only`` rebuilds the report from the cells alone (the scores are in them).
Cells of other settings (another fingerprint) are ignored. Raising ``--subsets`` or ``--orders``
later keeps every finished cell: subset j and order o do not depend on how many there are.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import platform
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from pipeline.bench.fidelity import random_scores
from pipeline.bench.metrics import (bootstrap_rows, bootstrap_spearman, class_prompts, spearman, standard_error,
                                    subset_predictions, zero_shot_accuracy)
from pipeline.bench.openmoji_clip import TargetLoss, model_params, unrolled_variants
from pipeline.bench.protocol import (half_subsets, lds_ceiling, order_noise, order_noise_variance,
                                     order_split_reliability, ranked, reordered_uid)
from pipeline.bench.quality import (DatasetSettings, append_cell, load_fashion_mnist, read_cells, read_json_meta)
from pipeline.config import TrainConfig
from pipeline.data.pairs import PairTable
from pipeline.errors import UsageError
from pipeline.influence.cosine import cosine_form, fixed_context, gradient_norms
from pipeline.influence.objective import ZeroShotObjective, per_sample_loss
from pipeline.influence.scores import DEFAULT_COLUMN, SCORE_COLUMNS
from pipeline.influence.unrolled import UnrolledSettings
from pipeline.io.atomic import write_json_atomic
from pipeline.model.clip import build_clip, context_length, make_tokenizer, model_spec, normalize_images
from pipeline.model.scorer import InfluenceSettings, TrajectoryInfluence, ZeroShotTarget, settings_record, split_bank
from pipeline.model.train import WarmStart, train_final, train_proxy
from pipeline.model.trajectory import Trajectory

log = logging.getLogger(__name__)

DEFAULT_OUT = "benchmarks/results/fidelity_clip.json"
DEFAULT_QUICK_OUT = "benchmarks/results/fidelity_clip_quick.json"
DEFAULT_SCRATCH_OUT = "benchmarks/results/fidelity_clip_scratch.json"  # the first design's report and cells
TARGETS = {"bank": "target_loss", "zero_shot": "zero_shot_loss"}  # report key → the retrain cell's field
ZERO_SHOT_COLUMNS = {"diffin_unrolled": "diffin_unrolled_zs", "tracin": "tracin_zs"}  # zero-shot-target scores
FULL = -1  # the subset index of the full training set
TRAIN_SALT = "lds-train"  # which corpus pairs are the training pairs (seeded rank, split seed 0)


# --------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class LdsSettings:
    """Everything a run depends on. ``corpus_limit``: the Fashion-MNIST corpus holds the first
    that many images of each split (``diffin data fashion-mnist --limit``); the training pairs are
    ``num_train`` of its training split by seeded uid rank, V and the bank come from
    ``num_target`` test pairs, the full model's zero-shot accuracy from ``num_eval`` others."""

    num_train: int = 1000
    num_target: int = 1024
    num_eval: int = 2000
    corpus_limit: int = 6000
    noise: float = 0.3
    train: TrainConfig = TrainConfig(model="tiny-clip-32", steps=400, batch_size=32, lr=1e-3, warmup=20,
                                     checkpoints=8, seed=0)
    influence: InfluenceSettings = InfluenceSettings(bank_size=255, batch_size=256, proxy_batch_size=128, adam=True)
    # The counterfactual: every retrain continues the proxy from its checkpoint at this step with the
    # removed pairs taken out of the batches they fall in, and the scores use the checkpoints from
    # this step on. None: retrain from step 0 with the pairs excluded from the visiting stream.
    warm_start: int | None = 300
    subsets: int = 200
    fraction: float = 0.1
    orders: int = 2
    seeds: tuple[int, ...] = (0, 1)
    zero_shot: bool = True  # also score with the zero-shot target (diffin_unrolled_zs, tracin_zs)
    variants: bool = True  # also score the unrolled variants (f = exp; Adam with ε floored)
    cosine: bool = False  # also score the cosine form of tracin (a backward pass per pair and checkpoint)
    bootstrap: int = 1000
    workers: int = 2
    threads: int = 1


def full_settings() -> LdsSettings:
    """The run the issue asks for: 2 seeds × (200 subsets + full) × 2 orders = 804 retrains, each
    continuing the proxy from step 300 (:attr:`LdsSettings.warm_start`)."""
    return LdsSettings()


def scratch_settings() -> LdsSettings:
    """The first design, kept to report its cells: retrain from step 0 with the removed pairs
    excluded from the visiting stream, 4 checkpoints, scores over all of them (its measured
    order noise puts the LDS ceiling below 0.5: docs/FIDELITY.md)."""
    return dataclasses.replace(full_settings(), warm_start=None,
                               train=full_settings().train.model_copy(update={"checkpoints": 4}))


def quick_settings() -> LdsSettings:
    """The same machinery on tiny data (< 20 s on 2 cores): checks the machinery, not the outcome."""
    return LdsSettings(num_train=24, num_target=20, num_eval=16, corpus_limit=40,
                       train=TrainConfig(model="tiny-clip-32", steps=3, batch_size=8, lr=1e-3, warmup=1,
                                         checkpoints=2, seed=0),
                       influence=InfluenceSettings(bank_size=7, batch_size=16, proxy_batch_size=8, adam=True,
                                                   unrolled=UnrolledSettings(lanczos_steps=3)),
                       warm_start=2, subsets=4, fraction=0.25, seeds=(0,), variants=False, bootstrap=50,
                       workers=1)


def settings_for(quick: bool = False, seeds: int | None = None, subsets: int | None = None,
                 orders: int | None = None, fraction: float | None = None, workers: int | None = None,
                 threads: int = 1, cosine: bool = False, zero_shot: bool = True,
                 variants: bool = True, from_scratch: bool = False, warm_start: int | None = None) -> LdsSettings:
    """The quick or full preset with these overrides (None: the preset's value); ``seeds``:
    seeds 0..seeds-1; ``cosine``/``zero_shot``/``variants`` only switch columns off the preset
    (``cosine`` on); ``from_scratch``: the first design (:func:`scratch_settings`);
    ``warm_start``: another checkpoint step to continue from."""
    if from_scratch and (quick or warm_start is not None):
        raise UsageError("--from-scratch is the full run's first design: not with --quick or --warm-start")
    base = quick_settings() if quick else scratch_settings() if from_scratch else full_settings()
    changes: dict[str, Any] = {"threads": threads, "cosine": base.cosine or cosine,
                               "zero_shot": base.zero_shot and zero_shot, "variants": base.variants and variants}
    if seeds is not None:
        changes["seeds"] = tuple(range(seeds))
    for name, value in (("subsets", subsets), ("orders", orders), ("fraction", fraction), ("workers", workers),
                        ("warm_start", warm_start)):
        if value is not None:
            changes[name] = value
    settings = dataclasses.replace(base, **changes)
    check_settings(settings)
    return settings


def check_settings(settings: LdsSettings) -> None:
    """A one-line UsageError for settings the protocol cannot run."""
    if not settings.seeds or len(set(settings.seeds)) != len(settings.seeds):
        raise UsageError(f"need one or more distinct seeds, got {list(settings.seeds)}")
    if settings.subsets < 3 or settings.orders < 2:
        raise UsageError(f"need >= 3 subsets and >= 2 orders, got {settings.subsets} and {settings.orders}")
    if not 0 < settings.fraction < 1 or int(settings.num_train * settings.fraction) < 1:
        raise UsageError(f"--fraction must remove at least one of {settings.num_train} pairs and be < 1, "
                         f"got {settings.fraction}")
    if settings.workers < 1 or settings.threads < 1 or settings.bootstrap < 2:
        raise UsageError(f"--workers and --threads must be >= 1 and bootstrap >= 2, got {settings.workers}, "
                         f"{settings.threads}, {settings.bootstrap}")
    if settings.num_train > settings.corpus_limit or settings.num_target + settings.num_eval > settings.corpus_limit:
        raise UsageError(f"{settings.num_train} train, {settings.num_target} target + {settings.num_eval} eval pairs "
                         f"do not fit a corpus of the first {settings.corpus_limit} images per split")
    if settings.num_target <= settings.influence.bank_size:
        raise UsageError(f"{settings.num_target} target pairs leave none for V beside a bank of "
                         f"{settings.influence.bank_size}")
    if settings.train.checkpoint_steps()[-1] != settings.train.steps:
        raise UsageError("the last checkpoint must be at the final step (it is the full model)")
    steps = settings.train.checkpoint_steps()
    if settings.warm_start is not None and (settings.warm_start not in steps[:-1]):
        raise UsageError(f"--warm-start must be the step of a checkpoint before the last, one of {steps[:-1]}; "
                         f"got {settings.warm_start}")


def fingerprint(settings: LdsSettings) -> str:
    """What every cell depends on (data, training, scoring, subset size); cells of another are
    ignored. Not the counts (subsets, orders, seeds), the columns or the processes."""
    payload = {"num_train": settings.num_train, "num_target": settings.num_target, "num_eval": settings.num_eval,
               "corpus_limit": settings.corpus_limit, "noise": settings.noise, "fraction": settings.fraction,
               "train": settings.train.model_dump(mode="json"), "influence": settings_record(settings.influence),
               # the first design's cells keep their fingerprint
               **({"warm_start": settings.warm_start} if settings.warm_start is not None else {})}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def columns_key(settings: LdsSettings) -> str:
    """Which optional columns a scores cell holds (a scores cell of other columns is redone)."""
    return ",".join(name for name in ("zero_shot", "variants", "cosine") if getattr(settings, name)) or "base"


def cells_path(out: str | Path) -> Path:
    """The results file beside the report: ``fidelity_clip.json`` → ``fidelity_clip_cells.jsonl``."""
    out = Path(out)
    return out.with_name(f"{out.stem}_cells.jsonl")


# --------------------------------------------------------------------------- data


@dataclass
class LdsData:
    """Training pairs, target pairs (with class labels: the zero-shot target) and eval pairs."""

    train: PairTable
    target: PairTable
    eval: PairTable
    eval_labels: np.ndarray
    noisy: np.ndarray  # per training pair: its caption names a wrong class
    corpus: str


def load_data(settings: LdsSettings, data_dir: str | Path) -> LdsData:
    """Build or reuse the quality bench's Fashion-MNIST corpus and split it (deterministic)."""
    spec = DatasetSettings(num_train=settings.corpus_limit, num_target=settings.num_target,
                           num_eval=settings.num_eval, train=settings.train, influence=settings.influence)
    data = load_fashion_mnist(spec, data_dir, settings.noise)
    rows = sorted(ranked(data.train.uids, 0, TRAIN_SALT)[:settings.num_train])
    test_meta = read_json_meta(Path(data.corpus) / "test")
    target = dataclasses.replace(data.target, labels=[int(test_meta[u]["label"]) for u in data.target.uids])
    return LdsData(data.train.subset(rows), target, data.eval, data.eval_labels, data.noisy[rows], data.corpus)


def reordered(table: PairTable, order: int) -> PairTable:
    """``table`` with every uid renamed for visiting order ``order`` (order 0: unchanged)."""
    return dataclasses.replace(table, uids=[reordered_uid(u, order) for u in table.uids])


def seeded(settings: LdsSettings, seed: int) -> tuple[TrainConfig, InfluenceSettings]:
    """The training and scoring settings of ``seed`` (initialisation, order, bank, proxy batches;
    with a warm start, the scores use the checkpoints from its step on)."""
    cfg = settings.train.model_copy(update={"seed": seed, "threads": settings.threads})
    influence = dataclasses.replace(settings.influence, seed=seed)
    if settings.warm_start is not None:
        steps = cfg.checkpoint_steps()
        influence = dataclasses.replace(influence, checkpoints=tuple(i for i, step in enumerate(steps)
                                                                     if step >= settings.warm_start))
    return cfg, influence


def proxy_trajectory(settings: LdsSettings, data: LdsData, seed: int, work_dir: Path) -> Trajectory:
    """The proxy of ``seed`` (its checkpoints are what the scores read and what warm retrains
    continue from), trained into ``work_dir`` once and reused (the run is deterministic)."""
    pairs = hashlib.sha256("\n".join(data.train.uids).encode()).hexdigest()[:8]  # another corpus, another proxy
    where = work_dir / f"lds-proxy-{fingerprint(settings)}-{pairs}-s{seed}"
    if (where / "trajectory.json").is_file():
        return Trajectory.load(where)
    cfg, _ = seeded(settings, seed)
    return train_proxy(data.train, cfg, where, log_every=0)


def warm_start(settings: LdsSettings, trajectory: Trajectory) -> WarmStart | None:
    """The checkpoint every retrain of this proxy continues from (None: from step 0)."""
    if settings.warm_start is None:
        return None
    return WarmStart.from_checkpoint(trajectory, [c.step for c in trajectory.checkpoints].index(settings.warm_start))


def zero_shot_target() -> ZeroShotTarget:
    """The class prompts of every caption template, class-major (the quality bench's classifier)."""
    prompts = class_prompts()
    return ZeroShotTarget(tuple(t for p in prompts for t in p), len(prompts[0]))


# --------------------------------------------------------------------------- target losses


@dataclass
class ZeroShotLoss:
    """The zero-shot classifier's mean cross-entropy over V's images and labels."""

    objective: ZeroShotObjective
    batches: list[tuple[Tensor, Tensor]]

    def __call__(self, params: dict[str, Tensor]) -> float:
        with torch.no_grad():
            losses = torch.cat([per_sample_loss(self.objective, params, b) for b in self.batches])
        return float(losses.double().mean())


@dataclass
class TargetEvaluator:
    """Both target losses of a trained model, with the bank and V of one seed."""

    bank: TargetLoss
    zero_shot: ZeroShotLoss

    @classmethod
    def of(cls, data: LdsData, influence: InfluenceSettings, model_name: str) -> "TargetEvaluator":
        """V and the bank as :class:`TrajectoryInfluence` splits them, batched like it."""
        model = build_clip(model_spec(model_name))
        tokenizer = make_tokenizer(context_length(model))
        bank_idx, v_idx = split_bank(data.target, influence.bank_size, influence.seed)
        target, size = data.target, influence.batch_size
        parts = [v_idx[i:i + size] for i in range(0, len(v_idx), size)]
        bank = TargetLoss(model, (normalize_images(target.images[bank_idx]),
                                  tokenizer([target.captions[i] for i in bank_idx])),
                          [(normalize_images(target.images[p]), tokenizer([target.captions[i] for i in p]))
                           for p in parts])
        spec = zero_shot_target()
        objective = ZeroShotObjective(model, tokenizer(list(spec.prompts)), spec.prompts_per_class)
        labels = target.labels or []
        zero_shot = ZeroShotLoss(objective, [(normalize_images(target.images[p]),
                                              torch.as_tensor([labels[i] for i in p], dtype=torch.long))
                                             for p in parts])
        return cls(bank, zero_shot)

    def __call__(self, model: nn.Module) -> dict[str, float]:
        params = model_params(model)
        return {"target_loss": self.bank(params), "zero_shot_loss": self.zero_shot(params)}


# --------------------------------------------------------------------------- scoring


def _columns(scores: dict[str, Tensor]) -> dict[str, np.ndarray]:
    return {c: scores[c].double().numpy() for c in SCORE_COLUMNS if c in scores}


def zero_shot_columns(trajectory: Trajectory, influence: InfluenceSettings,
                      data: LdsData) -> tuple[dict[str, np.ndarray], list[float]]:
    """``diffin_unrolled`` and ``tracin`` with L_V the zero-shot task (``target.zero_shot``), and
    that L_V at every checkpoint."""
    settings = dataclasses.replace(influence, zero_shot=zero_shot_target(), components=("a", "d"), adam=False)
    scorer = TrajectoryInfluence(trajectory, settings)
    scorer.load_prepared(scorer.prepare(data.target, data.train))
    scores = scorer.score_table(data.train)
    return ({name: scores[column].double().numpy() for column, name in ZERO_SHOT_COLUMNS.items()},
            list(scorer.target_losses or []))


def cosine_column(scorer: TrajectoryInfluence, data: LdsData, components: Tensor, batch: int = 64) -> np.ndarray:
    """The cosine form of ``tracin`` (:mod:`pipeline.influence.cosine`): Σ_t w_t a_t / ‖G_z,t‖
    with TracIn's weights T·η_t/(N·m), the bank's embeddings and temperature held fixed."""
    s, trajectory = scorer.settings, scorer.trajectory
    bank_idx, _ = split_bank(data.target, s.bank_size, s.seed)
    objective = scorer._objective(data.target.images[bank_idx], [data.target.captions[i] for i in bank_idx])
    rows = list(range(len(data.train)))
    norms = []
    for params in scorer.params:
        context = fixed_context(objective, params)
        norms.append(torch.cat([gradient_norms(objective, params, b, context)
                                for b in scorer._batches(data.train, rows, batch)]))
    weights = [trajectory.total_steps / (trajectory.num_samples * len(scorer.checkpoints)) * c.lr
               for c in scorer.checkpoints]
    return cosine_form(components, weights, torch.stack(norms)).numpy()


def score_seed(settings: LdsSettings, data: LdsData, seed: int, work_dir: Path) -> dict[str, Any]:
    """Train the proxy of ``seed``, score every training pair with every column in one pass
    (plus the optional ones); the scores cell (scores by training uid, L_V per checkpoint)."""
    _, influence = seeded(settings, seed)
    start = time.perf_counter()
    # the proxy stays in work_dir: warm retrains continue from it
    trajectory = proxy_trajectory(settings, data, seed, work_dir)
    t_train = time.perf_counter() - start
    scorer = TrajectoryInfluence(trajectory, influence)
    prepared = scorer.prepare(data.target, data.train)
    scorer.load_prepared(prepared)
    scores = scorer.score_table(data.train)
    columns = _columns(scores)
    target_loss = list(scorer.target_losses or [])
    if settings.variants:
        columns.update({k: v.double().numpy() for k, v in
                        unrolled_variants(trajectory, influence, data.train, data.target, prepared).items()})
    zero_shot_loss: list[float] = []
    if settings.zero_shot:
        extra, zero_shot_loss = zero_shot_columns(trajectory, influence, data)
        columns.update(extra)
    if settings.cosine:
        columns["tracin_cosine"] = cosine_column(scorer, data, scores["a"])
    log.info("lds seed %d: %d pairs scored, %d columns (%.0f s)", seed, len(data.train), len(columns),
             time.perf_counter() - start)
    return {"kind": "scores", "seed": seed, "columns_key": columns_key(settings), "uids": list(data.train.uids),
            "scores": {c: [float(f"{x:.8g}") for x in v] for c, v in columns.items()},
            "target_loss": [round(x, 6) for x in target_loss],
            "zero_shot_target_loss": [round(x, 6) for x in zero_shot_loss],
            "noisy_in_train": int(data.noisy.sum()),
            "seconds": {"proxy_train": round(t_train, 1), "score": round(time.perf_counter() - start - t_train, 1)}}


# --------------------------------------------------------------------------- retraining


def retrain_cell(data: LdsData, cfg: TrainConfig, evaluator: TargetEvaluator, removed: Sequence[str],
                 seed: int, subset: int, order: int, warm: WarmStart | None = None) -> dict[str, Any]:
    """Retrain without ``removed`` under visiting order ``order``; the retrain cell (both target
    losses; the full set's also its zero-shot accuracy on the eval pairs). ``warm``: continue from
    that checkpoint with the removed pairs taken out of their batches; else from step 0 with them
    excluded from the visiting stream."""
    start = time.perf_counter()
    renamed = {reordered_uid(u, order) for u in removed}
    table = reordered(data.train, order)
    model = (train_final(table, cfg, renamed) if warm is None
             else train_final(table, cfg, warm=warm, drop_from_batches=renamed))
    cell: dict[str, Any] = {"kind": "retrain", "seed": seed, "subset": subset, "order": order,
                            "removed": len(removed), **evaluator(model)}
    if subset == FULL:
        cell["acc"] = zero_shot_accuracy(model, data.eval.images, data.eval_labels, class_prompts())
    cell["seconds"] = round(time.perf_counter() - start, 1)
    return cell


@dataclass(frozen=True)
class ChunkJob:
    """One worker's share: the seeds it scores, then the (seed, subset, order) retrains it runs."""

    settings: LdsSettings
    data_dir: str
    cells_file: str
    fingerprint: str
    work_dir: str
    score_seeds: tuple[int, ...]
    retrains: tuple[tuple[int, int, int], ...]


def run_chunk(job: ChunkJob) -> int:
    """Load the data once, score, retrain; append every finished cell. Returns the cells written."""
    torch.set_num_threads(job.settings.threads)
    settings, cells = job.settings, Path(job.cells_file)
    data = load_data(settings, job.data_dir)
    written = 0
    for seed in job.score_seeds:
        append_cell(cells, {"settings": job.fingerprint, **score_seed(settings, data, seed, Path(job.work_dir))})
        written += 1
    evaluators: dict[int, TargetEvaluator] = {}
    subsets: dict[int, list[list[str]]] = {}
    warm: dict[int, WarmStart | None] = {}
    for seed, subset, order in job.retrains:
        cfg, influence = seeded(settings, seed)
        if seed not in evaluators:
            evaluators[seed] = TargetEvaluator.of(data, influence, cfg.model)
            subsets[seed] = half_subsets(data.train.uids, settings.subsets, seed, settings.fraction)
            warm[seed] = (warm_start(settings, proxy_trajectory(settings, data, seed, Path(job.work_dir)))
                          if settings.warm_start is not None else None)
        removed = [] if subset == FULL else subsets[seed][subset]
        cell = retrain_cell(data, cfg, evaluators[seed], removed, seed, subset, order, warm[seed])
        append_cell(cells, {"settings": job.fingerprint, **cell})
        written += 1
        log.info("lds seed %d subset %d order %d: L_V %.4f (%.0f s)", seed, subset, order, cell["target_loss"],
                 cell["seconds"])
    return written


def pending_work(settings: LdsSettings, cells: Sequence[dict[str, Any]],
                 print_: str) -> tuple[list[int], list[tuple[int, int, int]]]:
    """The seeds still to score and the retrains still to run, in the order they are worth most
    to a partial run: per seed the full set, then subset by subset (every order of one subset
    before the next)."""
    mine = [c for c in cells if c.get("settings") == print_]
    scored = {c["seed"] for c in mine if c["kind"] == "scores" and c["columns_key"] == columns_key(settings)}
    done = {(c["seed"], c["subset"], c["order"]) for c in mine if c["kind"] == "retrain"}
    wanted = [(seed, subset, order) for seed in settings.seeds for subset in [FULL, *range(settings.subsets)]
              for order in range(settings.orders)]
    return [s for s in settings.seeds if s not in scored], [w for w in wanted if w not in done]


def plan_chunks(settings: LdsSettings, data_dir: str, cells_file: Path, print_: str, work_dir: Path,
                score: Sequence[int], retrains: Sequence[tuple[int, int, int]]) -> list[ChunkJob]:
    """Round-robin shares for ``settings.workers`` processes (retrains cost about the same)."""
    workers = max(1, min(settings.workers, len(score) + len(retrains)))
    return [ChunkJob(settings, str(data_dir), str(cells_file), print_, str(work_dir),
                     tuple(score[w::workers]), tuple(retrains[w::workers])) for w in range(workers)]


def _worker_logging() -> None:
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s [worker {os.getpid()}] %(name)s: %(message)s")


def run_chunks(jobs: Sequence[ChunkJob]) -> int:
    """Run the shares, in this process when there is one, else in spawned processes."""
    if len(jobs) <= 1:
        return sum(run_chunk(job) for job in jobs)
    with ProcessPoolExecutor(len(jobs), mp_context=get_context("spawn"), initializer=_worker_logging) as pool:
        return sum(pool.map(run_chunk, jobs))


# --------------------------------------------------------------------------- the report


def effects_table(cells: Sequence[dict[str, Any]], seed: int, orders: int, field: str) -> tuple[list[int], np.ndarray]:
    """(subset indices, effects [subsets, orders]) of the subsets measured under every order, the
    effect of subset S under order o being ``field``(without S, o) − ``field``(full, o)."""
    loss = {(c["subset"], c["order"]): c[field] for c in cells if c["kind"] == "retrain" and c["seed"] == seed}
    if any((FULL, o) not in loss for o in range(orders)):
        return [], np.zeros((0, orders))
    subsets = sorted({s for s, _ in loss if s != FULL and all((s, o) in loss for o in range(orders))})
    effects = np.array([[loss[(s, o)] - loss[(FULL, o)] for o in range(orders)] for s in subsets], dtype=np.float64)
    return subsets, effects.reshape(len(subsets), orders)


def truth_summary(effects: np.ndarray, base: Sequence[float]) -> dict[str, Any]:
    """The ground truth of one (seed, target): counts, spread, noise floor and LDS ceiling."""
    mean = effects.mean(axis=1)
    noise_one = float(np.sqrt(order_noise_variance(effects)))
    return {"subsets": int(effects.shape[0]), "orders": int(effects.shape[1]),
            "full_loss_per_order": [round(b, 6) for b in base],
            "effect_mean": float(mean.mean()), "effect_std": float(mean.std()),
            "noise_rms_one_order": noise_one, "noise_rms_of_mean": noise_one / np.sqrt(effects.shape[1]),
            "order_split": order_split_reliability(effects),
            "lds_ceiling": lds_ceiling(mean, order_noise(effects))}


def column_metrics(scores: dict[str, dict[str, float]], removed_sets: Sequence[Sequence[str]],
                   effects: np.ndarray, rows: np.ndarray, default: str = DEFAULT_COLUMN) -> dict[str, dict[str, Any]]:
    """Per column: LDS against the mean effect, its bootstrap SE, the LDS per order, and the gap
    of ``default`` over it with a paired-bootstrap SE (the same resampled subsets)."""
    mean = effects.mean(axis=1)
    predictions = {c: subset_predictions(s, removed_sets) for c, s in scores.items()}
    boots = {c: bootstrap_spearman(p, mean, rows) for c, p in predictions.items()}
    out: dict[str, dict[str, Any]] = {}
    for column, pred in predictions.items():
        entry: dict[str, Any] = {"lds": spearman(pred, mean), "lds_se": standard_error(boots[column]),
                                 "lds_per_order": [spearman(pred, effects[:, o]) for o in range(effects.shape[1])]}
        default_lds = out.get(default, {}).get("lds")
        if column != default and entry["lds"] is not None and default_lds is not None:
            entry["gap_to_default"] = default_lds - entry["lds"]
            entry["gap_se"] = standard_error(boots[default] - boots[column])
        out[column] = entry
    return out


def is_unrolled_variant(column: str) -> bool:
    """True for the default column's own variants (Adam, zero-shot target, f, ε floors): the goal
    compares the default with the other methods, not with these."""
    return column.startswith(("diffin_unrolled", "unrolled_"))


def goal_check(columns: dict[str, dict[str, Any]], default: str = DEFAULT_COLUMN,
               threshold: float = 0.5, margin: float = 2.0) -> dict[str, Any] | None:
    """Issue #24's goal on one (seed, target): the default's LDS ≥ ``threshold`` and above every
    other method (not its own variants) by more than ``margin`` paired standard errors; the
    closest method and its gap in standard errors say by how much it is met or missed."""
    lds_default = columns.get(default, {}).get("lds")
    others = {c: e for c, e in columns.items() if not is_unrolled_variant(c) and e.get("gap_se") is not None}
    if lds_default is None or not others:
        return None
    ratios = {c: (e["gap_to_default"] / e["gap_se"] if e["gap_se"] > 0 else
                  (math.inf if e["gap_to_default"] > 0 else 0.0)) for c, e in others.items()}
    closest = min(ratios, key=ratios.__getitem__)
    return {"lds_at_least": threshold, "lds_met": lds_default >= threshold, "closest": closest,
            "closest_gap": others[closest]["gap_to_default"],
            "closest_gap_in_se": ratios[closest] if math.isfinite(ratios[closest]) else None,
            "above_every_method_met": ratios[closest] > margin}


def _ordered(scores: dict[str, Any], default: str) -> list[str]:
    return [default] + [c for c in scores if c != default] if default in scores else list(scores)


def seed_report(settings: LdsSettings, cells: Sequence[dict[str, Any]], seed: int) -> dict[str, Any] | None:
    """The report of one seed from its cells (None before its scores cell exists)."""
    scored = [c for c in cells if c["kind"] == "scores" and c["seed"] == seed]
    if not scored:
        return None
    record = scored[-1]
    uids = record["uids"]
    scores = {c: dict(zip(uids, values)) for c, values in record["scores"].items()}
    scores["random"] = random_scores(uids, seed)
    scores = {c: scores[c] for c in _ordered(scores, DEFAULT_COLUMN)}
    all_sets = half_subsets(uids, settings.subsets, seed, settings.fraction)
    full = {c["order"]: c for c in cells if c["kind"] == "retrain" and c["seed"] == seed and c["subset"] == FULL}
    report: dict[str, Any] = {
        "learning": {"target_loss_checkpoints": record["target_loss"],
                     "zero_shot_target_loss_checkpoints": record["zero_shot_target_loss"],
                     "full_acc_per_order": [full[o]["acc"] for o in sorted(full)],
                     "noisy_in_train": record["noisy_in_train"], "seconds": record["seconds"]}}
    for target, field in TARGETS.items():
        subsets, effects = effects_table(cells, seed, settings.orders, field)
        if len(subsets) < 3:
            report[target] = {"truth": {"subsets": len(subsets)}, "columns": None}
            continue
        rows = bootstrap_rows(len(subsets), settings.bootstrap, seed)
        columns = column_metrics(scores, [all_sets[s] for s in subsets], effects, rows)
        report[target] = {"truth": truth_summary(effects, [full[o][field] for o in range(settings.orders)]),
                          "columns": columns, "goal": goal_check(columns)}
    return report


def build_report(settings: LdsSettings, cells: Sequence[dict[str, Any]], print_: str) -> dict[str, Any]:
    """Every seed's report from the cells of this fingerprint."""
    mine = [c for c in cells if c.get("settings") == print_
            and (c["kind"] != "retrain" or c["order"] < settings.orders)]
    report = {}
    for seed in settings.seeds:
        part = seed_report(settings, mine, seed)
        if part is not None:
            report[f"seed{seed}"] = part
    return report


def run_benchmark(settings: LdsSettings, out: str | Path, data_dir: str | Path = "data", command: str = "",
                  work_dir: str | Path | None = None, report_only: bool = False) -> dict[str, Any]:
    """Run what the results file beside ``out`` lacks (:func:`cells_path`), then write the JSON
    report to ``out`` atomically and return it. ``report_only``: compute nothing. ``work_dir``
    (default: ``data_dir/lds_work``) keeps each seed's proxy trajectory: the scores read it and
    warm retrains continue from it."""
    check_settings(settings)
    start = time.perf_counter()
    cells_file, print_ = cells_path(out), fingerprint(settings)
    work = Path(work_dir) if work_dir is not None else Path(data_dir) / "lds_work"  # the proxies' trajectories
    score, retrains = pending_work(settings, read_cells(cells_file), print_)
    written = 0
    if not report_only and (score or retrains):
        work.mkdir(parents=True, exist_ok=True)
        if settings.warm_start is not None:  # train the proxies once, before the workers share them
            data = load_data(settings, data_dir)
            for seed in sorted(set(score) | {seed for seed, _, _ in retrains}):
                proxy_trajectory(settings, data, seed, work)
        log.info("lds: %d scorings and %d retrains to run on %d workers", len(score), len(retrains), settings.workers)
        written = run_chunks(plan_chunks(settings, str(data_dir), cells_file, print_, work, score, retrains))
    cells = read_cells(cells_file)
    report = build_report(settings, cells, print_)
    report["_meta"] = _meta(settings, cells, print_, command, cells_file, written, time.perf_counter() - start)
    write_json_atomic(Path(out), report)
    return report


def _meta(settings: LdsSettings, cells: Sequence[dict[str, Any]], print_: str, command: str, cells_file: Path,
          written: int, total: float) -> dict[str, Any]:
    mine = [c for c in cells if c.get("settings") == print_]
    retrain_seconds = [c["seconds"] for c in mine if c["kind"] == "retrain"]
    wanted = len(settings.seeds) * (settings.subsets + 1) * settings.orders
    settings_dict = dataclasses.asdict(settings) | {"train": settings.train.model_dump(mode="json"),
                                                    "influence": settings_record(settings.influence)}
    return {
        "command": command, "settings": settings_dict, "settings_fingerprint": print_,
        "cells_file": str(cells_file), "default_column": DEFAULT_COLUMN,
        "counts": {"retrains_wanted": wanted, "retrains_done": len(retrain_seconds),
                   "scorings_done": sum(c["kind"] == "scores" for c in mine), "cells_written_this_run": written},
        "seconds": {"total_this_run": round(total, 1),
                    "retrain_median": float(np.median(retrain_seconds)) if retrain_seconds else None,
                    "retrain_sum": round(float(np.sum(retrain_seconds)), 1)},
        "conventions": {
            "effect": "L_V(without S, order o) - L_V(full, order o), averaged over the orders; order o renames "
                      "every uid (pipeline.bench.protocol.reordered_uid), same initialisation",
            "counterfactual": (f"every retrain continues the order-0 proxy from its checkpoint at step "
                               f"{settings.warm_start} under order o, the removed pairs taken out of the batches "
                               "they fall in; the scores use the checkpoints from that step on"
                               if settings.warm_start is not None else
                               "every retrain runs from step 0, the removed pairs excluded from the visiting "
                               "stream; the scores use every checkpoint"),
            "lds": "Spearman over subsets of (sum of the removed pairs' scores, mean effect)",
            "lds_se": f"sample std of the LDS over {settings.bootstrap} bootstrap resamples of the subsets (seeded)",
            "gap_se": "the same over the paired resamples of (default LDS - column LDS)",
            "noise_floor": "order_split: Spearman/Pearson across subsets between two orders' effects; "
                           "mean_reliability: Spearman-Brown of the mean over the orders",
            "lds_ceiling": "sqrt(1 - noise variance of the mean effect / variance of the mean effects)",
            "targets": "bank: the target pairs' CLIP loss against the scores' bank (the pipeline's L_V); "
                       "zero_shot: the class-prompt classifier's cross-entropy on V's images",
        },
        "environment": {"torch": torch.__version__, "python": platform.python_version(),
                        "machine": platform.machine(), "cpu_count": os.cpu_count(),
                        "load_avg_at_end": list(os.getloadavg()) if hasattr(os, "getloadavg") else None},
    }


# --------------------------------------------------------------------------- table


def _fmt(entry: dict[str, Any] | None, key: str = "lds") -> str:
    if not entry or entry.get(key) is None:
        return "—"
    se = entry.get(f"{key}_se" if key == "lds" else "gap_se")
    return f"{entry[key]:+.3f}" + (f" ± {se:.3f}" if se is not None else "")


def _goal_line(seed: str, goal: dict[str, Any] | None) -> str:
    if goal is None:
        return f"{seed}: goal not computable"
    in_se = goal["closest_gap_in_se"]
    return (f"{seed}: LDS >= {goal['lds_at_least']}: {'met' if goal['lds_met'] else 'missed'}; above every method "
            f"by > 2 SE: {'met' if goal['above_every_method_met'] else 'missed'} (closest {goal['closest']}: gap "
            f"{goal['closest_gap']:+.3f}" + (f", {in_se:.1f} SE)" if in_se is not None else ")"))


def format_table(report: dict[str, Any]) -> str:
    """Markdown: per target, one row per column (LDS ± SE and the default's gap, per seed), then
    the ground truth rows (subsets, noise floor, ceiling)."""
    seeds = [k for k in report if k.startswith("seed")]
    lines: list[str] = []
    for target in TARGETS:
        parts = {s: report[s][target] for s in seeds if report[s][target]["columns"]}
        if not parts:
            continue
        head = [f"{s} LDS ± SE | {s} gap ± SE" for s in parts]
        lines += [f"**{target} target**", "", "| column | " + " | ".join(head) + " |",
                  "|---" + "|---:|---:" * len(parts) + "|"]
        columns = dict.fromkeys(c for p in parts.values() for c in p["columns"])
        for column in columns:
            cells = [f"{_fmt(p['columns'].get(column))} | {_fmt(p['columns'].get(column), 'gap_to_default')}"
                     for p in parts.values()]
            lines.append(f"| {column} | " + " | ".join(cells) + " |")
        lines += ["", "| seed | subsets | effect mean ± std | order-split ρ | noise RMS (mean) | LDS ceiling |",
                  "|---|---:|---:|---:|---:|---:|"]
        for seed, p in parts.items():
            t = p["truth"]
            rho, ceiling = t["order_split"]["spearman"], t["lds_ceiling"]
            lines.append(f"| {seed} | {t['subsets']} | {t['effect_mean']:+.4f} ± {t['effect_std']:.4f} | "
                         f"{'—' if rho is None else f'{rho:.3f}'} | {t['noise_rms_of_mean']:.4f} | "
                         f"{'—' if ceiling is None else f'{ceiling:.3f}'} |")
        lines += [""] + [_goal_line(seed, p.get("goal")) for seed, p in parts.items()] + [""]
    return "\n".join(lines)
