"""The cosine form of first-order influence (a harm-detection lever, docs/QUALITY.md).

TracIn sums η_t·⟨u_t, G_z(θ_t)⟩ over the checkpoints, so a pair with a large loss gradient —
a mismatched caption, but also a hard clean pair — weighs in proportion to ‖G_z‖. The cosine
form divides each checkpoint's term by that norm (Pruthi et al. 2020 discuss the same
normalisation; "cosine TracIn" in later data-selection work), so only the gradient's direction
counts:

    cosine = Σ_t w_t · a_t / ‖G_z(θ_t)‖,   a_t = ⟨u_t, G_z(θ_t)⟩,

with ``w_t`` the column's per-checkpoint weights (TracIn's T·η_t/(N·m)). The norm is the
per-pair gradient of ℓ_z with the objective's shared context (the temperature and the
negative bank's embeddings) held constant: the pair's own path through the network. One
pair's share of the bank's gradient is 1/(bank size + 1) of the softmax mass, and computing
it exactly would cost a bank backward pass per pair.

No I/O, no Ray: per-sample gradients by ``torch.func.vmap(grad)``; the cost is a backward
pass per pair per checkpoint (about 70 ms a pair on one CPU core for the quality bench's
tiny CLIP), which is why it is a study lever and not a ``score.method``.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor
from torch.func import grad, vmap

from pipeline.influence.objective import Context, PerSampleObjective, forward_mode_safe
from pipeline.influence.params import ParamDict


def fixed_context(objective: PerSampleObjective, params: ParamDict) -> Context:
    """The objective's shared context at ``params``, detached (held constant)."""
    with torch.no_grad():
        return tuple(c.detach() for c in objective.context(params))


def gradient_norms(objective: PerSampleObjective, params: ParamDict, batch: Sequence[Tensor],
                   context: Context | None = None) -> Tensor:
    """‖∇_θ ℓ_z(θ)‖ (float64 [n]) of every sample z of ``batch`` (a tuple of tensors with the
    samples along dim 0), ``context`` (default: :func:`fixed_context`) held constant."""
    held = fixed_context(objective, params) if context is None else context

    def one(p: ParamDict, *sample: Tensor) -> Tensor:
        single = tuple(x[None] for x in sample)
        return objective.loss(objective.features(p, single), held, single)[0]

    per_sample = vmap(grad(one), in_dims=(None, *([0] * len(batch))))
    with forward_mode_safe():
        grads = per_sample(params, *batch)
    return torch.sqrt(sum((g.reshape(g.shape[0], -1).double() ** 2).sum(1) for g in grads.values()))


def cosine_form(components: Tensor, weights: Sequence[float] | Tensor, norms: Tensor,
                floor: float = 1e-12) -> Tensor:
    """Σ_t w_t · a_t / max(‖G_z,t‖, floor) for components ``a`` [m, n], ``weights`` [m] and
    gradient norms [m, n]; float64 [n]. A zero gradient (a pair the model fits exactly) gives
    a zero term, not a division by zero."""
    a, g = components.double(), norms.double()
    if a.shape != g.shape:
        raise ValueError(f"components {tuple(a.shape)} and norms {tuple(g.shape)} differ in shape")
    w = torch.as_tensor(weights, dtype=torch.float64)
    if w.shape != (a.shape[0],):
        raise ValueError(f"{w.numel()} weights for {a.shape[0]} checkpoints")
    return (w[:, None] * a / g.clamp_min(floor)).sum(0)
