"""The trajectory stage: reuse an existing trajectory or train the proxy one (DESIGN §2.5).

Completion marker: ``<run>/trajectory/trajectory.json``. A finished proxy trajectory whose
fingerprint matches the configuration is reused; one from another configuration is never
silently mixed in — the stage refuses and says so.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.config import RunConfig, TrainConfig
from pipeline.data.shards import expand_shards, load_sizes
from pipeline.errors import UsageError
from pipeline.model.trajectory import MANIFEST, Trajectory
from pipeline.runtime.executor import Executor, Resources

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainTask:
    """One proxy-training job: which shards, which settings, where the trajectory goes."""

    urls: tuple[str, ...]
    cfg: TrainConfig
    out_dir: str
    sizes: dict[str, int] | None = None
    exclude: frozenset[str] = field(default_factory=frozenset)
    holdout: tuple[float, int] | None = None


@dataclass
class TrainStage:
    """Trains a proxy CLIP; runs wherever the executor puts it, with these resources."""

    resources: Resources = Resources(num_cpus=1.0)

    def process(self, task: TrainTask) -> str:
        """Train and return the trajectory directory."""
        from pipeline.model.train import train_from_shards  # heavy imports only on the worker

        train_from_shards(task.urls, task.cfg, task.out_dir, task.sizes, task.exclude, task.holdout)
        return task.out_dir


def holdout_of(config: RunConfig) -> tuple[float, int] | None:
    """(fraction, seed) of the held-out target pairs, when the target set is held out."""
    target = config.target
    if target is None or target.holdout_fraction is None:
        return None
    return (target.holdout_fraction, target.seed)


def ensure_trajectory(config: RunConfig, run_dir: str | Path, executor: Executor) -> Trajectory:
    """Return the run's trajectory, training the proxy one first if needed (resumable)."""
    if config.trajectory.path is not None:
        return Trajectory.load(config.trajectory.path)
    from pipeline.model.train import proxy_fingerprint

    out_dir = Path(run_dir) / "trajectory"
    urls = tuple(expand_shards(config.data.shards))
    sizes = load_sizes(config.data.sizes) if config.data.sizes else None
    cfg = config.trajectory.train
    holdout = holdout_of(config)
    fingerprint = proxy_fingerprint(urls, cfg, sizes, holdout=holdout)
    if (out_dir / MANIFEST).is_file():
        existing = Trajectory.load(out_dir)
        if existing.source.get("fingerprint") == fingerprint:
            log.info("trajectory %s is complete for this configuration; reusing it", out_dir)
            return existing
        raise UsageError(
            f"{out_dir} holds a trajectory from a different configuration "
            f"({existing.source.get('fingerprint')} != {fingerprint}); use a new --run-dir or delete it")
    resources = Resources(num_cpus=config.resources.num_cpus, num_gpus=config.resources.num_gpus)
    task = TrainTask(urls, cfg, str(out_dir), sizes, holdout=holdout)
    executor.map(TrainStage(resources).process, [task], resources)
    return Trajectory.load(out_dir)
