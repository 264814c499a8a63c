"""Learning-rate schedules with open_clip's exact step semantics.

open_clip assigns ``lr = schedule(step)`` before optimizer step ``step`` (0-based global step).
Warmup: ``base_lr * (step + 1) / warmup``. Cosine after warmup:
``0.5 * (1 + cos(pi * (step - warmup) / (total - warmup))) * base_lr``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class LRSchedule:
    """A warmup + decay schedule over ``total_steps`` optimizer steps."""

    base_lr: float
    total_steps: int
    warmup: int = 0
    kind: str = "cosine"  # "cosine" | "const" | "const-cooldown"
    cooldown_steps: int = 0
    cooldown_power: float = 1.0
    cooldown_end_lr: float = 0.0

    def __post_init__(self) -> None:
        if self.kind not in ("cosine", "const", "const-cooldown"):
            raise ValueError(f"unknown lr schedule {self.kind!r}")
        if self.total_steps < 1 or self.warmup < 0:
            raise ValueError("total_steps must be >= 1 and warmup >= 0")

    def lr_at(self, step: int) -> float:
        """Learning rate that open_clip assigns before optimizer step ``step``."""
        if step < self.warmup:
            return self.base_lr * (step + 1) / self.warmup
        if self.kind == "const":
            return self.base_lr
        if self.kind == "const-cooldown":
            start_cooldown = self.total_steps - self.cooldown_steps
            if step < start_cooldown:
                return self.base_lr
            e = step - start_cooldown
            decay = (1 - e / max(self.cooldown_steps, 1)) ** self.cooldown_power
            return decay * (self.base_lr - self.cooldown_end_lr) + self.cooldown_end_lr
        e = step - self.warmup
        es = self.total_steps - self.warmup
        return 0.5 * (1 + math.cos(math.pi * e / es)) * self.base_lr

    def checkpoint_lr(self, step: int) -> float:
        """η_t of the checkpoint saved after ``step`` optimizer steps.

        It is the learning rate of the update taken *at* θ_t, i.e. ``lr_at(step)``; the
        final checkpoint (``step == total_steps``) has no following update, so the rate of
        the last update taken, ``lr_at(total_steps - 1)``, is used instead.
        """
        return self.lr_at(min(step, self.total_steps - 1))

    def to_dict(self) -> dict:
        return asdict(self)
