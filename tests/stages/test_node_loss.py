"""A whole Ray worker node lost mid-score (issue #14): its raylet, object store and workers die
at once. The run must finish on the surviving node(s) with exactly one score file per shard,
byte-identical to an undisturbed run, and its summary must say which shards were retried.

The cluster is Ray's multi-node test cluster on this host (``ray.cluster_utils.Cluster``: a
real GCS, raylets and object stores per node); the head has no CPUs, so every actor runs on a
worker node, and each worker node has room for exactly one scoring actor. Losing a node
therefore also shrinks the cluster: the lost actor's replacement cannot start until the pool
ends, and the surviving actor must take the lost shard.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable

import pytest

from pipeline.config import parse_config
from pipeline.runtime.executor import LocalExecutor, RayExecutor
from pipeline.stages.pipeline import run_pipeline
from tests.conftest import make_tiny_corpus
from tests.processes import alive, processes_using, stop_processes_naming
from tests.stages.faults import attempts, stalled_rerun
from tests.stages.test_pipeline import pipeline_config

pytestmark = pytest.mark.ray

SHARDS = 4
VICTIM = "00001"  # the second shard handed out: the first actor ready takes 00000
SCORING = ("trajectory", "prepare", "score")
SELECTION = ("kept.parquet", "kept_uids.npy", "manifest.parquet", "summary.json")
STORE = 80 * 1024 * 1024  # object store per node (Ray's minimum is 75 MiB)
# Notice a dead raylet within seconds (default: 5 missed checks 3 s apart).
FAST_HEALTH_CHECKS = {"health_check_initial_delay_ms": 1000, "health_check_period_ms": 1000,
                      "health_check_timeout_ms": 2000, "health_check_failure_threshold": 3}


def node_loss_config(corpus: Path) -> dict:
    """Two scoring actors of one CPU each (one per worker node), single-threaded torch (the
    in-process reference computes bit for bit what the Ray workers compute), a selection."""
    config = pipeline_config(corpus)
    config["resources"] = {"actors": 2, "num_cpus": 1.0, "threads": 1}
    config["trajectory"]["train"]["threads"] = 1
    config["target"].update(holdout_fraction=0.25, bank_size=4)  # 8 of 32 pairs: a bank of 4, 4 targets
    config["select"] = {"column": "diffin_unrolled", "rule": "top_fraction", "fraction": 0.5}
    return config


@pytest.fixture(scope="module")
def undisturbed(tmp_path_factory):
    """4 shards of 8 pairs, the whole run in process: the reference."""
    corpus = make_tiny_corpus(tmp_path_factory.mktemp("corpus_nodes"), n=8 * SHARDS, shard_size=8)
    config = parse_config(node_loss_config(corpus))
    run_dir = tmp_path_factory.mktemp("undisturbed")
    run_pipeline(config, run_dir, LocalExecutor(), progress=False)
    return config, run_dir


class LocalCluster:
    """A head without CPUs and ``workers`` worker nodes of one CPU each, under a temp dir of its
    own: its processes are the ones naming that dir, and only those are stopped."""

    def __init__(self, workers: int) -> None:
        from ray.cluster_utils import Cluster

        self.temp_dir = tempfile.mkdtemp(prefix="rn-", dir="/tmp")  # short: Ray's socket paths live below it
        self.cluster: Any = None
        common = {"object_store_memory": STORE, "temp_dir": self.temp_dir}
        try:
            self.cluster = Cluster(initialize_head=True, head_node_args={
                "num_cpus": 0, "include_dashboard": False, "_system_config": FAST_HEALTH_CHECKS, **common})
            for _ in range(workers):
                self.cluster.add_node(num_cpus=1, **common)
            self.cluster.wait_for_nodes()
        except BaseException:
            self.shutdown()
            raise

    @property
    def address(self) -> str:
        return self.cluster.address

    def node(self, node_id: str):
        [node] = [n for n in self.cluster.worker_nodes if n.node_id == node_id]
        return node

    def shutdown(self) -> set[int]:
        """Stop every node; returns the pids that had to be killed by hand afterwards (their
        command line or an open file names the cluster's temp dir)."""
        import ray

        try:
            if ray.is_initialized():  # a driver still connected (a failed test) keeps the head alive
                ray.shutdown()
            if self.cluster is not None:
                self.cluster.shutdown()
        finally:
            leftover = stop_processes_naming(self.temp_dir, grace=5.0)
            shutil.rmtree(self.temp_dir, ignore_errors=True)
        return leftover


@pytest.fixture
def two_node_cluster():
    cluster = LocalCluster(workers=2)
    try:
        yield cluster
    finally:
        leftover = cluster.shutdown()
    assert not leftover, f"processes of the test cluster outlived its shutdown: {leftover}"
    assert not processes_using(cluster.temp_dir)


def _scored(run_dir: Path) -> list[Path]:
    return sorted((run_dir / "scores").glob("*.parquet")) if (run_dir / "scores").is_dir() else []


def _wait_until(condition: Callable[[], bool], timeout: float, what: str,
                runner: threading.Thread | None = None) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if runner is not None and not runner.is_alive():
            raise AssertionError(f"the run ended before {what}") from getattr(runner, "error", None)
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


class Run(threading.Thread):
    """``run_pipeline`` in a thread, so that the test thread can take nodes away meanwhile (and
    fail, not hang, if the run never ends)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(daemon=True)
        self.args, self.kwargs = args, kwargs
        self.summary: dict | None = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self.summary = run_pipeline(*self.args, **self.kwargs)
        except BaseException as exc:  # reported by the test thread
            self.error = exc

    def result(self, timeout: float) -> dict:
        self.join(timeout)
        assert not self.is_alive(), f"the run did not finish within {timeout}s of losing a node"
        if self.error is not None:
            raise self.error
        return self.summary


def _assert_exactly_once_and_identical(run_dir: Path, reference: Path) -> None:
    names = [f"{i:05d}.parquet" for i in range(SHARDS)]
    assert sorted(p.name for p in (run_dir / "scores").iterdir()) == names  # no temporaries, nothing else
    assert sorted(p.name for p in (run_dir / "stats").iterdir()) == [n.replace(".parquet", ".json") for n in names]
    for name in names:
        assert (run_dir / "scores" / name).read_bytes() == (reference / "scores" / name).read_bytes(), name


def test_lost_node_mid_commit_its_shard_is_retried_on_the_survivor(undisturbed, two_node_cluster, tmp_path,
                                                                    monkeypatch) -> None:
    """Node B dies while committing shard 00001 (a cut-off temporary in scores/), with shard
    00000 done on node A. A takes 00001 over; the run ends with every shard scored once, the
    temporary gone, and the retry recorded in stats/00001.json and run_summary.json."""
    config, reference = undisturbed
    run_dir, markers = stalled_rerun(reference, tmp_path, monkeypatch, stall_stem=VICTIM,
                                     stall_timeout=120.0, partial_commit=True)
    executor = RayExecutor(address=two_node_cluster.address)
    try:
        import ray

        assert len([n for n in ray.nodes() if n["Alive"]]) == 3
        run = Run(config, run_dir, executor, progress=False, stages=SCORING)
        run.start()
        _wait_until(lambda: (markers / f"started-{VICTIM}").exists() and _scored(run_dir), 180,
                    f"shard {VICTIM} stalled mid-commit and another shard done", run)
        temporaries = list((run_dir / "scores").glob(f".{VICTIM}.parquet.tmp-*"))
        assert len(temporaries) == 1
        victim_pid = int((markers / f"pid-{VICTIM}").read_text())
        victim_node = (markers / f"node-{VICTIM}").read_text()
        done_before = len(_scored(run_dir))
        assert done_before < SHARDS
        two_node_cluster.cluster.remove_node(two_node_cluster.node(victim_node), allow_graceful=False)
        summary = run.result(timeout=180)
        # The GCS declares the node dead after missed health checks (the driver may learn of the
        # lost actor sooner: ActorUnavailableError).
        _wait_until(lambda: not {n["NodeID"]: n["Alive"] for n in ray.nodes()}[victim_node], 30,
                    "the GCS to declare the node dead")
        assert sum(n["Alive"] for n in ray.nodes()) == 2
    finally:
        executor.shutdown()
    assert not alive(victim_pid)

    # 00001 was attempted twice: by the lost node's actor, then by the survivor; the others once.
    victim_attempts = attempts(markers, VICTIM)
    assert len(victim_attempts) == 2 and victim_attempts[0] == victim_pid != victim_attempts[1]
    stems = [f"{i:05d}" for i in range(SHARDS)]
    assert {s: len(attempts(markers, s)) for s in stems if s != VICTIM} == {s: 1 for s in stems if s != VICTIM}
    # The surviving actor took 00001 over (its replacement had no room to start on the cluster).
    assert victim_attempts[1] in {p for s in stems if s != VICTIM for p in attempts(markers, s)}
    # Every shard scored once, identical to the undisturbed run.
    assert summary["shards_scored_now"] == SHARDS
    _assert_exactly_once_and_identical(run_dir, reference)
    # What was retried, and how often.
    victim_url = str(config.data.shards).replace("*", VICTIM)
    assert summary["retried_shards"] == [{"shard": victim_url, "retries": 1}]
    on_disk = json.loads((run_dir / "run_summary.json").read_text())
    assert on_disk["retried_shards"] == summary["retried_shards"]
    retries = {s: json.loads((run_dir / "stats" / f"{s}.json").read_text())["retries"] for s in stems}
    assert retries == {s: int(s == VICTIM) for s in stems}


@pytest.mark.slow
def test_whole_run_survives_losing_one_of_three_nodes(undisturbed, tmp_path) -> None:
    """The whole pipeline (trajectory, prepare, score, select) on three worker nodes, the real
    score stage (no stall): one node is killed once a score file is done. Same scores and
    selection as the undisturbed run; the summary names the retried shard(s)."""
    config, reference = undisturbed
    config = config.model_copy(update={"resources": config.resources.model_copy(update={"actors": 3})})
    cluster = LocalCluster(workers=3)
    try:
        executor = RayExecutor(address=cluster.address)
        try:
            import ray

            run_dir = tmp_path / "run"
            run = Run(config, run_dir, executor, progress=False)
            run.start()
            _wait_until(lambda: _scored(run_dir), 600, "a score file", run)
            assert len(_scored(run_dir)) < SHARDS
            victim = sorted(cluster.cluster.worker_nodes, key=lambda n: n.node_id)[0]
            cluster.cluster.remove_node(victim, allow_graceful=False)
            summary = run.result(timeout=300)
            assert sum(n["Alive"] for n in ray.nodes()) == 3
        finally:
            executor.shutdown()
    finally:
        leftover = cluster.shutdown()
    assert not leftover and not processes_using(cluster.temp_dir)
    _assert_exactly_once_and_identical(run_dir, reference)
    for name in SELECTION:
        assert (run_dir / "selection" / name).read_bytes() == (reference / "selection" / name).read_bytes(), name
    # Every actor held a shard when its node went (scoring takes seconds, handing out a shard
    # milliseconds), so the lost node's shard was retried.
    stats = {p.stem: json.loads(p.read_text())["retries"] for p in (run_dir / "stats").glob("*.json")}
    retried = [r["shard"].rsplit("/", 1)[-1].removesuffix(".tar") for r in summary["retried_shards"]]
    assert retried and all(stats[s] >= 1 for s in retried)
    assert sum(stats.values()) == sum(r["retries"] for r in summary["retried_shards"])
