"""``target.zero_shot``: labels from the target shards' json, the config's checks, a scored run."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline.config import ZeroShotConfig, parse_config
from pipeline.data.shards import Pair, ShardWriter
from pipeline.data.uids import make_uid
from pipeline.errors import UsageError
from pipeline.runtime.executor import LocalExecutor
from pipeline.stages.pipeline import run_pipeline
from pipeline.stages.prepare import load_target, prepare_fingerprint, target_labels
from pipeline.stages.trajectory import existing_trajectory
from pipeline.stages.context import RunContext
from tests.conftest import COLOURS, make_tiny_corpus
from tests.stages.test_pipeline import pipeline_config

CLASSES = list(COLOURS)


def labelled_target(out: Path, labels: list) -> Path:
    """One shard of coloured squares whose json ``label`` is given (a name, an index, anything)."""
    with ShardWriter(out, max_count=64) as writer:
        for i, label in enumerate(labels):
            colour = CLASSES[i % len(CLASSES)]
            buf = io.BytesIO()
            Image.fromarray(np.full((32, 32, 3), COLOURS[colour], np.uint8)).save(buf, format="PNG")
            writer.write_pair(Pair(f"t{i:04d}", buf.getvalue(), f"a {colour} square",
                                   {"uid": make_uid("target", str(i)), "label": label}, image_ext="png"))
    return out


def zero_shot_config(corpus: Path, target: Path, **zero_shot) -> dict:
    cfg = pipeline_config(corpus, method="tracin")  # u_t is what the target changes; no Lanczos: fast
    cfg["target"] = {"shards": str(target / "*.tar"), "bank_size": 5, "seed": 0,
                     "zero_shot": {"classes": CLASSES, "templates": ["a {} square", "a photo of {}"], **zero_shot}}
    return cfg


def test_labels_by_name_or_index_and_one_line_errors() -> None:
    zs = ZeroShotConfig(classes=CLASSES)
    assert target_labels(["a", "b", "c"], {"a": "blue", "b": 0, "c": 3}, zs) == [2, 0, 3]
    with pytest.raises(UsageError, match="target pair b has no json field 'label'"):
        target_labels(["a", "b"], {"a": 1}, zs)
    for bad in ("purple", 4, -1, True, 1.0):
        with pytest.raises(UsageError, match="neither a class index"):
            target_labels(["a"], {"a": bad}, zs)


@pytest.mark.parametrize("section, message", [
    ({"classes": ["red"]}, "at least 2"),
    ({"classes": ["red", "red"]}, "each class name once"),
    ({"classes": ["red", "blue"], "templates": ["a photo"]}, "has no '{}'"),
    ({"classes": ["red", "blue"], "label": "x"}, "Extra inputs"),
])
def test_bad_zero_shot_sections_are_refused(section: dict, message: str) -> None:
    with pytest.raises(Exception, match=message):
        ZeroShotConfig(**section)


def test_a_zero_shot_run_loads_labels_and_scores(tmp_path: Path) -> None:
    corpus = make_tiny_corpus(tmp_path / "corpus", n=48, shard_size=16)
    target = labelled_target(tmp_path / "target", [c if i % 2 else CLASSES.index(c) for i, c in
                                                   enumerate(CLASSES[i % 4] for i in range(24))])
    config = parse_config(zero_shot_config(corpus, target))
    table = load_target(config, 32, [], None)
    assert table.labels == [i % 4 for i in range(24)]  # names and indices alike
    summary = run_pipeline(config, tmp_path / "run", LocalExecutor(), progress=False,
                           stages=("trajectory", "prepare", "score"))
    losses = [c["target_loss"] for c in summary["checkpoints"]]
    assert all(np.isfinite(losses)) and all(0 < x < 10 for x in losses)
    scores = pq.read_table(sorted((tmp_path / "run" / "scores").glob("*.parquet"))[0])
    assert np.isfinite(np.array(scores.column("tracin").to_pylist())).all()
    # the fingerprint tells the zero-shot run from the plain one, and the plain one is as before
    plain = parse_config({**zero_shot_config(corpus, target), "target": {"shards": str(target / "*.tar"),
                                                                         "bank_size": 5, "seed": 0}})
    trajectory = existing_trajectory(RunContext.resolve(config, tmp_path / "run"))
    assert prepare_fingerprint(config, trajectory) != prepare_fingerprint(plain, trajectory)
    assert "zero_shot" not in plain.target.fingerprint_record()
    assert json.loads((tmp_path / "run" / "config.json").read_text())["target"]["zero_shot"]["classes"] == CLASSES


def test_an_unknown_label_stops_prepare_in_one_line(tmp_path: Path) -> None:
    corpus = make_tiny_corpus(tmp_path / "corpus", n=32, shard_size=16)
    target = labelled_target(tmp_path / "target", ["red", "green", "mauve", "blue"] * 3)
    config = parse_config(zero_shot_config(corpus, target))
    with pytest.raises(UsageError, match="'mauve' of target pair"):
        load_target(config, 32, [], None)
