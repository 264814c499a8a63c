"""Does normalising each pair's gradient (cosine TracIn) find harmful pairs better?

TracIn sums η_t·⟨u_t, ∇ℓ_z(θ_t)⟩ over the checkpoints; a pair with a large loss gradient (a
mismatched caption, but also a hard clean pair) weighs in proportion to its gradient norm. The
cosine form divides each checkpoint's term by ‖∇ℓ_z(θ_t)‖, so only the direction counts.

A screen on a seeded random subset of the training pairs (``--pairs``; per-sample gradients cost
about 70 ms a pair on one CPU core), on a trajectory trained by ``harm_levers.py`` (lever ``base``): the per-checkpoint
components a_t = ⟨u_t, G_z⟩ from the real scorer, the per-pair gradient norms by per-sample
autograd (``torch.func.vmap(grad)``) with the negative bank's embeddings held fixed (the pair's
own path through the network: the bank's share of a single pair's gradient is 1/256 of the
softmax mass), and the noise AUC of Σ_t w_t a_t / ‖G_z,t‖ next to TracIn, and of TracIn's
self-influence Σ_t w_t ‖G_z,t‖² (the mislabel detector of the TracIn paper; it needs the same
norms, so it comes free). Appended to the levers
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


def study_record(args, noisy: np.ndarray, a: np.ndarray, tracin: np.ndarray, norms: np.ndarray,
                 seconds: float) -> dict:
    """The levers-file line: TracIn, its cosine form, the gradient norm and TracIn's
    self-influence Σ_t w_t ‖∇ℓ_z(θ_t)‖² (Pruthi et al.'s mislabel detector: high = suspect,
    so the AUC reads its negation), with the checkpoint weights w fitted from TracIn itself."""
    weights, *_ = np.linalg.lstsq(a.T, tracin, rcond=None)  # tracin = Σ_t w_t a_t
    cosine = cosine_form(torch.from_numpy(a), weights, torch.from_numpy(norms)).numpy()
    self_influence = (weights[:, None] * norms ** 2).sum(axis=0)
    return {"dataset": args.dataset, "noise": args.noise, "seed": args.seed, "lever": "cosine", "pairs": len(tracin),
            "target_loss": None, "seconds": {"proxy": 0.0, "score": round(seconds, 1)},
            "checkpoint_weights": [float(w) for w in weights],
            "columns": {"tracin": {"auc": round(noise_auc(noisy, tracin), 4)},
                        "tracin_cosine": {"auc": round(noise_auc(noisy, cosine), 4),
                                          "below_zero": round(float((cosine < 0).mean()), 4),
                                          "mismatched_among_below": round(float(noisy[cosine < 0].mean()), 4)},
                        "gradient_norm": {"auc": round(noise_auc(noisy, -norms[-1]), 4)},
                        "self_influence": {"auc": round(noise_auc(noisy, -self_influence), 4)}},
            "auc_per_checkpoint": {"a_cosine": [round(noise_auc(noisy, a[t] / norms[t]), 4)
                                                for t in range(a.shape[0])]}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=1500, help="score a seeded random subset of this many pairs")
    parser.add_argument("--part", default="0/1", help="I/N: with every pair, score the I-th of N contiguous blocks "
                        "(run the N parts in parallel; the last to finish combines them)")
    parser.add_argument("--combine", action="store_true", help="with --part I/N: score nothing, combine the N saved "
                        "parts (after a run whose parts finished apart)")
    args, spec, data = one_trajectory_study(parser)
    part, parts = (int(x) for x in args.part.split("/"))
    every_pair = args.pairs >= len(data.train)
    stem = f"{args.dataset}_n{round(args.noise * 100)}_s{args.seed}"
    work = Path(args.work)
    start = time.perf_counter()
    if not args.combine:
        subset = np.sort(np.random.default_rng(args.seed).permutation(len(data.train))[:args.pairs])
        if every_pair and parts > 1:
            subset = np.array_split(subset, parts)[part]
        part_data = dataclasses.replace(data, train=data.train.subset(subset.tolist()), noisy=data.noisy[subset])
        trajectory = Trajectory.load(work / f"{stem}_ckpt4")
        scorer = TrajectoryInfluence(trajectory, dataclasses.replace(spec.influence, seed=args.seed, components=("a",)))
        scorer.load_prepared(scorer.prepare(part_data.target, part_data.train))
        scores = scorer.score_table(part_data.train)
        a = scores["a"].double().numpy()  # [m, n]
        tracin = scores["tracin"].double().numpy()
        norms = np.stack([gradient_norms(scorer, part_data, k) for k in range(a.shape[0])])
        noisy = part_data.noisy
    if every_pair and parts > 1:
        files = [work / f"{stem}_cosine_part{i}of{parts}.npz" for i in range(parts)]
        if not args.combine:
            np.savez(files[part], index=subset, tracin=tracin, norms=norms, a=a)
        if not all(f.is_file() for f in files):
            print(f"part {part}/{parts} saved; the last part combines", flush=True)
            return
        blocks = [dict(np.load(f)) for f in files]
        tracin = np.concatenate([b["tracin"] for b in blocks])
        a, norms = (np.concatenate([b[key] for b in blocks], axis=1) for key in ("a", "norms"))
        subset = np.concatenate([b["index"] for b in blocks])
        noisy = data.noisy[subset]
    elif args.combine:
        raise SystemExit("--combine needs --pairs covering the corpus and --part I/N with N > 1")
    record = study_record(args, noisy, a, tracin, norms, time.perf_counter() - start)
    if every_pair:  # in corpus order (the sorted full permutation): lever_retrains.py can retrain on it
        weights = np.array(record["checkpoint_weights"])
        cosine = cosine_form(torch.from_numpy(a), weights, torch.from_numpy(norms)).numpy()
        np.savez(work / f"{stem}_cosine.npz", tracin=cosine)  # the cosine form in tracin's place
    with Path(args.out).open("a") as handle:
        handle.write(json.dumps(record) + "\n")
    print(json.dumps(record), flush=True)


if __name__ == "__main__":
    main()
