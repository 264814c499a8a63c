"""Does averaging the scores of several proxy runs find harmful pairs better (TRAK's ensemble)?

Gradient-based scores of one small proxy are noisy: TRAK averages them over independently trained
models. The quality benchmark trains one proxy per seed on the same training pairs (its data split
does not change with the seed), so its score caches (``data/quality_work``) already hold an
ensemble of 3. This screen reads them and reports, per column, each proxy's noise AUC, the AUC of
the mean score over the proxies (the sign of an influence mean keeps its meaning: the drop rule
still reads 0) and of the mean rank, the below-zero share of the mean, and the rank average with
the ensemble's ``neg_clip_loss`` (what a combination adds). No proxy is trained and nothing is
scored here: it costs a few seconds. Appended to the levers results file as lever ``ensemble``.

    PYTHONPATH=.:benchmarks/studies python benchmarks/studies/proxy_ensemble.py --datasets fashion_mnist fashion_lookalike
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from scipy.stats import rankdata

from pipeline.bench import quality
from pipeline.bench.metrics import noise_auc

COLUMNS = ("diffin_unrolled", "tracin", "neg_clip_loss", "clip_score")


def ensemble_record(noisy: np.ndarray, caches: list[dict], dataset: str, seeds: list[int], noise: float) -> dict:
    """The levers-file line of one dataset's ensemble over ``caches`` (one score cache per seed)."""
    ncl_rank = np.mean([rankdata(c["neg_clip_loss"]) for c in caches], axis=0)
    columns = {}
    for column in COLUMNS:
        mean = np.mean([c[column] for c in caches], axis=0)
        rank = np.mean([rankdata(c[column]) for c in caches], axis=0)
        negative = mean < 0
        columns[column] = {
            "auc_per_proxy": [round(noise_auc(noisy, c[column]), 4) for c in caches],
            "auc": round(noise_auc(noisy, mean), 4), "auc_mean_rank": round(noise_auc(noisy, rank), 4),
            "below_zero": round(float(negative.mean()), 4),
            "mismatched_among_below": round(float(noisy[negative].mean()), 4) if negative.any() else None,
            "auc_rank_avg_ncl": round(noise_auc(noisy, rankdata(rank) + rankdata(ncl_rank)), 4)}
    return {"dataset": dataset, "noise": noise, "seed": "+".join(map(str, seeds)), "lever": "ensemble",
            "proxies": len(caches), "columns": columns}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--datasets", nargs="+", default=["fashion_mnist"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--noise", type=float, default=0.3)
    parser.add_argument("--data-dir", default="data")
    parser.add_argument("--bench-work", default="data/quality_work")
    parser.add_argument("--out", default="benchmarks/results/harm_levers.jsonl")
    args = parser.parse_args()
    for name in args.datasets:
        spec = quality.full_settings().dataset(name)
        data = quality.load_fashion_mnist(spec, args.data_dir, args.noise, name)
        fingerprint = quality.settings_fingerprint(spec, args.noise)
        caches = []
        for seed in args.seeds:
            with np.load(Path(args.bench_work) / f"{name}_s{seed}_{fingerprint}.npz") as cache:
                caches.append({c: cache[c] for c in COLUMNS})
        record = ensemble_record(data.noisy, caches, name, args.seeds, args.noise)
        with Path(args.out).open("a") as handle:
            handle.write(json.dumps(record) + "\n")
        print(json.dumps(record), flush=True)


if __name__ == "__main__":
    main()
