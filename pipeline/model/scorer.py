"""Diff-In for open_clip trajectories: the facade the score stage and the benchmarks use.

``TrajectoryInfluence`` loads the model once and the m checkpoints' parameters, prepares
each checkpoint (negative bank, u_t, g_t, w_t — docs/METHOD.md) and then scores batches of
decoded pairs at every checkpoint, returning per-checkpoint components and the scores.
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, Sequence

import torch
from torch import Tensor
from torch.func import functional_call

from pipeline.data.pairs import PairTable, rank_order
from pipeline.errors import UsageError
from pipeline.influence.embeddings import EmbeddingReference, EmbeddingSettings, draw_pools, kmeans
from pipeline.influence.forward import CheckpointScorer, compiled_features_jvp, vectors_needed
from pipeline.influence.objective import CLIPBankObjective, PerSampleObjective, ZeroShotObjective, forward_mode_safe
from pipeline.influence.params import ParamDict, cast, from_vector, to_vector
from pipeline.influence.prepare import PreparedCheckpoint, prepare_checkpoint, prepare_unrolled
from pipeline.influence.scores import (ADAM_TWINS, METHOD_COMPONENTS, CheckpointWeights, ScoreContext,
                                        compute_columns, with_adam_twins)
from pipeline.influence.unrolled import AdamGeometry, UnrolledSettings, segment_updates
from pipeline.influence.window import CHECKPOINT_WINDOWS, CheckpointWindow, checkpoint_window
from pipeline.model.clip import build_clip, context_length, make_tokenizer, normalize_images
from pipeline.model.schedule import LRSchedule
from pipeline.model.trajectory import Trajectory, load_checkpoint_state

log = logging.getLogger(__name__)

EMBEDDING_SAMPLE_SALT = "embedding-sample"  # the corpus sample the embedding columns are computed against


@dataclass(frozen=True)
class ZeroShotTarget:
    """L_V as a zero-shot classification task (``target.zero_shot``): the prompts, class-major,
    ``prompts_per_class`` per class; the target pairs carry the labels (``PairTable.labels``)."""

    prompts: tuple[str, ...]
    prompts_per_class: int


@dataclass(frozen=True)
class InfluenceSettings:
    """How scores are computed (part of a run's configuration fingerprint)."""

    c_mode: Literal["fd", "exact"] = "fd"
    hvp: Literal["exact", "fd"] = "exact"
    eps: float = 1e-3
    bank_size: int = 255
    proxy_batches: int = 1
    proxy_batch_size: int = 128
    batch_size: int = 128
    seed: int = 0
    components: tuple[str, ...] = METHOD_COMPONENTS["all"]
    unrolled: UnrolledSettings = UnrolledSettings()
    adam: bool = False
    adam_eps_floor: float = 0.0  # P = 1/(√v̂ + max(ε, floor)): bounds Adam's preconditioner on rarely seen coordinates
    dtype: str = "float32"
    checkpoints: tuple[int, ...] | None = None  # indices into the trajectory; None = all
    checkpoint_window: CheckpointWindow = "all"  # falling: of those, only the ones up to L_V's lowest (prepare)
    compile: bool = False  # single-direction JVPs through torch.compile (one-off compile per shape)
    embeddings: EmbeddingSettings = EmbeddingSettings()  # the embedding columns' reference sets
    zero_shot: ZeroShotTarget | None = None  # L_V: the target pairs' CLIP loss (None) or a zero-shot task

    def __post_init__(self) -> None:
        if self.checkpoint_window not in CHECKPOINT_WINDOWS:
            raise ValueError(f"unknown checkpoint_window {self.checkpoint_window!r}; choose from {CHECKPOINT_WINDOWS}")

    @property
    def computed_components(self) -> tuple[str, ...]:
        """``components`` plus, with ``adam``, their optimizer-aware twins (what gets written)."""
        return with_adam_twins(self.components, self.adam)


OPT_IN_DEFAULTS: dict[str, Any] = {"checkpoint_window": "all", "zero_shot": None}  # added after fingerprints were recorded


def settings_record(settings: InfluenceSettings) -> dict[str, Any]:
    """``asdict(settings)`` for fingerprints and records: the opt-in settings
    (:data:`OPT_IN_DEFAULTS`) are left out at their default, so the fingerprints of runs made
    before they existed stay what they were."""
    record = asdict(settings)
    for name, default in OPT_IN_DEFAULTS.items():
        if record[name] == default:
            del record[name]
    return record


def checkpoint_params(state_dict: dict[str, Tensor], model: torch.nn.Module,
                      dtype: torch.dtype, device: str | torch.device) -> ParamDict:
    """The trainable parameters of ``model`` taken from a checkpoint's state dict."""
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    missing = [n for n in names if n not in state_dict]
    if missing:
        raise ValueError(f"checkpoint lacks parameters {missing[:3]} of the model spec")
    return {n: state_dict[n].to(device=device, dtype=dtype) for n in names}


def _no_decay(name: str, p: Tensor) -> bool:
    """open_clip's rule for parameters without weight decay (gains, biases, temperature)."""
    return p.ndim < 2 or "bn" in name or "ln" in name or "bias" in name or "logit_scale" in name


def _open_clip_param_order(model: torch.nn.Module) -> list[str]:
    """Parameter order of open_clip's AdamW groups (gains/biases first, then the rest)."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return [n for n, p in named if _no_decay(n, p)] + [n for n, p in named if not _no_decay(n, p)]


def adam_preconditioner(optimizer_state: dict, model: torch.nn.Module, betas: Sequence[float],
                        eps: float, dtype: torch.dtype, device: str | torch.device) -> ParamDict | None:
    """Adam's diagonal preconditioner P = 1/(√v̂ + ε) from a saved optimizer state, by name
    (pass a larger ``eps`` to floor it).

    Returns None when the state has no second moments (e.g. before the first step).
    """
    state = optimizer_state.get("state", {})
    order = _open_clip_param_order(model)
    shapes = dict((n, p.shape) for n, p in model.named_parameters())
    if len(state) != len(order):
        return None
    precond = {}
    for index, name in enumerate(order):
        entry = state[index]
        v = entry["exp_avg_sq"]
        if v.shape != shapes[name]:
            raise ValueError(f"optimizer state {index} has shape {tuple(v.shape)}, parameter {name} {tuple(shapes[name])}")
        step = float(entry["step"])
        v_hat = v / (1 - betas[1] ** step)
        precond[name] = (1.0 / (v_hat.sqrt() + eps)).to(device=device, dtype=dtype)
    return precond


def rank_select(table: PairTable, count: int, seed: int, salt: str) -> list[int]:
    """Indices of the ``count`` pairs ranked first by (uid, seed, salt) — never by position."""
    return rank_order(table.uids, seed, salt)[:count]


def split_bank(target: PairTable, bank_size: int, seed: int) -> tuple[list[int], list[int]]:
    """(bank indices, target-set indices): the bank is drawn by seed, V is the rest."""
    if len(target) <= bank_size:
        raise UsageError(f"target set has {len(target)} pairs; needs more than target.bank_size={bank_size} "
                         "(raise target.max_pairs / holdout_fraction or lower bank_size)")
    bank = rank_select(target, bank_size, seed, "bank")
    chosen = set(bank)
    return bank, [i for i in range(len(target)) if i not in chosen]


@dataclass
class UnrolledPrepared:
    """The unrolled score's direction per checkpoint (and in Adam's metric, when asked)."""

    directions: list[ParamDict]
    adam_directions: list[ParamDict] | None = None
    diagnostics: dict = field(default_factory=dict)


@dataclass
class PreparedTrajectory:
    """Everything scoring needs besides the model: the bank and per-checkpoint vectors."""

    bank_uids: list[str]
    bank_images: Tensor  # uint8 [K, 3, S, S]
    bank_captions: list[str]
    prepared: list[PreparedCheckpoint]
    preconditioners: list[ParamDict | None] = field(default_factory=list)
    unrolled: UnrolledPrepared | None = None
    embeddings: EmbeddingReference | None = None


def segment_lrs(trajectory: Trajectory, steps: Sequence[int]) -> list[list[float]]:
    """η_s of every update each checkpoint stands for (:func:`segment_updates`), from the
    trajectory's schedule; a trajectory without one cannot give the unrolled score."""
    if not trajectory.schedule:
        raise UsageError("the trajectory records no learning-rate schedule (trajectory.json 'schedule'); "
                         "the unrolled score needs the rate of every step")
    try:
        schedule = LRSchedule(**trajectory.schedule)
    except (TypeError, ValueError) as exc:
        raise UsageError(f"trajectory.json 'schedule' is malformed: {exc}") from None
    return [[schedule.lr_at(s) for s in seg] for seg in segment_updates(steps, trajectory.total_steps)]


def adam_geometry(precond: ParamDict, params: ParamDict, model: torch.nn.Module, weight_decay: float) -> AdamGeometry:
    """Adam's metric √P and the decoupled decay (open_clip's decay group only), flat in the
    order of ``params``."""
    decayed = {n for n, p in model.named_parameters() if p.requires_grad and not _no_decay(n, p)}
    sqrt_p = to_vector({k: precond[k].sqrt() for k in params})
    decay = to_vector({k: torch.full_like(v, weight_decay if k in decayed else 0.0) for k, v in params.items()})
    return AdamGeometry(sqrt_p, decay)


class TrajectoryInfluence:
    """Scores image–text pairs against a CLIP trajectory with Diff-In and its baselines."""

    def __init__(self, trajectory: Trajectory, settings: InfluenceSettings = InfluenceSettings(),
                 device: str | torch.device = "cpu") -> None:
        self.trajectory, self.settings, self.device = trajectory, settings, torch.device(device)
        self.dtype = getattr(torch, settings.dtype)
        indices = settings.checkpoints or tuple(range(len(trajectory.checkpoints)))
        self.indices = list(indices)  # the trajectory's index of each checkpoint scored
        self.checkpoints = [trajectory.checkpoints[i] for i in indices]
        self.target_losses: list[float] | None = None  # L_V at every selected checkpoint, set by prepare()
        self.model = build_clip(trajectory.model).to(self.device, self.dtype).eval()
        self.tokenizer = make_tokenizer(context_length(self.model))
        self.params: list[ParamDict] = []
        self.optimizer_states: list[dict] = []
        for i in indices:
            obj = load_checkpoint_state(trajectory.checkpoint_path(i))
            self.params.append(checkpoint_params(obj["state_dict"], self.model, self.dtype, self.device))
            self.optimizer_states.append(obj.get("optimizer") or {})
        self.weights = [CheckpointWeights(c.step, c.lr) for c in self.checkpoints]
        self._context = ScoreContext(self.weights, trajectory.num_samples, trajectory.total_steps)
        self._scorers: list[CheckpointScorer] | None = None
        self._embeddings: EmbeddingReference | None = None

    def first(self, count: int) -> "TrajectoryInfluence":
        """This influence over only its first ``count`` checkpoints (a copy sharing the model
        and the parameters): what scoring over a checkpoint window uses."""
        other = copy.copy(self)
        other._keep_first(count)
        return other

    def _keep_first(self, count: int) -> None:
        if not 1 <= count <= len(self.params):
            raise ValueError(f"cannot keep {count} of {len(self.params)} checkpoints")
        self.indices, self.checkpoints = self.indices[:count], self.checkpoints[:count]
        self.params, self.optimizer_states = self.params[:count], self.optimizer_states[:count]
        self.weights = self.weights[:count]
        self._context = ScoreContext(self.weights, self.trajectory.num_samples, self.trajectory.total_steps)
        self._scorers = None

    @property
    def image_size(self) -> int:
        """Input resolution of the model's vision tower."""
        size = self.model.visual.image_size
        return int(size[0] if isinstance(size, (tuple, list)) else size)

    def inputs(self, images_uint8: Tensor, captions: Sequence[str]) -> tuple[Tensor, Tensor]:
        """Model inputs for decoded pairs: normalised images and tokens on the device."""
        images = normalize_images(images_uint8).to(self.device, self.dtype)
        return images, self.tokenizer(list(captions)).to(self.device)

    def _batches(self, table: PairTable, indices: Sequence[int], size: int | None = None) -> list[tuple[Tensor, Tensor]]:
        size = size or self.settings.batch_size
        return [self.inputs(table.images[list(indices[i:i + size])],
                            [table.captions[j] for j in indices[i:i + size]])
                for i in range(0, len(indices), size)]

    def _objective(self, bank_images: Tensor, bank_captions: Sequence[str]) -> CLIPBankObjective:
        return CLIPBankObjective(self.model, *self.inputs(bank_images, bank_captions))

    def target_objective(self, target: PairTable, target_idx: Sequence[int]) -> tuple[PerSampleObjective | None, list]:
        """L_V's objective and V's batches: the target pairs' CLIP loss (objective None: the
        training objective, over the bank) or, with ``zero_shot``, the zero-shot classifier's
        cross-entropy on V's images and labels."""
        zero_shot = self.settings.zero_shot
        if zero_shot is None:
            return None, self._batches(target, target_idx)
        if target.labels is None:
            raise UsageError("target.zero_shot: the target pairs were loaded without labels")
        objective = ZeroShotObjective(self.model, self.tokenizer(list(zero_shot.prompts)).to(self.device),
                                      zero_shot.prompts_per_class)
        size, indices = self.settings.batch_size, list(target_idx)
        batches = []
        for i in range(0, len(indices), size):
            part = indices[i:i + size]
            images, _ = self.inputs(target.images[part], [target.captions[j] for j in part])
            labels = torch.as_tensor([target.labels[j] for j in part], dtype=torch.long, device=self.device)
            batches.append((images, labels))
        return objective, batches

    def prepare_checkpoint(self, k: int, target: PairTable, train: PairTable) -> tuple[PreparedCheckpoint, ParamDict | None]:
        """u_t, g_t, w_t (and Adam's preconditioner when enabled) for checkpoint ``k``.

        The bank and V come from :func:`split_bank` on ``target``; the proxy batches are
        drawn from ``train`` by (uid, seed, checkpoint step). Deterministic, so separate
        workers preparing different checkpoints agree on the bank.
        """
        s = self.settings
        ckpt = self.checkpoints[k]
        precond = self._preconditioner(k) if s.adam else None
        if s.adam and precond is None:
            raise UsageError(f"score.adam needs the optimizer state (second moments) in every checkpoint; "
                             f"the one at step {ckpt.step} has none (a released checkpoint never does)")
        bank_idx, target_idx = split_bank(target, s.bank_size, s.seed)
        objective = self._objective(target.images[bank_idx], [target.captions[i] for i in bank_idx])
        proxy_idx = rank_select(train, s.proxy_batches * s.proxy_batch_size, s.seed, f"proxy{ckpt.step}")
        v_objective, v_batches = self.target_objective(target, target_idx)
        with forward_mode_safe():
            prepared = prepare_checkpoint(objective, self.params[k], v_batches,
                                          self._batches(train, proxy_idx, s.proxy_batch_size), s.hvp, s.eps,
                                          vectors_needed(s.components), target_objective=v_objective)
        log.info("prepared checkpoint step %d: target loss %.4f", ckpt.step, prepared.target_loss)
        return prepared, precond

    def prepare(self, target: PairTable, train: PairTable) -> PreparedTrajectory:
        """Prepare every checkpoint in this process (the pipeline runs one task per checkpoint),
        then the unrolled directions when component d is asked for, then the embedding
        columns' reference sets (the corpus sample drawn from ``train`` by seed).

        L_V at every checkpoint is kept in ``target_losses``; under ``checkpoint_window:
        falling`` this influence then keeps only the window's checkpoints (``indices``), and
        the unrolled directions, the embeddings and the scores use only those.
        """
        bank_idx, _ = split_bank(target, self.settings.bank_size, self.settings.seed)
        results = [self.prepare_checkpoint(k, target, train) for k in range(len(self.params))]
        self.target_losses = [r[0].target_loss for r in results]
        count = len(checkpoint_window(self.settings.checkpoint_window, self.target_losses))
        if count < len(results):
            log.info("checkpoint window %s: L_V %s, scoring checkpoints %s", self.settings.checkpoint_window,
                     [round(x, 4) for x in self.target_losses], self.indices[:count])
            self._keep_first(count)
            results = results[:count]
        unrolled = self.prepare_unrolled(target, train) if "d" in self.settings.components else None
        sample = train.subset(rank_select(train, self.settings.embeddings.pool_pairs, self.settings.seed,
                                          EMBEDDING_SAMPLE_SALT))
        return PreparedTrajectory([target.uids[i] for i in bank_idx], target.images[bank_idx],
                                  [target.captions[i] for i in bank_idx],
                                  [r[0] for r in results], [r[1] for r in results], unrolled,
                                  self.prepare_embeddings(target, sample))

    def embed(self, table: PairTable, indices: Sequence[int] | None = None) -> tuple[Tensor, Tensor]:
        """Normalised image and text embeddings [n, D] of ``table``'s pairs (all, or ``indices``)
        at the last selected checkpoint (the model of ``clip_score``)."""
        indices = list(range(len(table))) if indices is None else list(indices)
        parts = []
        with torch.no_grad(), forward_mode_safe():
            for images, tokens in self._batches(table, indices):
                out = functional_call(self.model, self.params[-1], (images, tokens))  # open_clip normalises both
                parts.append((out[0], out[1]))
        if not parts:
            raise ValueError("no pairs to embed")
        return torch.cat([p[0] for p in parts]).cpu(), torch.cat([p[1] for p in parts]).cpu()

    def prepare_embeddings(self, target: PairTable, sample: PairTable) -> EmbeddingReference:
        """The reference sets of the embedding columns at the last selected checkpoint: the
        corpus ``sample``'s embeddings with K negative pools drawn from it by seed, the
        target set V's image embeddings (the target pairs outside the bank), negCLIPLoss's
        temperature, and k-means centroids of the sample's image embeddings."""
        s = self.settings
        if len(sample) == 0:
            raise UsageError("the embedding columns need a corpus sample, and none of the corpus pairs loaded")
        _, target_idx = split_bank(target, s.bank_size, s.seed)
        sample_img, sample_txt = self.embed(sample)
        target_img, _ = self.embed(target, target_idx)
        pools = draw_pools(len(sample), s.embeddings, lambda salt: rank_order(sample.uids, s.seed, salt))
        temperature = s.embeddings.temperature
        if temperature is None:
            temperature = float(torch.exp(-self.params[-1]["logit_scale"].double()).cpu())
        centroids = None
        if s.embeddings.clusters:
            k = min(s.embeddings.clusters, len(sample))
            centroids = kmeans(sample_img, k, s.seed, s.embeddings.kmeans_iterations).float()
        log.info("embedding references: %d sampled pairs, %d pools of %d, %d target images, tau %.4g, %s clusters",
                 len(sample), pools.shape[0], pools.shape[1], len(target_idx), temperature,
                 0 if centroids is None else len(centroids))
        return EmbeddingReference(list(sample.uids), sample_img, sample_txt, pools, target_img, temperature, centroids)

    def prepare_unrolled(self, target: PairTable, train: PairTable, adam_only: bool = False) -> UnrolledPrepared:
        """The unrolled directions acc_k of every checkpoint, backward from the last (sequential).

        H_k is the Hessian over ``unrolled.proxy_batches`` proxy batches drawn from ``train``
        by (uid, seed, checkpoint step); η_s comes from the trajectory's schedule. With
        ``adam`` the recursion is also run in Adam's metric (``adam_directions``);
        ``adam_only`` runs only that one and returns it as ``directions`` (for studies).
        """
        s = self.settings
        bank_idx, target_idx = split_bank(target, s.bank_size, s.seed)
        objective = self._objective(target.images[bank_idx], [target.captions[i] for i in bank_idx])
        steps = [c.step for c in self.checkpoints]
        lrs = segment_lrs(self.trajectory, steps)
        count = s.unrolled.proxy_batches * s.proxy_batch_size

        def proxy(k: int) -> list[tuple[Tensor, Tensor]]:
            return self._batches(train, rank_select(train, count, s.seed, f"proxy{steps[k]}"), s.proxy_batch_size)

        start = time.perf_counter()
        with forward_mode_safe():
            v_objective, target_batches = self.target_objective(target, target_idx)
            adam = None
            if s.adam or adam_only:
                geometry = [self._geometry(k) for k in range(len(self.params))]
                if any(g is None for g in geometry):
                    raise UsageError("the Adam variant needs the optimizer state (second moments) in every checkpoint")
                adam = prepare_unrolled(objective, self.params, target_batches, proxy, lrs, s.unrolled, geometry,
                                        target_objective=v_objective)
            plain = adam if adam_only else prepare_unrolled(objective, self.params, target_batches, proxy, lrs,
                                                            s.unrolled, target_objective=v_objective)
        diagnostics = {"seconds": round(time.perf_counter() - start, 3), "lanczos_steps": [c.lanczos_steps for c in plain],
                       "hvps": sum(c.lanczos_steps for c in plain) * (2 if adam and not adam_only else 1),
                       "carried_norm": [c.carried_norm for c in plain],
                       "ritz_max": [float(c.ritz_values.max()) for c in plain],
                       "ritz_min": [float(c.ritz_values.min()) for c in plain],
                       "segment_updates": [len(x) for x in lrs]}
        log.info("unrolled directions: %d checkpoints, %d HVPs, %.1f s", len(plain), diagnostics["hvps"],
                 diagnostics["seconds"])
        return UnrolledPrepared(
            [from_vector(c.direction, p) for c, p in zip(plain, self.params)],
            [from_vector(c.direction, p) for c, p in zip(adam, self.params)] if adam and not adam_only else None,
            diagnostics)

    def _geometry(self, k: int) -> AdamGeometry | None:
        precond = self._preconditioner(k)
        if precond is None:
            return None
        return adam_geometry(precond, self.params[k], self.model, float(self.trajectory.optimizer.get("weight_decay", 0.0)))

    def _preconditioner(self, k: int) -> ParamDict | None:
        opt = self.trajectory.optimizer
        return adam_preconditioner(self.optimizer_states[k], self.model, opt.get("betas", (0.9, 0.999)),
                                   max(opt.get("eps", 1e-8), self.settings.adam_eps_floor), self.dtype, self.device)

    def load_prepared(self, prepared: PreparedTrajectory) -> None:
        """Build the per-checkpoint scorers (context jets cached) from prepared vectors."""
        s = self.settings
        objective = self._objective(prepared.bank_images, prepared.bank_captions)
        self._bank_position = {uid: i for i, uid in enumerate(prepared.bank_uids)}
        preconds = prepared.preconditioners or [None] * len(self.params)
        if len(prepared.prepared) != len(self.params):
            raise ValueError(f"{len(prepared.prepared)} prepared checkpoints for {len(self.params)} selected")

        def here(x: ParamDict | None) -> ParamDict | None:
            return cast(x, self.dtype, self.device) if x is not None else None

        unrolled = prepared.unrolled
        if "d" in s.components and unrolled is None:
            raise ValueError("component d (diffin_unrolled) needs the prepared unrolled directions")
        m = len(self.params)
        directions = [here(x) for x in unrolled.directions] if "d" in s.components else [None] * m
        adam_dirs = ([here(x) for x in unrolled.adam_directions]
                     if "d" in s.components and unrolled.adam_directions else [None] * m)
        self._embeddings = prepared.embeddings
        network_jvp = compiled_features_jvp(objective) if s.compile else None  # one for every checkpoint
        with forward_mode_safe():
            self._scorers = [
                CheckpointScorer(objective, params, here(p.u), here(p.g), here(p.w), s.c_mode, s.eps,
                                 s.components, network_jvp=network_jvp,
                                 preconditioned_u=here({k: pc[k] * p.u[k] for k in p.u}) if pc is not None and "a" in s.components else None,
                                 unrolled=direction)
                for params, p, pc, direction in zip(self.params, prepared.prepared, preconds, directions)
            ]
            self._adam_scorers = [
                CheckpointScorer(objective, params, None, None, None, components=("d",), unrolled=direction)
                for params, direction in zip(self.params, adam_dirs)] if adam_dirs[0] is not None else []

    def score_inputs(self, images: Tensor, tokens: Tensor, uids: Sequence[str] | None = None) -> dict[str, Tensor]:
        """Components [m, B] and scores [B] (float64) for one batch of model inputs.

        ``uids`` (the pairs' uids) lets a pair that is itself in the negative bank be scored
        against the bank without itself (never its own negative).
        """
        if self._scorers is None:
            raise RuntimeError("call load_prepared() (or prepare()) before scoring")
        batch: tuple[Tensor, ...] = (images, tokens)
        positions = [self._bank_position.get(u, -1) for u in uids] if uids is not None else []
        if any(p >= 0 for p in positions):
            batch = (images, tokens, torch.tensor(positions, device=images.device))
        with forward_mode_safe():
            per_checkpoint = [scorer(batch) for scorer in self._scorers]
            adam = [scorer(batch).d for scorer in self._adam_scorers]
        named = [x.named() for x in per_checkpoint]
        components = {name: torch.stack([x[name] for x in named]).double().cpu() for name in named[0]}
        if adam:
            components[ADAM_TWINS["d"]] = torch.stack(adam).double().cpu()
        scores = compute_columns(components, self._context)
        img, txt = per_checkpoint[-1].features
        scores["clip_score"] = (img * txt).sum(-1).double().cpu()
        if self._embeddings is not None:
            scores.update(self._embeddings.columns(img.detach(), txt.detach(), uids))
        return {**components, "loss": per_checkpoint[-1].loss.double().cpu(), **scores}

    def score_table(self, table: PairTable) -> dict[str, Tensor]:
        """Score every pair of an in-memory table (components [m, n], scores [n])."""
        size = self.settings.batch_size
        parts = [self.score_inputs(*batch, uids=table.uids[i * size:(i + 1) * size])
                 for i, batch in enumerate(self._batches(table, list(range(len(table)))))]
        return {k: torch.cat([p[k] for p in parts], dim=-1) for k in parts[0]}
