"""Which CLIP counterfactual is above its order noise? A pilot for ``diffin bench lds``.

The LDS run's first 47 subsets (seed 0, two orders each) put a 10 % removal's effect on L_V below
the retraining noise: order-split Spearman 0.12, LDS ceiling 0.48. This pilot measures the same
noise statistics (``pipeline.bench.protocol``: order-split correlation, noise RMS, ceiling) for
counterfactuals that should be less chaotic, on the same data, proxy, subsets and target:

- ``scratch_batch``: retrain from step 0, the removed pairs taken out of the batches they fall in
  (the visiting stream and every other batch unchanged), where the benchmark's stream exclusion
  shifts every later batch;
- ``warm200_batch`` / ``warm300_batch``: continue the proxy from its checkpoint at step 200 / 300
  with the removed pairs taken out of the later batches — the counterfactual a trajectory
  estimator over those checkpoints models, over a horizon too short for the run to diverge.

Order o ≠ 0 renames every uid (the benchmark's ``reordered``): a different visiting stream after
the warm start (and from step 0 for ``scratch_batch``). Each retrain is one line in
``benchmarks/results/lds_pilot_cells.jsonl`` (resumable); ``--report`` prints the table.

    PYTHONPATH=. nice python benchmarks/studies/lds_noise_pilot.py --designs warm300_batch warm200_batch --subsets 20
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from pipeline.bench import lds
from pipeline.bench.protocol import half_subsets, reordered_uid
from pipeline.bench.quality import append_cell, read_cells
from pipeline.model.train import WarmStart, train_final, train_proxy
from pipeline.model.trajectory import Trajectory

DESIGNS = {"scratch_batch": None, "warm200_batch": 200, "warm300_batch": 300}  # design → warm-start step
CHECKPOINTS = 8  # the proxy saves every 50 steps (the same run as the benchmark's 4-checkpoint proxy)


def proxy(data: lds.LdsData, cfg, work: Path) -> Trajectory:
    """The seed's proxy with 8 checkpoints (trained once, reused)."""
    where = work / f"lds_pilot_s{cfg.seed}"
    if (where / "trajectory.json").is_file():
        return Trajectory.load(where)
    return train_proxy(data.train, cfg.model_copy(update={"checkpoints": CHECKPOINTS}), where, log_every=0)


def design_start(trajectory: Trajectory, design: str) -> WarmStart | None:
    """The checkpoint ``design`` continues from (None: step 0), loaded once per design."""
    step = DESIGNS[design]
    if step is None:
        return None
    return WarmStart.from_checkpoint(trajectory, [c.step for c in trajectory.checkpoints].index(step))


def retrain(data: lds.LdsData, cfg, warm: WarmStart | None, removed: list[str], order: int):
    """The final model without ``removed`` under visiting order ``order``, from ``warm``."""
    return train_final(lds.reordered(data.train, order), cfg, warm=warm,
                       drop_from_batches={reordered_uid(u, order) for u in removed})


def report(cells: list[dict], seed: int, orders: int) -> str:
    """Noise statistics per design (and the benchmark's own stream-exclusion cells for comparison)."""
    rows = ["| design | subsets | effect mean ± std | noise RMS (one order) | order-split ρ | LDS ceiling |",
            "|---|---:|---:|---:|---:|---:|"]
    for design in DESIGNS:
        mine = [c for c in cells if c["design"] == design and c["seed"] == seed]
        subsets, effects = lds.effects_table(mine, seed, orders, "target_loss")
        if len(subsets) < 3:
            continue
        truth = lds.truth_summary(effects, [0.0] * orders)
        rows.append(f"| {design} | {truth['subsets']} | {truth['effect_mean']:+.4f} ± {truth['effect_std']:.4f} | "
                    f"{truth['noise_rms_one_order']:.4f} | {truth['order_split']['spearman']:.3f} | "
                    f"{truth['lds_ceiling']:.3f} |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--designs", nargs="+", default=list(DESIGNS), choices=list(DESIGNS))
    parser.add_argument("--subsets", type=int, default=20)
    parser.add_argument("--orders", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data-dir", default="data")
    parser.add_argument("--work", default="data/levers_work")
    parser.add_argument("--out", default="benchmarks/results/lds_pilot_cells.jsonl")
    parser.add_argument("--report", action="store_true", help="print the table of the finished cells, run nothing")
    args = parser.parse_args()
    out = Path(args.out)
    if args.report:
        print(report(read_cells(out), args.seed, args.orders))
        return
    torch.set_num_threads(1)
    settings = lds.full_settings()
    data = lds.load_data(settings, args.data_dir)
    cfg, influence = lds.seeded(settings, args.seed)
    trajectory = proxy(data, cfg, Path(args.work))
    evaluator = lds.TargetEvaluator.of(data, influence, cfg.model)
    subsets = half_subsets(data.train.uids, settings.subsets, args.seed, settings.fraction)
    done = {(c["design"], c["subset"], c["order"]) for c in read_cells(out) if c["seed"] == args.seed}
    for design in args.designs:
        warm = design_start(trajectory, design)
        for subset in [lds.FULL, *range(args.subsets)]:
            for order in range(args.orders):
                if (design, subset, order) in done:
                    continue
                start = time.perf_counter()
                removed = [] if subset == lds.FULL else subsets[subset]
                model = retrain(data, cfg, warm, removed, order)
                cell = {"kind": "retrain", "design": design, "seed": args.seed, "subset": subset, "order": order,
                        "removed": len(removed), **evaluator(model), "seconds": round(time.perf_counter() - start, 1)}
                append_cell(out, cell)
                print(json.dumps(cell), flush=True)
    print(report(read_cells(out), args.seed, args.orders))


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
