"""Diff-In for open_clip trajectories: the facade the score stage and the benchmarks use.

``TrajectoryInfluence`` loads the model once and the m checkpoints' parameters, prepares
each checkpoint (negative bank, u_t, g_t, w_t — DESIGN §2.3–2.4) and then scores batches of
decoded pairs at every checkpoint, returning per-checkpoint components and the scores.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Literal, Sequence

import torch
from torch import Tensor

from pipeline.data.pairs import PairTable, rank_order
from pipeline.errors import UsageError
from pipeline.influence.forward import CheckpointScorer
from pipeline.influence.objective import CLIPBankObjective, forward_mode_safe
from pipeline.influence.params import ParamDict, cast
from pipeline.influence.prepare import PreparedCheckpoint, prepare_checkpoint
from pipeline.influence.scores import CheckpointWeights, combine
from pipeline.model.clip import build_clip, context_length, make_tokenizer, normalize_images
from pipeline.model.trajectory import Trajectory, load_checkpoint_state

log = logging.getLogger(__name__)


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
    components: tuple[str, ...] = ("a", "b", "c")
    adam: bool = False
    dtype: str = "float32"
    checkpoints: tuple[int, ...] | None = None  # indices into the trajectory; None = all


def checkpoint_params(state_dict: dict[str, Tensor], model: torch.nn.Module,
                      dtype: torch.dtype, device: str | torch.device) -> ParamDict:
    """The trainable parameters of ``model`` taken from a checkpoint's state dict."""
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    missing = [n for n in names if n not in state_dict]
    if missing:
        raise ValueError(f"checkpoint lacks parameters {missing[:3]} of the model spec")
    return {n: state_dict[n].to(device=device, dtype=dtype) for n in names}


def _open_clip_param_order(model: torch.nn.Module) -> list[str]:
    """Parameter order of open_clip's AdamW groups (gains/biases first, then the rest)."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]

    def no_decay(n: str, p: Tensor) -> bool:
        return p.ndim < 2 or "bn" in n or "ln" in n or "bias" in n or "logit_scale" in n

    return [n for n, p in named if no_decay(n, p)] + [n for n, p in named if not no_decay(n, p)]


def adam_preconditioner(optimizer_state: dict, model: torch.nn.Module, betas: Sequence[float],
                        eps: float, dtype: torch.dtype, device: str | torch.device) -> ParamDict | None:
    """Adam's diagonal preconditioner P = 1/(√v̂ + ε) from a saved optimizer state, by name.

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
class PreparedTrajectory:
    """Everything scoring needs besides the model: the bank and per-checkpoint vectors."""

    bank_uids: list[str]
    bank_images: Tensor  # uint8 [K, 3, S, S]
    bank_captions: list[str]
    prepared: list[PreparedCheckpoint]
    preconditioners: list[ParamDict | None] = field(default_factory=list)


class TrajectoryInfluence:
    """Scores image–text pairs against a CLIP trajectory with Diff-In and its baselines."""

    def __init__(self, trajectory: Trajectory, settings: InfluenceSettings = InfluenceSettings(),
                 device: str | torch.device = "cpu") -> None:
        self.trajectory, self.settings, self.device = trajectory, settings, torch.device(device)
        self.dtype = getattr(torch, settings.dtype)
        indices = settings.checkpoints or tuple(range(len(trajectory.checkpoints)))
        self.checkpoints = [trajectory.checkpoints[i] for i in indices]
        self.model = build_clip(trajectory.model).to(self.device, self.dtype).eval()
        self.tokenizer = make_tokenizer(context_length(self.model))
        self.params: list[ParamDict] = []
        self.optimizer_states: list[dict] = []
        for i in indices:
            obj = load_checkpoint_state(trajectory.checkpoint_path(i))
            self.params.append(checkpoint_params(obj["state_dict"], self.model, self.dtype, self.device))
            self.optimizer_states.append(obj.get("optimizer") or {})
        self.weights = [CheckpointWeights(c.step, c.lr) for c in self.checkpoints]
        self._scorers: list[CheckpointScorer] | None = None

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

    def prepare_checkpoint(self, k: int, target: PairTable, train: PairTable) -> tuple[PreparedCheckpoint, ParamDict | None]:
        """u_t, g_t, w_t (and Adam's preconditioner when enabled) for checkpoint ``k``.

        The bank and V come from :func:`split_bank` on ``target``; the proxy batches are
        drawn from ``train`` by (uid, seed, checkpoint step). Deterministic, so separate
        workers preparing different checkpoints agree on the bank.
        """
        s = self.settings
        bank_idx, target_idx = split_bank(target, s.bank_size, s.seed)
        objective = self._objective(target.images[bank_idx], [target.captions[i] for i in bank_idx])
        ckpt = self.checkpoints[k]
        proxy_idx = rank_select(train, s.proxy_batches * s.proxy_batch_size, s.seed, f"proxy{ckpt.step}")
        with forward_mode_safe():
            prepared = prepare_checkpoint(objective, self.params[k], self._batches(target, target_idx),
                                          self._batches(train, proxy_idx, s.proxy_batch_size), s.hvp, s.eps)
        log.info("prepared checkpoint step %d: target loss %.4f", ckpt.step, prepared.target_loss)
        return prepared, (self._preconditioner(k) if s.adam else None)

    def prepare(self, target: PairTable, train: PairTable) -> PreparedTrajectory:
        """Prepare every checkpoint in this process (the pipeline runs one task per checkpoint)."""
        bank_idx, _ = split_bank(target, self.settings.bank_size, self.settings.seed)
        results = [self.prepare_checkpoint(k, target, train) for k in range(len(self.params))]
        return PreparedTrajectory([target.uids[i] for i in bank_idx], target.images[bank_idx],
                                  [target.captions[i] for i in bank_idx],
                                  [r[0] for r in results], [r[1] for r in results])

    def _preconditioner(self, k: int) -> ParamDict | None:
        opt = self.trajectory.optimizer
        return adam_preconditioner(self.optimizer_states[k], self.model, opt.get("betas", (0.9, 0.999)),
                                   opt.get("eps", 1e-8), self.dtype, self.device)

    def load_prepared(self, prepared: PreparedTrajectory) -> None:
        """Build the per-checkpoint scorers (context jets cached) from prepared vectors."""
        s = self.settings
        objective = self._objective(prepared.bank_images, prepared.bank_captions)
        preconds = prepared.preconditioners or [None] * len(self.params)
        if len(prepared.prepared) != len(self.params):
            raise ValueError(f"{len(prepared.prepared)} prepared checkpoints for {len(self.params)} selected")

        def here(x: ParamDict) -> ParamDict:
            return cast(x, self.dtype, self.device)

        with forward_mode_safe():
            self._scorers = [
                CheckpointScorer(objective, params, here(p.u), here(p.g), here(p.w), s.c_mode, s.eps,
                                 s.components,
                                 preconditioned_u=here({k: pc[k] * p.u[k] for k in p.u}) if pc is not None else None)
                for params, p, pc in zip(self.params, prepared.prepared, preconds)
            ]

    def score_inputs(self, images: Tensor, tokens: Tensor) -> dict[str, Tensor]:
        """Components [m, B] and scores [B] (float64) for one batch of model inputs."""
        if self._scorers is None:
            raise RuntimeError("call load_prepared() (or prepare()) before scoring")
        with forward_mode_safe():
            comps = [scorer((images, tokens)) for scorer in self._scorers]
        a, b, c = (torch.stack([getattr(x, n) for x in comps]).double().cpu() for n in ("a", "b", "c"))
        a_pre = torch.stack([x.a_pre for x in comps]).double().cpu() if comps[0].a_pre is not None else None
        scores = combine(a, b, c, self.weights, self.trajectory.num_samples, self.trajectory.total_steps, a_pre)
        img, txt = comps[-1].features
        scores["clip_score"] = (img * txt).sum(-1).double().cpu()
        return {"a": a, "b": b, "c": c, "loss": comps[-1].loss.double().cpu(), **scores}

    def score_table(self, table: PairTable) -> dict[str, Tensor]:
        """Score every pair of an in-memory table (components [m, n], scores [n])."""
        parts = [self.score_inputs(*batch) for batch in self._batches(table, list(range(len(table))))]
        return {k: torch.cat([p[k] for p in parts], dim=-1) for k in parts[0]}
