"""The CLIP half of the fidelity benchmark: the proxy CLIP on real OpenMoji pairs.

The corpus is built into ``<data-dir>/openmoji`` (or a complete one there is reused). Train
and target pairs are chosen by seeded uid rank; the target set is held-out OpenMoji pairs,
from which :class:`TrajectoryInfluence` draws the negative bank (the rest is V). The proxy
CLIP is trained with :func:`train_proxy` (AdamW, as every CLIP), scored with
:class:`TrajectoryInfluence` (with the Adam-aware variant), and retrained without left-out
pairs with :func:`train_final` — the same loop, so leave-out retraining is exact. L_V is the
mean bank loss over V with the same bank as the scores.
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from pipeline.bench.protocol import DatasetResult, load_shard_dir, measure_ground_truth, split_by_rank, with_renamed
from pipeline.config import TrainConfig
from pipeline.data.corpora.common import CORPUS_FILE
from pipeline.data.corpora.openmoji import build_openmoji
from pipeline.data.pairs import PairTable
from pipeline.data.shards import SIZES_FILE, load_sizes
from pipeline.errors import UsageError
from pipeline.influence.objective import CLIPBankObjective, per_sample_loss
from pipeline.influence.params import ParamDict
from pipeline.influence.scores import SCORE_COLUMNS
from pipeline.model.clip import build_clip, model_spec
from pipeline.model.scorer import (InfluenceSettings, PreparedTrajectory, TrajectoryInfluence, settings_record,
                                   split_bank)
from pipeline.model.train import train_final, train_proxy
from pipeline.model.trajectory import Trajectory, load_checkpoint_state

log = logging.getLogger(__name__)

CORPUS_NAME = "openmoji"


@dataclass(frozen=True)
class OpenMojiSettings:
    """The OpenMoji/CLIP experiment: split sizes, proxy run, scoring, ground-truth counts.

    ``corpus_limit`` builds (and requires) a corpus of only the first N emoji — for tests.
    """

    num_train: int = 512
    num_target: int = 255
    train: TrainConfig = TrainConfig(model="tiny-clip-32", steps=80, batch_size=32, lr=1e-3,
                                     warmup=10, checkpoints=5, seed=0)
    influence: InfluenceSettings = InfluenceSettings(bank_size=127, adam=True)
    loo: int = 40
    lds_subsets: int = 64
    noise: int = 8
    corpus_limit: int | None = None
    seed: int = 0
    sweep: bool = True  # also score the unrolled variants (f = exp, Adam with floored ε)
    lds_fraction: float = 0.5  # share of the training pairs each LDS subset removes


# --------------------------------------------------------------------------- corpus


def corpus_is_complete(directory: Path, limit: int | None = None) -> bool:
    """True if ``directory`` holds a finished OpenMoji build (every shard present, counts
    consistent) made with ``limit``."""
    try:
        info = json.loads((directory / CORPUS_FILE).read_text())
        sizes = load_sizes(directory / SIZES_FILE)
    except (OSError, ValueError, UsageError):
        return False
    return (info.get("source") == CORPUS_NAME and info.get("details", {}).get("limit") == limit
            and sum(sizes.values()) == info.get("num_pairs")
            and all((directory / name).is_file() for name in sizes))


def ensure_openmoji(data_dir: str | Path, limit: int | None = None) -> Path:
    """``<data_dir>/openmoji``: reused when complete, built when absent; else a UsageError."""
    directory = Path(data_dir) / CORPUS_NAME
    if corpus_is_complete(directory, limit):
        log.info("reusing the OpenMoji corpus in %s", directory)
        return directory
    if directory.exists() and any(directory.iterdir()):
        raise UsageError(f"{directory} exists but is not a complete OpenMoji corpus"
                         f"{f' of the first {limit} emoji' if limit else ''}; remove it or pass "
                         "another --data-dir")
    log.info("building the OpenMoji corpus into %s", directory)
    build_openmoji(directory, limit=limit)
    return directory


def load_openmoji(directory: Path, size: int) -> PairTable:
    """Every pair of the corpus at ``size`` px (one reading thread: deterministic and safe)."""
    return load_shard_dir(directory, size)


# --------------------------------------------------------------------------- target loss


@dataclass
class TargetLoss:
    """L_V for any parameters of the model: mean bank loss over V with a fixed bank."""

    model: nn.Module
    bank: tuple[Tensor, Tensor]
    batches: list[tuple[Tensor, Tensor]]

    def __call__(self, params: ParamDict) -> float:
        objective = CLIPBankObjective(self.model, *self.bank)
        with torch.no_grad():
            losses = torch.cat([per_sample_loss(objective, params, b) for b in self.batches])
        return float(losses.double().mean())

    @classmethod
    def of(cls, scorer: TrajectoryInfluence, prepared: PreparedTrajectory, target: PairTable) -> "TargetLoss":
        """V = the target pairs not in the prepared bank (the scorer's split), batched like it."""
        _, v_idx = split_bank(target, scorer.settings.bank_size, scorer.settings.seed)
        if set(prepared.bank_uids) & {target.uids[i] for i in v_idx}:
            raise ValueError("the prepared bank overlaps V: prepared for another target set or seed")
        size = scorer.settings.batch_size
        batches = [scorer.inputs(target.images[v_idx[i:i + size]], [target.captions[j] for j in v_idx[i:i + size]])
                   for i in range(0, len(v_idx), size)]
        return cls(scorer.model, scorer.inputs(prepared.bank_images, prepared.bank_captions), batches)


def model_params(model: nn.Module) -> ParamDict:
    """The trainable parameters of a trained model, detached (float32)."""
    return {n: p.detach().float() for n, p in model.named_parameters() if p.requires_grad}


def checkpoint_model_params(trajectory: Trajectory, index: int, model: nn.Module) -> ParamDict:
    """Parameters of checkpoint ``index``, for the objective's model (float32, CPU)."""
    state = load_checkpoint_state(trajectory.checkpoint_path(index))["state_dict"]
    return {n: state[n].float() for n, p in model.named_parameters() if p.requires_grad}


# --------------------------------------------------------------------------- experiment


def _split(table: PairTable, settings: OpenMojiSettings) -> tuple[PairTable, PairTable]:
    train_idx, target_idx = split_by_rank(table.uids, settings.num_train, settings.num_target, settings.seed)
    return table.subset(train_idx), table.subset(target_idx)


def _train_log(trajectory: Trajectory) -> list[float]:
    rows = (trajectory.root / "train_log.jsonl").read_text().splitlines()
    return [json.loads(r)["loss"] for r in rows]


def _learning(trajectory: Trajectory, prepared: PreparedTrajectory, target_loss: TargetLoss,
              settings: OpenMojiSettings) -> dict:
    losses = _train_log(trajectory)
    with torch.random.fork_rng():
        torch.manual_seed(settings.train.seed)
        init = build_clip(trajectory.model)
    return {"train_loss_first_10": float(np.mean(losses[:10])), "train_loss_last_10": float(np.mean(losses[-10:])),
            "target_loss_init": target_loss(model_params(init)),
            "target_loss_checkpoints": [p.target_loss for p in prepared.prepared],
            "checkpoints": [{"step": c.step, "lr": c.lr} for c in trajectory.checkpoints]}


def _score(trajectory: Trajectory, settings: OpenMojiSettings, train: PairTable,
           target: PairTable) -> tuple[TrajectoryInfluence, PreparedTrajectory, dict[str, Tensor]]:
    scorer = TrajectoryInfluence(trajectory, settings.influence)
    prepared = scorer.prepare(target, train)
    scorer.load_prepared(prepared)
    return scorer, prepared, scorer.score_table(train)


def run_openmoji(settings: OpenMojiSettings, data_dir: str | Path, work_dir: str | Path | None = None) -> DatasetResult:
    """Build/reuse the corpus, train, score and retrain; scores for all CLIP methods."""
    if settings.train.checkpoint_steps()[-1] != settings.train.steps:
        raise UsageError("the last checkpoint must be at the final step (L_V(θ_T) is read from it)")
    start = time.perf_counter()
    corpus = ensure_openmoji(data_dir, settings.corpus_limit)
    size = int(model_spec(settings.train.model)["config"]["vision_cfg"]["image_size"])
    table = load_openmoji(corpus, size)
    train, target = _split(table, settings)
    t_data = time.perf_counter() - start
    with tempfile.TemporaryDirectory(dir=work_dir, prefix="fidelity-") as tmp:
        trajectory = train_proxy(train, settings.train, Path(tmp) / "trajectory", log_every=0)
        t_train = time.perf_counter() - start - t_data
        scorer, prepared, scores = _score(trajectory, settings, train, target)
        t_score = time.perf_counter() - start - t_data - t_train
        variant_scores = unrolled_variants(trajectory, settings.influence, train, target, prepared) if settings.sweep else {}
        target_loss = TargetLoss.of(scorer, prepared, target)
        base = target_loss(checkpoint_model_params(trajectory, len(trajectory.checkpoints) - 1, scorer.model))
        learning = _learning(trajectory, prepared, target_loss, settings)
    cfg = settings.train

    def without(removed: set[str]) -> float:
        return target_loss(model_params(train_final(train, cfg, removed)))

    def renamed(uid: str) -> float:
        return target_loss(model_params(train_final(replace(train, uids=with_renamed(train.uids, uid)), cfg)))

    truth = measure_ground_truth(train.uids, base, without, settings.loo, settings.lds_subsets, settings.seed,
                                 "openmoji", renamed_loss=renamed, noise_count=settings.noise,
                                 lds_fraction=settings.lds_fraction)
    by_uid = {m: dict(zip(train.uids, scores[m].tolist())) if m in scores else None for m in SCORE_COLUMNS}
    variants = {name: dict(zip(train.uids, values.tolist())) for name, values in variant_scores.items()}
    meta = {
        "settings": _settings_dict(settings),
        "data": {"corpus": str(corpus), "corpus_pairs": len(table), "train": len(train),
                 "target": len(target), "bank": len(prepared.bank_uids),
                 "v": len(target) - len(prepared.bank_uids)},
        "learning": learning,
        "truth": truth.summary(),
        "seconds": {"data": round(t_data, 1), "train": round(t_train, 1), "score": round(t_score, 1),
                    "retrain": round(truth.seconds, 1), "total": round(time.perf_counter() - start, 1)},
    }
    return DatasetResult(by_uid, truth, meta, variants)


ADAM_EPS_FLOORS = (1e-4, 1e-3)
VARIANT_LANCZOS_STEPS = 10  # the variants' K (digits: K = 10 within 0.01 of K = 20 and 40)


def unrolled_variants(trajectory: Trajectory, influence: InfluenceSettings, train: PairTable,
                      target: PairTable, prepared: PreparedTrajectory) -> dict[str, Tensor]:
    """The unrolled score under other choices, each with K = VARIANT_LANCZOS_STEPS: f = exp,
    and the Adam metric with ε floored (P = 1/(√v̂ + max(ε, floor)) for each ADAM_EPS_FLOORS)."""
    base = replace(influence, components=("d",), adam=False,
                   unrolled=replace(influence.unrolled, lanczos_steps=VARIANT_LANCZOS_STEPS))
    runs = [("unrolled_f_exp", replace(base, unrolled=replace(base.unrolled, factor="exp")), False)]
    runs += [(f"unrolled_adam_floor{floor:g}", replace(base, adam_eps_floor=floor), True) for floor in ADAM_EPS_FLOORS]
    out: dict[str, Tensor] = {}
    for name, variant, adam_only in runs:
        scorer = TrajectoryInfluence(trajectory, variant)
        scorer.load_prepared(replace(prepared, unrolled=scorer.prepare_unrolled(target, train, adam_only=adam_only)))
        out[name] = scorer.score_table(train)["diffin_unrolled"]  # in Adam's metric for the adam variants
    return out


def _settings_dict(settings: OpenMojiSettings) -> dict:
    out = asdict(settings)
    out["train"] = settings.train.model_dump(mode="json")
    out["influence"] = settings_record(settings.influence)
    return out
