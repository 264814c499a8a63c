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
from typing import Callable

import numpy as np
import torch
from scipy.stats import rankdata

from pipeline.bench import quality
from pipeline.bench.selections import Method
from pipeline.influence.scores import EMBEDDING_COLUMNS
from pipeline.model.train import train_final

# (lever, column) in the order worth retraining first: best screen AUC first, sub-variants last.
CELLS = (("base", "diffin_unrolled"), ("base", "tracin"), ("adam", "tracin_adam"), ("ckpt8", "diffin_unrolled"),
         ("zero_shot", "diffin_unrolled"), ("corpus_bank", "diffin_unrolled"), ("round2", "diffin_unrolled"),
         ("adam", "diffin_unrolled_adam"), ("ckpt8", "tracin"), ("zero_shot", "tracin"),
         ("corpus_bank", "tracin"), ("round2", "tracin"), ("adam_floor", "tracin_adam"),
         ("adam_floor", "diffin_unrolled_adam"), ("cosine", "tracin"), ("combo", "rank_avg"),
         ("ensemble", "diffin_unrolled"), ("ensemble", "neg_clip_loss"), ("ensemble", "recipe"))
# The benchmark's own methods shown beside the levers in the multi-seed table (its cells).
REFERENCE_METHODS = ("random", "oracle", "neg_clip_loss+share", "neg_clip_loss+drop", "clip_score+share",
                     "clip_score+drop", "tracin+drop", "diffin_unrolled+drop")


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
        if record["lever"] == "ensemble" and record["dataset"] == dataset and record.get("noise", 0.3) == 0.3:
            for column, values in record["columns"].items():  # over every seed's proxy: the same for each seed
                stats.setdefault(("ensemble", column), values)
            continue
        if record["dataset"] == dataset and record["seed"] == seed and record.get("noise", 0.3) == 0.3:
            lever = record["lever"]
            if lever == "cosine" and record.get("pairs") != 6000:
                continue  # the 1,500-pair screen: the retrain used every pair's cosine form
            if lever == "base" and "auc_rank_avg_ncl" in record["columns"]["diffin_unrolled"]:
                stats.setdefault(("combo", "rank_avg"),
                                 {"auc": record["columns"]["diffin_unrolled"]["auc_rank_avg_ncl"]})
            for column, values in record["columns"].items():
                if lever == "cosine" and column != "tracin_cosine":
                    continue  # its plain tracin, gradient norm and self-influence are screen-only readings
                name = "tracin" if lever == "cosine" else column
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
        signed = column not in EMBEDDING_COLUMNS  # a cheap column's sign means nothing
        below = f"{100 * s['below_zero']:.1f} %" if signed and s.get("below_zero") is not None else "—"
        among = (f"{100 * s['mismatched_among_below']:.1f} %"
                 if signed and s.get("mismatched_among_below") is not None else "—")
        rows.append(f"| {lever} | `{column}` | {auc} | {below} | {among} | {fifty['metrics']['acc']:.3f} / "
                    f"{thirty['metrics']['acc']:.3f} | {fifty['headroom_share']:.2f} / {thirty['headroom_share']:.2f} | "
                    f"{100 * fifty['kept_noisy_fraction']:.1f} % / {100 * thirty['kept_noisy_fraction']:.1f} % |")
    return "\n".join(rows)


ENSEMBLE_SEEDS = (0, 1, 2)  # the proxies an ``ensemble`` cell averages (the benchmark's seeds: same training pairs)


def lever_values(lever: str, column: str, stem: str, levers_work: Path, base_arrays: dict,
                 bench_cache: Callable[[int], dict] | None = None) -> np.ndarray | dict | None:
    """The column a cell retrains on: the lever's saved scores, the benchmark's own for ``base``
    (its score cache), the rank average for the combination, the mean over the benchmark's
    proxies of every seed for ``ensemble`` (column ``recipe``: both columns the default recipe
    reads, by slot); None when not scored yet."""
    if lever == "combo":
        return combination_values(base_arrays)
    if lever == "ensemble":
        if bench_cache is None:
            return None
        if column == "recipe":  # the default recipe's two columns, both from the ensemble
            return {c: np.mean([bench_cache(seed)[c] for seed in ENSEMBLE_SEEDS], axis=0)
                    for c in ("diffin_unrolled", "neg_clip_loss")}
        return np.mean([bench_cache(seed)[column] for seed in ENSEMBLE_SEEDS], axis=0)
    path = levers_work / f"{stem}_{lever}.npz"
    if path.is_file():
        with np.load(path) as lever_file:
            return lever_file[column]
    return base_arrays[column] if lever == "base" else None


def combination_values(arrays: dict) -> np.ndarray:
    """``rank_avg``: the mean of the pairs' ranks by ``diffin_unrolled`` and by ``neg_clip_loss``
    (ties averaged), scaled to [0, 1] — the influence ranking combined with the best cheap detector."""
    both = rankdata(arrays["diffin_unrolled"]) + rankdata(arrays["neg_clip_loss"])
    return (both - both.min()) / max(both.max() - both.min(), 1.0)


def cell_method(lever: str, column: str) -> tuple[Method, str]:
    """The benchmark method a cell runs and the score-file slot its column goes into.

    A lever's column runs as ``COLUMN+drop``; the combination runs as the default recipe
    (``neg_clip_loss+share``: Diff-In's below-zero count, the lowest dropped, the budget filled
    per cluster) with the rank average in ``neg_clip_loss``'s place, so the comparison with the
    default changes the chooser only."""
    if lever == "combo" or (lever, column) == ("ensemble", "recipe"):
        return Method.parse("neg_clip_loss+share"), "neg_clip_loss"
    return Method.parse(f"{column}+drop"), column


def seeds_table(retrains: list[dict], bench: list[dict], dataset: str, seeds: list[int]) -> str:
    """Mean ± std over ``seeds`` of each cell finished at every seed, the benchmark's reference
    methods above them, headroom = (mean − random mean) / (oracle mean − random mean), and each
    cell's paired gap to the default recipe (``neg_clip_loss+share``, mean ± std of the per-seed
    differences)."""
    metric = quality.METRICS[dataset][0]
    values: dict[tuple[str, str], dict[int, float]] = {}
    for c in bench:
        if c["kind"] == "retrain" and c["dataset"] == dataset and c["seed"] in seeds and c["method"] in REFERENCE_METHODS \
                and c.get("noise", 0.3) == 0.3:
            values.setdefault((c["method"], c["budget"]), {})[c["seed"]] = c["metrics"][metric]
    for r in retrains:
        if r["dataset"] == dataset and r["seed"] in seeds:
            values.setdefault((f"{r['lever']}: `{r['column']}`", r["budget"]), {})[r["seed"]] = r["metrics"][metric]
    names = [m for m in REFERENCE_METHODS] + [f"{lever}: `{column}`" for lever, column in CELLS]
    budgets = [b for b, _ in quality.BUDGETS]
    complete = [n for n in names if all(len(values.get((n, b), {})) == len(seeds) for b in budgets)]
    mean = {(n, b): float(np.mean(list(values[(n, b)].values()))) for n in complete for b in budgets}
    rows = [f"| method ({len(seeds)} seeds: {', '.join(map(str, seeds))}) | {metric} keep 50 | {metric} keep 30 | "
            "headroom 50 / 30 | vs the default 50 / 30 |", "|---|---|---|---|---|"]
    default = "neg_clip_loss+share"
    for n in complete:
        cells, shares, gaps = [], [], []
        for b in budgets:
            v = np.array([values[(n, b)][s] for s in seeds])
            cells.append(f"{v.mean():.3f} ± {v.std(ddof=1):.3f}")
            if ("random", b) in mean and ("oracle", b) in mean:
                shares.append(f"{headroom(mean[(n, b)], mean[('random', b)], mean[('oracle', b)]):.2f}")
            if default in complete and n != default:
                d = v - np.array([values[(default, b)][s] for s in seeds])
                gaps.append(f"{d.mean():+.3f} ± {d.std(ddof=1):.3f}")
        label = n if ":" in n else f"`{n}`"
        rows.append(f"| {label} | {' | '.join(cells)} | {' / '.join(shares) or '—'} | {' / '.join(gaps) or '—'} |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", default="fashion_mnist")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--noise", type=float, default=0.3)
    parser.add_argument("--cells", nargs="+", default=None, metavar="LEVER:COLUMN",
                        help="only these cells (default: every cell of CELLS)")
    parser.add_argument("--data-dir", default="data")
    parser.add_argument("--levers-work", default="data/levers_work")
    parser.add_argument("--bench-work", default="data/quality_work")
    parser.add_argument("--bench-cells", default="benchmarks/results/quality_cells.jsonl")
    parser.add_argument("--out", default="benchmarks/results/lever_retrains.jsonl")
    parser.add_argument("--table", action="store_true", help="print the markdown table of the finished cells, run nothing")
    parser.add_argument("--seeds-table", nargs="+", type=int, default=None, metavar="SEED",
                        help="print the mean ± std table over these seeds (cells finished at every one), run nothing")
    parser.add_argument("--screen", default="benchmarks/results/harm_levers.jsonl", help="the lever screen's results")
    args = parser.parse_args()
    if args.table:
        print(markdown_table(quality.read_cells(Path(args.out)), quality.read_cells(Path(args.screen)),
                             args.dataset, args.seed))
        return
    if args.seeds_table:
        print(seeds_table(quality.read_cells(Path(args.out)), quality.read_cells(Path(args.bench_cells)),
                          args.dataset, args.seeds_table))
        return
    torch.set_num_threads(1)

    spec = quality.full_settings().dataset(args.dataset)
    data = quality.load_fashion_mnist(spec, args.data_dir, args.noise, args.dataset)
    fingerprint = quality.settings_fingerprint(spec, args.noise)
    reference = bench_cells(quality.read_cells(Path(args.bench_cells)), fingerprint, args.dataset, args.seed)
    def bench_cache(seed: int) -> dict:
        with np.load(Path(args.bench_work) / f"{args.dataset}_s{seed}_{fingerprint}.npz") as cache:
            return {k: cache[k] for k in cache.files}

    base_arrays = bench_cache(args.seed)
    cfg = spec.train.model_copy(update={"seed": args.seed, "threads": 1})
    out = Path(args.out)
    done = {(r["lever"], r["column"], r["budget"]) for r in quality.read_cells(out)
            if r["dataset"] == args.dataset and r["seed"] == args.seed}
    stem = f"{args.dataset}_n{round(args.noise * 100)}_s{args.seed}"
    train = data.train
    wanted = [tuple(c.split(":", 1)) for c in args.cells] if args.cells else list(CELLS)
    for lever, column in wanted:
        values = lever_values(lever, column, stem, Path(args.levers_work), base_arrays, bench_cache)
        if values is None:
            print(f"{lever}: no scores yet, skipped", flush=True)
            continue
        method, slot = cell_method(lever, column)
        arrays = {**base_arrays, **(values if isinstance(values, dict) else {slot: values})}
        values = arrays[slot]
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
                bench = reference.get((method.name, budget)) if lever == "base" else None
                if bench is not None:  # the bench's own selection: same kept set, reuse its retrain
                    if bench["kept_digest"] != record["kept_digest"]:
                        raise SystemExit(f"base {column} {budget}: kept set differs from the benchmark's cell")
                    metrics = bench["metrics"]
                else:
                    model = train_final(train, cfg, exclude=set(train.uids) - set(uids))
                    metrics = quality.evaluate_model(model, data)
                metric = quality.METRICS[args.dataset][0]
                share = headroom(metrics[metric], reference[("random", budget)]["metrics"][metric],
                                 reference[("oracle", budget)]["metrics"][metric])
                line = {"dataset": args.dataset, "seed": args.seed, "noise": args.noise, "settings": fingerprint,
                        "lever": lever, "column": column, "method": method.name, "budget": budget,
                        "metrics": metrics, "headroom_share": share,
                        "below_zero": round(float(np.mean((arrays["diffin_unrolled"] if method.rule == "share"
                                                           else values) < 0)), 4),
                        "seconds": round(time.perf_counter() - start, 1), **record}
                quality.append_cell(out, line)
                print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
