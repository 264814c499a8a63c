"""The retraining protocol of the fidelity benchmark, shared by every dataset.

Samples are chosen by seeded rank of their uid (``sample_rank``), never by position: the
train/target split, the leave-one-out samples and the random half-subsets. The actual effect
of removing a set R is ``L_V(θ_T without R) − L_V(θ_T)``, measured by deterministic
retraining with the same settings (the caller supplies ``retrained_loss``).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np

from pipeline.bench.metrics import pearson, spearman
from pipeline.data.pairs import rank_order
from pipeline.data.uids import make_uid
from pipeline.errors import UsageError

if TYPE_CHECKING:
    from pipeline.data.pairs import PairTable

log = logging.getLogger(__name__)


ranked = rank_order  # seeded uid order, shared with training and scoring


def split_by_rank(uids: Sequence[str], num_train: int, num_target: int,
                  seed: int) -> tuple[list[int], list[int]]:
    """Disjoint train and target indices: the first ``num_train`` by rank, then ``num_target``.

    Both lists are returned in rank order; a UsageError if there are not enough samples.
    """
    if num_train < 1 or num_target < 1:
        raise UsageError(f"need at least one train and one target sample, got {num_train}, {num_target}")
    if num_train + num_target > len(uids):
        raise UsageError(f"need {num_train} train + {num_target} target samples, the data has {len(uids)}")
    order = ranked(uids, seed, "split")
    return order[:num_train], order[num_train:num_train + num_target]


def loo_samples(uids: Sequence[str], count: int, seed: int) -> list[str]:
    """The ``count`` uids left out one at a time (first by seeded rank)."""
    if not 0 < count <= len(uids):
        raise UsageError(f"leave-one-out count must be in 1..{len(uids)}, got {count}")
    return [uids[i] for i in ranked(uids, seed, "loo")[:count]]


def half_subsets(uids: Sequence[str], count: int, seed: int, fraction: float = 0.5) -> list[list[str]]:
    """``count`` random subsets to REMOVE: subset j is the first ⌊fraction·n⌋ uids by rank with
    salt j (``fraction`` 0.5: random halves, the usual LDS; smaller: closer to the linear regime)."""
    size = int(len(uids) * fraction)
    if count < 1 or size < 1 or not 0 < fraction < 1:
        raise UsageError(f"need at least one subset of at least one sample and 0 < fraction < 1, got {count} "
                         f"subsets of {size} (fraction {fraction}) from {len(uids)} samples")
    return [[uids[i] for i in ranked(uids, seed, f"lds{j}")[:size]] for j in range(count)]


def renamed_uid(uid: str) -> str:
    """Another uid for the same sample: it moves the sample in the visiting order only."""
    return make_uid("fidelity-noise", uid)


def reordered_uid(uid: str, order: int) -> str:
    """The uid of a sample under visiting order ``order``: itself for order 0, else a uid
    derived from it and ``order`` (the trainer's order is a function of (uid, seed) only, so
    renaming every uid draws a new visiting order and leaves the initialisation alone)."""
    if order < 0:
        raise ValueError(f"order must be >= 0, got {order}")
    return uid if order == 0 else make_uid(f"fidelity-order{order}", uid)


def with_renamed(uids: Sequence[str], uid: str) -> list[str]:
    """``uids`` with ``uid`` replaced by :func:`renamed_uid` (same samples, other order)."""
    if uid not in uids:
        raise ValueError(f"uid {uid} is not among the training uids")
    return [renamed_uid(u) if u == uid else u for u in uids]


def lds_ceiling(lds_actual: np.ndarray, noise_actual: np.ndarray) -> float | None:
    """The LDS a perfect estimator could reach under order noise: √(1 − σ²_noise / σ²_effects).

    Each subset's measured effect is its true effect plus order noise of variance about
    mean(noise²) (retrains that only reorder the data); the correlation of the true effects
    with the measured ones is bounded by the square root of the reliability.
    """
    if lds_actual.size < 2 or noise_actual.size == 0:
        return None
    total = float(lds_actual.var())
    noise = float((noise_actual ** 2).mean())
    return float(np.sqrt(max(0.0, 1.0 - noise / total))) if total > 0 else None


def order_noise_variance(effects: np.ndarray) -> float:
    """The order noise variance of one measured effect, from ``effects`` [subsets, orders].

    Two-way residuals: what is left of e[s, o] after its subset's mean and its order's mean,
    Σ r² / ((S − 1)(O − 1)). The order's mean goes because an effect is a difference with the
    full set retrained under the same order: that retrain's own noise shifts every subset of the
    order alike, which changes no ranking (the LDS of one order) and is not noise of the ranking.
    """
    if effects.ndim != 2 or effects.shape[0] < 2 or effects.shape[1] < 2:
        raise ValueError(f"need effects [subsets >= 2, orders >= 2], got shape {effects.shape}")
    residual = effects - effects.mean(1, keepdims=True) - effects.mean(0, keepdims=True) + effects.mean()
    return float((residual ** 2).sum() / ((effects.shape[0] - 1) * (effects.shape[1] - 1)))


def order_noise(effects: np.ndarray) -> np.ndarray:
    """Per subset, the order noise left in the mean of its effects over the O orders: values
    whose mean square is :func:`order_noise_variance` / O (what :func:`lds_ceiling` takes)."""
    subsets, orders = effects.shape if effects.ndim == 2 else (0, 0)
    order_noise_variance(effects)  # checks the shape
    residual = effects - effects.mean(1, keepdims=True) - effects.mean(0, keepdims=True) + effects.mean()
    per_subset = (residual ** 2).sum(1) / (orders - 1) * subsets / (subsets - 1)
    return np.sqrt(per_subset / orders)


def order_split_reliability(effects: np.ndarray) -> dict[str, float | None]:
    """How well one visiting order's effects predict another's (the noise floor of the LDS).

    ``spearman``/``pearson``: the mean over pairs of orders of the correlation, across subsets,
    of their effects (what an estimator that knew one order's measurement exactly would score
    against another's); ``mean_reliability``: the Spearman–Brown reliability of the mean over
    all O orders, O·r / (1 + (O − 1)·r) with r the mean Pearson (None when r ≤ 0).
    """
    if effects.ndim != 2 or effects.shape[1] < 2:
        raise ValueError(f"need effects [subsets, orders >= 2], got shape {effects.shape}")
    orders = effects.shape[1]
    pairs = [(a, b) for a in range(orders) for b in range(a + 1, orders)]
    rho = [spearman(effects[:, a], effects[:, b]) for a, b in pairs]
    r = [pearson(effects[:, a], effects[:, b]) for a, b in pairs]
    mean_rho = None if None in rho else float(np.mean(rho))
    mean_r = None if None in r else float(np.mean(r))
    reliability = None if mean_r is None or mean_r <= 0 else orders * mean_r / (1 + (orders - 1) * mean_r)
    return {"spearman": mean_rho, "pearson": mean_r, "mean_reliability": reliability}


@dataclass
class GroundTruth:
    """Actual effects of removal, measured by retraining, and the retraining noise floor.

    ``noise_actual`` holds L_V changes of retrains on the SAME data with one sample's uid
    renamed (:func:`renamed_uid`): only the visiting order changes, so these are what
    order alone does to L_V — the scale below which leave-one-out effects are noise.
    """

    base_loss: float
    loo_uids: list[str]
    loo_actual: np.ndarray
    removed_sets: list[list[str]]
    lds_actual: np.ndarray
    noise_actual: np.ndarray
    seconds: float

    def summary(self) -> dict:
        """Counts and the spread of the actual effects (for the report's metadata)."""
        def stats(x: np.ndarray) -> dict[str, float] | None:
            if x.size == 0:
                return None
            return {"mean": float(x.mean()), "std": float(x.std()), "min": float(x.min()),
                    "max": float(x.max()), "rms": float(np.sqrt((x ** 2).mean()))}

        return {"base_target_loss": self.base_loss, "loo_count": len(self.loo_uids),
                "lds_ceiling": lds_ceiling(self.lds_actual, self.noise_actual),
                "lds_subsets": len(self.removed_sets),
                "removed_per_subset": len(self.removed_sets[0]) if self.removed_sets else 0,
                "noise_count": int(self.noise_actual.size),
                "loo_actual": stats(self.loo_actual), "lds_actual": stats(self.lds_actual),
                "noise_actual": stats(self.noise_actual), "retrain_seconds": round(self.seconds, 1)}


def measure_ground_truth(train_uids: Sequence[str], base_loss: float,
                         retrained_loss: Callable[[set[str]], float],
                         loo_count: int, lds_subsets: int, seed: int, name: str = "",
                         renamed_loss: Callable[[str], float] | None = None,
                         noise_count: int = 0, lds_fraction: float = 0.5) -> GroundTruth:
    """Retrain once per left-out sample, per removed subset (``lds_fraction`` of the samples)
    and per renamed sample (noise floor).

    ``retrained_loss(removed)`` is L_V after retraining without ``removed``;
    ``renamed_loss(uid)`` is L_V after retraining on all samples with ``uid`` renamed.
    """
    if noise_count and renamed_loss is None:
        raise ValueError("noise_count > 0 needs renamed_loss")
    start = time.perf_counter()
    loo = loo_samples(train_uids, loo_count, seed)
    removed_sets = half_subsets(train_uids, lds_subsets, seed, lds_fraction)
    renamed = [train_uids[i] for i in ranked(train_uids, seed, "noise")[:noise_count]]
    jobs: list[Callable[[], float]] = [lambda r=set(r): retrained_loss(r) for r in [[u] for u in loo] + removed_sets]
    jobs += [lambda u=u: renamed_loss(u) for u in renamed]
    effects = []
    for k, job in enumerate(jobs):
        effects.append(job() - base_loss)
        elapsed = time.perf_counter() - start
        log.info("%s retrain %d/%d: effect %+.3e (%.0f s, ETA %.0f s)", name, k + 1, len(jobs),
                 effects[-1], elapsed, elapsed / (k + 1) * (len(jobs) - k - 1))
    arr = np.array(effects, dtype=np.float64)
    n_loo, n_lds = len(loo), len(removed_sets)
    return GroundTruth(base_loss, loo, arr[:n_loo], removed_sets, arr[n_loo:n_loo + n_lds],
                       arr[n_loo + n_lds:], time.perf_counter() - start)


@dataclass
class DatasetResult:
    """Scores of every training sample per method (None: not applicable) and the ground truth."""

    scores: dict[str, dict[str, float] | None]
    truth: GroundTruth
    meta: dict
    variants: dict[str, dict[str, float]] = field(default_factory=dict)  # extra estimators, reported apart


def load_shard_dir(directory: Path, size: int) -> PairTable:
    """Every pair of a shard directory (``*.tar`` + ``sizes.json``) at ``size`` px, read by one
    thread (deterministic)."""
    from pipeline.data.pairs import load_pairs
    from pipeline.data.shards import SIZES_FILE, expand_shards, load_sizes

    sizes = load_sizes(directory / SIZES_FILE)
    return load_pairs(expand_shards(str(directory / "*.tar")), size, sizes=sizes, threads=1)

