"""The digits half of the fidelity benchmark: an MLP trained by plain mini-batch SGD.

scikit-learn's bundled digits (1,797 8×8 images, no download) are the real data. The trainer
is the setting of Diff-In's derivation: θ_{t+1} = θ_t − η_t ∇L_{B_t}(θ_t), plain SGD (no
momentum, no weight decay) with a learning-rate schedule, in float64. The visiting order is
that of the proxy CLIP trainer (:func:`pipeline.model.train.batch_indices`, a function of
(uid, seed) only), so excluding uids is exact leave-out retraining. Checkpoints are kept in
memory and scored with the influence library directly: ClassifierObjective,
prepare_checkpoint, CheckpointScorer and combine.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Iterable, Literal, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from pipeline.bench.protocol import DatasetResult, measure_ground_truth, split_by_rank, with_renamed
from pipeline.data.pairs import rank_order
from pipeline.data.uids import make_uid
from pipeline.errors import UsageError
from pipeline.influence.forward import CheckpointScorer
from pipeline.influence.objective import ClassifierObjective, per_sample_loss
from pipeline.influence.params import ParamDict, axpy, from_vector, params_of
from pipeline.influence.prepare import mean_loss_grad, prepare_checkpoint, prepare_unrolled
from pipeline.influence.unrolled import UnrolledSettings, segment_updates, unrolled_scores
from pipeline.influence.scores import CheckpointWeights, combine
from pipeline.model.schedule import LRSchedule
from pipeline.model.train import batch_indices

log = logging.getLogger(__name__)

SOURCE = "sklearn-digits"


@dataclass(frozen=True)
class MLPConfig:
    """The MLP and its SGD run (deterministic for a seed)."""

    hidden: int = 32
    steps: int = 600
    batch_size: int = 32
    lr: float = 0.2
    warmup: int = 0
    schedule: Literal["cosine", "const"] = "cosine"
    checkpoints: int = 5
    seed: int = 0

    def __post_init__(self) -> None:
        if min(self.hidden, self.steps, self.batch_size, self.checkpoints) < 1:
            raise UsageError("hidden, steps, batch_size and checkpoints must be >= 1")
        if self.checkpoints > self.steps:
            raise UsageError(f"checkpoints ({self.checkpoints}) exceeds steps ({self.steps})")

    def lr_schedule(self) -> LRSchedule:
        """The learning-rate schedule (open_clip's step semantics, as for the proxy CLIP)."""
        return LRSchedule(self.lr, self.steps, self.warmup, self.schedule)

    def checkpoint_steps(self) -> list[int]:
        """Evenly spaced global steps, ending at ``steps`` (as TrainConfig.checkpoint_steps)."""
        return [round(self.steps * (i + 1) / self.checkpoints) for i in range(self.checkpoints)]


@dataclass
class Digits:
    """Labelled samples with uids: features float64 [n, 64] in [0, 1], labels int64 [n]."""

    uids: list[str]
    x: Tensor
    y: Tensor

    def __len__(self) -> int:
        return len(self.uids)

    def subset(self, indices: Sequence[int]) -> "Digits":
        """The samples at ``indices``, in that order."""
        idx = list(indices)
        return Digits([self.uids[i] for i in idx], self.x[idx], self.y[idx])

    def without(self, exclude: Iterable[str]) -> "Digits":
        """The samples whose uid is not in ``exclude`` (order kept)."""
        excluded = set(exclude)
        return self.subset([i for i, u in enumerate(self.uids) if u not in excluded])

    @property
    def batch(self) -> tuple[Tensor, Tensor]:
        """All samples as one (x, y) batch."""
        return self.x, self.y


def load_digits_data() -> Digits:
    """scikit-learn's digits; uid = make_uid("sklearn-digits", dataset index)."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = torch.from_numpy(np.asarray(bunch.data, dtype=np.float64) / 16.0)
    y = torch.from_numpy(np.asarray(bunch.target, dtype=np.int64))
    return Digits([make_uid(SOURCE, str(i)) for i in range(len(y))], x, y)


def build_mlp(cfg: MLPConfig, in_features: int = 64, classes: int = 10) -> nn.Module:
    """A float64 tanh MLP initialised from ``cfg.seed`` (the global RNG is left untouched)."""
    with torch.random.fork_rng():
        torch.manual_seed(cfg.seed)
        model = nn.Sequential(nn.Linear(in_features, cfg.hidden), nn.Tanh(), nn.Linear(cfg.hidden, classes))
    return model.double()


@dataclass(frozen=True)
class Snapshot:
    """Parameters after ``step`` SGD steps, and η_t of the update taken from them."""

    step: int
    lr: float
    params: ParamDict


@dataclass
class MLPRun:
    """The result of one SGD run: final parameters, in-memory checkpoints, per-step losses."""

    params: ParamDict
    checkpoints: list[Snapshot] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)


def train_mlp(data: Digits, cfg: MLPConfig, exclude: Iterable[str] = (),
              keep_checkpoints: bool = False) -> MLPRun:
    """Plain mini-batch SGD on the mean cross-entropy of ``data`` minus ``exclude``.

    Batches follow :func:`batch_indices` over the remaining uids, so the run is a function of
    (data, cfg, exclude) only. With ``keep_checkpoints`` the parameters at
    ``cfg.checkpoint_steps()`` are kept (with their η_t) in memory, and the loss of every
    batch before its update is recorded.
    """
    train = data.without(exclude)
    model = build_mlp(cfg, train.x.shape[1])
    objective = ClassifierObjective(model)
    schedule = cfg.lr_schedule()
    save = set(cfg.checkpoint_steps()) if keep_checkpoints else set()
    params = params_of(model)
    run = MLPRun(params)
    for step, idx in enumerate(batch_indices(train.uids, cfg.seed, cfg.batch_size, cfg.steps)):
        batch = (train.x[idx], train.y[idx])
        if keep_checkpoints:
            with torch.no_grad():
                run.losses.append(float(per_sample_loss(objective, params, batch).mean()))
        params = axpy(-schedule.lr_at(step), mean_loss_grad(objective, params, [batch]), params)
        if step + 1 in save:
            run.checkpoints.append(Snapshot(step + 1, schedule.checkpoint_lr(step + 1), params))
    run.params = params
    return run


def mean_loss(model: nn.Module, params: ParamDict, data: Digits) -> float:
    """L(θ): the mean per-sample cross-entropy over ``data``."""
    with torch.no_grad():
        return float(per_sample_loss(ClassifierObjective(model), params, data.batch).mean())


def score_run(run: MLPRun, model: nn.Module, train: Digits, target: Digits, cfg: MLPConfig,
              c_mode: Literal["exact", "fd"] = "exact") -> dict[str, Tensor]:
    """tracin, diffin_eq9, diffin for every training sample from the run's checkpoints.

    u_t is the gradient of the mean target loss, g_t and H_B those of the mean loss over the
    whole training set (the full-data gradient the proxy batches stand in for).
    """
    objective = ClassifierObjective(model)
    parts = {"a": [], "b": [], "c": []}
    for snap in run.checkpoints:
        prepared = prepare_checkpoint(objective, snap.params, [target.batch], [train.batch], hvp="exact")
        components = CheckpointScorer(objective, snap.params, prepared.u, prepared.g, prepared.w,
                                      c_mode=c_mode)(train.batch)
        for name in parts:
            parts[name].append(getattr(components, name))
    a, b, c = (torch.stack(parts[n]) for n in ("a", "b", "c"))
    weights = [CheckpointWeights(s.step, s.lr) for s in run.checkpoints]
    return combine(a, b, c, weights, len(train), cfg.steps)


@dataclass(frozen=True)
class DigitsSettings:
    """The digits experiment: split sizes, MLP run, ground-truth counts."""

    num_train: int = 1000
    num_target: int = 797
    mlp: MLPConfig = MLPConfig()
    loo: int = 200
    lds_subsets: int = 100
    noise: int = 20
    c_mode: Literal["exact", "fd"] = "exact"
    seed: int = 0
    unrolled: UnrolledSettings = UnrolledSettings()
    proxy_batch_size: int | None = 128  # the pipeline's default proxy batch for H_k (None: whole train set)
    sweep: bool = True  # also score the unrolled variants (f, K, Hessian, m) for the report's metadata


def proxy_batches(train: Digits, step: int, batch_size: int | None, count: int, seed: int) -> list[tuple[Tensor, Tensor]]:
    """The training samples H_k is taken over at checkpoint ``step``: ``count`` batches drawn by
    (uid, seed, step) as the pipeline draws its proxy batches; ``batch_size=None``: all of them."""
    if batch_size is None:
        return [train.batch]
    order = rank_order(train.uids, seed, f"proxy{step}")[:batch_size * count]
    return [train.subset(order[i:i + batch_size]).batch for i in range(0, len(order), batch_size)]


def unrolled_scores_of(run: MLPRun, model: nn.Module, train: Digits, target: Digits, cfg: MLPConfig,
                       settings: UnrolledSettings = UnrolledSettings(), snapshots: Sequence[Snapshot] | None = None,
                       proxy_batch_size: int | None = None) -> Tensor:
    """``diffin_unrolled`` for every training sample from ``snapshots`` (default: the run's).

    u is the target gradient at the last snapshot, H_k the proxy-batch Hessian at snapshot k
    (the pipeline's choice: ``proxy_batch_size`` samples × ``settings.proxy_batches``; None =
    the whole training set), η_s the schedule's rate of every update.
    """
    snaps = list(snapshots if snapshots is not None else run.checkpoints)
    objective = ClassifierObjective(model)
    schedule = cfg.lr_schedule()
    segments = segment_updates([s.step for s in snaps], cfg.steps)
    lrs = [[schedule.lr_at(i) for i in seg] for seg in segments]
    directions = prepare_unrolled(
        objective, [s.params for s in snaps], [target.batch],
        lambda k: proxy_batches(train, snaps[k].step, proxy_batch_size, settings.proxy_batches, cfg.seed),
        lrs, settings)
    d = torch.stack([
        CheckpointScorer(objective, s.params, None, None, None, components=("d",),
                         unrolled=from_vector(direction.direction, s.params))(train.batch).d
        for s, direction in zip(snaps, directions)])
    return unrolled_scores(d, len(train))


def run_digits(settings: DigitsSettings) -> DatasetResult:
    """Train, score and retrain on digits; scores for diffin, diffin_eq9, tracin (+ n/a ones)."""
    start = time.perf_counter()
    data = load_digits_data()
    train_idx, target_idx = split_by_rank(data.uids, settings.num_train, settings.num_target, settings.seed)
    train, target = data.subset(train_idx), data.subset(target_idx)
    cfg = settings.mlp
    model = build_mlp(cfg)
    run = train_mlp(train, cfg, keep_checkpoints=True)
    t_train = time.perf_counter() - start
    scores = score_run(run, model, train, target, cfg, settings.c_mode)
    t0 = time.perf_counter()
    scores["diffin_unrolled"] = unrolled_scores_of(run, model, train, target, cfg, settings.unrolled,
                                                   proxy_batch_size=settings.proxy_batch_size)
    t_unrolled = time.perf_counter() - t0
    t_score = time.perf_counter() - start - t_train
    variants = unrolled_variants(run, model, train, target, settings)
    base = mean_loss(model, run.params, target)

    def without(removed: set[str]) -> float:
        return mean_loss(model, train_mlp(train, cfg, removed).params, target)

    def renamed(uid: str) -> float:
        return mean_loss(model, train_mlp(replace(train, uids=with_renamed(train.uids, uid)), cfg).params, target)

    truth = measure_ground_truth(train.uids, base, without, settings.loo, settings.lds_subsets, settings.seed,
                                 "digits", renamed_loss=renamed, noise_count=settings.noise)
    by_uid = {name: dict(zip(train.uids, values.tolist())) for name, values in scores.items()}
    meta = {
        "settings": asdict(settings),
        "data": {"source": "sklearn.datasets.load_digits", "train": len(train), "target": len(target)},
        "learning": {"train_loss_first_10": float(np.mean(run.losses[:10])),
                     "train_loss_last_10": float(np.mean(run.losses[-10:])),
                     "target_loss_init": mean_loss(model, params_of(build_mlp(cfg)), target),
                     "target_loss_checkpoints": [mean_loss(model, s.params, target) for s in run.checkpoints],
                     "target_accuracy": _accuracy(model, run.params, target),
                     "checkpoints": [{"step": s.step, "lr": s.lr} for s in run.checkpoints]},
        "truth": truth.summary(),
        "seconds": {"train": round(t_train, 1), "score": round(t_score, 1), "unrolled": round(t_unrolled, 2),
                    "retrain": round(truth.seconds, 1), "total": round(time.perf_counter() - start, 1)},
    }
    return DatasetResult({**by_uid, "tracin_adam": None, "diffin_unrolled_adam": None, "clip_score": None}, truth, meta,
                         {name: dict(zip(train.uids, values.tolist())) for name, values in variants.items()})


SWEEP_CHECKPOINTS = (1, 2, 5, 10, 20)


def unrolled_variants(run: MLPRun, model: nn.Module, train: Digits, target: Digits,
                      settings: DigitsSettings) -> dict[str, Tensor]:
    """``diffin_unrolled`` under other choices, one changed at a time from the default:
    f = exp, K ∈ {5, 10, 40}, H over the whole training set, and m ∈ SWEEP_CHECKPOINTS
    (m = 1: a horizon-damped influence function at the final weights)."""
    if not settings.sweep:
        return {}
    cfg, base, size = settings.mlp, settings.unrolled, settings.proxy_batch_size
    out = {"unrolled_f_exp": unrolled_scores_of(run, model, train, target, cfg, replace(base, factor="exp"),
                                                proxy_batch_size=size),
           "unrolled_full_hessian": unrolled_scores_of(run, model, train, target, cfg, base, proxy_batch_size=None)}
    for k in (5, 10, 40):
        out[f"unrolled_K{k}"] = unrolled_scores_of(run, model, train, target, cfg, replace(base, lanczos_steps=k),
                                                   proxy_batch_size=size)
    most = max(m for m in SWEEP_CHECKPOINTS if m <= cfg.steps)
    dense = train_mlp(train, replace(cfg, checkpoints=most), keep_checkpoints=True).checkpoints
    for m in SWEEP_CHECKPOINTS:
        if m <= most and most % m == 0:
            chosen = dense[len(dense) // m - 1::len(dense) // m]
            out[f"unrolled_m{m}"] = unrolled_scores_of(run, model, train, target, cfg, base, chosen, size)
    return out


def _accuracy(model: nn.Module, params: ParamDict, data: Digits) -> float:
    with torch.no_grad():
        logits = torch.func.functional_call(model, params, (data.x,))
    return float((logits.argmax(1) == data.y).double().mean())
