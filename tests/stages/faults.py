"""Fault injection for reliability tests: a real ScoreStage that stalls on one chosen shard.

This is a module of its own (not a test file) so that Ray workers can import the class when
they unpickle the stage.
"""

from __future__ import annotations

import functools
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from pipeline.io.atomic import _temp_sibling, write_bytes_atomic
from pipeline.io.layout import RunLayout, shard_stem
from pipeline.stages import score as score_module
from pipeline.stages.score import ScoreStage, ShardResult, ShardTask


@dataclass
class StallingScoreStage(ScoreStage):
    """The real score stage, plus a trace of attempts and a stall on shard ``stall_stem``.

    Every ``process`` call appends this process's pid to ``<marker_dir>/attempts-<stem>``.
    On the first attempt of ``stall_stem`` it writes ``pid-<stem>`` (its pid), then
    ``started-<stem>``, and sleeps so that the test can kill it mid-shard; if nobody does
    within ``stall_timeout`` seconds it raises, so a broken test fails instead of hanging.
    Later attempts (after ``started-<stem>`` exists) score normally.

    Under Ray it also writes ``node-<stem>`` (the Ray node id it runs on) before
    ``started-<stem>``. With ``partial_commit`` it stalls mid-commit: the shard's score file
    is half written under the temporary name the atomic writer uses (a cut-off Parquet file),
    as a worker killed while writing leaves it.
    """

    marker_dir: str = ""
    stall_stem: str = ""
    stall_timeout: float = 120.0
    partial_commit: bool = False

    def process(self, task: ShardTask) -> ShardResult:
        stem = shard_stem(task.url)
        markers = Path(self.marker_dir)
        with open(markers / f"attempts-{stem}", "a") as log:
            log.write(f"{os.getpid()}\n")
        if stem == self.stall_stem and not (markers / f"started-{stem}").exists():
            write_bytes_atomic(markers / f"pid-{stem}", str(os.getpid()).encode())
            import ray

            if ray.is_initialized():
                write_bytes_atomic(markers / f"node-{stem}", ray.get_runtime_context().get_node_id().encode())
            if self.partial_commit:
                target = RunLayout.of(self.run_dir, self.storage).score_file(task.url)
                target.parent.mkdir(parents=True, exist_ok=True)
                _temp_sibling(target).write_bytes(b"PAR1" + bytes(100))  # no footer: cut off mid-write
            write_bytes_atomic(markers / f"started-{stem}", b"")
            time.sleep(self.stall_timeout)
            raise RuntimeError(f"shard {stem} stalled for {self.stall_timeout}s and was never killed")
        return super().process(task)


def attempts(marker_dir: Path, stem: str) -> list[int]:
    """The pids that started ``stem``, in order."""
    path = marker_dir / f"attempts-{stem}"
    return [int(line) for line in path.read_text().split()] if path.exists() else []


def reuse_prepared(reference: Path, run_dir: Path) -> None:
    """Copy a finished run's trajectory and prepared vectors into ``run_dir`` (same
    configuration: the stages reuse them, so only scoring runs)."""
    for part in ("trajectory", "prepared"):
        shutil.copytree(reference / part, run_dir / part)


def stalled_rerun(reference: Path, tmp_path: Path, monkeypatch, **stall) -> tuple[Path, Path]:
    """A run dir that reuses ``reference``'s trajectory and prepared vectors, with the score
    stage replaced by :class:`StallingScoreStage` (``stall``: its settings) writing its markers
    under ``tmp_path/markers``; returns (run_dir, markers)."""
    run_dir, markers = tmp_path / "run", tmp_path / "markers"
    reuse_prepared(reference, run_dir)  # only scoring runs on Ray
    markers.mkdir()
    monkeypatch.setattr(score_module, "ScoreStage",
                        functools.partial(StallingScoreStage, marker_dir=str(markers), **stall))
    return run_dir, markers
