"""LRSchedule reproduces open_clip_train's schedulers exactly, step by step."""

from __future__ import annotations

import math

import pytest
import torch

import pipeline  # noqa: F401  (torchvision shim before open_clip)
from open_clip_train.scheduler import const_lr, const_lr_cooldown, cosine_lr

from pipeline.model.schedule import LRSchedule


def _optimizer() -> torch.optim.Optimizer:
    """An AdamW with open_clip's two parameter groups (no-decay / decay)."""
    bias, weight = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2, 2))
    return torch.optim.AdamW([{"params": [bias], "weight_decay": 0.0},
                              {"params": [weight], "weight_decay": 0.2}], lr=1.0)


def _open_clip_lrs(schedule: LRSchedule) -> list[float]:
    """The lr open_clip's own scheduler assigns to the optimizer at every step."""
    opt = _optimizer()
    s = schedule
    if s.kind == "cosine":
        adjust = cosine_lr(opt, s.base_lr, s.warmup, s.total_steps)
    elif s.kind == "const":
        adjust = const_lr(opt, s.base_lr, s.warmup, s.total_steps)
    else:
        adjust = const_lr_cooldown(opt, s.base_lr, s.warmup, s.total_steps, s.cooldown_steps,
                                   s.cooldown_power, s.cooldown_end_lr)
    lrs = []
    for step in range(s.total_steps):
        adjust(step)
        group_lrs = {g["lr"] for g in opt.param_groups}
        assert len(group_lrs) == 1
        lrs.append(group_lrs.pop())
    return lrs


CONFIGS = [
    LRSchedule(base_lr=5e-4, total_steps=40, warmup=7, kind="cosine"),
    LRSchedule(base_lr=1e-3, total_steps=25, warmup=0, kind="cosine"),
    LRSchedule(base_lr=3e-3, total_steps=13, warmup=13, kind="cosine"),
    LRSchedule(base_lr=2e-4, total_steps=30, warmup=4, kind="const"),
    LRSchedule(base_lr=1e-3, total_steps=36, warmup=5, kind="const-cooldown",
               cooldown_steps=12, cooldown_power=1.0, cooldown_end_lr=0.0),
    LRSchedule(base_lr=1e-3, total_steps=36, warmup=3, kind="const-cooldown",
               cooldown_steps=9, cooldown_power=2.0, cooldown_end_lr=1e-5),
    LRSchedule(base_lr=1e-3, total_steps=20, warmup=10, kind="const-cooldown",
               cooldown_steps=15, cooldown_power=0.5, cooldown_end_lr=1e-4),
]


@pytest.mark.parametrize("schedule", CONFIGS, ids=lambda s: f"{s.kind}-w{s.warmup}-T{s.total_steps}")
def test_lr_at_equals_open_clip_at_every_step(schedule: LRSchedule) -> None:
    expected = _open_clip_lrs(schedule)
    assert [schedule.lr_at(step) for step in range(schedule.total_steps)] == expected


def test_checkpoint_lr_is_lr_of_the_next_update_and_last_update_at_the_end() -> None:
    s = CONFIGS[0]
    for t in range(s.total_steps):
        assert s.checkpoint_lr(t) == s.lr_at(t)
    assert s.checkpoint_lr(s.total_steps) == s.lr_at(s.total_steps - 1)
    assert s.checkpoint_lr(s.total_steps) > 0


def test_warmup_and_cosine_values_by_formula() -> None:
    s = LRSchedule(base_lr=1.0, total_steps=10, warmup=4)
    assert s.lr_at(0) == pytest.approx(0.25)
    assert s.lr_at(3) == pytest.approx(1.0)
    assert s.lr_at(4) == pytest.approx(1.0)
    assert s.lr_at(7) == pytest.approx(0.5 * (1 + math.cos(math.pi * 3 / 6)))


@pytest.mark.parametrize("kwargs", [dict(kind="linear"), dict(total_steps=0), dict(warmup=-1)])
def test_invalid_schedules_are_rejected(kwargs: dict) -> None:
    base = dict(base_lr=1e-3, total_steps=10, warmup=0)
    with pytest.raises(ValueError):
        LRSchedule(**{**base, **kwargs})


def test_to_dict_round_trips() -> None:
    for s in CONFIGS:
        assert LRSchedule(**s.to_dict()) == s
