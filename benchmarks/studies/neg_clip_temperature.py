"""Which temperature should negCLIPLoss use: the checkpoint's learned one or the paper's 0.01?

Trains the quality benchmark's Fashion-MNIST proxy (its full settings, one seed), embeds every
training pair and the corpus sample once at the last checkpoint, and reports the noise AUC of
``neg_clip_loss`` at several temperatures next to ``clip_score`` (the same embeddings).

    python benchmarks/studies/neg_clip_temperature.py --seed 0 --out benchmarks/results/neg_clip_temperature.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import tempfile
from pathlib import Path

import torch

from pipeline.bench import quality
from pipeline.bench.metrics import noise_auc
from pipeline.influence.embeddings import draw_pools, neg_clip_loss
from pipeline.data.pairs import rank_order
from pipeline.model.scorer import EMBEDDING_SAMPLE_SALT, TrajectoryInfluence, rank_select
from pipeline.model.train import train_proxy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data-dir", default="data")
    parser.add_argument("--out", default="benchmarks/results/neg_clip_temperature.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    settings = quality.full_settings()
    spec = settings.fashion_mnist
    data = quality.load_fashion_mnist(spec, args.data_dir, settings.noise)
    cfg = spec.train.model_copy(update={"seed": args.seed, "threads": 1})
    influence = dataclasses.replace(spec.influence, seed=args.seed, components=("a",))
    with tempfile.TemporaryDirectory() as tmp:
        trajectory = train_proxy(data.train, cfg, Path(tmp) / "t", log_every=0)
        scorer = TrajectoryInfluence(trajectory, influence)
        img, txt = scorer.embed(data.train)
        sample_idx = rank_select(data.train, influence.embeddings.pool_pairs, args.seed, EMBEDDING_SAMPLE_SALT)
        learned = math.exp(-float(scorer.params[-1]["logit_scale"]))
    sample = data.train.subset(sample_idx)
    pools = draw_pools(len(sample), influence.embeddings, lambda salt: rank_order(sample.uids, args.seed, salt))
    s_img, s_txt = img[sample_idx].double(), txt[sample_idx].double()
    where = {u: i for i, u in enumerate(sample.uids)}
    own = torch.tensor([where.get(u, -1) for u in data.train.uids])
    mask = pools[None, :, :] == own[:, None, None]
    result = {"seed": args.seed, "learned_temperature": learned,
              "clip_score": noise_auc(data.noisy, (img * txt).sum(-1).double().numpy()), "neg_clip_loss": {}}
    for tau in sorted({learned, 0.01, 0.03, 0.1}):
        ncl = neg_clip_loss(img.double(), txt.double(), s_img[pools], s_txt[pools], tau, mask)
        result["neg_clip_loss"][f"{tau:.4g}"] = noise_auc(data.noisy, ncl.numpy())
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
