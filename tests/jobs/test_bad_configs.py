"""Malformed run configs through the CLI (issue #5 item 4): exit code 2, ONE stderr line that
names the offending key and the problem, and nothing written (no run dir, no other file)."""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

import pytest
import yaml

from jobs import prune
from pipeline.config import parse_config

DELETE = object()


def base_config(corpus: Path) -> dict:
    """A valid config using every section, so that cross-section checks apply."""
    return {
        "data": {"shards": str(corpus / "{00000..00002}.tar"), "sizes": str(corpus / "sizes.json")},
        "trajectory": {"train": {"model": "tiny-clip-32", "steps": 6, "batch_size": 8, "warmup": 2,
                                 "checkpoints": 2}},
        "target": {"holdout_fraction": 0.25, "max_pairs": 16, "bank_size": 3},
        "score": {"batch_size": 8, "proxy_batch_size": 8, "keep_json_fields": []},
        "select": {"column": "diffin_unrolled", "rule": "top_fraction", "fraction": 0.5},
        "reshard": {"shard_size": 16},
        "resources": {"actors": 1, "num_cpus": 0.5, "num_gpus": 0},
    }


def change(**dotted: Any) -> Callable[[dict], dict]:
    """A mutation setting (or, with DELETE, removing) dotted keys; ``__`` stands for ``.``."""
    def apply(cfg: dict) -> dict:
        cfg = copy.deepcopy(cfg)
        for key, value in dotted.items():
            *parents, leaf = key.split("__")
            node = cfg
            for p in parents:
                node = node[p]
            if value is DELETE:
                del node[leaf]
            else:
                node[leaf] = value
        return cfg
    return apply


# (id, mutation of the base config or raw YAML text, key the line must name (None: whole file), problem)
CASES: list[tuple[str, Any, str | None, str]] = [
    # unknown keys
    ("unknown-top-level-key", change(extra=1), "extra", "unknown key"),
    ("unknown-section-key", change(score__batchsize=8), "score.batchsize", "unknown key"),
    ("unknown-nested-key", change(trajectory__train__stepz=5), "trajectory.train.stepz", "unknown key"),
    # wrong types
    ("batch-size-not-int", change(score__batch_size="big"), "score.batch_size", "valid integer"),
    ("num-cpus-not-number", change(resources__num_cpus="two"), "resources.num_cpus", "valid number"),
    ("json-fields-not-list", change(score__keep_json_fields="lang"), "score.keep_json_fields", "valid list"),
    ("adam-not-bool", change(score__adam="maybe"), "score.adam", "valid boolean"),
    ("section-not-mapping", change(score=5), "score", "valid dictionary"),
    # out of range
    ("negative-batch-size", change(score__batch_size=-1), "score.batch_size", "greater than 0"),
    ("fraction-above-1", change(select__fraction=1.5), "select.fraction", "less than or equal to 1"),
    ("eps-zero", change(score__eps=0), "score.eps", "greater than 0"),
    ("eps-infinite", change(score__eps=float("inf")), "score.eps", "finite number"),
    ("zero-actors", change(resources__actors=0), "resources.actors", "greater than 0"),
    ("negative-gpus", change(resources__num_gpus=-0.5), "resources.num_gpus", "greater than or equal to 0"),
    ("holdout-fraction-1", change(target__holdout_fraction=1.0), "target.holdout_fraction", "less than 1"),
    ("zero-bank", change(target__bank_size=0), "target.bank_size", "greater than 0"),
    ("zero-train-steps", change(trajectory__train__steps=0), "trajectory.train.steps", "greater than 0"),
    ("empty-checkpoint-list", change(score__checkpoints=[]), "score.checkpoints", "non-empty list"),
    # missing paths
    ("missing-shards", change(data__shards="/nonexistent/{00000..00001}.tar"), "data.shards", "shard not found"),
    ("missing-sizes", change(data__sizes="/nonexistent/sizes.json"), "data.sizes", "file not found"),
    ("missing-trajectory-path", change(trajectory={"path": "/nonexistent/traj"}), "trajectory.path",
     "trajectory manifest not found"),
    ("missing-target-shards", change(target={"shards": "/nonexistent/t.tar"}), "target.shards", "shard not found"),
    ("missing-target-sizes", change(target__sizes="/nonexistent/t.json"), "target.sizes", "file not found"),
    ("empty-shard-list", change(data__shards=[]), "data.shards", "shard list"),
    ("missing-data-section", change(data=DELETE), "data", "required key is missing"),
    # unknown names
    ("unknown-model", change(trajectory__train__model="ViT-Nope"), "trajectory.train.model", "unknown model"),
    ("unknown-score-column", change(select__column="foo"), "select.column", "Input should be"),
    ("unknown-rule", change(select__rule="best"), "select.rule", "Input should be"),
    # inconsistent settings
    ("cuda-without-gpus", change(score__device="cuda"), "score.device", "resources.num_gpus > 0"),
    ("fractional-gpus-above-1", change(resources__num_gpus=1.5), "resources.num_gpus", "whole number"),
    ("top-k-without-k", change(select={"column": "tracin", "rule": "top_k"}), "select", "needs 'k'"),
    ("column-not-computed", change(score__method="tracin", select__column="diffin"), "select.column",
     "not computed"),
    ("stratum-not-kept", change(select__stratify_by="lang"), "select.stratify_by", "keep_json_fields"),
    # not a config at all
    ("invalid-yaml", "data: [unclosed\n", None, "not valid YAML"),
    ("not-a-mapping", "- just\n- a list\n", None, "top level must be a mapping"),
]


def test_base_config_is_valid(tiny_corpus: Path) -> None:
    """Every case below differs from a config that passes, so each error is the case's own."""
    parse_config(base_config(tiny_corpus))


def _write(tmp_path: Path, corpus: Path, case: Any) -> Path:
    path = tmp_path / "bad.yaml"
    path.write_text(case if isinstance(case, str) else yaml.safe_dump(case(base_config(corpus))))
    return path


def _listing(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


@pytest.mark.parametrize("case,key,problem", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_malformed_config_one_line_exit_2_nothing_written(tiny_corpus: Path, tmp_path: Path, capsys,
                                                          monkeypatch, case: Any, key: str | None,
                                                          problem: str) -> None:
    config = _write(tmp_path, tiny_corpus, case)
    monkeypatch.chdir(tmp_path)  # the default run dir (runs/<name>) would land here too
    before = _listing(tmp_path)
    run_dir = tmp_path / "run"
    assert prune.main(["--config", str(config), "--run-dir", str(run_dir)]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    line = lines[0]
    assert line.startswith(f"diffin: error: {config}: "), line
    if key is not None:  # the key path comes right after the file name
        assert line.startswith(f"diffin: error: {config}: {key}: "), line
    assert problem in line, line
    assert not run_dir.exists()
    assert _listing(tmp_path) == before  # nothing written anywhere


def test_missing_config_file(tmp_path: Path, capsys) -> None:
    assert prune.main(["--config", str(tmp_path / "nope.yaml"), "--run-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"diffin: error: config file not found: {tmp_path / 'nope.yaml'}"
    assert list(tmp_path.iterdir()) == []


def test_console_script_prints_exactly_one_line(tiny_corpus: Path, tmp_path: Path) -> None:
    """Out of process, nothing else (logging, warnings) reaches stderr or stdout."""
    config = _write(tmp_path, tiny_corpus, change(score__device="cuda"))
    exe = Path(sys.executable).with_name("diffin")
    result = subprocess.run([str(exe), "run", "--config", str(config), "--run-dir", str(tmp_path / "run")],
                            capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.count("\n") == 1 and result.stderr.startswith(f"diffin: error: {config}: score.device: ")
    assert not (tmp_path / "run").exists() and not (tmp_path / "runs").exists()
