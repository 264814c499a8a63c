"""Proxy training: schedule-true checkpoints, determinism, uid exclusion changes only what it must."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from pipeline.config import TrainConfig
from pipeline.data.pairs import load_pairs
from pipeline.data.shards import expand_shards, load_sizes
from pipeline.model.clip import build_clip
from pipeline.model.schedule import LRSchedule
from pipeline.errors import UsageError
from pipeline.model.train import (WarmStart, batch_indices, run_training, train_final, train_from_shards,
                                    train_proxy)
from pipeline.model.trajectory import Trajectory, load_checkpoint_state

CFG = TrainConfig(model="tiny-clip-32", steps=6, batch_size=8, warmup=2, save_steps=[0, 2, 4, 6], seed=3)


@pytest.fixture(scope="module")
def table(tiny_corpus: Path):
    return load_pairs(expand_shards(str(tiny_corpus / "*.tar")), 32, load_sizes(tiny_corpus / "sizes.json"))


def _state(traj: Trajectory, i: int) -> dict[str, torch.Tensor]:
    return load_checkpoint_state(traj.checkpoint_path(i))["state_dict"]


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_order_is_a_function_of_uid_and_seed() -> None:
    uids = [f"{i:032x}" for i in range(20)]
    full = [b for batch in batch_indices(uids, 0, 4, 12) for b in batch]
    dropped = uids[7]
    rest = [u for u in uids if u != dropped]
    reduced = [rest[b] for batch in batch_indices(rest, 0, 4, 12) for b in batch]
    filtered = [uids[i] for i in full if uids[i] != dropped]
    assert len(filtered) < len(reduced) and reduced[: len(filtered)] == filtered
    shuffled = list(reversed(uids))  # same pairs, other positions: same visiting order
    assert [shuffled[b] for batch in batch_indices(shuffled, 0, 4, 12) for b in batch] == [uids[i] for i in full]
    assert [b for batch in batch_indices(uids, 1, 4, 12) for b in batch] != full


def test_checkpoints_follow_the_schedule(table, tmp_path: Path) -> None:
    traj = train_proxy(table, CFG, tmp_path / "traj")
    loaded = Trajectory.load(tmp_path / "traj")
    assert loaded == traj
    schedule = LRSchedule(CFG.lr, CFG.steps, CFG.warmup, "cosine")
    assert [c.step for c in loaded.checkpoints] == [0, 2, 4, 6]
    assert [c.lr for c in loaded.checkpoints] == [schedule.lr_at(0), schedule.lr_at(2), schedule.lr_at(4), schedule.lr_at(5)]
    assert loaded.num_samples == len(table) and loaded.total_steps == 6 and loaded.batch_size == 8
    for i, ckpt in enumerate(loaded.checkpoints):
        obj = load_checkpoint_state(loaded.checkpoint_path(i))  # weights_only=True
        assert {"epoch", "name", "state_dict", "optimizer"} <= set(obj)
        assert obj["step"] == ckpt.step
        model = build_clip(loaded.model)
        model.load_state_dict(obj["state_dict"])  # strict: an open_clip model of the spec
        if ckpt.step > 0:  # the optimizer's last applied lr is the schedule's lr at step t-1
            assert obj["optimizer"]["param_groups"][0]["lr"] == pytest.approx(schedule.lr_at(ckpt.step - 1))
    assert not _same(_state(loaded, 0), _state(loaded, 3))  # it trained


def test_training_is_deterministic(table, tmp_path: Path) -> None:
    a = train_proxy(table, CFG, tmp_path / "a")
    b = train_proxy(table, CFG, tmp_path / "b")
    assert a.to_dict() == b.to_dict()
    for i in range(len(a.checkpoints)):
        assert _same(_state(a, i), _state(b, i))


def test_excluding_uids_changes_only_what_it_must(table, tmp_path: Path) -> None:
    full = train_proxy(table, CFG, tmp_path / "full")
    # The uid first visited at step 3 (0-based): checkpoints up to step 3 must not change.
    order = list(batch_indices(table.uids, CFG.seed, CFG.batch_size, CFG.steps))
    seen_before = {table.uids[i] for batch in order[:3] for i in batch}
    victim = next(table.uids[i] for i in order[3] if table.uids[i] not in seen_before)
    loo = train_proxy(table, CFG, tmp_path / "loo", exclude=[victim])
    assert loo.num_samples == full.num_samples - 1
    assert [(c.step, c.lr) for c in loo.checkpoints] == [(c.step, c.lr) for c in full.checkpoints]
    assert _same(_state(full, 0), _state(loo, 0)) and _same(_state(full, 1), _state(loo, 1))  # steps 0, 2
    assert not _same(_state(full, 3), _state(loo, 3))  # step 6: the batch at step 3 differs
    absent = train_proxy(table, CFG, tmp_path / "absent", exclude=["f" * 32])  # uid not in the data
    for i in range(len(full.checkpoints)):
        assert _same(_state(full, i), _state(absent, i))


def test_train_final_is_the_same_loop(table, tmp_path: Path) -> None:
    victim = table.uids[7]
    traj = train_proxy(table, CFG, tmp_path / "loo", exclude=[victim])
    final = train_final(table, CFG, exclude=[victim])  # nothing written, same run
    assert _same(final.state_dict(), _state(traj, len(traj.checkpoints) - 1))
    assert not _same(train_final(table, CFG).state_dict(), final.state_dict())


def _states(table, cfg: TrainConfig, **kwargs) -> dict[int, dict[str, torch.Tensor]]:
    """Every saved state of one run_training call, by step."""
    states: dict[int, dict[str, torch.Tensor]] = {}

    def keep(step: int, model: torch.nn.Module, optimizer) -> None:
        states[step] = {k: v.clone() for k, v in model.state_dict().items()}

    run_training(table, cfg, keep, log_every=0, **kwargs)
    return states


def test_warm_start_continues_the_run_exactly(table, tmp_path: Path) -> None:
    traj = train_proxy(table, CFG, tmp_path / "full")
    for index in (0, 1, 2):  # steps 0, 2, 4: the continuation is the same run, bit for bit
        warm = WarmStart.from_checkpoint(traj, index)
        assert warm.step == traj.checkpoints[index].step
        assert _same(train_final(table, CFG, warm=warm).state_dict(), _state(traj, 3))
    once = WarmStart.from_checkpoint(traj, 1)  # one warm start serves many retrains: it is not consumed
    assert all(_same(train_final(table, CFG, warm=once).state_dict(), _state(traj, 3)) for _ in range(2))
    states = _states(table, CFG, warm=WarmStart.from_checkpoint(traj, 1))
    assert sorted(states) == [2, 4, 6] and _same(states[4], _state(traj, 2))
    bare = tmp_path / "bare.pt"
    torch.save({"state_dict": _state(traj, 1)}, bare)
    traj.checkpoints[1] = dataclasses.replace(traj.checkpoints[1], path=str(bare))
    with pytest.raises(UsageError, match="no optimizer state"):
        WarmStart.from_checkpoint(traj, 1)


def test_drop_from_batches_changes_only_the_batches_it_falls_in(table) -> None:
    cfg = CFG.model_copy(update={"save_steps": [0, 2, 4, 5, 6]})
    order = list(batch_indices(table.uids, cfg.seed, cfg.batch_size, cfg.steps))  # 48 pairs: one epoch
    victim = table.uids[order[4][0]]  # visited at step 4 (0-based) only
    full, dropped = _states(table, cfg), _states(table, cfg, drop_from_batches=[victim])
    assert all(_same(full[s], dropped[s]) for s in (0, 2, 4))  # before its batch: unchanged
    assert not _same(full[5], dropped[5])
    # Stream exclusion shifts the later batches; dropping from the batch does not.
    assert not _same(_states(table, cfg, drop_from_batches=[victim])[6],
                     run_training(table.subset([i for i, u in enumerate(table.uids) if u != victim]), cfg,
                                  log_every=0)[0].state_dict())
    emptied = [table.uids[i] for i in order[5]]  # the last batch emptied: no update at that step
    last = _states(table, cfg, drop_from_batches=emptied)
    assert _same(last[6], last[5]) and _same(last[5], full[5])


def test_warm_start_with_a_drop_equals_the_run_from_scratch(table, tmp_path: Path) -> None:
    order = list(batch_indices(table.uids, CFG.seed, CFG.batch_size, CFG.steps))
    victim = table.uids[order[5][3]]  # visited at step 5: after checkpoint 2 (step 4)
    traj = train_proxy(table, CFG, tmp_path / "full")
    warm = train_final(table, CFG, warm=WarmStart.from_checkpoint(traj, 2), drop_from_batches=[victim])
    scratch = train_final(table, CFG, drop_from_batches=[victim])
    assert _same(warm.state_dict(), scratch.state_dict())
    assert not _same(warm.state_dict(), _state(traj, 3))


def test_exclude_file_and_max_samples(tiny_corpus: Path, tmp_path: Path) -> None:
    urls = expand_shards(str(tiny_corpus / "*.tar"))
    table = load_pairs(urls, 32)
    uid_file = tmp_path / "uids.txt"
    uid_file.write_text("\n".join(table.uids[:5]) + "\n")
    cfg = CFG.model_copy(update={"exclude_uids": str(uid_file), "max_samples": 40, "save_steps": [6]})
    traj = train_from_shards(urls, cfg, tmp_path / "t")
    sampled = load_pairs(urls, 32, max_samples=40, seed=cfg.seed)
    assert traj.num_samples == 40 - len(set(sampled.uids) & set(table.uids[:5]))
    assert traj.source["kind"] == "proxy" and traj.source["num_excluded"] == 40 - traj.num_samples
