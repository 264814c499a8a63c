"""Does normalising each pair's gradient (cosine TracIn) find harmful pairs better?

TracIn sums η_t·⟨u_t, ∇ℓ_z(θ_t)⟩ over the checkpoints; a pair with a large loss gradient (a
mismatched caption, but also a hard clean pair) weighs in proportion to its gradient norm. The
cosine form divides each checkpoint's term by ‖∇ℓ_z(θ_t)‖, so only the direction counts.

A screen on a seeded random subset of the training pairs (``--pairs``; per-sample gradients cost
about 70 ms a pair on one CPU core), on a trajectory trained by ``harm_levers.py`` (lever ``base``): the per-checkpoint
components a_t = ⟨u_t, G_z⟩ from the real scorer, the per-pair gradient norms by per-sample
autograd (``torch.func.vmap(grad)``) with the negative bank's embeddings held fixed (the pair's
own path through the network: the bank's share of a single pair's gradient is 1/256 of the
softmax mass), and the noise AUC of Σ_t w_t a_t / ‖G_z,t‖ next to TracIn. Appended to the levers
results file as lever ``cosine``. With ``--pairs`` at least the corpus size every pair is scored
and the cosine column is saved as ``{dataset}_n30_s{seed}_cosine.npz`` (key ``tracin``: the cosine
form in TracIn's place), which ``lever_retrains.py`` retrains on.

    nice -n 10 python benchmarks/studies/cosine_influence.py --dataset fashion_mnist --seed 0
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import numpy as np
import torch

from harm_levers import one_trajectory_study  # a sibling study script (run with benchmarks/studies on PYTHONPATH)
from pipeline.bench.metrics import noise_auc
from pipeline.influence.cosine import cosine_form, fixed_context
from pipeline.influence.cosine import gradient_norms as pair_gradient_norms
from pipeline.model.scorer import TrajectoryInfluence, split_bank
from pipeline.model.trajectory import Trajectory


def gradient_norms(scorer: TrajectoryInfluence, data, k: int, batch: int = 64) -> np.ndarray:
    """‖∇_θ ℓ_z(θ_k)‖ of every training pair, the bank's embeddings and the temperature held
    fixed (:func:`pipeline.influence.cosine.gradient_norms`)."""
    s = scorer.settings
    bank_idx, _ = split_bank(data.target, s.bank_size, s.seed)
    objective = scorer._objective(data.target.images[bank_idx], [data.target.captions[i] for i in bank_idx])
    params = scorer.params[k]
    context = fixed_context(objective, params)
    norms = [pair_gradient_norms(objective, params, (images, tokens), context)
             for images, tokens in scorer._batches(data.train, list(range(len(data.train))), batch)]
    return torch.cat(norms).numpy()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=1500, help="score a seeded random subset of this many pairs")
    parser.add_argument("--part", default="0/1", help="I/N: with every pair, score the I-th of N contiguous blocks "
                        "(run the N parts in parallel; the last to finish combines them)")
    args, spec, data = one_trajectory_study(parser)
    part, parts = (int(x) for x in args.part.split("/"))
    every_pair = args.pairs >= len(data.train)
    subset = np.sort(np.random.default_rng(args.seed).permutation(len(data.train))[:args.pairs])
    if every_pair and parts > 1:
        subset = np.array_split(subset, parts)[part]
    full_noisy = data.noisy
    data = dataclasses.replace(data, train=data.train.subset(subset.tolist()), noisy=data.noisy[subset])
    stem = f"{args.dataset}_n{round(args.noise * 100)}_s{args.seed}"
    trajectory = Trajectory.load(Path(args.work) / f"{stem}_ckpt4")
    start = time.perf_counter()
    scorer = TrajectoryInfluence(trajectory, dataclasses.replace(spec.influence, seed=args.seed, components=("a",)))
    scorer.load_prepared(scorer.prepare(data.target, data.train))
    scores = scorer.score_table(data.train)
    a = scores["a"].double().numpy()  # [m, n]
    tracin = scores["tracin"].double().numpy()
    weights, *_ = np.linalg.lstsq(a.T, tracin, rcond=None)  # tracin = Σ_t w_t a_t
    norms = np.stack([gradient_norms(scorer, data, k) for k in range(a.shape[0])])
    cosine = cosine_form(torch.from_numpy(a), weights, torch.from_numpy(norms)).numpy()
    if every_pair and parts > 1:
        work = Path(args.work)
        np.savez(work / f"{stem}_cosine_part{part}of{parts}.npz", index=subset, cosine=cosine, tracin=tracin,
                 norms=norms, a=a)
        files = [work / f"{stem}_cosine_part{i}of{parts}.npz" for i in range(parts)]
        if not all(f.is_file() for f in files):
            print(f"part {part}/{parts} saved; the last part combines", flush=True)
            return
        blocks = [dict(np.load(f)) for f in files]
        cosine, tracin = (np.concatenate([b[key] for b in blocks]) for key in ("cosine", "tracin"))
        a, norms = (np.concatenate([b[key] for b in blocks], axis=1) for key in ("a", "norms"))
        subset = np.concatenate([b["index"] for b in blocks])
        data = dataclasses.replace(data, noisy=full_noisy[subset])
    if every_pair:  # in corpus order (the sorted full permutation): lever_retrains.py can retrain on it
        np.savez(Path(args.work) / f"{stem}_cosine.npz", tracin=cosine)  # the cosine form in tracin's place
    record = {"dataset": args.dataset, "noise": args.noise, "seed": args.seed, "lever": "cosine", "pairs": len(subset),
              "target_loss": None, "seconds": {"proxy": 0.0, "score": round(time.perf_counter() - start, 1)},
              "checkpoint_weights": [float(w) for w in weights],
              "columns": {"tracin": {"auc": round(noise_auc(data.noisy, tracin), 4)},
                          "tracin_cosine": {"auc": round(noise_auc(data.noisy, cosine), 4),
                                            "below_zero": round(float((cosine < 0).mean()), 4),
                                            "mismatched_among_below": round(float(data.noisy[cosine < 0].mean()), 4)},
                          "gradient_norm": {"auc": round(noise_auc(data.noisy, -norms[-1]), 4)}},
              "auc_per_checkpoint": {"a_cosine": [round(noise_auc(data.noisy, a[t] / norms[t]), 4)
                                                  for t in range(a.shape[0])]}}
    with Path(args.out).open("a") as handle:
        handle.write(json.dumps(record) + "\n")
    print(json.dumps(record), flush=True)


if __name__ == "__main__":
    main()
