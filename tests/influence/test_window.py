"""The checkpoint window: which checkpoints are scored, from L_V per checkpoint."""

from __future__ import annotations

import math

import pytest

from pipeline.errors import UsageError
from pipeline.influence.window import CHECKPOINT_WINDOWS, checkpoint_window, falling_window


@pytest.mark.parametrize("losses, window", [
    ([4.45, 2.98, 2.67, 2.66], [0, 1, 2, 3]),   # falls throughout: every checkpoint
    ([3.0, 2.0, 1.5, 1.8, 2.4], [0, 1, 2]),     # rises after its minimum: the rise is dropped
    ([3.0, 2.0, 2.0, 2.5], [0, 1]),             # tie: the earliest lowest
    ([3.0, 2.0, 2.0], [0, 1]),
    ([3.0, 1.0, 2.5, 1.2, 2.0], [0, 1]),        # dip, rise, smaller dip: the lowest counts
    ([3.0, 1.2, 2.5, 1.0, 2.0], [0, 1, 2, 3]),  # dip, rise, deeper dip: the rise in between stays
    ([2.0], [0]),
    ([2.0, 1.0], [0, 1]),
    ([1.0, 2.0], [0]),
    ([2.0, 2.0], [0]),
])
def test_falling_window(losses: list[float], window: list[int]) -> None:
    assert falling_window(losses) == window


def test_non_finite_losses_are_never_the_lowest() -> None:
    assert falling_window([3.0, 2.0, math.nan, math.inf]) == [0, 1]
    assert falling_window([math.nan, 2.0, 1.0]) == [0, 1, 2]
    assert falling_window([math.nan, math.nan]) == [0]
    with pytest.raises(ValueError):
        falling_window([])


def test_checkpoint_window_rules() -> None:
    assert CHECKPOINT_WINDOWS == ("all", "falling")
    assert checkpoint_window("all", [1.0, 2.0, 3.0]) == [0, 1, 2]  # all: whatever L_V does
    assert checkpoint_window("falling", [3.0, 2.0, 2.5]) == [0, 1]
    with pytest.raises(ValueError, match="unknown checkpoint window"):
        checkpoint_window("rising", [1.0, 2.0])


@pytest.mark.parametrize("losses", [[1.0, 2.0, 3.0], [2.0], [2.0, 2.0]])
def test_falling_window_of_fewer_than_two_is_a_usage_error(losses: list[float]) -> None:
    with pytest.raises(UsageError) as caught:
        checkpoint_window("falling", losses)
    message = str(caught.value)
    assert "\n" not in message and "score.checkpoint_window" in message
    assert ", ".join(f"{x:.4g}" for x in losses) in message  # names the L_V sequence
