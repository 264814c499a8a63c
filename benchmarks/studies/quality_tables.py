"""Markdown tables for docs/QUALITY.md from the quality benchmark's results file.

Per dataset and budget, one row per method: each metric (mean ± std over the seeds that
finished, with how many; Openclipart: R@1 and R@5), the headroom share, the mismatched share kept, the smallest true-class
count kept (Fashion-MNIST corpora), the column's noise AUC.

    python benchmarks/studies/quality_tables.py benchmarks/results/quality_cells.jsonl
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict

import numpy as np

from pipeline.bench.quality import (BUDGETS, METRICS, _add_headroom, _summarise, full_settings, read_cells,
                                    settings_fingerprint, target_loss_check)
from pipeline.bench.selections import Method


def tables(path: str, noise: float = 0.3) -> str:
    """The tables of the cells with the current full settings' fingerprint (``noise``: the
    Fashion-MNIST corpora's), without the seeds the benchmark withholds."""
    cells = read_cells(__import__("pathlib").Path(path))
    settings = full_settings()
    out: list[str] = []
    for name in METRICS:
        current = settings_fingerprint(settings.dataset(name), noise)
        mine = [c for c in cells if c["dataset"] == name and c["settings"] == current]
        withheld = {c["seed"] for c in mine if c["kind"] == "scores" and target_loss_check(c) is not None}
        mine = [c for c in mine if c["seed"] not in withheld]
        if not mine:
            continue
        metric, metrics = METRICS[name][0], METRICS[name]
        scored = [c for c in mine if c["kind"] == "scores"]
        auc: dict[str, float] = {}
        if scored and all("noise_auc" in c for c in scored):
            auc = {m: float(np.mean([c["noise_auc"][m] for c in scored])) for m in scored[0]["noise_auc"]}
        by: dict[tuple[str, str], list[dict]] = defaultdict(list)
        for c in mine:
            if c["kind"] == "retrain":
                by[(c["budget"], c["method"])].append(c)
        seeds = sorted({c["seed"] for c in scored})
        out.append(f"**{name}** (seeds {', '.join(map(str, seeds))})\n")
        head = "| method | " + " | ".join(f"{m} {b}" for m in metrics for b, _ in BUDGETS) + " | headroom 50 / 30 | "
        head += "mismatched kept 50 / 30 | smallest class kept 50 / 30 | noise AUC |" if auc else "distinct captions 50 / 30 |"
        out += [head, "|---" * (head.count("|") - 1) + "|"]
        rows = {b: {} for b, _ in BUDGETS}
        for (budget, method), group in by.items():
            rows[budget][method] = _summarise([c["metrics"] for c in group], metrics)
            rows[budget][method]["cells"] = group
        for budget in rows:
            _add_headroom(rows[budget], metric)
        methods = sorted({m for b in rows for m in rows[b]},
                         key=lambda m: -rows["keep_50"].get(m, {}).get(f"{metric}_mean", -1))
        for method in methods:
            cells_b = [rows[b].get(method) for b, _ in BUDGETS]
            vals = [_fmt(e, m) for m in metrics for e in cells_b]
            head_share = " / ".join(f"{e['headroom']:.2f}" if e and "headroom" in e else "—" for e in cells_b)
            line = f"| {method} | " + " | ".join(vals) + f" | {head_share} | "
            if auc:
                noisy = " / ".join(f"{100 * np.mean([c['kept_noisy_fraction'] for c in e['cells']]):.1f} %"
                                   if e else "—" for e in cells_b)
                smallest = " / ".join(f"{min(e['cells'][0]['class_counts'])}" if e and "class_counts" in e["cells"][0]
                                      else "—" for e in cells_b)
                column = Method.parse(method).column or method
                line += f"{noisy} | {smallest} | " + (f"{auc[column]:.3f}" if column in auc else "—") + " |"
            else:
                line += " / ".join(str(e["cells"][0]["distinct_captions"]) if e else "—" for e in cells_b) + " |"
            out.append(line)
        if scored:
            full = _summarise([c["full"] for c in scored], metrics)
            shown = " | ".join(f"{_fmt(full, m)} | (same)" for m in metrics)
            out.append(f"| full (100 %) | {shown} | | |" + (" | |" if auc else ""))
        out.append("")
    return "\n".join(out)


def _fmt(entry: dict | None, metric: str) -> str:
    if not entry:
        return "—"
    mean, std, n = entry[f"{metric}_mean"], entry[f"{metric}_std"], entry["seeds"]
    return f"{mean:.3f}" if std is None else f"{mean:.3f} ± {std:.3f} ({n})"


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("cells", nargs="?", default="benchmarks/results/quality_cells.jsonl")
    parser.add_argument("--noise", type=float, default=0.3)
    args = parser.parse_args()
    print(tables(args.cells, args.noise))
