"""The same config run twice into two run dirs (issue #5 item 5): every output is byte-identical —
trajectory, prepared vectors, score Parquet files, selection outputs and resharded tars — on a
real local Ray with two scoring actors, so which actor scores which shard differs between runs.

Only per-run telemetry may differ: ``run_summary.json`` and ``stats/<shard>.json`` carry
wall-clock timings, worker pids and memory, and paths inside the run dir. Those two are
compared after dropping exactly those fields and replacing the run dir by a placeholder.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest


pytestmark = pytest.mark.ray

TELEMETRY = {"run_summary.json"}
TELEMETRY_DIRS = {"stats"}
VOLATILE_KEYS = {"seconds", "stage_seconds", "pairs_per_s", "worker"}


@pytest.fixture(scope="module")
def two_runs(ray_runs):
    """The two runs of the same config on one Ray (``tests/stages/conftest.py``)."""
    return ray_runs[0], ray_runs[2]


def _files(run_dir: Path) -> list[str]:
    return sorted(str(p.relative_to(run_dir)) for p in run_dir.rglob("*") if p.is_file())


def _is_telemetry(name: str) -> bool:
    return name in TELEMETRY or name.split("/", 1)[0] in TELEMETRY_DIRS


def _normalised(path: Path, run_dir: Path) -> Any:
    def clean(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items() if k not in VOLATILE_KEYS}
        if isinstance(value, list):
            return [clean(v) for v in value]
        if isinstance(value, str):
            return value.replace(str(run_dir), "<run>")
        return value
    return clean(json.loads(path.read_text()))


def test_same_files_in_both_runs(two_runs) -> None:
    first, second = two_runs
    names = _files(first)
    assert names == _files(second)
    for part in ("scores/00000.parquet", "selection/kept.parquet", "selection/kept_uids.npy",
                 "selection/manifest.parquet", "selection/summary.json", "shards/sizes.json",
                 "trajectory/trajectory.json", "prepared/bank.pt"):
        assert part in names, part
    assert len([n for n in names if n.startswith("scores/")]) == 20
    assert any(n.startswith("shards/") and n.endswith(".tar") for n in names)


def test_outputs_are_byte_identical(two_runs) -> None:
    first, second = two_runs
    compared = [n for n in _files(first) if not _is_telemetry(n)]
    different = [n for n in compared if (first / n).read_bytes() != (second / n).read_bytes()]
    assert different == []
    assert any(n.startswith("scores/") for n in compared) and any(n.startswith("shards/") for n in compared)


def test_telemetry_differs_only_in_timings_pids_and_run_dir(two_runs) -> None:
    first, second = two_runs
    telemetry = [n for n in _files(first) if _is_telemetry(n)]
    assert "run_summary.json" in telemetry
    for name in telemetry:
        assert _normalised(first / name, first) == _normalised(second / name, second), name


def test_both_actors_scored(two_runs) -> None:
    """The runs really used two scoring actors (so scheduling could differ)."""
    for run_dir in two_runs:
        pids = {json.loads(p.read_text())["worker"]["pid"] for p in (run_dir / "stats").glob("*.json")}
        assert len(pids) == 2, run_dir
