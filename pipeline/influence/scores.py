"""Scores from per-checkpoint components, and the score vocabulary.

This module owns the names: the score columns, the per-checkpoint components, which
components each column needs, and which components each ``score.method`` computes. The
Parquet schema, the config, select and the report derive from these tables.

With m checkpoints (step t, learning rate η_t), N training samples and T total steps:

- ``diffin_unrolled`` = (1/N) Σ_k d_k, d_k = ⟨acc_k, G_z(θ_k)⟩  (:mod:`.unrolled`)
- ``tracin``     = Σ_t (T/(N·m)) · η_t · a_t
- ``diffin_eq9`` = Σ_t −(t·η_t²/(N·m)) · (b_t + c_t)        (the reference's Eq. 9)
- ``diffin``     = Σ_t (T/(N·m)) · [η_t · a_t − t·η_t² · (b_t + c_t)]

so that ``diffin == tracin + T · diffin_eq9``. Every score estimates
L_V(θ_T without z) − L_V(θ_T): positive means z helps.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import torch
from torch import Tensor

from pipeline.influence.unrolled import unrolled_scores

COMPONENTS = ("a", "b", "c", "d", "a_adam", "d_adam")  # per-checkpoint lists in the score files
COLUMN_COMPONENTS: dict[str, tuple[str, ...]] = {  # score column → the components it is computed from
    "diffin_unrolled": ("d",),
    "diffin": ("a", "b", "c"),
    "diffin_eq9": ("b", "c"),
    "tracin": ("a",),
    "diffin_unrolled_adam": ("d_adam",),  # score.adam: the unrolled recursion in Adam's metric
    "tracin_adam": ("a_adam",),  # score.adam: ⟨P_t u_t, G_z⟩, P_t Adam's preconditioner
    "clip_score": (),  # cosine of the pair's embeddings at the last checkpoint: always computed
    "neg_clip_loss": (),  # negCLIPLoss against fixed corpus pools (influence/embeddings.py): always computed
    "norm_sim_2": (),  # NormSim_2 of the image against the target images: always computed
    "norm_sim_inf": (),  # NormSim_inf (nearest target image's similarity): always computed
}
SCORE_COLUMNS = tuple(COLUMN_COMPONENTS)  # the score files' float columns, in file order
ESTIMATE_COLUMNS = tuple(c for c, needs in COLUMN_COMPONENTS.items() if needs)  # estimates of ΔL_V (units of L_V)
EMBEDDING_COLUMNS = tuple(c for c, needs in COLUMN_COMPONENTS.items() if not needs)  # the last checkpoint's embeddings
METHOD_COMPONENTS: dict[str, tuple[str, ...]] = {  # score.method → the components it computes
    "unrolled": ("d",),  # one JVP per checkpoint
    "tracin": ("a",),  # one JVP per checkpoint
    "diffin": ("a", "b", "c"),  # about three JVPs per checkpoint
    "all": ("a", "b", "c", "d"),
}
ADAM_TWINS: dict[str, str] = {"a": "a_adam", "d": "d_adam"}  # component → its optimizer-aware twin (score.adam)
DEFAULT_METHOD = "unrolled"
DEFAULT_COLUMN = "diffin_unrolled"  # docs/FIDELITY.md: the best measured score


def with_adam_twins(components: Sequence[str], adam: bool) -> tuple[str, ...]:
    """``components`` and, with ``adam``, their optimizer-aware twins (one more JVP each)."""
    return tuple(components) + (tuple(ADAM_TWINS[c] for c in components if c in ADAM_TWINS) if adam else ())


def method_components(method: str, adam: bool = False) -> tuple[str, ...]:
    """Every component a run with ``score.method`` and ``score.adam`` computes."""
    return with_adam_twins(METHOD_COMPONENTS[method], adam)


def columns_computed(components: Sequence[str]) -> tuple[str, ...]:
    """The score columns that the given components determine (in file order)."""
    have = set(components)
    return tuple(name for name, needs in COLUMN_COMPONENTS.items() if set(needs) <= have)


@dataclass(frozen=True)
class CheckpointWeights:
    """What the scores need to know about one checkpoint."""

    step: int
    lr: float


@dataclass(frozen=True)
class ScoreContext:
    """The trajectory facts the score formulas weigh components with: per checkpoint (t, η_t),
    N training samples, T total steps."""

    checkpoints: Sequence[CheckpointWeights]
    num_samples: int
    total_steps: int

    def __post_init__(self) -> None:
        if self.num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {self.num_samples}")

    def column(self, name: str) -> Tensor:
        """[m, 1] float64 column of a per-checkpoint quantity (``step`` or ``lr``)."""
        return torch.tensor([getattr(ck, name) for ck in self.checkpoints], dtype=torch.float64)[:, None]


def _first_order(x: Tensor, ctx: ScoreContext) -> Tensor:
    """Σ_t (T/(N·m)) η_t x_t: TracIn's weighting of a first-order component."""
    m = len(ctx.checkpoints)
    return (ctx.total_steps / (ctx.num_samples * m)) * (ctx.column("lr") * x).sum(0)


def _eq9(comp: Mapping[str, Tensor], ctx: ScoreContext) -> Tensor:
    """Σ_t −(t·η_t²/(N·m)) (b_t + c_t): the reference's Eq. 9."""
    m, eta = len(ctx.checkpoints), ctx.column("lr")
    return (-(ctx.column("step") * eta**2) / (ctx.num_samples * m) * (comp["b"] + comp["c"])).sum(0)


def _unrolled(d: Tensor, ctx: ScoreContext) -> Tensor:
    """(1/N) Σ_k d_k."""
    return unrolled_scores(d, ctx.num_samples)


# score column → its formula over float64 components [m, n] (the components of COLUMN_COMPONENTS)
ColumnFormula = Callable[[Mapping[str, Tensor], ScoreContext], Tensor]
COLUMN_FORMULAS: dict[str, ColumnFormula] = {
    "diffin_unrolled": lambda comp, ctx: _unrolled(comp["d"], ctx),
    "diffin": lambda comp, ctx: _first_order(comp["a"], ctx) + ctx.total_steps * _eq9(comp, ctx),
    "diffin_eq9": _eq9,
    "tracin": lambda comp, ctx: _first_order(comp["a"], ctx),
    "diffin_unrolled_adam": lambda comp, ctx: _unrolled(comp["d_adam"], ctx),
    "tracin_adam": lambda comp, ctx: _first_order(comp["a_adam"], ctx),
}


def compute_columns(components: Mapping[str, Tensor], ctx: ScoreContext) -> dict[str, Tensor]:
    """Every score column (in file order) whose components are all given, in float64.

    ``components``: name → [m, n] (checkpoint × sample). Columns without a formula here
    (:data:`EMBEDDING_COLUMNS`) are the scoring facade's.
    """
    m = len(ctx.checkpoints)
    for name, value in components.items():
        if value.shape[0] != m:
            raise ValueError(f"component {name} must have {m} rows (one per checkpoint), got {value.shape[0]}")
    comp = {name: value.to(torch.float64) for name, value in components.items()}
    return {name: COLUMN_FORMULAS[name](comp, ctx) for name in columns_computed(tuple(comp))
            if name in COLUMN_FORMULAS}


def combine(a: Tensor, b: Tensor, c: Tensor, checkpoints: Sequence[CheckpointWeights],
            num_samples: int, total_steps: int, preconditioned_a: Tensor | None = None) -> dict[str, Tensor]:
    """``tracin``, ``diffin_eq9``, ``diffin`` (and ``tracin_adam`` from ``preconditioned_a``)
    from components [m, n] (checkpoint × sample), in float64."""
    components = {"a": a, "b": b, "c": c}
    if preconditioned_a is not None:
        components[ADAM_TWINS["a"]] = preconditioned_a
    return compute_columns(components, ScoreContext(checkpoints, num_samples, total_steps))
