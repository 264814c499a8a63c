"""The prepare stage: one Ray task per checkpoint computes u_t, g_t, w_t.

Outputs in ``<run>/prepared/``: ``bank.pt`` (the negative bank's uids, uint8 images and
captions), ``ckpt_XXX.pt`` per checkpoint (u, g, w, Adam preconditioner) and, when the
unrolled score is computed, ``unrolled.pt`` (the direction acc_k of every checkpoint — one
task after the others, since the recursion runs backward over the checkpoints), each stamped
with the prepare fingerprint (trajectory + data + target + settings). A file with the current
fingerprint is reused; one with another fingerprint is refused.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import torch

from pipeline.config import RunConfig
from pipeline.data.pairs import PairTable, in_holdout, load_pairs, sample_pairs
from pipeline.data.shards import expand_shards, load_sizes
from pipeline.errors import UsageError
from pipeline.influence.prepare import PreparedCheckpoint
from pipeline.influence.scores import METHOD_COMPONENTS
from pipeline.influence.unrolled import UnrolledSettings
from pipeline.io.atomic import atomic_path
from pipeline.io.layout import BANK_FILE, UNROLLED_FILE, RunLayout, prepared_checkpoint_name
from pipeline.io.storage import StorageOptions, StoragePath, as_path, read_torch
from pipeline.model.clip import resolve_model_config
from pipeline.model.scorer import InfluenceSettings, PreparedTrajectory, UnrolledPrepared, segment_lrs, split_bank
from pipeline.model.trajectory import Trajectory
from pipeline.runtime.executor import Executor, Resources
from pipeline.stages.trajectory import load_trajectory, trajectory_location

log = logging.getLogger(__name__)


def influence_settings(config: RunConfig) -> InfluenceSettings:
    """The scoring settings of a run (score + target sections)."""
    score, target = config.score, require_target(config)
    return InfluenceSettings(
        c_mode=score.c_mode, hvp=score.hvp, eps=score.eps, bank_size=target.bank_size,
        proxy_batches=score.proxy_batches, proxy_batch_size=score.proxy_batch_size,
        batch_size=score.batch_size, seed=target.seed, components=METHOD_COMPONENTS[score.method],
        unrolled=UnrolledSettings(score.unrolled.lanczos_steps, score.unrolled.f, score.unrolled.proxy_batches),
        adam=score.adam, dtype=score.dtype, compile=score.compile,
        checkpoints=tuple(score.checkpoints) if score.checkpoints is not None else None)


def require_target(config: RunConfig):
    if config.target is None:
        raise UsageError("target: required to score (give target.shards or target.holdout_fraction)")
    return config.target


def score_device(config: RunConfig) -> str:
    """Device from the config, never from probing the driver: cuda iff the actor has GPUs."""
    if config.score.device != "auto":
        return config.score.device
    return "cuda" if config.resources.num_gpus > 0 else "cpu"


def worker_threads(config: RunConfig) -> int:
    """torch threads per worker: ``resources.threads`` or ceil(num_cpus) — fixed by the config,
    so float reductions (and hence scores) are the same under every executor."""
    import math

    return config.resources.threads or max(1, math.ceil(config.resources.num_cpus))


def _image_size(trajectory: Trajectory) -> int:
    cfg = trajectory.model.get("config") or resolve_model_config(trajectory.model["name"])
    size = cfg["vision_cfg"]["image_size"]
    return int(size[0] if isinstance(size, (list, tuple)) else size)


def load_target(config: RunConfig, image_size: int) -> PairTable:
    """The target set's pairs (own shards, or the held-out pairs of the corpus)."""
    target = require_target(config)
    if target.shards is not None:
        sizes = load_sizes(target.sizes, config.storage) if target.sizes else None
        return load_pairs(expand_shards(target.shards), image_size, sizes=sizes,
                          max_samples=target.max_pairs, seed=target.seed, storage=config.storage)
    urls = expand_shards(config.data.shards)
    sizes = load_sizes(config.data.sizes, config.storage) if config.data.sizes else None
    keep = partial(in_holdout, fraction=target.holdout_fraction, seed=target.seed)
    return sample_pairs(urls, image_size, target.max_pairs, target.seed, "target", sizes, keep, config.storage)


def load_proxy_pool(config: RunConfig, image_size: int) -> PairTable:
    """Training pairs from which each checkpoint's proxy batches are drawn (never target pairs)."""
    settings = influence_settings(config)
    target = require_target(config)
    urls = expand_shards(config.data.shards)
    sizes = load_sizes(config.data.sizes, config.storage) if config.data.sizes else None
    keep = partial(_not_holdout, fraction=target.holdout_fraction, seed=target.seed) \
        if target.holdout_fraction is not None else None
    count = 4 * max(settings.proxy_batches, settings.unrolled.proxy_batches) * settings.proxy_batch_size
    return sample_pairs(urls, image_size, count, settings.seed, "proxy-pool", sizes, keep, config.storage)


def _not_holdout(uid: str, fraction: float, seed: int) -> bool:
    return not in_holdout(uid, fraction, seed)


def prepare_fingerprint(config: RunConfig, trajectory: Trajectory) -> str:
    """Hash of everything the prepared vectors depend on."""
    payload = {"trajectory": trajectory.fingerprint(), "data": config.data.model_dump(mode="json"),
               "target": require_target(config).model_dump(mode="json"),
               "settings": {k: v for k, v in asdict(influence_settings(config)).items()
                            if k not in ("batch_size", "compile")}}  # scoring-only settings
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=list).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class PrepareTask:
    """Prepare checkpoint ``index`` of the (selected) trajectory checkpoints."""

    index: int


@dataclass
class PrepareStage:
    """Computes one checkpoint's shared vectors; resources come from the config."""

    config: RunConfig
    trajectory_dir: str
    out_dir: str
    fingerprint: str
    device: str
    resources: Resources

    def process(self, task: PrepareTask) -> str:
        from pipeline.model.scorer import TrajectoryInfluence

        torch.set_num_threads(worker_threads(self.config))
        trajectory = load_trajectory(self.trajectory_dir, self.config.storage)
        influence = TrajectoryInfluence(trajectory, influence_settings(self.config), self.device)
        size = influence.image_size
        prepared, precond = influence.prepare_checkpoint(task.index, load_target(self.config, size),
                                                         load_proxy_pool(self.config, size))
        path = as_path(self.out_dir, self.config.storage) / prepared_checkpoint_name(task.index)
        with atomic_path(path) as tmp:
            torch.save({"fingerprint": self.fingerprint, "step": influence.checkpoints[task.index].step,
                        "u": _cpu(prepared.u), "g": _cpu(prepared.g), "w": _cpu(prepared.w),
                        "precond": _cpu(precond),
                        "target_loss": prepared.target_loss, "hvp": prepared.hvp}, tmp)
        return str(path)

    def process_unrolled(self, task: "UnrolledTask") -> str:
        """The unrolled directions of every checkpoint (one sequential task) → ``unrolled.pt``."""
        from pipeline.model.scorer import TrajectoryInfluence

        torch.set_num_threads(worker_threads(self.config))
        trajectory = load_trajectory(self.trajectory_dir, self.config.storage)
        influence = TrajectoryInfluence(trajectory, influence_settings(self.config), self.device)
        size = influence.image_size
        unrolled = influence.prepare_unrolled(load_target(self.config, size), load_proxy_pool(self.config, size))
        path = as_path(self.out_dir, self.config.storage) / UNROLLED_FILE
        with atomic_path(path) as tmp:
            torch.save({"fingerprint": self.fingerprint, "directions": [_cpu(d) for d in unrolled.directions],
                        "adam_directions": [_cpu(d) for d in unrolled.adam_directions] if unrolled.adam_directions
                        else None,
                        # timings vary between runs: logged, not stored (the file is byte-deterministic)
                        "diagnostics": {k: v for k, v in unrolled.diagnostics.items() if k != "seconds"}}, tmp)
        return str(path)


@dataclass(frozen=True)
class UnrolledTask:
    """Compute the unrolled directions of all (selected) checkpoints."""


def _cpu(params: dict[str, torch.Tensor] | None) -> dict[str, torch.Tensor] | None:
    return {k: v.detach().cpu() for k, v in params.items()} if params is not None else None


def _stamp(path: StoragePath) -> str | None:
    if not path.is_file():
        return None
    return read_torch(path).get("fingerprint")


def run_prepare(config: RunConfig, run_dir: str | Path, trajectory: Trajectory,
                executor: Executor) -> StoragePath:
    """Write (or reuse) ``<run>/prepared/``: the bank, then one task per checkpoint."""
    out = RunLayout.of(run_dir, config.storage).prepared
    fingerprint = prepare_fingerprint(config, trajectory)
    settings = influence_settings(config)
    count = len(settings.checkpoints or trajectory.checkpoints)
    if settings.checkpoints and max(settings.checkpoints) >= len(trajectory.checkpoints):
        raise UsageError(f"score.checkpoints: index {max(settings.checkpoints)} out of range "
                         f"(trajectory has {len(trajectory.checkpoints)} checkpoints)")
    stamps = [_stamp(out / BANK_FILE)] + [_stamp(out / prepared_checkpoint_name(k)) for k in range(count)]
    stale = {s for s in stamps if s is not None and s != fingerprint}
    if stale:
        raise UsageError(f"{out} holds prepared vectors of another configuration ({sorted(stale)[0]} != "
                         f"{fingerprint}); use a new --run-dir or delete it")
    if stamps[0] is None:
        target = load_target(config, _image_size(trajectory))
        bank_idx, _ = split_bank(target, settings.bank_size, settings.seed)
        with atomic_path(out / BANK_FILE) as tmp:
            torch.save({"fingerprint": fingerprint, "uids": [target.uids[i] for i in bank_idx],
                        "images": target.images[bank_idx].clone(),
                        "captions": [target.captions[i] for i in bank_idx],
                        "target_pairs": len(target) - len(bank_idx)}, tmp)
    if "d" in settings.components:
        segment_lrs(trajectory, [trajectory.checkpoints[k].step for k in (settings.checkpoints or range(count))])
        unrolled_stamp = _stamp(out / UNROLLED_FILE)
        if unrolled_stamp not in (None, fingerprint):
            raise UsageError(f"{out / UNROLLED_FILE} was prepared under another configuration; "
                             "use a new --run-dir or delete it")
    todo = [PrepareTask(k) for k in range(count) if stamps[k + 1] is None]
    resources = Resources(config.resources.num_cpus, config.resources.num_gpus)
    stage = PrepareStage(config, trajectory_location(trajectory), str(out), fingerprint, score_device(config),
                         resources)
    if todo:
        executor.map(stage.process, todo, resources)
    if "d" in settings.components and not (out / UNROLLED_FILE).is_file():
        executor.map(stage.process_unrolled, [UnrolledTask()], resources)
    log.info("prepared %d checkpoints in %s (%d computed now)", count, out, len(todo))
    return out


def load_prepared_dir(directory: str | StoragePath, count: int,
                      storage: StorageOptions | None = None) -> tuple[PreparedTrajectory, str]:
    """Read ``bank.pt`` and ``ckpt_000..`` back into a :class:`PreparedTrajectory`."""
    d = as_path(directory, storage)
    bank = read_torch(d / BANK_FILE)
    prepared, preconds = [], []
    for k in range(count):
        obj = read_torch(d / prepared_checkpoint_name(k))
        if obj["fingerprint"] != bank["fingerprint"]:
            raise UsageError(f"{d}: checkpoint {k} was prepared under another configuration")
        prepared.append(PreparedCheckpoint(obj["u"], obj["g"], obj["w"], obj["hvp"], obj["target_loss"]))
        preconds.append(obj["precond"])
    unrolled = None
    if (d / UNROLLED_FILE).is_file():
        obj = read_torch(d / UNROLLED_FILE)
        if obj["fingerprint"] != bank["fingerprint"] or len(obj["directions"]) != count:
            raise UsageError(f"{d}: {UNROLLED_FILE} was prepared under another configuration")
        unrolled = UnrolledPrepared(obj["directions"], obj["adam_directions"], obj["diagnostics"])
    return (PreparedTrajectory(bank["uids"], bank["images"], bank["captions"], prepared, preconds, unrolled),
            bank["fingerprint"])
