"""Run-config validation: every problem is one line naming the key; nothing is written."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from pipeline.config import load_config, parse_config
from pipeline.errors import UsageError


@pytest.fixture()
def base(tiny_corpus: Path) -> dict:
    return {"data": {"shards": str(tiny_corpus / "{00000..00002}.tar"), "sizes": str(tiny_corpus / "sizes.json")},
            "trajectory": {"train": {"model": "tiny-clip-32", "steps": 10, "warmup": 2}},
            "resources": {"num_cpus": 0.5}}


def test_valid_config_parses(base: dict) -> None:
    config = parse_config(base)
    assert config.trajectory.train.steps == 10
    assert config.trajectory.train.checkpoint_steps() == [2, 5, 8, 10]
    assert config.resources.num_gpus == 0


def _set(cfg: dict, dotted: str, value) -> dict:
    cfg = copy.deepcopy(cfg)
    *parents, leaf = dotted.split(".")
    node = cfg
    for p in parents:
        node = node.setdefault(p, {})
    if value is _DELETE:
        node.pop(leaf)
    else:
        node[leaf] = value
    return cfg


_DELETE = object()

BAD = [
    ("extra", "bogus", "unknown key"),
    ("data.extra", 1, "data.extra: unknown key"),
    ("trajectory.train.stepz", 10, "trajectory.train.stepz: unknown key"),
    ("trajectory.train.steps", "many", "trajectory.train.steps"),
    ("trajectory.train.steps", 0, "trajectory.train.steps"),
    ("trajectory.train.lr", -1.0, "trajectory.train.lr"),
    ("trajectory.train.batch_size", 2.5, "trajectory.train.batch_size"),
    ("trajectory.train.schedule", "linear", "trajectory.train.schedule"),
    ("trajectory.train.warmup", 50, "warmup (50) must be smaller than steps"),
    ("trajectory.train.exclude_uids", "/nonexistent/uids.txt", "trajectory.train.exclude_uids: file not found"),
    ("trajectory.path", "/nonexistent/traj", "exactly one of"),
    ("data.shards", "/nonexistent/{00000..00001}.tar", "data.shards: shard not found"),
    ("data.shards", "/nonexistent/*.tar", "data.shards: shard list"),
    ("data.shards", [], "data.shards: shard list"),
    ("data.shards", 5, "data.shards"),
    ("data.sizes", "/nonexistent/sizes.json", "data.sizes: file not found"),
    ("data", _DELETE, "data: required key is missing"),
    ("resources.num_cpus", 0, "resources.num_cpus"),
    ("resources.num_gpus", -1, "resources.num_gpus"),
]


@pytest.mark.parametrize("key,value,expected", BAD, ids=[f"{k}={v!r}"[:40] for k, v, _ in BAD])
def test_bad_config_is_one_clear_line(base: dict, key: str, value, expected: str) -> None:
    with pytest.raises(UsageError) as info:
        parse_config(_set(base, key, value))
    message = str(info.value)
    assert expected in message
    assert "\n" not in message


def test_checkpoint_window_setting(base: dict) -> None:
    """``score.checkpoint_window``: all by default; falling chooses among ``score.checkpoints``
    (at least 2, in step order); errors name both keys."""
    assert parse_config(base).score.checkpoint_window == "all"
    falling = _set(base, "score.checkpoint_window", "falling")
    assert parse_config(falling).score.checkpoint_window == "falling"
    assert parse_config(_set(falling, "score.checkpoints", [0, 2, 3])).score.checkpoints == [0, 2, 3]
    for checkpoints, expected in [([2], "needs at least 2 of them"), ([3, 1], "list them increasing")]:
        with pytest.raises(UsageError) as info:
            parse_config(_set(falling, "score.checkpoints", checkpoints))
        message = str(info.value)
        assert "checkpoint_window 'falling'" in message and "score.checkpoints" in message
        assert expected in message and "\n" not in message
    parse_config(_set(base, "score.checkpoints", [3, 1]))  # any order without the window, as before
    with pytest.raises(UsageError, match="score.checkpoint_window"):
        parse_config(_set(base, "score.checkpoint_window", "rising"))


def test_missing_trajectory_path_named(base: dict) -> None:
    cfg = _set(base, "trajectory", {"path": "/nonexistent/traj"})
    with pytest.raises(UsageError, match="trajectory.path: trajectory manifest not found"):
        parse_config(cfg)


def test_yaml_problems(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: [unclosed\n")
    with pytest.raises(UsageError, match="not valid YAML"):
        load_config(bad)
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("just a string\n")
    with pytest.raises(UsageError, match="top level must be a mapping"):
        load_config(scalar)


def test_load_config_roundtrip(tmp_path: Path, base: dict) -> None:
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(base))
    assert load_config(path) == parse_config(base)


def test_uid_rule_setting_and_the_legacy_require_uid(base: dict) -> None:
    assert parse_config(base).data.uid_from == ("json", "url")  # default: DataComp uid, else img2dataset url
    assert parse_config(_set(base, "data.uid_from", ["image"])).data.uid_from == ("image",)
    assert parse_config(_set(base, "data.require_uid", True)).data.uid_from == ("json",)
    assert parse_config(_set(base, "data.require_uid", False)).data.uid_from == ("json", "url", "image")
    both = _set(_set(base, "data.require_uid", True), "data.uid_from", ["json"])
    for bad, error in [(_set(base, "data.uid_from", ["sha"]), "data.uid_from: unknown uid source 'sha'"),
                       (_set(base, "data.uid_from", []), "data.uid_from: name at least one"),
                       (both, "require_uid is replaced by uid_from")]:
        with pytest.raises(UsageError, match=error) as info:
            parse_config(bad)
        assert "\n" not in str(info.value)
