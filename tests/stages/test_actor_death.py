"""A scoring actor SIGKILLed mid-shard (issue #5 item 1): it is replaced, its shard retried, and
the run ends with exactly one score file per shard, byte-identical to an undisturbed run."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import pytest

from pipeline.config import parse_config
from pipeline.runtime.executor import LocalExecutor, RayExecutor, stage_actor_pids
from pipeline.stages.pipeline import run_pipeline
from tests.conftest import make_tiny_corpus
from tests.stages.faults import attempts, stalled_rerun
from tests.stages.test_pipeline import pipeline_config

pytestmark = pytest.mark.ray

SHARDS = 8
VICTIM = "00003"
SCORING = ("trajectory", "prepare", "score")


@pytest.fixture(scope="module")
def undisturbed(tmp_path_factory):
    """8 shards of 8 pairs, scored in process: the reference run (trajectory, prepared, scores)."""
    corpus = make_tiny_corpus(tmp_path_factory.mktemp("corpus8"), n=8 * SHARDS, shard_size=8)
    config = parse_config(pipeline_config(corpus))
    run_dir = tmp_path_factory.mktemp("undisturbed")
    run_pipeline(config, run_dir, LocalExecutor(), progress=False, stages=SCORING)
    return config, run_dir


class ActorKiller(threading.Thread):
    """Waits for the stalled shard's marker, finds its actor through Ray's state API by the pid
    the actor wrote, and SIGKILLs that process."""

    def __init__(self, markers: Path, stem: str, gcs_address: str, timeout: float = 60.0) -> None:
        super().__init__(daemon=True)
        self.markers, self.stem, self.gcs_address, self.timeout = markers, stem, gcs_address, timeout
        self.killed_pid: int | None = None
        self.actor: object | None = None
        self.error: BaseException | None = None
        self.stop = threading.Event()

    def run(self) -> None:
        try:
            self._run()
        except BaseException as exc:  # reported by the test thread
            self.error = exc

    def _run(self) -> None:
        from ray.util.state import list_actors

        started = self.markers / f"started-{self.stem}"
        deadline = time.monotonic() + self.timeout
        while not started.exists():
            if self.stop.is_set() or time.monotonic() > deadline:
                raise TimeoutError(f"shard {self.stem} never started")
            time.sleep(0.05)
        pid = int((self.markers / f"pid-{self.stem}").read_text())
        alive = list_actors(address=self.gcs_address, filters=[("state", "=", "ALIVE")], detail=True)
        matches = [a for a in alive if a.pid == pid]
        if len(matches) != 1 or pid not in stage_actor_pids(self.gcs_address):
            raise AssertionError(f"pid {pid} is not one live stage actor: {[(a.class_name, a.pid) for a in alive]}")
        self.actor = matches[0]
        os.kill(pid, signal.SIGKILL)
        self.killed_pid = pid


def test_sigkilled_actor_is_replaced_and_its_shard_retried(undisturbed, tmp_path: Path, monkeypatch) -> None:
    config, reference = undisturbed
    run_dir, markers = stalled_rerun(reference, tmp_path, monkeypatch, stall_stem=VICTIM,
                                     stall_timeout=60.0)
    executor = RayExecutor(num_cpus=2, num_gpus=0)
    try:
        import ray
        from ray.util.state import list_actors

        # Our own cluster, by address: other Ray instances may run on this machine.
        gcs_address = ray.get_runtime_context().gcs_address
        killer = ActorKiller(markers, VICTIM, gcs_address)
        killer.start()
        try:
            summary = run_pipeline(config, run_dir, executor, progress=False, stages=SCORING)
        except Exception as exc:
            killer.join(timeout=5)
            if killer.error is not None:  # the killer's failure explains the run's
                raise killer.error from exc
            raise
        finally:
            killer.stop.set()
            killer.join(timeout=30)
        if killer.error is not None:
            raise killer.error
        victim_states = [a.state for a in list_actors(address=gcs_address, detail=True)
                         if a.pid == killer.killed_pid]
    finally:
        executor.shutdown()
    assert killer.killed_pid is not None and victim_states == ["DEAD"]

    stems = [f"{i:05d}" for i in range(SHARDS)]
    # The killed shard was attempted twice, by the killed actor and then by another process;
    # every other shard exactly once.
    victim_attempts = attempts(markers, VICTIM)
    assert len(victim_attempts) == 2 and victim_attempts[0] == killer.killed_pid
    assert victim_attempts[1] != killer.killed_pid
    assert {s: len(attempts(markers, s)) for s in stems if s != VICTIM} == {s: 1 for s in stems if s != VICTIM}
    # Exactly once: one committed file per shard, no temporaries, nothing else.
    assert summary["shards_scored_now"] == SHARDS
    assert sorted(p.name for p in (run_dir / "scores").iterdir()) == [f"{s}.parquet" for s in stems]
    # Identical to the undisturbed run, byte for byte.
    for stem in stems:
        name = f"{stem}.parquet"
        assert (run_dir / "scores" / name).read_bytes() == (reference / "scores" / name).read_bytes(), name
