"""Trajectories: a directory with ``trajectory.json`` and open_clip checkpoints.

``trajectory.json``::

    {
      "format": "diffin-trajectory/1",
      "model": {"name": "tiny-clip-32"}            # open_clip name or shipped config name
               | {"name": "...", "config": {...}},  # inline open_clip model config
      "num_samples": N, "total_steps": T, "batch_size": B, "seed": 0,
      "optimizer": {"name": "adamw", "lr": ..., "betas": [...], "eps": ..., "weight_decay": ...},
      "schedule": {LRSchedule fields},
      "checkpoints": [{"path": "checkpoints/step_00050.pt", "step": 50, "lr": 0.0009}, ...],
      "source": {"kind": "proxy" | "open_clip" | "released", ...}
    }

Checkpoint paths are relative to the trajectory directory (absolute paths and URLs allowed).
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file as load_safetensors

from pipeline.errors import UsageError
from pipeline.io.atomic import write_json_atomic

FORMAT = "diffin-trajectory/1"
MANIFEST = "trajectory.json"
SAFETENSORS_SUFFIX = ".safetensors"


@dataclass(frozen=True)
class CheckpointRef:
    """One checkpoint of a trajectory: where it is, its global step t and learning rate η_t."""

    path: str
    step: int
    lr: float


@dataclass
class Trajectory:
    """A CLIP training trajectory: model spec, run facts and m checkpoints in step order."""

    model: dict[str, Any]
    num_samples: int
    total_steps: int
    batch_size: int
    optimizer: dict[str, Any]
    schedule: dict[str, Any]
    checkpoints: list[CheckpointRef]
    seed: int | None = None
    source: dict[str, Any] = field(default_factory=dict)
    root: Path = field(default=Path("."), compare=False)
    location: str | None = field(default=None, compare=False)  # where it was loaded from, if remote

    def __post_init__(self) -> None:
        steps = [c.step for c in self.checkpoints]
        if not steps:
            raise UsageError("trajectory has no checkpoints")
        if steps != sorted(steps) or len(set(steps)) != len(steps):
            raise UsageError(f"trajectory checkpoint steps must be strictly increasing, got {steps}")

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("root")
        data.pop("location")
        return {"format": FORMAT, **data}

    def checkpoint_path(self, index: int) -> str:
        """Resolved location of checkpoint ``index`` (relative paths resolve against root)."""
        path = self.checkpoints[index].path
        if "://" in path or os.path.isabs(path):
            return path
        return str(self.root / path)

    def fingerprint(self) -> str:
        """A hash of the manifest content (not of where it is stored)."""
        text = json.dumps(self.to_dict(), sort_keys=True)
        return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]

    def save(self, directory: str | os.PathLike | None = None) -> Path:
        """Write ``trajectory.json`` into ``directory`` (default: root) atomically."""
        out = Path(directory) if directory is not None else self.root
        write_json_atomic(out / MANIFEST, self.to_dict())
        return out / MANIFEST

    @classmethod
    def from_dict(cls, data: dict[str, Any], root: Path) -> "Trajectory":
        if data.get("format") != FORMAT:
            raise UsageError(f"{root / MANIFEST}: unsupported trajectory format {data.get('format')!r}")
        body = {k: v for k, v in data.items() if k != "format"}
        try:
            body["checkpoints"] = [CheckpointRef(**c) for c in body["checkpoints"]]
            return cls(**body, root=root)
        except (TypeError, KeyError) as exc:
            raise UsageError(f"{root / MANIFEST}: malformed trajectory manifest ({exc})") from None

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Trajectory":
        """Load a trajectory from its directory or its ``trajectory.json``."""
        p = Path(path)
        manifest = p if p.name == MANIFEST else p / MANIFEST
        if not manifest.is_file():
            raise UsageError(f"trajectory manifest not found: {manifest}")
        try:
            data = json.loads(manifest.read_text())
        except json.JSONDecodeError as exc:
            raise UsageError(f"{manifest} is not valid JSON: {exc.msg}") from None
        return cls.from_dict(data, manifest.parent)


def checkpoint_location(path: str | os.PathLike, out_dir: str | os.PathLike) -> str:
    """A checkpoint's path as a manifest in ``out_dir`` stores it: relative when inside, else absolute."""
    absolute, base = Path(path).resolve(), Path(out_dir).resolve()
    if absolute.is_relative_to(base):
        return absolute.relative_to(base).as_posix()
    return str(absolute)


def load_checkpoint_state(path: str | os.PathLike, map_location: str = "cpu",
                          mmap: bool = False) -> dict[str, Any]:
    """Load an open_clip checkpoint safely (``weights_only=True``) and return the file's dict.

    Plain state dicts (no ``state_dict`` key) are wrapped as ``{"state_dict": sd}``; a
    ``module.`` prefix from DistributedDataParallel is stripped; a ``.safetensors`` file (as
    open_clip also loads) is read as a plain state dict. ``mmap=True`` maps the
    tensors lazily instead of reading them (cheap when only metadata such as ``epoch`` is
    needed); files in torch's legacy non-zip format fall back to a full read. An unreadable
    or unsafe file raises a one-line ``UsageError``.
    """
    try:
        obj = _read(path, map_location, mmap)
    except FileNotFoundError:
        raise UsageError(f"checkpoint not found: {path}") from None
    except (OSError, EOFError, RuntimeError, pickle.UnpicklingError, SafetensorError) as exc:
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise UsageError(f"cannot read checkpoint {path}: {reason}") from None
    if not isinstance(obj, dict):
        raise UsageError(f"checkpoint {path} does not hold a dict")
    if "state_dict" not in obj:
        obj = {"state_dict": obj}
    sd = obj["state_dict"]
    if sd and all(k.startswith("module.") for k in sd):
        obj["state_dict"] = {k[len("module."):]: v for k, v in sd.items()}
    return obj


def _read(path: str | os.PathLike, map_location: str, mmap: bool) -> Any:
    """The file's object: a safetensors state dict by suffix, else :func:`_torch_load`."""
    if str(path).endswith(SAFETENSORS_SUFFIX):
        return load_safetensors(path, device=map_location)
    return _torch_load(path, map_location, mmap)


def _torch_load(path: str | os.PathLike, map_location: str, mmap: bool) -> Any:
    """``torch.load`` with ``weights_only=True``; retries without mmap on legacy-format files."""
    if mmap:
        try:
            return torch.load(path, map_location=map_location, weights_only=True, mmap=True)
        except RuntimeError as exc:
            if "mmap can only be used" not in str(exc):
                raise
    return torch.load(path, map_location=map_location, weights_only=True)
