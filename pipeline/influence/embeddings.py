"""Scores and groupings from one checkpoint's embeddings: no derivatives, one forward pass.

These are the cheap filters a user compares influence scores with, and the concept groups the
selection rules balance over. Every function takes L2-normalised embeddings (what open_clip's
forward returns) and is a function of the pair alone: the reference sets (negative pools, target
images, centroids) are fixed once per run, so a pair's value never depends on its batch.

- :func:`neg_clip_loss` — negCLIPLoss (Wang et al., "CLIPLoss and Norm-Based Data Selection
  Methods for Multimodal Contrastive Learning", NeurIPS 2024): the CLIP score minus the
  contrastive normaliser of the pair's batch, averaged over K fixed random batches from the
  corpus. Equal to −τ · (the pair's symmetric CLIP loss in that batch).
- :func:`norm_sim` — NormSim_p (same paper): the p-norm of the pair's image's cosine
  similarities to the target images; p = ∞ is the nearest target image's similarity.
- :func:`kmeans` / :func:`nearest_centroid` — deterministic k-means (k-means++ seeding from a
  torch generator, fixed Lloyd iterations) for per-cluster budgets.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import Tensor


def neg_clip_loss(img: Tensor, txt: Tensor, pool_img: Tensor, pool_txt: Tensor, temperature: float,
                  self_mask: Tensor | None = None) -> Tensor:
    """negCLIPLoss of each pair against K fixed negative pools.

    ``img``, ``txt``: [B, D]; ``pool_img``, ``pool_txt``: [K, P, D] (pool k's pairs); per pool,
    with s = cosine and τ = ``temperature``:

        ncl_k(i) = s_ii − ½ τ [log(e^{s_ii/τ} + Σ_j e^{s_ij/τ}) + log(e^{s_ii/τ} + Σ_j e^{s_ji/τ})]

    (s_ij = ⟨img_i, txt_j⟩, s_ji = ⟨img_j, txt_i⟩, j over pool k), and the result is the mean over
    the K pools. ``self_mask`` ([B, K, P], True where pool entry j IS pair i) leaves a pair out of
    its own pools. Higher = keep.
    """
    if temperature <= 0 or not math.isfinite(temperature):
        raise ValueError(f"temperature must be a positive finite number, got {temperature}")
    if pool_img.ndim != 3 or pool_img.shape != pool_txt.shape:
        raise ValueError(f"pools must be [K, P, D] image and text embeddings of one shape, got "
                         f"{tuple(pool_img.shape)} and {tuple(pool_txt.shape)}")
    positive = (img * txt).sum(-1)  # [B]
    rows = torch.einsum("bd,kpd->bkp", img, pool_txt) / temperature  # image i against pool texts
    cols = torch.einsum("bd,kpd->bkp", txt, pool_img) / temperature  # text i against pool images
    if self_mask is not None:
        rows = rows.masked_fill(self_mask, float("-inf"))
        cols = cols.masked_fill(self_mask, float("-inf"))
    own = (positive / temperature)[:, None, None].expand(-1, rows.shape[1], 1)  # [B, K, 1]
    lse_rows = torch.logsumexp(torch.cat([own, rows], dim=2), dim=2)  # [B, K]
    lse_cols = torch.logsumexp(torch.cat([own, cols], dim=2), dim=2)
    return positive - 0.5 * temperature * (lse_rows + lse_cols).mean(1)


def norm_sim(img: Tensor, target_img: Tensor, p: float) -> Tensor:
    """NormSim_p: ‖(⟨img_i, v⟩)_{v ∈ target}‖_p for each row of ``img`` ([B, D]) against the
    target images ``target_img`` ([M, D]); ``p = math.inf`` gives max_v |⟨img_i, v⟩|."""
    if target_img.ndim != 2 or target_img.shape[0] == 0:
        raise ValueError(f"target images must be a non-empty [M, D] matrix, got {tuple(target_img.shape)}")
    if not p >= 1:
        raise ValueError(f"p must be >= 1 (a norm), got {p}")
    sims = (img @ target_img.T).abs()
    if math.isinf(p):
        return sims.amax(1)
    return sims.pow(p).sum(1).pow(1.0 / p)


def kmeans(x: Tensor, k: int, seed: int, iterations: int = 25) -> Tensor:
    """Centroids [k, D] of the rows of ``x`` ([n, D], n >= k) by spherical k-means.

    k-means++ seeding from ``torch.Generator().manual_seed(seed)``, then ``iterations`` Lloyd
    steps on cosine similarity (rows and centroids L2-normalised); an emptied cluster keeps its
    centroid. Deterministic for a given input, k, seed and iteration count (float64 inside).
    """
    if x.ndim != 2 or not 1 <= k <= x.shape[0]:
        raise ValueError(f"need 1 <= k <= rows, got k={k} for {tuple(x.shape)}")
    data = torch.nn.functional.normalize(x.double(), dim=1)
    generator = torch.Generator().manual_seed(seed)
    first = int(torch.randint(data.shape[0], (1,), generator=generator))
    chosen = [first]
    dist = (1.0 - data @ data[first]).clamp_min(0)
    for _ in range(1, k):
        weights = dist if float(dist.sum()) > 0 else torch.ones_like(dist)
        nxt = int(torch.multinomial(weights, 1, generator=generator))
        chosen.append(nxt)
        dist = torch.minimum(dist, (1.0 - data @ data[nxt]).clamp_min(0))
    centroids = data[chosen].clone()
    for _ in range(iterations):
        assign = (data @ centroids.T).argmax(1)
        sums = torch.zeros_like(centroids).index_add_(0, assign, data)
        counts = torch.bincount(assign, minlength=k)
        filled = counts > 0
        centroids[filled] = torch.nn.functional.normalize(sums[filled], dim=1)
    return centroids


def nearest_centroid(x: Tensor, centroids: Tensor) -> Tensor:
    """Index (int64 [n]) of the most cosine-similar centroid for each row of ``x``; ties go to
    the lower index."""
    sims = torch.nn.functional.normalize(x.double(), dim=1) @ torch.nn.functional.normalize(centroids.double(), dim=1).T
    return sims.argmax(1)


@dataclass(frozen=True)
class EmbeddingSettings:
    """The embedding columns' reference sets (part of the scoring settings and fingerprint)."""

    pool_pairs: int = 2048  # corpus pairs embedded once: the negative pools and the k-means sample
    pools: int = 10  # K fixed random negative pools that negCLIPLoss averages over
    pool_size: int = 255  # negatives per pool (a batch of 256 with the pair itself)
    temperature: float | None = None  # negCLIPLoss τ; None: the checkpoint's learned 1/exp(logit_scale)
    clusters: int = 10  # k-means clusters of image embeddings (the score files' cluster column); 0: none
    kmeans_iterations: int = 25

    def __post_init__(self) -> None:
        for name in ("pool_pairs", "pools", "pool_size", "kmeans_iterations"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.clusters < 0:
            raise ValueError(f"clusters must be >= 0, got {self.clusters}")
        if self.temperature is not None and not (self.temperature > 0 and math.isfinite(self.temperature)):
            raise ValueError(f"temperature must be positive and finite, got {self.temperature}")


@dataclass
class EmbeddingReference:
    """What the embedding columns of every pair are computed against, fixed once per run.

    ``sample_uids``/``sample_img``/``sample_txt``: the embedded corpus sample [M, D];
    ``pools``: [K, P] indices into the sample (pool k); ``target_img``: the target images
    [V, D]; ``temperature``: negCLIPLoss's τ; ``centroids``: [C, D] or None.
    """

    sample_uids: list[str]
    sample_img: Tensor
    sample_txt: Tensor
    pools: Tensor
    target_img: Tensor
    temperature: float
    centroids: Tensor | None = None

    def __post_init__(self) -> None:
        # built once, not per batch: the pools as float64 [K, P, D], the uid → sample position map
        self._pool_img = self.sample_img.double()[self.pools]
        self._pool_txt = self.sample_txt.double()[self.pools]
        self._target = self.target_img.double()
        self._where = {u: i for i, u in enumerate(self.sample_uids)}

    def columns(self, img: Tensor, txt: Tensor, uids: Sequence[str] | None = None) -> dict[str, Tensor]:
        """``neg_clip_loss``, ``norm_sim_2``, ``norm_sim_inf`` (float64 [B]) and ``cluster``
        (int64 [B], absent without centroids) for normalised embeddings of a batch; a pair
        that is itself in the sample (by ``uids``) is left out of its own pools."""
        img64, txt64 = img.double(), txt.double()
        pool_img, pool_txt = self._pool_img.to(img.device), self._pool_txt.to(img.device)
        mask = None
        if uids is not None:
            own = torch.tensor([self._where.get(u, -1) for u in uids], device=img.device)
            if bool((own >= 0).any()):
                mask = self.pools.to(img.device)[None, :, :] == own[:, None, None]
        target = self._target.to(img.device)
        out = {"neg_clip_loss": neg_clip_loss(img64, txt64, pool_img, pool_txt, self.temperature, mask),
               "norm_sim_2": norm_sim(img64, target, 2.0), "norm_sim_inf": norm_sim(img64, target, math.inf)}
        if self.centroids is not None:
            out["cluster"] = nearest_centroid(img64, self.centroids.to(img.device))
        return {k: v.cpu() for k, v in out.items()}


def draw_pools(sample_size: int, settings: EmbeddingSettings, order: Callable[[str], Sequence[int]]) -> Tensor:
    """[K, P] pool indices into a sample of ``sample_size`` pairs: pool k is the first
    P = min(pool_size, sample_size) of ``order(f"negpool{k}")`` (a seeded rank of the sample)."""
    size = min(settings.pool_size, sample_size)
    return torch.tensor([list(order(f"negpool{k}"))[:size] for k in range(settings.pools)], dtype=torch.int64)
