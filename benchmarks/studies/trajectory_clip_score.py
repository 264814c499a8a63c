"""Does averaging a cheap column over the trajectory find mismatched captions better?

The noisy-label literature ranks examples by their margin or loss averaged over training (e.g.
area under the margin, Pleiss et al. 2020): early in training a network fits the clean pattern
first, so a mismatched pair's loss is most telling before it is memorised. This screen computes
``clip_score`` (the cosine of the pair's embeddings) at every checkpoint of a trajectory trained
by ``harm_levers.py`` (its ``ckpt8`` lever: 8 checkpoints of the quality bench's proxy) and prints
the noise AUC per checkpoint, of the mean score, of the mean rank, and of the mean rank over the
last checkpoints only. No retraining; nothing is written.

    PYTHONPATH=.:benchmarks/studies nice python benchmarks/studies/trajectory_clip_score.py \\
        --dataset fashion_mnist --trajectory data/levers_work/fashion_mnist_n30_s0_ckpt8
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
import torch.nn.functional as F
from scipy.stats import rankdata

from pipeline.bench import quality
from pipeline.bench.metrics import noise_auc
from pipeline.model.clip import build_clip, context_length, normalize_images, tokenize
from pipeline.model.trajectory import Trajectory, load_checkpoint_state


def clip_scores(trajectory: Trajectory, k: int, table, batch: int = 500) -> np.ndarray:
    """The cosine of each pair's image and caption embeddings at checkpoint ``k``."""
    model = build_clip(trajectory.model)
    model.load_state_dict(load_checkpoint_state(trajectory.checkpoint_path(k))["state_dict"])
    model.eval()
    length = context_length(model)
    parts = []
    with torch.no_grad():
        for start in range(0, len(table), batch):
            images = F.normalize(model.encode_image(normalize_images(table.images[start:start + batch])), dim=-1)
            texts = F.normalize(model.encode_text(tokenize(table.captions[start:start + batch], length)), dim=-1)
            parts.append((images * texts).sum(-1).numpy())
    return np.concatenate(parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", default="fashion_mnist")
    parser.add_argument("--trajectory", default="data/levers_work/fashion_mnist_n30_s0_ckpt8")
    parser.add_argument("--data-dir", default="data")
    args = parser.parse_args()
    torch.set_num_threads(1)
    spec = quality.full_settings().dataset(args.dataset)
    data = quality.load_fashion_mnist(spec, args.data_dir, 0.3, args.dataset)
    trajectory = Trajectory.load(args.trajectory)
    scores = np.stack([clip_scores(trajectory, k, data.train) for k in range(len(trajectory.checkpoints))])
    for k, row in enumerate(scores):
        print(f"checkpoint {k} (step {trajectory.checkpoints[k].step}): AUC {noise_auc(data.noisy, row):.4f}")
    ranks = np.stack([rankdata(row) for row in scores])
    print(f"mean score: AUC {noise_auc(data.noisy, scores.mean(0)):.4f}")
    for first in range(len(scores)):
        print(f"mean rank over checkpoints {first}..{len(scores) - 1}: AUC {noise_auc(data.noisy, ranks[first:].mean(0)):.4f}")


if __name__ == "__main__":
    main()
