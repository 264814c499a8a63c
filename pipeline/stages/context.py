"""A run resolved once: its configuration, run directory, input shards and what the stages
derive from the configuration (resources, device, threads, scoring settings).

The one place where the configuration is translated into what stages need; every stage's
driver-side function takes a :class:`RunContext` instead of re-deriving it.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any

from pipeline.config import RunConfig, TargetConfig
from pipeline.data.shards import expand_shards, expected_count, load_sizes
from pipeline.errors import UsageError
from pipeline.influence.embeddings import EmbeddingSettings
from pipeline.influence.scores import METHOD_COMPONENTS
from pipeline.influence.unrolled import UnrolledSettings
from pipeline.io.layout import RunLayout, check_unique_stems
from pipeline.runtime.executor import Resources


def require_target(config: RunConfig) -> TargetConfig:
    """The target section, or one line saying scoring needs it."""
    if config.target is None:
        raise UsageError("target: required to score (give target.shards or target.holdout_fraction)")
    return config.target


def influence_settings(config: RunConfig):
    """The scoring settings of a run (score + target sections) as the model facade takes them."""
    from pipeline.model.scorer import InfluenceSettings, ZeroShotTarget  # the facade imports open_clip: only when scoring

    score, target = config.score, require_target(config)
    zero_shot = None if target.zero_shot is None else \
        ZeroShotTarget(tuple(target.zero_shot.prompts()), len(target.zero_shot.templates))
    return InfluenceSettings(
        c_mode=score.c_mode, hvp=score.hvp, eps=score.eps, bank_size=target.bank_size,
        proxy_batches=score.proxy_batches, proxy_batch_size=score.proxy_batch_size,
        batch_size=score.batch_size, seed=target.seed, components=METHOD_COMPONENTS[score.method],
        unrolled=UnrolledSettings(score.unrolled.lanczos_steps, score.unrolled.f, score.unrolled.proxy_batches),
        adam=score.adam, dtype=score.dtype, compile=score.compile,
        embeddings=EmbeddingSettings(**score.embeddings.model_dump()),
        checkpoints=tuple(score.checkpoints) if score.checkpoints is not None else None,
        checkpoint_window=score.checkpoint_window, zero_shot=zero_shot)


def check_train_model(config: RunConfig, source: str = "config") -> None:
    """Refuse (one line naming ``source``, the config file; exit 2) a proxy-training model name
    that is neither a model config we ship nor an open_clip model: before any work."""
    from pipeline.model.clip import resolve_model_config

    if config.trajectory.train is None:
        return
    try:
        resolve_model_config(config.trajectory.train.model)
    except UsageError as exc:
        raise UsageError(f"{source}: trajectory.train.model: {exc}") from None


def score_device(config: RunConfig) -> str:
    """Device from the config, never from probing the driver: cuda iff the actor has GPUs."""
    if config.score.device != "auto":
        return config.score.device
    return "cuda" if config.resources.num_gpus > 0 else "cpu"


@dataclass(frozen=True)
class RunContext:
    """One run, resolved once on the driver (cheap, no Ray): stages take it instead of the
    config and the run directory.

    ``urls``: the input shards, expanded once, in order, with unique file stems; ``sizes``:
    their ``sizes.json`` counts (by file name) when the config names one; ``source``: where
    the config came from (its file), named in errors.
    """

    config: RunConfig
    layout: RunLayout
    urls: tuple[str, ...]
    sizes: dict[str, int] | None
    source: str = "config"

    @classmethod
    def resolve(cls, config: RunConfig, run_dir: str | os.PathLike, source: str = "config") -> "RunContext":
        """Expand ``data.shards``, refuse shards whose score files would collide, read
        ``data.sizes``, check the proxy-training model: before anything is trained or scored."""
        check_train_model(config, source)
        urls = tuple(expand_shards(config.data.shards))
        check_unique_stems(urls)
        sizes = load_sizes(config.data.sizes, config.storage) if config.data.sizes else None
        return cls(config, RunLayout.of(run_dir, config.storage), urls, sizes, source)

    @property
    def storage(self) -> dict[str, dict[str, Any]]:
        """fsspec options by URL scheme (plain, picklable: stages carry it to workers)."""
        return dict(self.config.storage)

    @property
    def pairs_in(self) -> int | None:
        """Pairs the input shards hold by ``sizes.json`` (None without one)."""
        if self.sizes is None:
            return None
        return sum(expected_count(u, self.sizes) or 0 for u in self.urls)

    @property
    def model_resources(self) -> Resources:
        """What a worker that holds the model asks for (trajectory, prepare, score)."""
        return Resources(self.config.resources.num_cpus, self.config.resources.num_gpus)

    @property
    def io_resources(self) -> Resources:
        """What a worker that only reads and writes files asks for (select, reshard): no GPU,
        at most one CPU."""
        return Resources(num_cpus=min(self.config.resources.num_cpus, 1.0), num_gpus=0)

    @property
    def device(self) -> str:
        """See :func:`score_device`."""
        return score_device(self.config)

    @property
    def threads(self) -> int:
        """torch threads per worker: ``resources.threads`` or ceil(num_cpus) — fixed by the
        config, so float reductions (and hence scores) are the same under every executor."""
        return self.config.resources.threads or max(1, math.ceil(self.config.resources.num_cpus))

    def influence_settings(self):
        """See :func:`influence_settings`."""
        return influence_settings(self.config)
