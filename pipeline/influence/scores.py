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
from typing import Sequence

import torch
from torch import Tensor

COMPONENTS = ("a", "b", "c", "d", "a_adam", "d_adam")  # per-checkpoint lists in the score files
COLUMN_COMPONENTS: dict[str, tuple[str, ...]] = {  # score column → the components it is computed from
    "diffin_unrolled": ("d",),
    "diffin": ("a", "b", "c"),
    "diffin_eq9": ("b", "c"),
    "tracin": ("a",),
    "diffin_unrolled_adam": ("d_adam",),  # score.adam: the unrolled recursion in Adam's metric
    "tracin_adam": ("a_adam",),  # score.adam: ⟨P_t u_t, G_z⟩, P_t Adam's preconditioner
    "clip_score": (),  # cosine of the pair's embeddings at the last checkpoint: always computed
}
SCORE_COLUMNS = tuple(COLUMN_COMPONENTS)  # the score files' float columns, in file order
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


def combine(a: Tensor, b: Tensor, c: Tensor, checkpoints: Sequence[CheckpointWeights],
            num_samples: int, total_steps: int, preconditioned_a: Tensor | None = None) -> dict[str, Tensor]:
    """Scores for samples from components shaped [m, n] (checkpoint × sample), in float64.

    ``preconditioned_a`` (optional, [m, n]: component ``a_adam`` = ⟨P_t u_t, G_z⟩) gives the
    optimizer-aware first-order variant (``tracin_adam``).
    """
    m = len(checkpoints)
    if a.shape[0] != m or b.shape[0] != m or c.shape[0] != m:
        raise ValueError(f"components must have {m} rows (one per checkpoint), got {a.shape[0]}")
    a, b, c = (x.to(torch.float64) for x in (a, b, c))
    eta = torch.tensor([ck.lr for ck in checkpoints], dtype=torch.float64)[:, None]
    t = torch.tensor([ck.step for ck in checkpoints], dtype=torch.float64)[:, None]
    first = (total_steps / (num_samples * m)) * (eta * a).sum(0)
    eq9 = (-(t * eta**2) / (num_samples * m) * (b + c)).sum(0)
    scores = {"tracin": first, "diffin_eq9": eq9, "diffin": first + total_steps * eq9}
    if preconditioned_a is not None:
        scores["tracin_adam"] = (total_steps / (num_samples * m)) * (eta * preconditioned_a.to(torch.float64)).sum(0)
    return scores
