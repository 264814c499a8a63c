"""Does a zero-shot-task target make the influence scores find harmful pairs better?

The default target loss L_V is the target pairs' CLIP loss against a bank of target pairs. On a
corpus whose captions repeat (Fashion-MNIST's are a class noun in a template; Openclipart repeats
titles) the bank holds many pairs with the same caption as a target pair, and the loss pushes them
apart as negatives. The zero-shot target (``pipeline.influence.objective.ZeroShotObjective``)
replaces L_V with the zero-shot classifier's cross-entropy on the same target images: each class
appears once, as zero-shot evaluation scores it.

A screen (no retraining): on a trajectory trained by ``harm_levers.py`` (its ``base`` lever: the
quality bench's full settings) it scores every training pair with u_t from the zero-shot target
and reports, as ``harm_levers.py`` does, the noise AUC, the share below 0 and the mismatched
share among those. The cell is appended to the same results file as lever ``zero_shot``.

    nice -n 10 python benchmarks/studies/zero_shot_target.py --dataset fashion_mnist --seed 0
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import numpy as np
import torch

from pipeline.bench import quality
from pipeline.bench.metrics import class_prompts
from pipeline.influence.objective import ZeroShotObjective, forward_mode_safe
from pipeline.influence.params import from_vector
from pipeline.influence.prepare import mean_loss_grad, per_sample_loss, prepare_unrolled
from pipeline.model.scorer import TrajectoryInfluence, UnrolledPrepared, rank_select, segment_lrs, split_bank
from pipeline.model.trajectory import Trajectory

from harm_levers import one_trajectory_study, report_columns  # a sibling study script (run with benchmarks/studies on PYTHONPATH)


def zero_shot_prepared(scorer: TrajectoryInfluence, data, labels: np.ndarray):
    """The scorer's prepared trajectory with u_t (and the unrolled directions) from the zero-shot target."""
    s = scorer.settings
    prepared = scorer.prepare(data.target, data.train)
    prompts = class_prompts()
    objective = ZeroShotObjective(scorer.model, scorer.tokenizer([t for p in prompts for t in p]), len(prompts[0]))
    _, target_idx = split_bank(data.target, s.bank_size, s.seed)
    batches = []
    for i in range(0, len(target_idx), s.batch_size):
        part = target_idx[i:i + s.batch_size]
        images, _ = scorer.inputs(data.target.images[part], [data.target.captions[j] for j in part])
        batches.append((images, torch.as_tensor(labels[part], dtype=torch.long)))
    losses = []
    with forward_mode_safe():
        for k, params in enumerate(scorer.params):
            u = mean_loss_grad(objective, params, batches)
            with torch.no_grad():
                loss = float(torch.cat([per_sample_loss(objective, params, b) for b in batches]).mean())
            prepared.prepared[k] = dataclasses.replace(prepared.prepared[k], u=u, target_loss=loss)
            losses.append(loss)
        steps = [c.step for c in scorer.checkpoints]
        count = s.unrolled.proxy_batches * s.proxy_batch_size
        bank_idx, _ = split_bank(data.target, s.bank_size, s.seed)
        train_objective = scorer._objective(data.target.images[bank_idx], [data.target.captions[i] for i in bank_idx])
        plain = prepare_unrolled(
            train_objective, scorer.params, batches,
            lambda k: scorer._batches(data.train, rank_select(data.train, count, s.seed, f"proxy{steps[k]}"),
                                      s.proxy_batch_size),
            segment_lrs(scorer.trajectory, steps), s.unrolled, target_objective=objective)
    prepared.unrolled = UnrolledPrepared([from_vector(c.direction, p) for c, p in zip(plain, scorer.params)], None,
                                         prepared.unrolled.diagnostics)
    return prepared, losses


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    args, spec, data = one_trajectory_study(parser)
    meta = quality.read_json_meta(Path(data.corpus) / "test")
    labels = np.array([int(meta[u]["label"]) for u in data.target.uids])
    stem = f"{args.dataset}_n{round(args.noise * 100)}_s{args.seed}"
    trajectory = Trajectory.load(Path(args.work) / f"{stem}_ckpt4")
    influence = dataclasses.replace(spec.influence, seed=args.seed, components=("a", "d"))
    start = time.perf_counter()
    scorer = TrajectoryInfluence(trajectory, influence)
    prepared, losses = zero_shot_prepared(scorer, data, labels)
    scorer.load_prepared(prepared)
    scores = scorer.score_table(data.train)
    columns = {c: scores[c].double().numpy() for c in ("tracin", "diffin_unrolled", "neg_clip_loss")}
    np.savez(Path(args.work) / f"{stem}_zero_shot.npz", **columns)
    record = {"dataset": args.dataset, "noise": args.noise, "seed": args.seed, "lever": "zero_shot", "excluded": 0,
              "target_loss": [round(x, 5) for x in losses],
              "seconds": {"proxy": 0.0, "score": round(time.perf_counter() - start, 1)},
              "columns": report_columns(data.noisy, {c: columns[c] for c in ("tracin", "diffin_unrolled")},
                                 columns["neg_clip_loss"])}
    with Path(args.out).open("a") as handle:
        handle.write(json.dumps(record) + "\n")
    print(json.dumps(record), flush=True)


if __name__ == "__main__":
    main()
