"""Add the cosine form of TracIn to a finished ``diffin bench lds`` run without rescoring the rest.

``diffin bench lds --cosine`` scores the cosine column in the same pass as every other column; a
run made without it would redo each seed's whole scoring (about 25 minutes a seed here) to add one
column. This script computes only that column — :func:`pipeline.bench.lds.cosine_column` on the
same persisted proxy (``data/lds_work``), with the same settings and checkpoints — and appends a
scores cell holding the seed's finished columns plus ``tracin_cosine``, under the ``--cosine``
run's column key. ``diffin bench lds --cosine --report-only`` then reports it (and a rerun with
``--cosine`` has nothing left to compute).

    PYTHONPATH=. nice python benchmarks/studies/lds_add_cosine.py --seed 0
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import numpy as np
import torch

from pipeline.bench import lds
from pipeline.bench.quality import append_cell, read_cells
from pipeline.model.scorer import TrajectoryInfluence


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, required=True)
    parser.add_argument("--data-dir", default="data")
    parser.add_argument("--out", default=lds.DEFAULT_OUT, help="the run's report (its cells file sits beside it)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    settings = lds.settings_for(cosine=True)
    print_, cells_file = lds.fingerprint(settings), lds.cells_path(args.out)
    scored = [c for c in read_cells(cells_file) if c.get("settings") == print_ and c["kind"] == "scores"
              and c["seed"] == args.seed]
    if not scored:
        raise SystemExit(f"seed {args.seed} has no scores cell in {cells_file}: run diffin bench lds first")
    base = scored[-1]
    if "tracin_cosine" in base["scores"]:
        print(f"seed {args.seed}: tracin_cosine already scored")
        return
    start = time.perf_counter()
    data = lds.load_data(settings, args.data_dir)
    if list(data.train.uids) != base["uids"]:
        raise SystemExit("the training pairs differ from the scored ones")
    trajectory = lds.proxy_trajectory(settings, data, args.seed, Path(args.data_dir) / "lds_work")
    _, influence = lds.seeded(settings, args.seed)
    scorer = TrajectoryInfluence(trajectory, dataclasses.replace(influence, components=("a",)))
    scorer.load_prepared(scorer.prepare(data.target, data.train))
    scores = scorer.score_table(data.train)
    tracin = scores["tracin"].double().numpy()
    if not np.allclose(tracin, base["scores"]["tracin"], rtol=1e-5, atol=1e-12):
        raise SystemExit("tracin recomputed differs from the scored column: not the same proxy or settings")
    cosine = lds.cosine_column(scorer, data, scores["a"])
    cell = {**base, "columns_key": lds.columns_key(settings),
            "scores": {**base["scores"], "tracin_cosine": [float(f"{x:.8g}") for x in cosine]},
            "seconds": {**base["seconds"], "cosine_added": round(time.perf_counter() - start, 1)}}
    append_cell(cells_file, cell)
    print(json.dumps({"seed": args.seed, "seconds": cell["seconds"]}), flush=True)


if __name__ == "__main__":
    main()
