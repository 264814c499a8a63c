"""Import a released open_clip checkpoint (weights only, no run) as a one-checkpoint trajectory.

A released checkpoint is what ``open_clip.create_model_and_transforms(name, pretrained=FILE)``
loads: a bare state dict, ``{"state_dict": ...}`` (optionally with a DistributedDataParallel
``module.`` prefix) or a ``.safetensors`` file — no ``params.txt``, no optimizer state.
Nothing in it says how it was trained, so the user states the model name, the number of
updates T, the learning rate η of the last update, the training-set size N and the batch
size; the trajectory records them with the assumption that every one of the T updates had
rate η (a constant schedule).

With its single checkpoint at t = T, ``tracin`` is (T/N) η ⟨∇L_V(θ_T), ∇ℓ_z(θ_T)⟩ and
``diffin_unrolled`` is (1/N) ⟨φ(H) ∇L_V, ∇ℓ_z⟩ with φ(λ) = η Σ_{j<T} f(η, λ)^j — about
(1 − (1 − ηλ)^T)/λ: an influence function whose inverse Hessian is damped by the horizon ηT.

The user's file is referenced by the manifest (never copied or changed): the checkpoint
loader (:func:`pipeline.model.trajectory.load_checkpoint_state`) reads every form above.
"""

from __future__ import annotations

import hashlib
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Mapping

import torch

from pipeline.errors import UsageError
from pipeline.model.clip import build_clip, model_spec
from pipeline.model.schedule import LRSchedule
from pipeline.model.trajectory import CheckpointRef, Trajectory, checkpoint_location, load_checkpoint_state

KIND = "released"
_SHOWN_KEYS = 3


@dataclass(frozen=True)
class ReleasedFacts:
    """What the user states about the training behind a released checkpoint (``None``: not given)."""

    model: str | None = None
    steps: int | None = None
    lr: float | None = None
    num_samples: int | None = None
    batch_size: int | None = None


# field → (command-line flag, why it is needed): the order of the checks.
REQUIRED: dict[str, tuple[str, str]] = {
    "model": ("--model", "a state dict does not name the model it belongs to"),
    "steps": ("--steps", "T, the number of updates that produced the checkpoint, sets the horizon of "
                         "the unrolled score and TracIn's weight"),
    "lr": ("--lr", "η, the learning rate of the last update, sets the step size of every recorded update"),
    "num_samples": ("--train-num-samples", "N, the training-set size, scales every score by 1/N"),
    "batch_size": ("--batch-size", "the samples per optimizer step are part of the trajectory's run facts"),
}


def check_facts(facts: ReleasedFacts) -> None:
    """Raise a one-line ``UsageError`` naming the first missing or invalid stated value."""
    for name, (flag, why) in REQUIRED.items():
        value = getattr(facts, name)
        if value is None:
            raise UsageError(f"{flag} is required to import a released checkpoint: {why}")
        if name == "model":
            continue
        if isinstance(value, bool) or not math.isfinite(value) or value <= 0 \
                or (name != "lr" and not isinstance(value, int)):
            kind = "a positive number" if name == "lr" else "a positive integer"
            raise UsageError(f"{flag} must be {kind}, got {value!r}")


def released_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The file's state dict (tensors memory-mapped where the format allows); one-line errors."""
    if not path.is_file():
        raise UsageError(f"checkpoint file not found: {path}")
    state = load_checkpoint_state(path, mmap=True)["state_dict"]
    if not isinstance(state, Mapping) or not state \
            or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise UsageError(f"{path} is not a model checkpoint: it holds no state dict of named tensors")
    return dict(state)


def _shown(keys: list[str]) -> str:
    more = f" (+{len(keys) - _SHOWN_KEYS} more)" if len(keys) > _SHOWN_KEYS else ""
    return ", ".join(keys[:_SHOWN_KEYS]) + more


def check_fits(state: Mapping[str, torch.Tensor], spec: dict[str, Any], path: Path) -> None:
    """A strict load's check: exactly the model's keys, with its shapes (model built on the meta
    device, so nothing is allocated or read). A mismatch is one line naming a few keys."""
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in build_clip(spec).state_dict().items()}
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [f"{k} {tuple(state[k].shape)} vs {expected[k]}" for k in expected
              if k in state and tuple(state[k].shape) != expected[k]]
    problems = [f"{label} {_shown(keys)}" for label, keys in
                (("missing", missing), ("unexpected", unexpected), ("shape mismatch", shapes)) if keys]
    if problems:
        raise UsageError(f"{path} does not load into model {spec['name']!r}: {'; '.join(problems)}")


def file_sha256(path: Path, chunk: int = 1 << 24) -> str:
    """SHA-256 of the file's bytes: the manifest (hence the trajectory fingerprint) names the weights."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def import_released(checkpoint: str | os.PathLike, out_dir: str | os.PathLike | None,
                    facts: ReleasedFacts) -> Trajectory:
    """The one-checkpoint trajectory of a released checkpoint (not yet saved; see ``Trajectory.save``).

    ``out_dir`` is where the manifest will live (required: a released file has no run directory);
    the checkpoint is referenced relative to it when inside it, else by absolute path.
    """
    check_facts(facts)
    if out_dir is None:
        raise UsageError("--out is required to import a released checkpoint: the directory of the "
                         "trajectory.json to write")
    path, out = Path(checkpoint), Path(out_dir)
    state = released_state_dict(path)
    spec = model_spec(facts.model)
    check_fits(state, spec, path)
    schedule = LRSchedule(base_lr=float(facts.lr), total_steps=facts.steps, kind="const")
    ref = CheckpointRef(checkpoint_location(path, out), facts.steps, schedule.checkpoint_lr(facts.steps))
    return Trajectory(
        model=spec, num_samples=facts.num_samples, total_steps=facts.steps, batch_size=facts.batch_size,
        optimizer={"lr": float(facts.lr)}, schedule=schedule.to_dict(), checkpoints=[ref],
        source={"kind": KIND, "file": str(path.resolve()), "sha256": file_sha256(path),
                "stated": asdict(facts), "assumed": "constant learning rate lr over all steps"},
        root=out,
    )
