"""Per-checkpoint shared vectors: u_t, g_t, w_t = H_B u_t, and the
unrolled directions acc_k (sequential over checkpoints)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Collection, Literal, Sequence

import torch

from pipeline.influence.objective import Batch, PerSampleObjective, per_sample_loss
from pipeline.influence.params import ParamDict, axpy, from_vector, norm, scale, sub, to_vector
from pipeline.influence.unrolled import AdamGeometry, UnrolledCheckpoint, UnrolledSettings, unrolled_directions

HVPMode = Literal["exact", "fd"]


def _with_grad(params: ParamDict) -> ParamDict:
    return {k: v.detach().requires_grad_(True) for k, v in params.items()}


def mean_loss_grad(objective: PerSampleObjective, params: ParamDict,
                   batches: Sequence[Batch], create_graph: bool = False) -> ParamDict:
    """∇ of the mean per-sample loss over all samples of ``batches`` (samples weigh equally)."""
    p = _with_grad(params)
    total = None
    count = 0
    for batch in batches:
        losses = per_sample_loss(objective, p, batch)
        count += losses.shape[0]
        total = losses.sum() if total is None else total + losses.sum()
    if total is None or count == 0:
        raise ValueError("mean_loss_grad needs at least one non-empty batch")
    grads = torch.autograd.grad(total / count, list(p.values()), create_graph=create_graph,
                                allow_unused=True)
    return {k: (g if g is not None else torch.zeros_like(p[k])) if create_graph
            else (g.detach() if g is not None else torch.zeros_like(params[k]))
            for k, g in zip(p, grads)}


def hvp_exact(objective: PerSampleObjective, params: ParamDict, batches: Sequence[Batch],
              v: ParamDict) -> ParamDict:
    """H_B v by double backward, H_B the Hessian of the mean loss over ``batches``."""
    p = _with_grad(params)
    total, count = None, 0
    for batch in batches:
        losses = per_sample_loss(objective, p, batch)
        count += losses.shape[0]
        total = losses.sum() if total is None else total + losses.sum()
    grads = torch.autograd.grad(total / count, list(p.values()), create_graph=True, allow_unused=True)
    inner = sum((g * v[k]).sum() for k, g in zip(p, grads) if g is not None)
    hv = torch.autograd.grad(inner, list(p.values()), allow_unused=True)
    return {k: (h.detach() if h is not None else torch.zeros_like(params[k])) for k, h in zip(p, hv)}


def hvp_fd(objective: PerSampleObjective, params: ParamDict, batches: Sequence[Batch],
           v: ParamDict, eps: float = 1e-3, base_grad: ParamDict | None = None) -> ParamDict:
    """The paper's forward difference: H v ≈ (∇L(θ + ε v̂) − ∇L(θ)) · ‖v‖ / ε."""
    v_norm = norm(v)
    if float(v_norm) == 0.0:
        return {k: torch.zeros_like(x) for k, x in v.items()}
    g0 = base_grad if base_grad is not None else mean_loss_grad(objective, params, batches)
    shifted = axpy(eps / v_norm, v, params)
    g1 = mean_loss_grad(objective, shifted, batches)
    return scale(v_norm / eps, sub(g1, g0))


class BatchHessian:
    """v ↦ H_B v on flat vectors, H_B the Hessian of the mean loss over ``batches`` at ``params``.

    The first-order graph is built once and reused by every product (one extra backward
    pass per product), as a Lanczos run needs K products at the same point.
    """

    def __init__(self, objective: PerSampleObjective, params: ParamDict, batches: Sequence[Batch]) -> None:
        self._params = _with_grad(params)
        total, count = None, 0
        for batch in batches:
            losses = per_sample_loss(objective, self._params, batch)
            count += losses.shape[0]
            total = losses.sum() if total is None else total + losses.sum()
        if total is None or count == 0:
            raise ValueError("BatchHessian needs at least one non-empty batch")
        leaves = list(self._params.values())
        grads = torch.autograd.grad(total / count, leaves, create_graph=True, allow_unused=True)
        self._grads = [g if g is not None else torch.zeros_like(p) for g, p in zip(grads, leaves)]
        self.dim = sum(p.numel() for p in leaves)

    def __call__(self, v: torch.Tensor) -> torch.Tensor:
        parts = from_vector(v.to(self._grads[0].dtype), self._params)
        inner = sum((g * parts[k]).sum() for k, g in zip(self._params, self._grads) if g.requires_grad)
        if not isinstance(inner, torch.Tensor):  # the loss does not depend on the parameters
            return torch.zeros_like(v)
        hv = torch.autograd.grad(inner, list(self._params.values()), retain_graph=True, allow_unused=True)
        return torch.cat([(h if h is not None else torch.zeros_like(p)).reshape(-1)
                          for h, p in zip(hv, self._params.values())]).detach()


@dataclass
class PreparedCheckpoint:
    """Shared vectors of one checkpoint: target gradient u, proxy gradient g, w = H_B u
    (g and w are None when the scores asked for do not read them)."""

    u: ParamDict
    g: ParamDict | None
    w: ParamDict | None
    hvp: HVPMode
    target_loss: float


def prepare_checkpoint(objective: PerSampleObjective, params: ParamDict,
                       target_batches: Sequence[Batch], train_batches: Sequence[Batch],
                       hvp: HVPMode = "exact", eps: float = 1e-3,
                       vectors: Collection[str] = ("u", "g", "w"),
                       target_objective: PerSampleObjective | None = None) -> PreparedCheckpoint:
    """u_t = ∇L_V(θ_t), g_t = ∇L_B(θ_t) over the proxy batches, w_t = H_B u_t.

    u is always computed (it also gives the target loss); g and w only when in ``vectors``.
    L_V is ``target_objective``'s mean loss over ``target_batches`` (default: the training
    objective's, i.e. the target pairs' CLIP loss).
    """
    if hvp not in ("exact", "fd"):
        raise ValueError(f"unknown hvp mode {hvp!r}")
    target_objective = target_objective or objective
    u = mean_loss_grad(target_objective, params, target_batches)
    g = mean_loss_grad(objective, params, train_batches) if "g" in vectors else None
    w = None
    if "w" in vectors:  # the forward difference starts from g (computed here if not asked for)
        w = (hvp_exact(objective, params, train_batches, u) if hvp == "exact"
             else hvp_fd(objective, params, train_batches, u, eps, base_grad=g))
    with torch.no_grad():
        losses = torch.cat([per_sample_loss(target_objective, params, b) for b in target_batches])
    return PreparedCheckpoint(u, g, w, hvp, float(losses.mean()))


def prepare_unrolled(objective: PerSampleObjective, checkpoint_params: Sequence[ParamDict],
                     target_batches: Sequence[Batch], proxy_batches_at: Callable[[int], Sequence[Batch]],
                     segment_lrs: Sequence[Sequence[float]], settings: UnrolledSettings,
                     geometry: Sequence[AdamGeometry] | None = None,
                     target_objective: PerSampleObjective | None = None) -> list[UnrolledCheckpoint]:
    """The unrolled score directions of every checkpoint, sequentially.

    u = ∇L_V at the last checkpoint (L_V: ``target_objective``, default ``objective``, over
    ``target_batches``) starts the backward recursion; H_k is the Hessian of
    the mean loss over ``proxy_batches_at(k)`` at ``checkpoint_params[k]``, applied through
    K = ``settings.lanczos_steps`` products. Cost: m·K Hessian–vector products, independent
    of the corpus size. Directions are flat (:func:`pipeline.influence.params.from_vector`).
    """
    if len(checkpoint_params) != len(segment_lrs):
        raise ValueError(f"{len(checkpoint_params)} checkpoints but {len(segment_lrs)} segments")
    u = to_vector(mean_loss_grad(target_objective or objective, checkpoint_params[-1], target_batches))
    return unrolled_directions(
        u, lambda k: BatchHessian(objective, checkpoint_params[k], proxy_batches_at(k)), segment_lrs,
        settings.lanczos_steps, settings.factor, geometry)
