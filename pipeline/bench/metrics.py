"""Fidelity metrics (DESIGN §6): estimated vs actual effects of removing training samples.

Every score estimates L_V(θ_T without z) − L_V(θ_T) (DESIGN §2.3), so the "actual" effects
compared against are the same difference, measured by retraining:

- leave-one-out: Spearman and Pearson correlation over the left-out samples, and the
  relative error ‖est − actual‖₂ / ‖actual‖₂ (1.0 is what the all-zero estimate gets);
- LDS (linear datamodeling score): the predicted effect of removing a set R is the sum of
  the scores of R; LDS is the Spearman correlation, over random subsets, between that
  prediction and the actual change of L_V after retraining without R.

Undefined values (constant inputs, fewer than two points) are ``None``, written as JSON null.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import numpy as np
from scipy.stats import rankdata

METRIC_KEYS = ("spearman_loo", "pearson_loo", "relerr_loo", "lds")


def _vectors(x: Sequence[float] | np.ndarray, y: Sequence[float] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    a, b = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if a.ndim != 1 or a.shape != b.shape:
        raise ValueError(f"need two 1-d arrays of equal length, got shapes {a.shape} and {b.shape}")
    return a, b


def _finite(value: float) -> float | None:
    return float(value) if math.isfinite(value) else None


def pearson(x: Sequence[float] | np.ndarray, y: Sequence[float] | np.ndarray) -> float | None:
    """Pearson correlation of ``x`` and ``y``; None if undefined (constant input, n < 2)."""
    a, b = _vectors(x, y)
    if a.size < 2 or not (np.all(np.isfinite(a)) and np.all(np.isfinite(b))):
        return None
    a, b = a - a.mean(), b - b.mean()
    denom = math.sqrt(float(a @ a) * float(b @ b))
    return _finite(float(a @ b) / denom) if denom > 0 else None


def spearman(x: Sequence[float] | np.ndarray, y: Sequence[float] | np.ndarray) -> float | None:
    """Spearman rank correlation (Pearson of average ranks, so ties are handled)."""
    a, b = _vectors(x, y)
    if a.size < 2 or not (np.all(np.isfinite(a)) and np.all(np.isfinite(b))):
        return None
    return pearson(rankdata(a), rankdata(b))


def relative_error(estimate: Sequence[float] | np.ndarray, actual: Sequence[float] | np.ndarray) -> float | None:
    """‖estimate − actual‖₂ / ‖actual‖₂; None if ``actual`` is all zero or values are not finite."""
    est, act = _vectors(estimate, actual)
    scale = float(np.linalg.norm(act))
    if scale == 0.0:
        return None
    return _finite(float(np.linalg.norm(est - act)) / scale)


def subset_predictions(scores: Mapping[str, float], removed_sets: Sequence[Sequence[str]]) -> np.ndarray:
    """The predicted effect of removing each set: the sum of its samples' scores."""
    return np.array([sum(scores[uid] for uid in removed) for removed in removed_sets], dtype=np.float64)


def lds(scores: Mapping[str, float], removed_sets: Sequence[Sequence[str]],
        actual: Sequence[float] | np.ndarray) -> float | None:
    """Linear datamodeling score: Spearman over subsets of (Σ scores of removed, actual change)."""
    if len(removed_sets) != len(actual):
        raise ValueError(f"{len(removed_sets)} removed sets but {len(actual)} actual effects")
    return spearman(subset_predictions(scores, removed_sets), actual)


def method_metrics(scores: Mapping[str, float] | None, loo_uids: Sequence[str], loo_actual: np.ndarray,
                   removed_sets: Sequence[Sequence[str]], lds_actual: np.ndarray,
                   is_estimate: bool = True) -> dict[str, float | None]:
    """The four metrics of one method; all None when the method does not apply (``scores`` None).

    ``is_estimate=False`` (baselines whose values are not effects in units of L_V, such as
    CLIP score or random numbers) leaves the relative error None.
    """
    if scores is None:
        return dict.fromkeys(METRIC_KEYS)
    estimate = np.array([scores[uid] for uid in loo_uids], dtype=np.float64)
    return {
        "spearman_loo": spearman(estimate, loo_actual),
        "pearson_loo": pearson(estimate, loo_actual),
        "relerr_loo": relative_error(estimate, loo_actual) if is_estimate else None,
        "lds": lds(scores, removed_sets, lds_actual),
    }
