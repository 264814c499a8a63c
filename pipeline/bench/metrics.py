"""Benchmark metrics: fidelity (estimated vs actual effects of removing training samples)
and retraining quality (zero-shot accuracy, retrieval recall, noise-detection AUC).

Every score estimates L_V(θ_T without z) − L_V(θ_T), so the "actual" effects
compared against are the same difference, measured by retraining:

- leave-one-out: Spearman and Pearson correlation over the left-out samples, and the
  relative error ‖est − actual‖₂ / ‖actual‖₂ (1.0 is what the all-zero estimate gets);
- LDS (linear datamodeling score): the predicted effect of removing a set R is the sum of
  the scores of R; LDS is the Spearman correlation, over random subsets, between that
  prediction and the actual change of L_V after retraining without R.

Undefined values (constant inputs, fewer than two points) are ``None``, written as JSON null.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from pipeline.data.corpora.fashion_mnist import CAPTION_NOUNS, TEMPLATES
from pipeline.data.pairs import PairTable
from pipeline.model.clip import context_length, make_tokenizer, normalize_images

METRIC_KEYS = ("spearman_loo", "pearson_loo", "relerr_loo", "lds")
EVAL_BATCH = 512  # images / captions per encoder call when evaluating a retrained model


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
    from scipy.stats import rankdata  # the 'bench' extra: imported where used

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


def _rank_rows(x: np.ndarray) -> np.ndarray:
    from scipy.stats import rankdata  # the 'bench' extra: imported where used

    return rankdata(x, axis=1)


def _row_pearson(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pearson correlation of each row of ``a`` with the same row of ``b`` (NaN where undefined)."""
    a, b = a - a.mean(1, keepdims=True), b - b.mean(1, keepdims=True)
    denom = np.sqrt((a * a).sum(1) * (b * b).sum(1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denom > 0, (a * b).sum(1) / denom, np.nan)


def bootstrap_rows(count: int, resamples: int, seed: int) -> np.ndarray:
    """[resamples, count] indices drawn with replacement (seeded): the bootstrap over subsets."""
    if count < 2 or resamples < 2:
        raise ValueError(f"need at least 2 subsets and 2 resamples, got {count} and {resamples}")
    return np.random.default_rng(seed).integers(0, count, size=(resamples, count))


def bootstrap_spearman(x: np.ndarray, y: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Spearman of (x, y) on every bootstrap resample (``rows`` from :func:`bootstrap_rows`)."""
    a, b = _vectors(x, y)
    return _row_pearson(_rank_rows(a[rows]), _rank_rows(b[rows]))


def standard_error(values: np.ndarray) -> float | None:
    """Sample standard deviation (ddof 1) of the finite bootstrap values; None if < 2 are finite."""
    finite = values[np.isfinite(values)]
    return float(finite.std(ddof=1)) if finite.size > 1 else None


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


# ------------------------------------------------ retraining quality (diffin bench quality)


def noise_auc(noisy: np.ndarray, scores: np.ndarray) -> float:
    """ROC AUC of detecting mismatched pairs: label = noisy, score = −(method score)."""
    noisy = np.asarray(noisy, dtype=bool)
    if noisy.all() or not noisy.any():
        raise ValueError("noise AUC needs both noisy and clean pairs")
    from sklearn.metrics import roc_auc_score  # the 'bench' extra: imported where used

    return float(roc_auc_score(noisy, -np.asarray(scores, dtype=np.float64)))


@torch.no_grad()
def encode_images(model: nn.Module, images_uint8: Tensor) -> Tensor:
    """L2-normalised image embeddings (float32)."""
    parts = [model.encode_image(normalize_images(images_uint8[i:i + EVAL_BATCH]), normalize=True)
             for i in range(0, len(images_uint8), EVAL_BATCH)]
    return torch.cat(parts).float()


@functools.lru_cache(maxsize=4)
def _tokenizer(length: int) -> Any:
    return make_tokenizer(length)


@torch.no_grad()
def encode_texts(model: nn.Module, captions: Sequence[str]) -> Tensor:
    """L2-normalised text embeddings (float32)."""
    tokens = _tokenizer(context_length(model))(list(captions))
    parts = [model.encode_text(tokens[i:i + EVAL_BATCH], normalize=True) for i in range(0, len(tokens), EVAL_BATCH)]
    return torch.cat(parts).float()


def class_prompts(templates: Sequence[str] = TEMPLATES, nouns: Sequence[str] = CAPTION_NOUNS) -> list[list[str]]:
    """Per class, its prompt in every caption template."""
    return [[t.format(noun) for t in templates] for noun in nouns]


def zero_shot_accuracy(model: nn.Module, images: Tensor, labels: np.ndarray,
                       prompts: Sequence[Sequence[str]]) -> float:
    """Top-1 zero-shot accuracy: class embedding = normalised mean of its prompts' embeddings."""
    model = model.eval()
    per_class = len(prompts[0])
    if any(len(p) != per_class for p in prompts):
        raise ValueError("every class needs the same number of prompts")
    texts = encode_texts(model, [t for p in prompts for t in p])
    classes = texts.view(len(prompts), per_class, -1).mean(1)
    classes = classes / classes.norm(dim=-1, keepdim=True)
    predicted = (encode_images(model, images) @ classes.T).argmax(dim=1).numpy()
    return float((predicted == labels).mean())


def unique_caption_order(captions: Sequence[str], order: Sequence[int]) -> list[int]:
    """``order`` without the pairs whose caption (case-folded, stripped) came earlier in it."""
    seen: set[str] = set()
    kept = []
    for i in order:
        text = captions[i].casefold().strip()
        if text not in seen:
            seen.add(text)
            kept.append(i)
    return kept


def caption_groups(captions: Sequence[str]) -> Tensor:
    """An id per caption; captions equal after case-folding and stripping share it."""
    ids: dict[str, int] = {}
    return torch.tensor([ids.setdefault(c.casefold().strip(), len(ids)) for c in captions])


def recall_at(similarity: Tensor, groups: Tensor, ks: Sequence[int]) -> dict[int, float]:
    """Recall@k of query i (row i) against items (columns) with caption-group ids ``groups``.

    An item counts as correct when its caption equals the query pair's (Openclipart repeats
    titles, so a drawing's duplicate title is not a wrong answer). The query's rank is the
    number of wrong items scoring at least as high as its best correct item: ties count
    against, so a collapsed model (all scores equal) gets 0.
    """
    correct = groups.unsqueeze(1) == groups.unsqueeze(0)
    best = similarity.masked_fill(~correct, float("-inf")).max(dim=1, keepdim=True).values
    rank = ((similarity >= best) & ~correct).sum(dim=1)
    return {k: float((rank < k).float().mean()) for k in ks}


def retrieval_recall(model: nn.Module, table: PairTable) -> dict[str, float]:
    """Image→text and text→image recall@1/@5 on held-out pairs; r1/r5 average both ways."""
    model = model.eval()
    sim = encode_images(model, table.images) @ encode_texts(model, table.captions).T
    groups = caption_groups(table.captions)
    i2t, t2i = recall_at(sim, groups, (1, 5)), recall_at(sim.T, groups, (1, 5))
    return {"r1": (i2t[1] + t2i[1]) / 2, "r5": (i2t[5] + t2i[5]) / 2,
            "i2t_r1": i2t[1], "i2t_r5": i2t[5], "t2i_r1": t2i[1], "t2i_r5": t2i[5]}
