"""Shared fixtures: every test builds its own tiny data."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import pipeline  # noqa: F401  (torchvision shim, env defaults)
from pipeline.data.shards import Pair, ShardWriter
from pipeline.data.uids import make_uid

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220), "yellow": (230, 220, 20)}


def make_tiny_corpus(out_dir: Path, n: int = 48, shard_size: int = 16, size: int = 32) -> Path:
    """Write ``n`` coloured-square pairs into shards under ``out_dir``; return the dir."""
    names = list(COLOURS)
    with ShardWriter(out_dir, max_count=shard_size) as writer:
        for i in range(n):
            colour = names[i % len(names)]
            arr = np.full((size, size, 3), 255, np.uint8)
            lo, hi = (i * 3) % (size // 2), (i * 3) % (size // 2) + size // 2
            arr[lo:hi, lo:hi] = COLOURS[colour]
            buf = io.BytesIO()
            Image.fromarray(arr).save(buf, format="JPEG", quality=90)
            writer.write_pair(Pair(f"pair{i:05d}", buf.getvalue(), f"a {colour} square",
                                   {"uid": make_uid("tiny", str(i))}))
    return out_dir


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """48 pairs in 3 shards of 16, with sizes.json (read-only: do not modify)."""
    return make_tiny_corpus(tmp_path_factory.mktemp("tiny_corpus"))


# The sections that make write_config's run go through every stage (trajectory to reshard), small.
EVERY_STAGE = {"target": {"holdout_fraction": 0.25, "max_pairs": 8, "bank_size": 3, "seed": 0},
               "score": {"batch_size": 8, "proxy_batch_size": 8, "unrolled": {"lanczos_steps": 3}},
               "select": {"column": "diffin_unrolled", "rule": "top_fraction", "fraction": 0.5},
               "reshard": {"shard_size": 8}}


def write_config(path: Path, corpus: Path, **train) -> Path:
    """A small valid run config over ``corpus`` (train settings overridable)."""
    import yaml

    settings = {"model": "tiny-clip-32", "steps": 6, "batch_size": 8, "warmup": 2,
                "checkpoints": 3, "seed": 0, **train}
    config = {"data": {"shards": str(corpus / "*.tar"), "sizes": str(corpus / "sizes.json")},
              "trajectory": {"train": settings}, "resources": {"num_cpus": 0.5}}
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="session")
def overfit_trajectory(tiny_corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A proxy trajectory over tiny_corpus whose target loss rises after its minimum (read-only).

    Trained to steps 2, 4 and 6; its manifest lists 4 checkpoints at steps 2, 4, 5, 6 holding
    the weights of steps 2, 4, 6 and again 2: L_V falls, then the last checkpoint's is back at
    the first's — what an overfitting proxy looks like to the checkpoint window.
    """
    from dataclasses import replace

    from pipeline.config import TrainConfig
    from pipeline.data.pairs import load_pairs
    from pipeline.data.shards import expand_shards
    from pipeline.model.schedule import LRSchedule
    from pipeline.model.train import train_proxy
    from pipeline.model.trajectory import CheckpointRef

    table = load_pairs(expand_shards(str(tiny_corpus / "*.tar")), 32)
    cfg = TrainConfig(model="tiny-clip-32", steps=6, batch_size=8, lr=3e-3, warmup=2, save_steps=[2, 4, 6], seed=0)
    out = tmp_path_factory.mktemp("overfit") / "trajectory"
    trained = train_proxy(table, cfg, out, log_every=0)
    schedule = LRSchedule(**trained.schedule)
    files = [c.path for c in trained.checkpoints]
    refs = [CheckpointRef(path, step, schedule.checkpoint_lr(step))
            for path, step in zip([files[0], files[1], files[2], files[0]], [2, 4, 5, 6])]
    replace(trained, checkpoints=refs).save(out)
    return out
