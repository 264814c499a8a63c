"""A driver SIGKILLed mid-run, with its embedded Ray, then restarted (issue #5 item 1): the rerun
resumes from the finished shards (left untouched), reuses the trajectory and prepared vectors,
scores every shard exactly once and ends with the same scores and selection as an undisturbed
run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from pipeline.config import parse_config
from pipeline.runtime.executor import LocalExecutor, StageActor
from pipeline.stages.pipeline import run_pipeline
from tests.conftest import make_tiny_corpus
from tests.processes import alive as _alive, cmdline as _cmdline, descendants as _descendants, \
    processes_naming as _session_processes

pytestmark = pytest.mark.ray

REPO = Path(__file__).resolve().parents[2]
SHARDS = 12
KILL_AFTER = 3  # finished score files
SELECTION = ("kept.parquet", "kept_uids.npy", "manifest.parquet", "summary.json")


def restart_config(corpus: Path) -> dict:
    """One scoring actor over 12 shards, so that scoring takes a while; single-threaded torch
    everywhere, so the in-process reference computes bit for bit what Ray workers compute.
    No reshard section (tests/stages/test_determinism.py covers resharded bytes): it would
    only add Ray task start-up time here."""
    return {
        "data": {"shards": str(corpus / "{00000..00011}.tar"), "sizes": str(corpus / "sizes.json")},
        "trajectory": {"train": {"model": "tiny-clip-32", "steps": 6, "batch_size": 8, "warmup": 2,
                                 "checkpoints": 2, "seed": 0, "threads": 1}},
        "target": {"holdout_fraction": 0.15, "max_pairs": 64, "bank_size": 7, "seed": 0},
        "score": {"batch_size": 16, "proxy_batch_size": 8, "unrolled": {"lanczos_steps": 4}},
        "select": {"column": "diffin_unrolled", "rule": "top_fraction", "fraction": 0.5},
        "resources": {"actors": 1, "num_cpus": 0.5, "threads": 1},
    }


def _ray_session_of(driver_pid: int, since: float) -> str | None:
    """The name of the Ray session the driver started (Ray names it session_<time>_<driver pid>)."""
    found = [p for p in Path("/tmp/ray").glob(f"session_*_{driver_pid}") if p.stat().st_mtime >= since - 1]
    return max(found, key=lambda p: p.stat().st_mtime).name if found else None


def _start(config: Path, run_dir: Path, log: Path) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # an embedded Ray of its own
    env.update(HF_HUB_OFFLINE="1", RAY_AUTH_MODE="disabled", PYTHONUNBUFFERED="1")
    with open(log, "ab") as out:
        return subprocess.Popen([sys.executable, "-m", "jobs.prune", "--config", str(config), "--run-dir",
                                 str(run_dir), "--no-progress"], cwd=REPO, env=env, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)


def _end(proc: subprocess.Popen) -> None:
    """SIGKILL a driver this test started (and its process group) if it still runs."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)


def _scored(run_dir: Path) -> list[Path]:
    return sorted((run_dir / "scores").glob("*.parquet")) if (run_dir / "scores").is_dir() else []


def _identity(path: Path) -> tuple[int, int, bytes]:
    st = path.stat()
    return st.st_ino, st.st_mtime_ns, path.read_bytes()


def _wait_until(condition, timeout: float, what: str, proc: subprocess.Popen | None = None,
                log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"driver exited ({proc.returncode}) before {what}:\n{log.read_text()[-3000:]}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


# ----------------------------------------------------------------------------- the test


@pytest.fixture(scope="module")
def restart_setup(tmp_path_factory):
    """The corpus, its config file, and an undisturbed in-process run of the same config."""
    root = tmp_path_factory.mktemp("restart")
    corpus = make_tiny_corpus(root / "corpus", n=8 * SHARDS, shard_size=8)
    config = restart_config(corpus)
    path = root / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    reference = root / "undisturbed"
    run_pipeline(parse_config(config), reference, LocalExecutor(), progress=False)
    return path, reference


def test_killed_driver_resumes_from_finished_shards(restart_setup, tmp_path: Path) -> None:
    config, reference = restart_setup
    run_dir, log = tmp_path / "run", tmp_path / "driver.log"
    started = time.time()
    proc = _start(config, run_dir, log)
    session, doomed = None, set()
    try:
        _wait_until(lambda: len(_scored(run_dir)) >= KILL_AFTER, 300, f"{KILL_AFTER} score files", proc, log)
        session = _ray_session_of(proc.pid, started)
        assert session is not None, "no Ray session directory named after the driver"
        doomed = {proc.pid} | _descendants(proc.pid) | _session_processes(session)
        commands = " ".join(_cmdline(p) for p in doomed)
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and everything in its process group
        proc.wait(timeout=30)
        assert proc.returncode == -signal.SIGKILL
        # The embedded Ray dies with its driver: raylet, GCS, workers, dashboard.
        assert "raylet" in commands and "gcs_server" in commands and StageActor.__name__ in commands
        _wait_until(lambda: not any(_alive(p) for p in doomed) and not _session_processes(session), 60,
                    "the killed run's Ray processes to exit")
    finally:
        _end(proc)
        survivors = {p for p in doomed | (_session_processes(session) if session else set()) if _alive(p)}
        for pid in survivors:  # only processes this test started
            os.kill(pid, signal.SIGKILL)
    finished = {p.name: _identity(p) for p in _scored(run_dir)}
    assert KILL_AFTER <= len(finished) < SHARDS, "the driver was not killed mid-scoring"
    earlier = {p: _identity(run_dir / p) for p in ("trajectory/trajectory.json", "prepared/bank.pt",
                                                  "prepared/ckpt_000.pt", "prepared/ckpt_001.pt")}
    assert not (run_dir / "selection").exists()

    rerun = _start(config, run_dir, log)
    try:
        assert rerun.wait(timeout=400) == 0, log.read_text()[-3000:]
    finally:
        _end(rerun)

    # Finished work was kept, not redone: same inode, mtime and bytes.
    assert {n: _identity(run_dir / "scores" / n) for n in finished} == finished
    assert {p: _identity(run_dir / p) for p in earlier} == earlier
    summary = json.loads((run_dir / "run_summary.json").read_text())
    assert summary["shards_scored_now"] == SHARDS - len(finished)
    # Every shard exactly once, nothing else in scores/ (no temporaries).
    names = [f"{i:05d}.parquet" for i in range(SHARDS)]
    assert sorted(p.name for p in (run_dir / "scores").iterdir()) == names
    # The same scores and selection as the undisturbed run, byte for byte.
    for name in names:
        assert (run_dir / "scores" / name).read_bytes() == (reference / "scores" / name).read_bytes(), name
    for name in SELECTION:
        assert (run_dir / "selection" / name).read_bytes() == (reference / "selection" / name).read_bytes(), name
