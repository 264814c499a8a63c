"""Errors raised by a stage on Ray workers reach the caller as themselves: a failing ``setup()``
is not mistaken for an actor death (no replacement, no retries), and a UsageError/DataError
keeps its one-line message instead of Ray's multi-line task traceback."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from pipeline.errors import DataError, UsageError
from pipeline.runtime.executor import RayExecutor, Resources

pytestmark = pytest.mark.ray


@dataclass
class SetupFails:
    """``setup()`` raises a UsageError after noting the attempt in ``log``."""

    log: str
    resources: Resources = field(default_factory=lambda: Resources(num_cpus=0.5))

    def setup(self) -> None:
        with open(self.log, "a") as f:
            f.write(f"{os.getpid()}\n")
        raise UsageError("prepared/ckpt_000.pt was prepared under another configuration")

    def process(self, task: int) -> int:
        return task


@dataclass
class ProcessFails:
    """Task 2 is bad data."""

    resources: Resources = field(default_factory=lambda: Resources(num_cpus=0.5))

    def setup(self) -> None:
        pass

    def process(self, task: int) -> int:
        if task == 2:
            raise DataError(f"shard {task} holds 3 samples but sizes.json says 8")
        return task


@dataclass
class BadInput:
    """Every task names a missing file (a stage run one Ray task per task)."""

    resources: Resources = field(default_factory=lambda: Resources(num_cpus=0.5))

    def setup(self) -> None:
        pass

    def process(self, item: int) -> int:
        raise UsageError(f"item {item}: no such file")


@pytest.fixture(scope="module")
def executor():
    executor = RayExecutor(num_cpus=2, num_gpus=0)
    yield executor
    executor.shutdown()


def test_setup_error_is_raised_once_not_retried(executor, tmp_path: Path) -> None:
    log = tmp_path / "setups"
    with pytest.raises(UsageError) as info:
        executor.run_stage(SetupFails(str(log)), list(range(6)), workers=2)
    assert str(info.value) == "prepared/ckpt_000.pt was prepared under another configuration"
    assert type(info.value) is UsageError
    # Only the two actors of the pool ever set up: no replacement actors, no retries.
    assert len(log.read_text().split()) <= 2


def _free_cpus() -> float:
    import ray

    return ray.available_resources().get("CPU", 0.0)


def test_stage_error_keeps_its_type_and_one_line(executor) -> None:
    with pytest.raises(DataError) as info:
        executor.run_stage(ProcessFails(), list(range(4)), workers=2)
    assert type(info.value) is DataError
    assert str(info.value) == "shard 2 holds 3 samples but sizes.json says 8"
    # The failed pool's actors are ended (the error, still referenced here, keeps no actor alive).
    deadline = time.monotonic() + 30
    while _free_cpus() < 2.0 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _free_cpus() == 2.0


def test_task_error_keeps_its_type_and_one_line(executor) -> None:
    with pytest.raises(UsageError) as info:
        executor.run_stage(BadInput(), [7])  # workers=None: Ray tasks, not an actor pool
    assert type(info.value) is UsageError and str(info.value) == "item 7: no such file"
