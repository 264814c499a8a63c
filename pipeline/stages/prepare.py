"""The prepare stage: one Ray task per checkpoint computes u_t, g_t, w_t.

Outputs in ``<run>/prepared/``: ``bank.pt`` (the negative bank's uids, uint8 images and
captions), ``ckpt_XXX.pt`` per checkpoint (u, g, w, Adam preconditioner), ``embeddings.pt``
(the embedding columns' reference sets at the last checkpoint: a corpus sample's embeddings,
its negative pools, the target images' embeddings, the temperature, the k-means centroids)
and, when the unrolled score is computed, ``unrolled.pt`` (the direction acc_k of every
checkpoint — one task after the others, since the recursion runs backward over the checkpoints), each stamped
with the prepare fingerprint (trajectory + data + target + settings). A file with the current
fingerprint is reused; one with another fingerprint is refused.

Under ``score.checkpoint_window: falling`` the checkpoints are prepared first; their L_V
decides the window (:func:`scored_checkpoints`: the first checkpoints up to L_V's lowest),
and ``embeddings.pt`` and ``unrolled.pt`` are then computed over the window only (each records
how many checkpoints it covers; one of another window is computed again).
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, replace
from functools import partial
from typing import Any, Sequence

import torch

from pipeline.config import RunConfig, ZeroShotConfig
from pipeline.data.pairs import PairTable, in_holdout, json_field_by_uid, load_pairs, sample_pairs
from pipeline.data.shards import expand_shards, load_sizes
from pipeline.errors import UsageError
from pipeline.influence.prepare import PreparedCheckpoint
from pipeline.io.atomic import atomic_path
from pipeline.influence.embeddings import EmbeddingReference
from pipeline.io.layout import BANK_FILE, EMBEDDINGS_FILE, UNROLLED_FILE, prepared_checkpoint_name
from pipeline.io.storage import StorageOptions, StoragePath, as_path, is_remote, read_torch
from pipeline.model.clip import resolve_model_config
from pipeline.influence.window import checkpoint_window
from pipeline.model.scorer import (EMBEDDING_SAMPLE_SALT, InfluenceSettings, PreparedTrajectory, UnrolledPrepared,
                                   segment_lrs, settings_record, split_bank)
from pipeline.model.trajectory import Trajectory
from pipeline.runtime.executor import Executor, Resources
from pipeline.stages.context import RunContext, influence_settings, require_target
from pipeline.stages.trajectory import load_trajectory, trajectory_location

log = logging.getLogger(__name__)


def _image_size(trajectory: Trajectory) -> int:
    cfg = trajectory.model.get("config") or resolve_model_config(trajectory.model["name"])
    size = cfg["vision_cfg"]["image_size"]
    return int(size[0] if isinstance(size, (list, tuple)) else size)


def load_target(config: RunConfig, image_size: int, urls: Sequence[str], sizes: dict[str, int] | None) -> PairTable:
    """The target set's pairs: its own shards, or the held-out pairs of the input shards
    ``urls`` (with their ``sizes.json`` counts ``sizes``); with ``target.zero_shot``, each
    labelled by its json field (:func:`target_labels`)."""
    target = require_target(config)
    if target.shards is not None:
        sizes = load_sizes(target.sizes, config.storage) if target.sizes else None
        from pipeline.model.train import check_uids_found

        table = load_pairs(expand_shards(target.shards), image_size, sizes=sizes,
                           max_samples=target.max_pairs, seed=target.seed, storage=config.storage,
                           uid_from=config.data.uid_from)
        check_uids_found(table, config.data.uid_from, "target")
    else:
        keep = partial(in_holdout, fraction=target.holdout_fraction, seed=target.seed)
        table = sample_pairs(list(urls), image_size, target.max_pairs, target.seed, "target", sizes, keep,
                             config.storage, config.data.uid_from)
    if target.zero_shot is None:
        return table
    values = json_field_by_uid(list(dict.fromkeys(table.shards)), target.zero_shot.label_field, sizes,
                               config.storage, config.data.uid_from)
    return replace(table, labels=target_labels(table.uids, values, target.zero_shot))


def target_labels(uids: Sequence[str], values: dict[str, Any], zero_shot: ZeroShotConfig) -> list[int]:
    """The class index of each target pair from its json label ``values[uid]``: an index into
    ``zero_shot.classes`` or one of the class names. A missing or unknown label is a one-line
    UsageError naming the pair (the config's classes and the target set disagree)."""
    index = {name: i for i, name in enumerate(zero_shot.classes)}
    field, labels = zero_shot.label_field, []
    for uid in uids:
        if uid not in values:
            raise UsageError(f"target.zero_shot: target pair {uid} has no json field {field!r}")
        value = values[uid]
        if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < len(index):
            labels.append(value)
        elif isinstance(value, str) and value in index:
            labels.append(index[value])
        else:
            raise UsageError(f"target.zero_shot: json {field!r} = {value!r} of target pair {uid} is neither a class "
                             f"index (0..{len(index) - 1}) nor one of target.zero_shot.classes")
    return labels


def load_proxy_pool(config: RunConfig, image_size: int, urls: Sequence[str], sizes: dict[str, int] | None) -> PairTable:
    """Training pairs of ``urls`` from which each checkpoint's proxy batches are drawn (never
    target pairs)."""
    settings = influence_settings(config)
    count = 4 * max(settings.proxy_batches, settings.unrolled.proxy_batches) * settings.proxy_batch_size
    return _corpus_sample(config, image_size, urls, sizes, count, "proxy-pool")


def load_embedding_sample(config: RunConfig, image_size: int, urls: Sequence[str],
                          sizes: dict[str, int] | None) -> PairTable:
    """The corpus pairs (never target pairs) the embedding columns are computed against:
    ``score.embeddings.pool_pairs`` of them, drawn by seed."""
    count = influence_settings(config).embeddings.pool_pairs
    return _corpus_sample(config, image_size, urls, sizes, count, EMBEDDING_SAMPLE_SALT)


def _corpus_sample(config: RunConfig, image_size: int, urls: Sequence[str], sizes: dict[str, int] | None,
                   count: int, salt: str) -> PairTable:
    """Up to ``count`` training pairs of ``urls`` (never held-out target pairs), drawn by the
    scoring seed and ``salt``."""
    target = require_target(config)
    keep = partial(_not_holdout, fraction=target.holdout_fraction, seed=target.seed) \
        if target.holdout_fraction is not None else None
    return sample_pairs(list(urls), image_size, count, influence_settings(config).seed, salt, sizes, keep,
                        config.storage, config.data.uid_from)


def _not_holdout(uid: str, fraction: float, seed: int) -> bool:
    return not in_holdout(uid, fraction, seed)


def prepare_fingerprint(config: RunConfig, trajectory: Trajectory) -> str:
    """Hash of everything the prepared vectors depend on."""
    payload = {"trajectory": trajectory.fingerprint(), "data": config.data.model_dump(mode="json"),
               "target": require_target(config).fingerprint_record(),
               "settings": {k: v for k, v in settings_record(influence_settings(config)).items()
                            if k not in ("batch_size", "compile")}}  # scoring-only settings
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=list).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class PrepareTask:
    """Prepare checkpoint ``index`` of the (selected) trajectory checkpoints."""

    index: int


@dataclass(frozen=True)
class UnrolledTask:
    """Compute the unrolled directions of all (selected) checkpoints, or of the first
    ``checkpoints`` of them (the checkpoint window)."""

    checkpoints: int | None = None


@dataclass(frozen=True)
class EmbeddingTask:
    """Compute the embedding columns' reference sets at the last selected checkpoint, or at
    the last of the first ``checkpoints`` of them (the checkpoint window)."""

    checkpoints: int | None = None


@dataclass
class PrepareStage:
    """Computes the shared vectors: one checkpoint's (:class:`PrepareTask`) or the unrolled
    directions of all (:class:`UnrolledTask`). ``setup`` loads the checkpoints, the target set
    and the proxy pool (once: a second call keeps them)."""

    config: RunConfig
    urls: tuple[str, ...]
    sizes: dict[str, int] | None
    trajectory_dir: str
    out_dir: str
    fingerprint: str
    device: str
    threads: int
    resources: Resources

    def setup(self) -> None:
        from pipeline.model.scorer import TrajectoryInfluence

        if getattr(self, "_influence", None) is not None:
            return
        torch.set_num_threads(self.threads)
        trajectory = load_trajectory(self.trajectory_dir, self.config.storage)
        self._influence = TrajectoryInfluence(trajectory, influence_settings(self.config), self.device)
        size = self._influence.image_size
        self._target = load_target(self.config, size, self.urls, self.sizes)
        self._pool = load_proxy_pool(self.config, size, self.urls, self.sizes)

    def process(self, task: PrepareTask | UnrolledTask | EmbeddingTask) -> str:
        """Compute and write the task's file (atomically); return its path."""
        if isinstance(task, UnrolledTask):
            return self._write_unrolled(task.checkpoints)
        if isinstance(task, EmbeddingTask):
            return self._write_embeddings(task.checkpoints)
        return self._write_checkpoint(task.index)

    def _window(self, checkpoints: int | None):
        """The influence over all selected checkpoints, or over the first ``checkpoints``."""
        return self._influence if checkpoints is None else self._influence.first(checkpoints)

    def _write_embeddings(self, checkpoints: int | None = None) -> str:
        """The embedding columns' reference sets → ``embeddings.pt`` (with the window's size
        when there is one)."""
        sample = load_embedding_sample(self.config, self._influence.image_size, self.urls, self.sizes)
        ref = self._window(checkpoints).prepare_embeddings(self._target, sample)
        path = as_path(self.out_dir, self.config.storage) / EMBEDDINGS_FILE
        window = {"checkpoints": checkpoints} if checkpoints is not None else {}
        with atomic_path(path) as tmp:
            torch.save({"fingerprint": self.fingerprint, **embedding_payload(ref), **window}, tmp)
        return str(path)

    def _write_checkpoint(self, index: int) -> str:
        prepared, precond = self._influence.prepare_checkpoint(index, self._target, self._pool)
        path = as_path(self.out_dir, self.config.storage) / prepared_checkpoint_name(index)
        with atomic_path(path) as tmp:
            torch.save({"fingerprint": self.fingerprint, "step": self._influence.checkpoints[index].step,
                        "u": _cpu(prepared.u), "g": _cpu(prepared.g), "w": _cpu(prepared.w),
                        "precond": _cpu(precond),
                        "target_loss": prepared.target_loss, "hvp": prepared.hvp}, tmp)
        return str(path)

    def _write_unrolled(self, checkpoints: int | None = None) -> str:
        """The unrolled directions of every checkpoint (of the window, when there is one; one
        sequential task) → ``unrolled.pt``."""
        unrolled = self._window(checkpoints).prepare_unrolled(self._target, self._pool)
        path = as_path(self.out_dir, self.config.storage) / UNROLLED_FILE
        with atomic_path(path) as tmp:
            torch.save({"fingerprint": self.fingerprint, "directions": [_cpu(d) for d in unrolled.directions],
                        "adam_directions": [_cpu(d) for d in unrolled.adam_directions] if unrolled.adam_directions
                        else None,
                        # timings vary between runs: logged, not stored (the file is byte-deterministic)
                        "diagnostics": {k: v for k, v in unrolled.diagnostics.items() if k != "seconds"}}, tmp)
        return str(path)


def embedding_payload(ref: EmbeddingReference) -> dict:
    """The fields of ``embeddings.pt`` (besides the fingerprint)."""
    return {"sample_uids": ref.sample_uids, "sample_img": ref.sample_img, "sample_txt": ref.sample_txt,
            "pools": ref.pools, "target_img": ref.target_img, "temperature": ref.temperature,
            "centroids": ref.centroids}


def _cpu(params: dict[str, torch.Tensor] | None) -> dict[str, torch.Tensor] | None:
    return {k: v.detach().cpu() for k, v in params.items()} if params is not None else None


def _scalars(path: StoragePath) -> dict:
    """A prepared file's dict for its scalars (fingerprint, target loss): memory-mapped when
    local, so u, g, w are not read."""
    if is_remote(path):
        return read_torch(path)
    return torch.load(path, map_location="cpu", weights_only=True, mmap=True)


def _stamp(path: StoragePath) -> str | None:
    return _scalars(path).get("fingerprint") if path.is_file() else None


def plan_prepare(ctx: RunContext, trajectory: Trajectory,
                 fingerprint: str) -> tuple[list[PrepareTask | EmbeddingTask], UnrolledTask | None]:
    """The checkpoints still to prepare, the embedding references when due (and the unrolled
    task, when its file is due) under the prepare ``fingerprint``; writes the bank first when
    missing. Files of another configuration are refused with one line."""
    out = ctx.layout.prepared
    settings = ctx.influence_settings()
    count = len(settings.checkpoints or trajectory.checkpoints)
    if settings.checkpoints and max(settings.checkpoints) >= len(trajectory.checkpoints):
        raise UsageError(f"score.checkpoints: index {max(settings.checkpoints)} out of range "
                         f"(trajectory has {len(trajectory.checkpoints)} checkpoints)")
    stamps = [_stamp(out / BANK_FILE)] + [_stamp(out / prepared_checkpoint_name(k)) for k in range(count)] \
        + [_stamp(out / EMBEDDINGS_FILE)]
    stale = {s for s in stamps if s is not None and s != fingerprint}
    if stale:
        raise UsageError(f"{out} holds prepared vectors of another configuration ({sorted(stale)[0]} != "
                         f"{fingerprint}); use a new --run-dir or delete it")
    if stamps[0] is None:
        _write_bank(ctx, trajectory, fingerprint)
    unrolled = None
    if "d" in settings.components:
        segment_lrs(trajectory, [trajectory.checkpoints[k].step for k in (settings.checkpoints or range(count))])
        unrolled_stamp = _stamp(out / UNROLLED_FILE)
        if unrolled_stamp not in (None, fingerprint):
            raise UsageError(f"{out / UNROLLED_FILE} was prepared under another configuration; "
                             "use a new --run-dir or delete it")
        unrolled = UnrolledTask() if unrolled_stamp is None else None
    todo: list[PrepareTask | EmbeddingTask] = [PrepareTask(k) for k in range(count) if stamps[k + 1] is None]
    return todo + ([EmbeddingTask()] if stamps[-1] is None else []), unrolled


def _write_bank(ctx: RunContext, trajectory: Trajectory, fingerprint: str) -> None:
    """``prepared/bank.pt``: the negative bank's uids, uint8 images and captions."""
    settings = ctx.influence_settings()
    target = load_target(ctx.config, _image_size(trajectory), ctx.urls, ctx.sizes)
    bank_idx, _ = split_bank(target, settings.bank_size, settings.seed)
    with atomic_path(ctx.layout.bank_file()) as tmp:
        torch.save({"fingerprint": fingerprint, "uids": [target.uids[i] for i in bank_idx],
                    "images": target.images[bank_idx].clone(),
                    "captions": [target.captions[i] for i in bank_idx],
                    "target_pairs": len(target) - len(bank_idx)}, tmp)


def run_prepare(ctx: RunContext, trajectory: Trajectory, executor: Executor) -> StoragePath:
    """Write (or reuse) ``<run>/prepared/``: the bank, then one task per checkpoint still to
    prepare (Ray tasks: they reuse Ray's worker processes, and each loads what it needs; in
    process the stage is set up once), then the unrolled directions (every checkpoint in one
    task). Under a checkpoint window the embedding references wait for the checkpoints: their
    L_V decides the window (:func:`prepare_window`)."""
    out = ctx.layout.prepared
    fingerprint = prepare_fingerprint(ctx.config, trajectory)
    todo, unrolled = plan_prepare(ctx, trajectory, fingerprint)
    stage = PrepareStage(config=ctx.config, urls=ctx.urls, sizes=ctx.sizes,
                         trajectory_dir=trajectory_location(trajectory), out_dir=str(out),
                         fingerprint=fingerprint, device=ctx.device, threads=ctx.threads,
                         resources=ctx.model_resources)
    computed = len(todo)
    if ctx.influence_settings().checkpoint_window != "all":
        computed = sum(isinstance(t, PrepareTask) for t in todo)
        todo, unrolled = prepare_window(ctx, trajectory, executor, stage, todo)
        computed += len(todo)
    if todo:
        executor.run_stage(stage, todo)
    if unrolled is not None:
        executor.run_stage(stage, [unrolled])
    count = len(ctx.influence_settings().checkpoints or trajectory.checkpoints)
    log.info("prepared %d checkpoints in %s (%d files computed now)", count, out, computed)
    return out


def prepare_window(ctx: RunContext, trajectory: Trajectory, executor: Executor, stage: PrepareStage,
                   todo: Sequence[PrepareTask | EmbeddingTask]) -> tuple[list[EmbeddingTask], UnrolledTask | None]:
    """Run the checkpoint tasks of ``todo``, decide the window from their L_V, and return the
    embedding and unrolled tasks of the window still due (a file covering another number of
    checkpoints is due again)."""
    checkpoints = [t for t in todo if isinstance(t, PrepareTask)]
    if checkpoints:
        executor.run_stage(stage, checkpoints)
    scored = scored_checkpoints(ctx, trajectory)
    count, out = len(scored), ctx.layout.prepared
    log.info("checkpoint window %s: scoring checkpoints %s of %s", ctx.config.score.checkpoint_window,
             list(scored), list(selected_checkpoints(ctx.influence_settings(), trajectory)))
    embeddings = [EmbeddingTask(count)] if _covers(out / EMBEDDINGS_FILE) != count else []
    due = "d" in ctx.influence_settings().components and _covers(out / UNROLLED_FILE) != count
    return embeddings, UnrolledTask(count) if due else None


def _covers(path: StoragePath) -> int | None:
    """How many checkpoints a prepared ``embeddings.pt`` or ``unrolled.pt`` of a checkpoint
    window covers (None when absent)."""
    if not path.is_file():
        return None
    obj = _scalars(path)
    return len(obj["directions"]) if "directions" in obj else obj.get("checkpoints")


def selected_checkpoints(settings: InfluenceSettings, trajectory: Trajectory) -> tuple[int, ...]:
    """The trajectory indices ``score.checkpoints`` names (default: all), in its order."""
    return tuple(settings.checkpoints or range(len(trajectory.checkpoints)))


def scored_checkpoints(ctx: RunContext, trajectory: Trajectory,
                       losses: dict[int, float] | None = None) -> tuple[int, ...]:
    """The trajectory indices the run scores: ``score.checkpoints`` (default all) and, under
    ``score.checkpoint_window: falling``, the first of them up to the one with the lowest L_V
    (:func:`pipeline.influence.window.checkpoint_window`). ``losses``: L_V by trajectory index
    (default: read from the prepared checkpoint files, which must all be there)."""
    settings = ctx.influence_settings()
    selected = selected_checkpoints(settings, trajectory)
    if settings.checkpoint_window == "all":
        return selected
    losses = prepared_target_losses(ctx, trajectory) if losses is None else losses
    missing = [i for i in selected if i not in losses]
    if missing:
        raise UsageError(f"score.checkpoint_window: '{settings.checkpoint_window}' needs L_V at every checkpoint "
                         f"from the prepare stage; checkpoint(s) {missing} are not prepared in {ctx.layout.prepared} "
                         "(run `diffin prepare` with this config and run dir first)")
    return selected[:len(checkpoint_window(settings.checkpoint_window, [losses[i] for i in selected]))]


def scoring_settings(ctx: RunContext, trajectory: Trajectory) -> InfluenceSettings:
    """The scoring settings with the checkpoint window applied: ``checkpoints`` are the
    scored ones (:func:`scored_checkpoints`); unchanged without a window."""
    settings = ctx.influence_settings()
    if settings.checkpoint_window == "all":
        return settings
    return replace(settings, checkpoints=scored_checkpoints(ctx, trajectory))


def prepared_target_losses(ctx: RunContext, trajectory: Trajectory) -> dict[int, float]:
    """L_V per trajectory checkpoint index, from ``<run>/prepared/ckpt_XXX.pt`` (written by this
    stage); checkpoints not prepared (yet, or under another configuration) are absent."""
    indices = selected_checkpoints(ctx.influence_settings(), trajectory)
    fingerprint = prepare_fingerprint(ctx.config, trajectory)
    losses: dict[int, float] = {}
    for k, index in enumerate(indices):
        path = ctx.layout.prepared_checkpoint(k)
        if not path.is_file():
            continue
        obj = _scalars(path)
        if obj.get("fingerprint") == fingerprint and obj.get("target_loss") is not None:
            losses[index] = float(obj["target_loss"])
    return losses


def load_prepared_dir(directory: str | StoragePath, count: int,
                      storage: StorageOptions | None = None) -> tuple[PreparedTrajectory, str]:
    """Read ``bank.pt`` and ``ckpt_000..`` (the first ``count``: all selected checkpoints, or
    those of the checkpoint window) back into a :class:`PreparedTrajectory`."""
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
    obj = read_torch(d / EMBEDDINGS_FILE)
    if obj["fingerprint"] != bank["fingerprint"] or obj.get("checkpoints", count) != count:
        raise UsageError(f"{d}: {EMBEDDINGS_FILE} was prepared under another configuration")
    embeddings = EmbeddingReference(**{k: v for k, v in obj.items() if k not in ("fingerprint", "checkpoints")})
    return (PreparedTrajectory(bank["uids"], bank["images"], bank["captions"], prepared, preconds, unrolled,
                               embeddings), bank["fingerprint"])
