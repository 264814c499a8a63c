"""Proxy CLIP training: a short deterministic open_clip run with checkpoints.

The visiting order is a function of (uid, seed) only: epoch ``e`` visits the training pairs
sorted by ``sample_rank(uid, seed, e)`` and batches are consecutive slices of the stream of
epochs. Excluding uids therefore removes exactly those pairs from the stream and leaves the
relative order of all others — and the initial weights, the schedule and the number of
steps — unchanged: the setting leave-one-out and subset retraining need.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import torch

from pipeline.config import TrainConfig
from pipeline.data.pairs import NO_UID_STATUSES, PairTable, in_holdout, load_pairs, rank_order
from pipeline.data.uids import DEFAULT_UID_FROM, UID_SETTING
from pipeline.errors import UsageError
from pipeline.io.atomic import atomic_path
from pipeline.io.storage import as_path
from pipeline.model.clip import build_clip, context_length, image_size, model_spec, normalize_images, tokenize
from pipeline.model.schedule import LRSchedule
from pipeline.model.trajectory import CheckpointRef, Trajectory, load_checkpoint_state

log = logging.getLogger(__name__)


def epoch_order(uids: Sequence[str], seed: int, epoch: int) -> list[int]:
    """Indices of ``uids`` in the order epoch ``epoch`` visits them."""
    return rank_order(uids, seed, f"epoch{epoch}")


def batch_indices(uids: Sequence[str], seed: int, batch_size: int, steps: int) -> Iterator[list[int]]:
    """The index batches of ``steps`` optimizer steps over the stream of epochs."""
    if not uids:
        raise UsageError("no training pairs left (all excluded or none loaded)")
    pending: list[int] = []
    epoch = 0
    for _ in range(steps):
        while len(pending) < batch_size:
            pending.extend(epoch_order(uids, seed, epoch))
            epoch += 1
        yield pending[:batch_size]
        pending = pending[batch_size:]


def read_uid_list(path: str | os.PathLike) -> set[str]:
    """uids from a DataComp ``.npy`` (dtype ``u8,u8``) or a text file with one uid per line."""
    p = Path(path)
    if p.suffix == ".npy":
        arr = np.load(p)
        return {f"{int(hi):016x}{int(lo):016x}" for hi, lo in arr.tolist()}
    return {line.strip() for line in p.read_text().splitlines() if line.strip()}


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """open_clip's convention: no weight decay on gains, biases, norms and logit_scale."""
    def no_decay(name: str, p: torch.Tensor) -> bool:
        return p.ndim < 2 or "bn" in name or "ln" in name or "bias" in name or "logit_scale" in name

    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return [
        {"params": [p for n, p in named if no_decay(n, p)], "weight_decay": 0.0},
        {"params": [p for n, p in named if not no_decay(n, p)], "weight_decay": weight_decay},
    ]


def clip_batch_loss(model: torch.nn.Module, images: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE over the batch (open_clip's ClipLoss on one process)."""
    image_features, text_features, scale = model(images, tokens)
    logits = scale * image_features @ text_features.T
    labels = torch.arange(images.shape[0])
    loss_i = torch.nn.functional.cross_entropy(logits, labels)
    loss_t = torch.nn.functional.cross_entropy(logits.T, labels)
    return 0.5 * (loss_i + loss_t)


def config_fingerprint(cfg: TrainConfig, data_id: str, excluded: Iterable[str]) -> str:
    """Hash of everything that determines the trajectory: settings, data and exclusions."""
    payload = json.dumps({"train": cfg.model_dump(mode="json"), "data": data_id,
                          "excluded": sorted(excluded)}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def exclude_uids(table: PairTable, exclude: Iterable[str]) -> PairTable:
    """The pairs of ``table`` whose uid is not in ``exclude`` (order kept)."""
    excluded = set(exclude)
    return table.subset([i for i, u in enumerate(table.uids) if u not in excluded])


def lr_schedule(cfg: TrainConfig) -> LRSchedule:
    """The learning-rate schedule of a proxy run."""
    return LRSchedule(cfg.lr, cfg.steps, cfg.warmup, cfg.schedule)


SaveHook = Callable[[int, torch.nn.Module, torch.optim.Optimizer], None]


@dataclass(frozen=True)
class WarmStart:
    """Continue a run from one of its checkpoints: the step it was saved at and its open_clip
    checkpoint dict (``state_dict`` and ``optimizer``). Steps before ``step`` are not run."""

    step: int
    state: dict[str, Any]

    @classmethod
    def from_checkpoint(cls, trajectory: Trajectory, index: int) -> "WarmStart":
        """Checkpoint ``index`` of ``trajectory`` (it must hold the optimizer state)."""
        state = load_checkpoint_state(trajectory.checkpoint_path(index))
        if "optimizer" not in state:
            raise UsageError(f"checkpoint {trajectory.checkpoint_path(index)} holds no optimizer state: "
                             "a warm start needs it")
        return cls(trajectory.checkpoints[index].step, state)


def run_training(data: PairTable, cfg: TrainConfig, on_save: SaveHook | None = None,
                 log_every: int = 25, warm: WarmStart | None = None,
                 drop_from_batches: Iterable[str] = ()) -> tuple[torch.nn.Module, list[dict]]:
    """The proxy training loop on ``data`` (exclusions already applied): one loop for all callers.

    Seeds torch with ``cfg.seed``, builds the model, and runs ``cfg.steps`` AdamW steps over
    :func:`batch_indices`. ``on_save(step, model, optimizer)`` is called at every step of
    ``cfg.checkpoint_steps()`` (step 0 before the first update). Returns the final model and
    the per-step log rows (``step``, ``lr``, ``loss``).

    ``warm``: load that checkpoint's weights and optimizer state and run only the steps after it
    (the batches are the same as a run from step 0 would visit). ``drop_from_batches``: these
    uids stay in the visiting stream but are taken out of every batch they fall in (the other
    pairs' batches unchanged; a step whose batch is emptied makes no update) — the counterfactual
    first-order estimators model, where the stream exclusion of :func:`exclude_uids` shifts every
    later batch.
    """
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    model = build_clip(model_spec(cfg.model))
    if image_size(model) != data.images.shape[-1]:
        raise UsageError(f"pairs were loaded at {data.images.shape[-1]} px but model {cfg.model} "
                         f"expects {image_size(model)} px")
    tokens = tokenize(data.captions, context_length(model))
    optimizer = torch.optim.AdamW(_param_groups(model, cfg.weight_decay), lr=cfg.lr,
                                  betas=cfg.betas, eps=cfg.eps, fused=True)
    schedule = lr_schedule(cfg)
    first = 0
    if warm is not None:
        if not 0 <= warm.step <= cfg.steps:
            raise UsageError(f"warm start at step {warm.step} is outside the run's 0..{cfg.steps} steps")
        model.load_state_dict(warm.state["state_dict"])
        # a copy: the optimizer would update the loaded moment tensors in place, and one WarmStart
        # serves many retrains
        optimizer.load_state_dict(copy.deepcopy(warm.state["optimizer"]))
        first = warm.step
    dropped = set(drop_from_batches)
    save_steps = [s for s in cfg.checkpoint_steps() if s >= first] if on_save is not None else []
    log_rows: list[dict] = []
    model.train()
    start = time.perf_counter()
    if first in save_steps:
        on_save(first, model, optimizer)
    for step, idx in enumerate(batch_indices(data.uids, cfg.seed, cfg.batch_size, cfg.steps)):
        if step < first:
            continue
        if dropped:
            idx = [i for i in idx if data.uids[i] not in dropped]
        if not idx:
            if step + 1 in save_steps:
                on_save(step + 1, model, optimizer)
            continue
        lr = schedule.lr_at(step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss = clip_batch_loss(model, normalize_images(data.images[idx]), tokens[idx])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        if not math.isfinite(loss.item()):
            raise RuntimeError(f"training diverged at step {step} (loss {loss.item()})")
        log_rows.append({"step": step, "lr": lr, "loss": loss.item()})
        if log_every and ((step + 1) % log_every == 0 or step + 1 == cfg.steps):
            log.info("train step %d/%d loss %.4f lr %.2e (%.1f steps/s)", step + 1, cfg.steps,
                     loss.item(), lr, (step + 1) / (time.perf_counter() - start))
        if step + 1 in save_steps:
            on_save(step + 1, model, optimizer)
    return model, log_rows


def train_final(table: PairTable, cfg: TrainConfig, exclude: Iterable[str] = (),
                log_every: int = 0, warm: WarmStart | None = None,
                drop_from_batches: Iterable[str] = ()) -> torch.nn.Module:
    """The final model of the proxy run on ``table`` minus ``exclude``, nothing written.

    Same loop, order and initialisation as :func:`train_proxy`: its parameters equal those of
    the last checkpoint of ``train_proxy`` with the same arguments when that checkpoint is at
    ``cfg.steps`` (for leave-out retraining). ``warm`` and ``drop_from_batches``: see
    :func:`run_training`.
    """
    return run_training(exclude_uids(table, exclude), cfg, log_every=log_every, warm=warm,
                        drop_from_batches=drop_from_batches)[0]


def train_proxy(table: PairTable, cfg: TrainConfig, out_dir: str | os.PathLike,
                exclude: Iterable[str] = (), data_id: str = "",
                log_every: int = 25) -> Trajectory:
    """Train a proxy CLIP on ``table`` (minus ``exclude``) and save its trajectory to ``out_dir``.

    Writes ``trajectory.json``, ``checkpoints/step_XXXXXX.pt`` (open_clip format:
    ``epoch``, ``name``, ``state_dict``, ``optimizer``, plus ``step`` and ``lr``) and
    ``train_log.jsonl``, all into a temporary directory renamed onto ``out_dir`` at the end.
    """
    excluded = set(exclude)
    data = exclude_uids(table, excluded)
    schedule = lr_schedule(cfg)
    fingerprint = config_fingerprint(cfg, data_id, excluded)
    checkpoints: list[CheckpointRef] = []
    with atomic_path(out_dir) as tmp:
        (tmp / "checkpoints").mkdir(parents=True)

        def save(step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
            name = f"checkpoints/step_{step:06d}.pt"
            lr = schedule.checkpoint_lr(step)
            torch.save({"epoch": step * cfg.batch_size // len(data), "name": f"proxy-{fingerprint}",
                        "step": step, "lr": lr, "state_dict": model.state_dict(),
                        "optimizer": optimizer.state_dict()}, tmp / name)
            checkpoints.append(CheckpointRef(name, step, lr))

        _, log_rows = run_training(data, cfg, save, log_every)
        (tmp / "train_log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in log_rows))
        trajectory = Trajectory(
            model=model_spec(cfg.model), num_samples=len(data), total_steps=cfg.steps,
            batch_size=cfg.batch_size,
            optimizer={"name": "adamw", "lr": cfg.lr, "betas": list(cfg.betas), "eps": cfg.eps,
                       "weight_decay": cfg.weight_decay},
            schedule=schedule.to_dict(), checkpoints=checkpoints, seed=cfg.seed,
            source={"kind": "proxy", "fingerprint": fingerprint, "data": data_id,
                    "num_excluded": len(table) - len(data), "train": cfg.model_dump(mode="json")},
            root=as_path(out_dir),
        )
        trajectory.save(tmp)
    return trajectory


def data_identity(urls: Sequence[str], sizes: dict[str, int] | None,
                  holdout: tuple[float, int] | None = None, uid_from: Sequence[str] = DEFAULT_UID_FROM) -> str:
    """A short identity of the training data (shard URLs, recorded counts, held-out fraction, uid rule)."""
    payload = json.dumps({"urls": list(urls), "sizes": sizes or {}, "uid_from": list(uid_from),
                          **({"holdout": list(holdout)} if holdout else {})}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def resolve_exclusions(cfg: TrainConfig, exclude: Iterable[str] = ()) -> set[str]:
    """The uids to leave out: those given plus those in ``cfg.exclude_uids``."""
    excluded = set(exclude)
    if cfg.exclude_uids:
        excluded |= read_uid_list(cfg.exclude_uids)
    return excluded


def proxy_fingerprint(urls: Sequence[str], cfg: TrainConfig, sizes: dict[str, int] | None = None,
                      exclude: Iterable[str] = (), holdout: tuple[float, int] | None = None,
                      uid_from: Sequence[str] = DEFAULT_UID_FROM) -> str:
    """The fingerprint :func:`train_from_shards` records for these inputs."""
    return config_fingerprint(cfg, data_identity(urls, sizes, holdout, uid_from), resolve_exclusions(cfg, exclude))


def train_from_shards(urls: Sequence[str], cfg: TrainConfig, out_dir: str | os.PathLike,
                      sizes: dict[str, int] | None = None, exclude: Iterable[str] = (),
                      holdout: tuple[float, int] | None = None, storage: Any = None,
                      uid_from: Sequence[str] = DEFAULT_UID_FROM) -> Trajectory:
    """Load pairs from ``urls`` at the model's resolution and run :func:`train_proxy`.

    ``holdout=(fraction, seed)`` leaves the held-out target pairs (:func:`in_holdout`) out
    of training, so the target set V is never trained on. ``uid_from``: the uid rule
    (:mod:`pipeline.data.uids`); when no pair has a uid by it, a :class:`UsageError` names the
    setting.
    """
    excluded = resolve_exclusions(cfg, exclude)
    size = int(model_spec(cfg.model)["config"]["vision_cfg"]["image_size"])
    table = load_pairs(urls, size, sizes=sizes, max_samples=cfg.max_samples, seed=cfg.seed, storage=storage,
                       uid_from=uid_from)
    check_uids_found(table, uid_from, "training")
    out_dir = as_path(out_dir, storage)
    if holdout is not None:
        table = table.subset([i for i, u in enumerate(table.uids) if not in_holdout(u, *holdout)])
    log.info("loaded %d pairs from %d shards (%d excluded)", len(table), len(urls),
             sum(u in excluded for u in table.uids))
    return train_proxy(table, cfg, out_dir, excluded, data_identity(urls, sizes, holdout, uid_from))


def check_uids_found(table: PairTable, uid_from: Sequence[str], what: str) -> None:
    """Refuse (one line naming ``data.uid_from``) a load of ``what`` pairs where no pair is usable
    and some had no uid by the rule: the setting, not the data, is what to change."""
    no_uid = sum(table.skipped.get(s, 0) for s in NO_UID_STATUSES)
    if len(table) == 0 and no_uid:
        raise UsageError(f"no {what} pairs: {no_uid} of {sum(table.skipped.values())} pairs read have no uid by "
                         f"{UID_SETTING} {list(uid_from)} (skipped: {table.skipped}); add a source to "
                         f"{UID_SETTING} (json: DataComp uid, url: img2dataset's url, image: the image bytes)")
