"""Which lever makes the first-order influence scores find harmful pairs better?

A screen, not the quality benchmark: for the quality benchmark's Fashion-MNIST corpora (its full
settings, one seed) it trains the proxy, scores every training pair under one setting of the real
scorer per lever, and reports per column the noise AUC (label = mismatched caption), the share
scored below 0 and the mismatched share among those. No retraining: the levers that detect
harm better are then retrained by ``diffin bench quality``.

Levers (each a setting of the pipeline):

- ``base``: the benchmark's settings (``tracin``, ``diffin_unrolled``);
- ``adam``: ``score.adam`` (the optimizer-aware twins), Adam's own ε;
- ``adam_floor``: the same with ``adam_eps_floor`` (P = 1/(√v̂ + max(ε, floor)));
- ``ckpt8``: a proxy saving 8 checkpoints instead of 4 (same training run);
- ``corpus_bank``: the per-pair loss's negatives drawn from the corpus (a seeded sample of the
  training pairs, mismatched ones included) instead of the target set; V unchanged (a study
  patch of ``split_bank``: the scorer takes its bank from the target table);
- ``round2``: multi-round — drop the pairs ``diffin_unrolled`` scores below 0 in ``base``,
  retrain the proxy on the rest (same steps), rescore every pair.

Every finished (dataset, seed, lever) cell is appended to the results file; a rerun skips it.

    nice -n 15 python benchmarks/studies/harm_levers.py --datasets fashion_mnist fashion_lookalike --seeds 0
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import numpy as np
import torch
from scipy.stats import rankdata

from pipeline.bench import quality
from pipeline.bench.metrics import noise_auc
from pipeline.data.pairs import PairTable
from pipeline.model.scorer import TrajectoryInfluence
from pipeline.model.train import train_proxy
from pipeline.model.trajectory import Trajectory

LEVERS = ("base", "adam", "adam_floor", "ckpt8", "round2", "corpus_bank")
FLOOR = 1e-4


def report_columns(noisy: np.ndarray, columns: dict[str, np.ndarray], cheap: np.ndarray | None) -> dict:
    out = {}
    for name, values in columns.items():
        neg = values < 0
        out[name] = {"auc": round(noise_auc(noisy, values), 4), "below_zero": round(float(neg.mean()), 4),
                     "mismatched_among_below": round(float(noisy[neg].mean()), 4) if neg.any() else None}
        if cheap is not None:  # rank average with neg_clip_loss: what a combination adds
            both = rankdata(values) + rankdata(cheap)
            out[name]["auc_rank_avg_ncl"] = round(noise_auc(noisy, both), 4)
    return out


def _trajectory(data, cfg, where: Path, exclude=()) -> Trajectory:
    if (where / "trajectory.json").is_file():
        return Trajectory.load(where)
    return train_proxy(data.train, cfg, where, exclude=exclude, log_every=0)


def _with_corpus_bank(data, influence):
    """``data`` whose target table is (a corpus sample of bank_size pairs) + V, with the scorer's
    ``split_bank`` patched to take exactly that sample as the bank."""
    import pipeline.model.scorer as scorer_module

    original = scorer_module.split_bank
    _, v_idx = original(data.target, influence.bank_size, influence.seed)
    sample = scorer_module.rank_select(data.train, influence.bank_size, influence.seed, "corpus_bank")
    bank, v = data.train.subset(sample), data.target.subset(v_idx)
    table = PairTable(bank.uids + v.uids, bank.keys + v.keys, bank.shards + v.shards,
                      torch.cat([bank.images, v.images]), bank.captions + v.captions, {})
    size = len(bank)

    def split_bank(target, bank_size, seed):
        if target is table:
            return list(range(size)), list(range(size, len(table)))
        return original(target, bank_size, seed)

    scorer_module.split_bank = split_bank
    return dataclasses.replace(data, target=table)


def run_cell(data, spec, seed: int, lever: str, work: Path, base_scores: dict | None, noise: float) -> dict:
    cfg = spec.train.model_copy(update={"seed": seed, "threads": 1})
    influence = dataclasses.replace(spec.influence, seed=seed, components=("a", "d"))
    exclude: list[str] = []
    tag = "ckpt4"
    if lever == "ckpt8":
        cfg, tag = cfg.model_copy(update={"checkpoints": 8}), "ckpt8"
    if lever in ("adam", "adam_floor"):
        influence = dataclasses.replace(influence, adam=True, adam_eps_floor=FLOOR if lever == "adam_floor" else 0.0)
    if lever == "round2":
        if base_scores is None:
            raise SystemExit("round2 needs the base cell's scores (run base first)")
        du = base_scores["diffin_unrolled"]
        exclude = [u for u, s in zip(data.train.uids, du) if s < 0]
        tag = "round2"
    if lever == "corpus_bank":
        data = _with_corpus_bank(data, influence)
    start = time.perf_counter()
    stem = f"{data.name}_n{round(noise * 100)}_s{seed}"
    trajectory = _trajectory(data, cfg, work / f"{stem}_{tag}", exclude)
    t_train = time.perf_counter() - start
    scorer = TrajectoryInfluence(trajectory, influence)
    prepared = scorer.prepare(data.target, data.train)
    scorer.load_prepared(prepared)
    scores = scorer.score_table(data.train)
    columns = {c: scores[c].double().numpy() for c in scores
               if c in ("tracin", "diffin_unrolled", "tracin_adam", "diffin_unrolled_adam", "clip_score",
                        "neg_clip_loss")}
    np.savez(work / f"{stem}_{lever}.npz", **columns)
    per_checkpoint = {c: [round(noise_auc(data.noisy, row.double().numpy()), 4) for row in scores[c]]
                      for c in ("a", "d", "a_adam", "d_adam") if c in scores}
    return {"dataset": data.name, "noise": noise, "seed": seed, "lever": lever, "excluded": len(exclude),
            "target_loss": [round(p.target_loss, 5) for p in prepared.prepared],
            "seconds": {"proxy": round(t_train, 1), "score": round(time.perf_counter() - start - t_train, 1)},
            "columns": report_columns(data.noisy, columns, columns["neg_clip_loss"]),
            "auc_per_checkpoint": per_checkpoint}


def study_arguments(parser: argparse.ArgumentParser) -> None:
    """The options the lever studies share: the corpus's noise, where data, trajectories and results go."""
    parser.add_argument("--noise", type=float, default=0.3, help="share of mismatched captions in the corpus")
    parser.add_argument("--data-dir", default="data")
    parser.add_argument("--work", default="data/levers_work", help="trajectories and per-pair scores")
    parser.add_argument("--out", default="benchmarks/results/harm_levers.jsonl")


def one_trajectory_study(parser: argparse.ArgumentParser):
    """Parse a single-trajectory study's options (``--dataset``, ``--seed`` and the shared ones);
    returns (args, the dataset's bench settings, its data)."""
    parser.add_argument("--dataset", default="fashion_mnist")
    parser.add_argument("--seed", type=int, default=0)
    study_arguments(parser)
    args = parser.parse_args()
    torch.set_num_threads(1)
    spec = quality.full_settings().dataset(args.dataset)
    return args, spec, quality.load_fashion_mnist(spec, args.data_dir, args.noise, args.dataset)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--datasets", nargs="+", default=["fashion_mnist"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--levers", nargs="+", default=list(LEVERS), choices=LEVERS)
    study_arguments(parser)
    args = parser.parse_args()
    torch.set_num_threads(1)
    settings = quality.full_settings()
    work, out = Path(args.work), Path(args.out)
    work.mkdir(parents=True, exist_ok=True)
    done = {(r["dataset"], r.get("noise", 0.3), r["seed"], r["lever"])
            for r in map(json.loads, out.read_text().splitlines())} if out.is_file() else set()
    for name in args.datasets:
        spec = settings.dataset(name)
        data = quality.load_fashion_mnist(spec, args.data_dir, args.noise, name)
        for seed in args.seeds:
            for lever in args.levers:
                if (name, args.noise, seed, lever) in done:
                    continue
                base_file = work / f"{name}_n{round(args.noise * 100)}_s{seed}_base.npz"
                base = dict(np.load(base_file)) if base_file.is_file() else None
                record = run_cell(data, spec, seed, lever, work, base, args.noise)
                with out.open("a") as handle:
                    handle.write(json.dumps(record) + "\n")
                print(json.dumps(record), flush=True)


if __name__ == "__main__":
    main()
