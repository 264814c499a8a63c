"""Run configuration (DESIGN §3.4): one YAML file, one section per stage, unknown keys are errors.

Relative paths in a config resolve against the current working directory (the repository
root for ``make`` targets, the uploaded working dir under ``ray job submit``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (BaseModel, ConfigDict, Field, NonNegativeFloat, NonNegativeInt,
                      PositiveFloat, PositiveInt, ValidationError, model_validator)

from pipeline.errors import UsageError


class Section(BaseModel):
    """Base of every config section: unknown keys and wrong types are rejected."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=False)


class DataConfig(Section):
    """Input shards (§3.1)."""

    shards: str | list[str] = Field(description="brace pattern, glob, or list of shard URLs")
    sizes: str | None = Field(None, description="sizes.json with per-shard counts")


class TrainConfig(Section):
    """Proxy CLIP training (§2.5): deterministic for a seed."""

    model: str = "tiny-clip-32"
    steps: PositiveInt = 200
    batch_size: PositiveInt = 64
    lr: PositiveFloat = 1e-3
    weight_decay: NonNegativeFloat = 0.1
    betas: tuple[float, float] = (0.9, 0.98)
    eps: PositiveFloat = 1e-6
    warmup: NonNegativeInt = 10
    schedule: Literal["cosine", "const"] = "cosine"
    checkpoints: PositiveInt = 4
    save_steps: list[NonNegativeInt] | None = None
    seed: int = 0
    max_samples: PositiveInt | None = None
    exclude_uids: str | None = None
    threads: PositiveInt | None = None

    @model_validator(mode="after")
    def _check_steps(self) -> "TrainConfig":
        if self.warmup >= self.steps:
            raise ValueError(f"warmup ({self.warmup}) must be smaller than steps ({self.steps})")
        if self.save_steps is not None:
            bad = [s for s in self.save_steps if s > self.steps]
            if bad:
                raise ValueError(f"save_steps {bad} exceed steps ({self.steps})")
            if len(set(self.save_steps)) != len(self.save_steps) or not self.save_steps:
                raise ValueError("save_steps must be a non-empty list of distinct steps")
        elif self.checkpoints > self.steps:
            raise ValueError(f"checkpoints ({self.checkpoints}) exceeds steps ({self.steps})")
        return self

    def checkpoint_steps(self) -> list[int]:
        """The global steps at which checkpoints are saved (evenly spaced, ending at steps)."""
        if self.save_steps is not None:
            return sorted(self.save_steps)
        m = self.checkpoints
        return [round(self.steps * (i + 1) / m) for i in range(m)]


class TrajectoryConfig(Section):
    """Either an existing trajectory (``path``) or proxy-training settings (``train``)."""

    path: str | None = None
    train: TrainConfig | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> "TrajectoryConfig":
        if (self.path is None) == (self.train is None):
            raise ValueError("give exactly one of 'path' (existing trajectory) or 'train' (proxy run)")
        return self


class ResourcesConfig(Section):
    """Ray resources per task/actor, declared here and never inferred on the driver (§4)."""

    actors: PositiveInt = 1
    num_cpus: PositiveFloat = 1.0
    num_gpus: NonNegativeFloat = 0.0
    address: str | None = Field(None, description="Ray address; default: local or RAY_ADDRESS")


class RunConfig(Section):
    """A whole run."""

    data: DataConfig
    trajectory: TrajectoryConfig
    resources: ResourcesConfig = ResourcesConfig()


def _format_error(exc: ValidationError) -> str:
    err = exc.errors()[0]
    where = ".".join(str(p) for p in err["loc"]) or "(top level)"
    message = err["msg"].removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        message = "unknown key"
    elif err["type"] == "missing":
        message = "required key is missing"
    more = f" (+{len(exc.errors()) - 1} more)" if len(exc.errors()) > 1 else ""
    return f"{where}: {message}{more}"


def parse_config(data: Any, source: str = "config") -> RunConfig:
    """Validate a parsed YAML mapping into a :class:`RunConfig` (UsageError on any problem)."""
    if not isinstance(data, dict):
        raise UsageError(f"{source}: the top level must be a mapping of sections")
    try:
        config = RunConfig.model_validate(data)
    except ValidationError as exc:
        raise UsageError(f"{source}: {_format_error(exc)}") from None
    check_paths(config, source)
    return config


def load_config(path: str | os.PathLike) -> RunConfig:
    """Read and validate a YAML run configuration."""
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"config file not found: {p}")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as exc:
        raise UsageError(f"{p}: not valid YAML ({str(exc).splitlines()[0]})") from None
    return parse_config(data, str(p))


def _is_local(url: str) -> bool:
    return "://" not in url or url.startswith("file://")


def check_paths(config: RunConfig, source: str) -> None:
    """Check that local input paths named by the config exist and the model is known."""
    from pipeline.data.shards import expand_shards  # local import: keeps config import light

    try:
        urls = expand_shards(config.data.shards)
    except UsageError as exc:
        raise UsageError(f"{source}: data.shards: {exc}") from None
    missing = [u for u in urls if _is_local(u) and not Path(u.removeprefix("file://")).is_file()]
    if missing:
        extra = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise UsageError(f"{source}: data.shards: shard not found: {missing[0]}{extra}")
    if config.data.sizes and not Path(config.data.sizes).is_file():
        raise UsageError(f"{source}: data.sizes: file not found: {config.data.sizes}")
    traj = config.trajectory
    if traj.path is not None:
        manifest = Path(traj.path)
        manifest = manifest if manifest.name == "trajectory.json" else manifest / "trajectory.json"
        if not manifest.is_file():
            raise UsageError(f"{source}: trajectory.path: trajectory manifest not found: {manifest}")
    if traj.train is not None:
        from pipeline.model.clip import resolve_model_config

        try:
            resolve_model_config(traj.train.model)
        except UsageError as exc:
            raise UsageError(f"{source}: trajectory.train.model: {exc}") from None
        if traj.train.exclude_uids and not Path(traj.train.exclude_uids).is_file():
            raise UsageError(
                f"{source}: trajectory.train.exclude_uids: file not found: {traj.train.exclude_uids}")
