"""Which checkpoints are scored: all of them, or the window where the target loss still falls.

Every score estimates a change of the target loss L_V, so it measures something useful only
over checkpoints where training reduces L_V. A proxy that overfits has L_V rising after some
checkpoint; the ``falling`` window drops every checkpoint after L_V's lowest.
"""

from __future__ import annotations

import math
from typing import Literal, Sequence

from pipeline.errors import UsageError

CheckpointWindow = Literal["all", "falling"]
CHECKPOINT_WINDOWS: tuple[str, ...] = ("all", "falling")
MIN_WINDOW = 2  # checkpoints a window must keep: one checkpoint says nothing about L_V falling


def falling_window(losses: Sequence[float]) -> list[int]:
    """Positions 0..k, k the checkpoint with the lowest L_V (ties: the earliest).

    ``losses`` are L_V at the checkpoints in step order. A non-finite L_V is never the
    lowest; when none is finite, only the first checkpoint remains.
    """
    if not losses:
        raise ValueError("falling_window needs the target loss of at least one checkpoint")
    lowest = 0
    for k, loss in enumerate(losses):
        if math.isfinite(loss) and (not math.isfinite(losses[lowest]) or loss < losses[lowest]):
            lowest = k
    return list(range(lowest + 1))


def checkpoint_window(rule: str, losses: Sequence[float]) -> list[int]:
    """Positions of the checkpoints scored under ``rule`` (``score.checkpoint_window``), given
    L_V at the candidate checkpoints in step order; a one-line :class:`UsageError` when
    ``falling`` keeps fewer than :data:`MIN_WINDOW` of them."""
    if rule == "all":
        return list(range(len(losses)))
    if rule != "falling":
        raise ValueError(f"unknown checkpoint window {rule!r}; choose from {CHECKPOINT_WINDOWS}")
    window = falling_window(losses)
    if len(window) < MIN_WINDOW:
        shown = ", ".join(f"{x:.4g}" for x in losses)
        raise UsageError(f"score.checkpoint_window: 'falling' keeps {len(window)} checkpoint(s), at least "
                         f"{MIN_WINDOW} are needed: L_V per checkpoint ({shown}) is lowest at the first; "
                         "train with a lower learning rate or save earlier checkpoints "
                         "(trajectory.train.save_steps, score.checkpoints), or set checkpoint_window: all")
    return window
