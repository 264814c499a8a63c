"""The embedding columns and k-means against brute-force loops (float64)."""

from __future__ import annotations

import math

import pytest
import torch

from pipeline.influence.embeddings import (EmbeddingReference, EmbeddingSettings, draw_pools, kmeans, nearest_centroid,
                                           neg_clip_loss, norm_sim)


def unit(n: int, d: int, seed: int) -> torch.Tensor:
    return torch.nn.functional.normalize(torch.randn(n, d, generator=torch.Generator().manual_seed(seed),
                                                     dtype=torch.float64), dim=1)


def brute_neg_clip_loss(x: torch.Tensor, y: torch.Tensor, px: torch.Tensor, py: torch.Tensor, tau: float,
                        skip: list[set[tuple[int, int]]] | None = None) -> list[float]:
    out = []
    for i in range(len(x)):
        per_pool = []
        for k in range(px.shape[0]):
            keep = [j for j in range(px.shape[1]) if not skip or (k, j) not in skip[i]]
            s_ii = float(x[i] @ y[i])
            row = math.log(math.exp(s_ii / tau) + sum(math.exp(float(x[i] @ py[k, j]) / tau) for j in keep))
            col = math.log(math.exp(s_ii / tau) + sum(math.exp(float(px[k, j] @ y[i]) / tau) for j in keep))
            per_pool.append(s_ii - 0.5 * tau * (row + col))
        out.append(sum(per_pool) / len(per_pool))
    return out


@pytest.mark.parametrize("tau", [0.01, 0.07, 1.0])
def test_neg_clip_loss_matches_brute_force(tau: float) -> None:
    x, y = unit(5, 8, 0), unit(5, 8, 1)
    px, py = unit(12, 8, 2).reshape(3, 4, 8), unit(12, 8, 3).reshape(3, 4, 8)
    got = neg_clip_loss(x, y, px, py, tau)
    assert torch.allclose(got, torch.tensor(brute_neg_clip_loss(x, y, px, py, tau), dtype=torch.float64),
                          rtol=1e-10, atol=1e-12)


def test_neg_clip_loss_is_minus_tau_times_the_clip_loss_in_the_batch() -> None:
    x, y = unit(1, 6, 4), unit(1, 6, 5)
    px, py = unit(7, 6, 6)[None], unit(7, 6, 7)[None]
    tau = 0.05
    batch_x, batch_y = torch.cat([x, px[0]]), torch.cat([y, py[0]])
    logits = batch_x @ batch_y.T / tau
    labels = torch.arange(8)
    clip_loss = 0.5 * (torch.nn.functional.cross_entropy(logits, labels, reduction="none")[0]
                       + torch.nn.functional.cross_entropy(logits.T, labels, reduction="none")[0])
    assert torch.allclose(neg_clip_loss(x, y, px, py, tau), -tau * clip_loss, rtol=1e-10)


def test_neg_clip_loss_self_mask_leaves_the_pair_out_of_its_pool() -> None:
    x, y = unit(3, 8, 8), unit(3, 8, 9)
    px, py = unit(8, 8, 10).reshape(2, 4, 8), unit(8, 8, 11).reshape(2, 4, 8)
    px[1, 2], py[1, 2] = x[0], y[0]  # pair 0 sits in pool 1 at position 2
    mask = torch.zeros(3, 2, 4, dtype=torch.bool)
    mask[0, 1, 2] = True
    got = neg_clip_loss(x, y, px, py, 0.1, mask)
    want = brute_neg_clip_loss(x, y, px, py, 0.1, skip=[{(1, 2)}, set(), set()])
    assert torch.allclose(got, torch.tensor(want, dtype=torch.float64), rtol=1e-10)


def test_neg_clip_loss_is_a_function_of_the_pair_alone() -> None:
    x, y = unit(9, 8, 12), unit(9, 8, 13)
    px, py = unit(20, 8, 14).reshape(4, 5, 8), unit(20, 8, 15).reshape(4, 5, 8)
    whole = neg_clip_loss(x, y, px, py, 0.02)
    alone = torch.cat([neg_clip_loss(x[i:i + 1], y[i:i + 1], px, py, 0.02) for i in reversed(range(9))]).flip(0)
    assert torch.equal(whole, alone) or torch.allclose(whole, alone, rtol=1e-14)


@pytest.mark.parametrize("bad", [0.0, -1.0, math.inf, math.nan])
def test_neg_clip_loss_refuses_a_bad_temperature(bad: float) -> None:
    x = unit(2, 4, 0)
    with pytest.raises(ValueError, match="temperature"):
        neg_clip_loss(x, x, x[None], x[None], bad)


def test_norm_sim_matches_brute_force() -> None:
    x, v = unit(4, 8, 16), unit(6, 8, 17)
    for p in (1.0, 2.0, 3.0):
        want = [sum(abs(float(x[i] @ v[j])) ** p for j in range(6)) ** (1 / p) for i in range(4)]
        assert torch.allclose(norm_sim(x, v, p), torch.tensor(want, dtype=torch.float64), rtol=1e-12)
    want_inf = [max(abs(float(x[i] @ v[j])) for j in range(6)) for i in range(4)]
    assert torch.allclose(norm_sim(x, v, math.inf), torch.tensor(want_inf, dtype=torch.float64), rtol=1e-12)
    with pytest.raises(ValueError, match="p must be"):
        norm_sim(x, v, 0.5)
    with pytest.raises(ValueError, match="non-empty"):
        norm_sim(x, v[:0], 2.0)


def test_kmeans_finds_separated_clusters_and_is_deterministic() -> None:
    centres = torch.eye(16, dtype=torch.float64)[:3]  # well separated (orthogonal)
    noise = torch.randn(90, 16, generator=torch.Generator().manual_seed(19), dtype=torch.float64) * 0.05
    truth = torch.arange(90) % 3
    x = centres[truth] + noise
    first, again = kmeans(x, 3, seed=5), kmeans(x, 3, seed=5)
    assert torch.equal(first, again)
    assign = nearest_centroid(x, first)
    for c in range(3):  # every true cluster maps onto exactly one found cluster
        assert len(set(assign[truth == c].tolist())) == 1
    assert len(set(assign.tolist())) == 3
    with pytest.raises(ValueError, match="k"):
        kmeans(x[:2], 3, seed=0)


def test_reference_columns_mask_the_pair_by_uid_and_assign_clusters() -> None:
    sample_img, sample_txt = unit(6, 8, 20), unit(6, 8, 21)
    pools = torch.tensor([[0, 1, 2], [3, 4, 5]])
    ref = EmbeddingReference([f"u{i}" for i in range(6)], sample_img, sample_txt, pools, unit(4, 8, 22), 0.1,
                             kmeans(sample_img, 2, seed=0))
    x, y = sample_img[[4, 0]], sample_txt[[4, 0]]
    out = ref.columns(x.float(), y.float(), ["u4", "other"])
    px, py = sample_img[pools], sample_txt[pools]
    want = brute_neg_clip_loss(x.float().double(), y.float().double(), px, py, 0.1, skip=[{(1, 1)}, set()])
    assert torch.allclose(out["neg_clip_loss"], torch.tensor(want, dtype=torch.float64), rtol=1e-6)
    assert out["cluster"].dtype == torch.int64 and out["cluster"].shape == (2,)
    assert set(out) == {"neg_clip_loss", "norm_sim_2", "norm_sim_inf", "cluster"}


def test_draw_pools_takes_the_seeded_order_and_caps_the_size() -> None:
    settings = EmbeddingSettings(pools=3, pool_size=4)
    pools = draw_pools(3, settings, lambda salt: [2, 0, 1] if salt.endswith("1") else [0, 1, 2])
    assert pools.tolist() == [[0, 1, 2], [2, 0, 1], [0, 1, 2]]
    with pytest.raises(ValueError, match="clusters"):
        EmbeddingSettings(clusters=-1)
