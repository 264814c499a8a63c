"""Executors: the same stage under Local and Ray; GPU requests honoured from declared resources."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import pytest

from pipeline.config import parse_config
from pipeline.runtime.executor import LocalExecutor, RayExecutor, Resources
from pipeline.stages.context import score_device


@dataclass
class WhereStage:
    """Reports where each task ran (process, GPUs Ray assigned) and that setup ran once."""

    resources: Resources = field(default_factory=Resources)

    def setup(self) -> None:
        self.setups = getattr(self, "setups", 0) + 1

    def process(self, task: int) -> tuple[int, int, tuple[str, ...], int]:
        import ray

        gpus = tuple(str(g) for g in ray.get_gpu_ids()) if ray.is_initialized() else ()
        return task, os.getpid(), gpus, self.setups


@pytest.fixture(scope="module")
def ray_cluster():
    """One embedded local Ray for this module's Ray tests (2 CPUs, 2 logical GPUs: GPU
    scheduling is tested on CPU): starting one costs ~5 s, so the tests share it. An executor
    made while it runs attaches to it and leaves it running; the fixture's executor, which
    started it, shuts it down at the end."""
    executor = RayExecutor(num_cpus=2, num_gpus=2)
    yield executor
    executor.shutdown()


def test_local_executor_sets_up_once_and_keeps_order() -> None:
    seen = []
    results = LocalExecutor().run_stage(WhereStage(), [3, 1, 2], workers=4,
                                        on_result=lambda t, r: seen.append(t))
    assert [r[0] for r in results] == [3, 1, 2] and seen == [3, 1, 2]
    assert {r[3] for r in results} == {1}


@pytest.mark.ray
def test_ray_actor_pool_honours_declared_logical_gpus(ray_cluster: RayExecutor) -> None:
    stage = WhereStage(Resources(num_cpus=0.5, num_gpus=1))
    results = ray_cluster.run_stage(stage, list(range(6)), workers=2)
    assert [r[0] for r in results] == list(range(6))
    pids = {r[1] for r in results}
    assert len(pids) == 2 and os.getpid() not in pids  # two actors, not the driver
    assert {r[2] for r in results} == {("0",), ("1",)}  # one distinct GPU per actor
    assert {r[3] for r in results} == {1}  # setup once per actor


@pytest.mark.ray
def test_ray_pool_larger_than_the_cluster_finishes(ray_cluster: RayExecutor, caplog) -> None:
    """Four workers of one CPU on a two-CPU cluster: two can never start; before the pool was
    capped at the cluster's room, their tasks waited on them forever (the run hung)."""
    with caplog.at_level("WARNING", logger="pipeline.runtime.executor"):
        results = ray_cluster.run_stage(WhereStage(Resources(num_cpus=1.0)), list(range(8)), workers=4)
    assert [r[0] for r in results] == list(range(8))
    assert len({r[1] for r in results}) <= 2
    assert "4 workers of" in caplog.text and "room for 2" in caplog.text


def test_device_comes_from_the_config_not_the_driver(tmp_path) -> None:
    from tests.conftest import make_tiny_corpus

    corpus = make_tiny_corpus(tmp_path / "c", n=8, shard_size=8)
    base = {"data": {"shards": str(corpus / "*.tar")}, "trajectory": {"train": {"steps": 4, "warmup": 1}},
            "target": {"holdout_fraction": 0.5}}
    assert score_device(parse_config({**base, "resources": {"num_gpus": 0.5}})) == "cuda"
    assert score_device(parse_config({**base, "resources": {"num_gpus": 0}})) == "cpu"
    assert score_device(parse_config({**base, "resources": {"num_gpus": 1}, "score": {"device": "cpu"}})) == "cpu"


@dataclass
class DiesOnceStage:
    """Its worker process dies (hard exit) the first time it sees task 2."""

    marker: str
    resources: Resources = field(default_factory=lambda: Resources(num_cpus=0.5))

    def setup(self) -> None:
        pass

    def process(self, task: int) -> int:
        if task == 2 and not os.path.exists(self.marker):
            open(self.marker, "w").close()
            os._exit(1)  # like a SIGKILL mid-task: no cleanup, no exception
        return task * 10


@pytest.mark.ray
def test_dead_actor_is_replaced_and_its_task_retried(ray_cluster: RayExecutor, tmp_path) -> None:
    results = ray_cluster.run_stage(DiesOnceStage(str(tmp_path / "died")), list(range(5)), workers=2)
    assert (tmp_path / "died").exists()  # the worker really died once
    assert results == [0, 10, 20, 30, 40]  # every task exactly once, in order
