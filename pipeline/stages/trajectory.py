"""The trajectory stage: reuse an existing trajectory or train the proxy one.

Completion marker: ``<run>/trajectory/trajectory.json``. A finished proxy trajectory whose
fingerprint matches the configuration is reused; one from another configuration is never
silently mixed in — the stage refuses and says so.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.config import RunConfig, TrainConfig
from pipeline.data.uids import DEFAULT_UID_FROM
from pipeline.errors import UsageError
from pipeline.io.atomic import atomic_path
from pipeline.io.storage import StorageOptions, StoragePath, as_path, download_dir, is_remote
from pipeline.model.trajectory import MANIFEST, Trajectory
from pipeline.runtime.executor import Executor, Resources
from pipeline.stages.context import RunContext

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
    storage: dict[str, dict[str, Any]] = field(default_factory=dict)
    uid_from: tuple[str, ...] = DEFAULT_UID_FROM


@dataclass
class TrainStage:
    """Trains a proxy CLIP; runs wherever the executor puts it, with these resources."""

    resources: Resources = Resources(num_cpus=1.0)

    def setup(self) -> None:
        """Nothing to load ahead: a task trains from its own shards."""

    def process(self, task: TrainTask) -> str:
        """Train and return the trajectory directory."""
        from pipeline.model.train import train_from_shards  # heavy imports only on the worker

        train_from_shards(task.urls, task.cfg, task.out_dir, task.sizes, task.exclude, task.holdout, task.storage,
                          task.uid_from)
        return task.out_dir


def holdout_of(config: RunConfig) -> tuple[float, int] | None:
    """(fraction, seed) of the held-out target pairs, when the target set is held out."""
    target = config.target
    if target is None or target.holdout_fraction is None:
        return None
    return (target.holdout_fraction, target.seed)


def ensure_trajectory(ctx: RunContext, executor: Executor) -> Trajectory:
    """Return the run's trajectory, training the proxy one first if needed (resumable)."""
    if ctx.config.trajectory.path is not None:
        return load_trajectory(ctx.config.trajectory.path, ctx.storage)
    return train_trajectory(ctx, ctx.layout.trajectory, executor)


def existing_trajectory(ctx: RunContext) -> Trajectory:
    """The run's trajectory when a stage after it runs alone: the one the config names, or
    the one ``diffin run`` trained into the run directory (one line if there is none)."""
    config = ctx.config
    path = as_path(config.trajectory.path, config.storage) if config.trajectory.path else ctx.layout.trajectory
    if not (path / MANIFEST).is_file() and not path.name == MANIFEST:
        raise UsageError(f"no trajectory at {path}; run `diffin run` with this config and run dir (it trains "
                         "the proxy trajectory first), or name an existing one in trajectory.path")
    return load_trajectory(path, config.storage)


def plan_training(ctx: RunContext, out_dir: StoragePath, exclude: frozenset[str] = frozenset()) -> TrainTask | None:
    """The training task of ``ctx``'s proxy trajectory into ``out_dir``, or None when a complete
    one of this configuration is there (its fingerprint: shards, sizes, hold-out, exclusions,
    training settings). A trajectory of another configuration is refused with one line."""
    from pipeline.model.train import proxy_fingerprint

    cfg = ctx.config.trajectory.train
    if cfg is None:
        raise UsageError("trajectory.train: required to train a proxy trajectory (the config names an existing one)")
    holdout = holdout_of(ctx.config)
    uid_from = ctx.config.data.uid_from
    fingerprint = proxy_fingerprint(ctx.urls, cfg, ctx.sizes, exclude, holdout=holdout, uid_from=uid_from)
    if (out_dir / MANIFEST).is_file():
        existing = load_trajectory(out_dir, ctx.storage)
        if existing.source.get("fingerprint") == fingerprint:
            log.info("trajectory %s is complete for this configuration; reusing it", out_dir)
            return None
        raise UsageError(
            f"{out_dir} holds a trajectory from a different configuration "
            f"({existing.source.get('fingerprint')} != {fingerprint}); use a new --run-dir or delete it")
    return TrainTask(ctx.urls, cfg, str(out_dir), ctx.sizes, exclude, holdout, ctx.storage, uid_from)


def train_trajectory(ctx: RunContext, out_dir: StoragePath, executor: Executor,
                     exclude: frozenset[str] = frozenset()) -> Trajectory:
    """Train the proxy trajectory of ``ctx`` into ``out_dir``, or reuse a complete one.

    The one way a proxy trajectory is trained (``diffin run`` and ``diffin train``): the
    held-out target pairs are left out, the storage options apply, and the fingerprint
    decides reuse (:func:`plan_training`).
    """
    task = plan_training(ctx, out_dir, exclude)
    if task is not None:
        executor.run_stage(TrainStage(ctx.model_resources), [task])
    return load_trajectory(out_dir, ctx.storage)


def trajectory_location(trajectory: Trajectory) -> str:
    """Where workers load ``trajectory`` from: its remote URL, else its local directory."""
    return trajectory.location or str(trajectory.root)


def cache_dir() -> Path:
    """Local cache for remote inputs: ``$DIFFIN_CACHE`` or ``~/.cache/diffin``."""
    return Path(os.environ.get("DIFFIN_CACHE") or Path.home() / ".cache" / "diffin")


def load_trajectory(location: str | os.PathLike, storage: StorageOptions | None = None) -> Trajectory:
    """Load a trajectory from a local directory (or its ``trajectory.json``) or an fsspec URL.

    A remote trajectory is copied once into the local cache (keyed by its URL and manifest
    content), so checkpoints are memory-mapped from local disk on every worker node.
    """
    path = as_path(location, storage)
    if not is_remote(path):
        return Trajectory.load(path)
    manifest = path if path.name == MANIFEST else path / MANIFEST
    try:
        text = manifest.read_text()
    except FileNotFoundError:
        raise UsageError(f"trajectory manifest not found: {manifest}") from None
    root = manifest.parent
    digest = hashlib.sha256(f"{root}\n{text}".encode()).hexdigest()[:16]
    local = cache_dir() / "trajectories" / digest
    if not (local / MANIFEST).is_file():
        with atomic_path(local) as tmp:
            download_dir(root, tmp)
    return dataclasses.replace(Trajectory.load(local), location=str(root))
