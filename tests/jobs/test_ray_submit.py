"""`ray start --head` on loopback, `ray job submit` of jobs.prune, outputs checked; the cluster
this test started (its own --temp-dir) is stopped, and nothing else."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

import pyarrow.parquet as pq
import yaml

from tests.conftest import make_tiny_corpus
from tests.processes import processes_using, stop_processes_naming
from tests.stages.test_pipeline import pipeline_config

pytestmark = pytest.mark.ray

REPO = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ray(*args: str, env: dict, timeout: float = 120) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).with_name("ray")
    return subprocess.run([str(exe), *args], env=env, capture_output=True, text=True, timeout=timeout)


AGENT_NOT_READY = "No available agent to submit job"  # Ray's answer while its job agent starts


def _submit(address: str, job_id: str, env: dict, *args: str, wait: float = 180) -> subprocess.CompletedProcess:
    """``ray job submit``, asked again while the head's job agent is still starting (on a loaded
    machine it may start after ``ray start`` returned; Ray then says to try again later)."""
    deadline = time.time() + wait
    while True:
        submitted = _ray("job", "submit", "--address", address, "--submission-id", job_id, *args, env=env)
        if submitted.returncode == 0 or AGENT_NOT_READY not in submitted.stderr or time.time() > deadline:
            return submitted
        time.sleep(2)


def test_ray_job_submit_prune(tmp_path: Path) -> None:
    corpus = make_tiny_corpus(tmp_path / "corpus", n=96, shard_size=8)
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(pipeline_config(corpus)))
    run_dir = tmp_path / "run"
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "HF_HUB_OFFLINE": "1",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.pop("RAY_ADDRESS", None)
    gcs, dashboard = _free_port(), _free_port()
    temp_dir = tempfile.mkdtemp(prefix="rt-", dir="/tmp")  # short: Ray's socket paths live below it
    started = _ray("start", "--head", f"--temp-dir={temp_dir}", "--node-ip-address=127.0.0.1", f"--port={gcs}",
                   "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}", "--num-cpus=2",
                   "--include-dashboard=true", "--disable-usage-stats", env=env)
    try:
        assert started.returncode == 0, started.stderr[-2000:]
        address = f"http://127.0.0.1:{dashboard}"
        job_id = f"diffin-test-{os.getpid()}-{int(time.time())}"
        submitted = _submit(address, job_id, env, "--working-dir", str(REPO), "--no-wait",
                            "--", "python", "-m", "jobs.prune", "--config", str(config),
                            "--run-dir", str(run_dir), "--no-progress")
        assert submitted.returncode == 0, submitted.stderr[-2000:]
        from ray.job_submission import JobStatus, JobSubmissionClient

        client = JobSubmissionClient(address)
        deadline, status = time.time() + 420, None
        while time.time() < deadline:
            status = client.get_job_status(job_id)
            if status.is_terminal():
                break
            time.sleep(2)
        assert status == JobStatus.SUCCEEDED, f"{status}\n{client.get_job_logs(job_id)[-3000:]}"
        summary = json.loads((run_dir / "run_summary.json").read_text())
        assert summary["pairs_in"] == 96 and summary["shards_scored_now"] == 12
        rows = sum(pq.read_table(f).num_rows for f in (run_dir / "scores").glob("*.parquet"))
        assert rows == 96
    finally:
        # Only this cluster's processes (never `ray stop`: it ends every Ray on the host), found by its --temp-dir.
        stopped = stop_processes_naming(temp_dir)
        assert not processes_using(temp_dir)
        assert stopped or started.returncode != 0, "no process of the started cluster names its --temp-dir"
        shutil.rmtree(temp_dir, ignore_errors=True)
