"""What each harm-detection lever is worth on retraining: its headroom share under drop-then-fill.

The lever screen (``harm_levers.py``) scores every training pair of the quality benchmark's
Fashion-MNIST corpus once per lever and saves the influence columns
(``data/levers_work/{dataset}_n30_s{seed}_{lever}.npz``). This study turns each of those columns
into the benchmark's ``COLUMN+drop`` selection — drop the pairs the column scores below 0 (its
own sign, nothing tuned), fill the budget from the rest in the seeded random order — with the
real reducer, retrains the benchmark's model on it exactly as ``diffin bench quality`` does, and
appends one line per (lever, column, budget) to ``benchmarks/results/lever_retrains.jsonl``.

Every other column of the score files is the benchmark's own cell (its score cache), so the
``base`` lever reproduces the benchmark's ``diffin_unrolled+drop`` selection: the study checks
the kept set's digest against the benchmark's cell and stops on a mismatch. A lever whose scores
are not there yet (``cosine_influence.py --pairs 6000`` writes the cosine form) is skipped. Headroom shares are
computed against the benchmark's ``random`` and ``oracle`` cells of the same seed.

    PYTHONPATH=.:benchmarks/studies nice -n 15 python benchmarks/studies/lever_retrains.py
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from pipeline.bench import quality
from pipeline.bench.selections import Method
from pipeline.model.train import train_final

# (lever, column) in the order worth retraining first: best screen AUC first, sub-variants last.
CELLS = (("base", "diffin_unrolled"), ("base", "tracin"), ("adam", "tracin_adam"), ("ckpt8", "diffin_unrolled"),
         ("zero_shot", "diffin_unrolled"), ("corpus_bank", "diffin_unrolled"), ("round2", "diffin_unrolled"),
         ("adam", "diffin_unrolled_adam"), ("ckpt8", "tracin"), ("zero_shot", "tracin"),
         ("corpus_bank", "tracin"), ("round2", "tracin"), ("adam_floor", "tracin_adam"),
         ("adam_floor", "diffin_unrolled_adam"), ("cosine", "tracin"))


def bench_cells(cells: list[dict], fingerprint: str, dataset: str, seed: int) -> dict[tuple[str, str], dict]:
    """The benchmark's retrain cells of one (dataset, seed, settings), by (method, budget)."""
    return {(c["method"], c["budget"]): c for c in cells
            if c["kind"] == "retrain" and c["settings"] == fingerprint and c["dataset"] == dataset
            and c["seed"] == seed}


def headroom(value: float, random: float, oracle: float) -> float | None:
    """(method − random) / (oracle − random); None without headroom."""
    return None if oracle == random else round((value - random) / (oracle - random), 3)


def markdown_table(retrains: list[dict], screen: list[dict], dataset: str, seed: int) -> str:
    """The levers' table for docs/QUALITY.md: the screen's noise AUC and below-zero counts
    (``harm_levers.jsonl``) beside each lever's retrained drop-then-fill result."""
    stats = {}
    for record in screen:
        if record["dataset"] == dataset and record["seed"] == seed and record.get("noise", 0.3) == 0.3:
            lever = "cosine" if record["lever"] == "cosine" and record.get("pairs") == 6000 else record["lever"]
            for column, values in record["columns"].items():
                name = "tracin" if lever == "cosine" and column == "tracin_cosine" else column
                stats.setdefault((lever, name), values)
    rows = ["| lever | column | noise AUC | below 0 | mismatched among below 0 | acc keep 50 / 30 | "
            "headroom 50 / 30 | mismatched kept 50 / 30 |", "|---|---|---:|---:|---:|---|---|---|"]
    for lever, column in CELLS:
        cells = {r["budget"]: r for r in retrains if (r["lever"], r["column"]) == (lever, column)
                 and r["dataset"] == dataset and r["seed"] == seed}
        if len(cells) < 2:
            continue
        s = stats.get((lever, column), {})
        fifty, thirty = cells["keep_50"], cells["keep_30"]
        auc = f"{s['auc']:.3f}" if "auc" in s else "—"
        below = f"{100 * s['below_zero']:.1f} %" if s.get("below_zero") is not None else "—"
        among = f"{100 * s['mismatched_among_below']:.1f} %" if s.get("mismatched_among_below") is not None else "—"
        rows.append(f"| {lever} | `{column}` | {auc} | {below} | {among} | {fifty['metrics']['acc']:.3f} / "
                    f"{thirty['metrics']['acc']:.3f} | {fifty['headroom_share']:.2f} / {thirty['headroom_share']:.2f} | "
                    f"{100 * fifty['kept_noisy_fraction']:.1f} % / {100 * thirty['kept_noisy_fraction']:.1f} % |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", default="fashion_mnist")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--noise", type=float, default=0.3)
    parser.add_argument("--data-dir", default="data")
    parser.add_argument("--levers-work", default="data/levers_work")
    parser.add_argument("--bench-work", default="data/quality_work")
    parser.add_argument("--bench-cells", default="benchmarks/results/quality_cells.jsonl")
    parser.add_argument("--out", default="benchmarks/results/lever_retrains.jsonl")
    parser.add_argument("--table", action="store_true", help="print the markdown table of the finished cells, run nothing")
    parser.add_argument("--screen", default="benchmarks/results/harm_levers.jsonl", help="the lever screen's results")
    args = parser.parse_args()
    if args.table:
        print(markdown_table(quality.read_cells(Path(args.out)), quality.read_cells(Path(args.screen)),
                             args.dataset, args.seed))
        return
    torch.set_num_threads(1)

    spec = quality.full_settings().dataset(args.dataset)
    data = quality.load_fashion_mnist(spec, args.data_dir, args.noise, args.dataset)
    fingerprint = quality.settings_fingerprint(spec, args.noise)
    reference = bench_cells(quality.read_cells(Path(args.bench_cells)), fingerprint, args.dataset, args.seed)
    with np.load(Path(args.bench_work) / f"{args.dataset}_s{args.seed}_{fingerprint}.npz") as cache:
        base_arrays = {k: cache[k] for k in cache.files}
    cfg = spec.train.model_copy(update={"seed": args.seed, "threads": 1})
    out = Path(args.out)
    done = {(r["lever"], r["column"], r["budget"]) for r in quality.read_cells(out)
            if r["dataset"] == args.dataset and r["seed"] == args.seed}
    stem = f"{args.dataset}_n{round(args.noise * 100)}_s{args.seed}"
    train = data.train
    for lever, column in CELLS:
        if not (Path(args.levers_work) / f"{stem}_{lever}.npz").is_file():
            print(f"{lever}: no scores yet, skipped", flush=True)
            continue
        with np.load(Path(args.levers_work) / f"{stem}_{lever}.npz") as lever_file:
            values = lever_file[column]
        arrays = {**base_arrays, column: values}
        method = Method.parse(f"{column}+drop")
        with tempfile.TemporaryDirectory(dir=args.bench_work, prefix="lever-") as tmp:
            files = quality.write_score_files(train, {k: torch.from_numpy(v) for k, v in arrays.items()},
                                              Path(tmp) / "scores", f"levers-{stem}-{lever}")
            for budget, fraction in quality.BUDGETS:
                if (lever, column, budget) in done:
                    continue
                start = time.perf_counter()
                uids = quality.select_uids(files, method.select_config(fraction, args.seed),
                                           Path(tmp) / f"selection_{budget}")
                record = quality.subset_record(data, uids)
                bench = reference.get((method.name, budget))
                if lever == "base":  # the bench's own selection: same kept set, reuse its retrain
                    if bench is None or bench["kept_digest"] != record["kept_digest"]:
                        raise SystemExit(f"base {column} {budget}: kept set differs from the benchmark's cell")
                    metrics = bench["metrics"]
                else:
                    model = train_final(train, cfg, exclude=set(train.uids) - set(uids))
                    metrics = quality.evaluate_model(model, data)
                metric = quality.METRICS[args.dataset][0]
                share = headroom(metrics[metric], reference[("random", budget)]["metrics"][metric],
                                 reference[("oracle", budget)]["metrics"][metric])
                line = {"dataset": args.dataset, "seed": args.seed, "noise": args.noise, "settings": fingerprint,
                        "lever": lever, "column": column, "budget": budget, "metrics": metrics,
                        "headroom_share": share, "below_zero": round(float(np.mean(values < 0)), 4),
                        "seconds": round(time.perf_counter() - start, 1), **record}
                quality.append_cell(out, line)
                print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
