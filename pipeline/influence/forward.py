"""Per-sample components by forward-mode differentiation.

For a batch of samples z at checkpoint θ_t, with the prepared u, g, w:

- a(z) = ⟨u, G_z⟩      : JVP of ℓ_z along u
- b(z) = ⟨w, G_z⟩      : JVP of ℓ_z along w
- c(z) = ⟨u, H_z g⟩    : exact — mixed second derivative of ℓ_z along (u, g) by nested
  forward mode; or the paper's finite difference (JVP_u at θ + εĝ − JVP_u at θ)·‖g‖/ε

No per-sample backward pass and no per-sample gradient is ever formed. The shared context
(the negative bank) and its tangents are computed once per checkpoint and direction in
:class:`CheckpointScorer` and reused for every batch.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable, Literal

import torch
from torch import Tensor
from torch.func import jvp, vmap

from pipeline.influence.objective import (Batch, Context, Features, PerSampleObjective, decomposed_layer_norm,
                                          fused_layer_norm_jvp)
from pipeline.influence.params import ParamDict, axpy, norm
from pipeline.influence.scores import ADAM_TWINS

CMode = Literal["exact", "fd"]


def context_jet(objective: PerSampleObjective, params: ParamDict, v: ParamDict) -> tuple[Context, Context]:
    """The shared context at ``params`` and its directional derivative along ``v``."""
    if not objective.context(params):
        return (), ()
    return jvp(objective.context, (params,), (v,))


def context_jet2(objective: PerSampleObjective, params: ParamDict, u: ParamDict,
                 g: ParamDict) -> tuple[Context, Context, Context, Context]:
    """Context, its derivatives along u and g, and the mixed second derivative along (u, g)."""
    if not objective.context(params):
        return (), (), (), ()

    def along_u(p: ParamDict) -> tuple[Context, Context]:
        return jvp(objective.context, (p,), (u,))

    with decomposed_layer_norm():
        (ctx, ctx_u), (ctx_g, ctx_ug) = jvp(along_u, (params,), (g,))
    return ctx, ctx_u, ctx_g, ctx_ug


FeaturesJVP = Callable[[ParamDict, ParamDict, Batch], tuple[Features, Features]]


def features_jvp(objective: PerSampleObjective, params: ParamDict, v: ParamDict,
                 batch: Batch) -> tuple[Features, Features]:
    """The network part of a first-order JVP: the features of ``batch`` and their tangent along v."""
    return jvp(lambda p: objective.features(p, batch), (params,), (v,))


def compiled_features_jvp(objective: PerSampleObjective) -> FeaturesJVP:
    """:func:`features_jvp` for ``objective`` through ``torch.compile`` (inductor fuses the
    tangent's elementwise work). Compiled on first call per input shape (a one-off cost of
    about a minute for the tiny CLIP on CPU); results equal the eager JVP to float rounding."""
    return torch.compile(functools.partial(features_jvp, objective), dynamic=False)


def loss_jvp(objective: PerSampleObjective, params: ParamDict, batch: Batch, v: ParamDict,
             ctx: Context, ctx_v: Context, network_jvp: FeaturesJVP | None = None) -> tuple[Tensor, Tensor, Features]:
    """(ℓ_z, ⟨∇ℓ_z, v⟩, features) for every z in ``batch``; the context's jet is given.

    ``network_jvp`` (e.g. :func:`compiled_features_jvp`) replaces the eager network JVP."""
    if network_jvp is not None:
        feats, feats_v = network_jvp(params, v, batch)
    else:
        with fused_layer_norm_jvp():
            feats, feats_v = features_jvp(objective, params, v, batch)
    loss, dloss = jvp(lambda f, c: objective.loss(f, c, batch), (feats, ctx), (feats_v, ctx_v))
    return loss, dloss, feats


def stack_directions(directions: list[ParamDict]) -> ParamDict:
    """Several directions stacked along a new leading dimension (for :func:`loss_jvp_multi`)."""
    return {k: torch.stack([d[k] for d in directions]) for k in directions[0]}


def stack_context(tangents: list[Context]) -> Context:
    """Context tangents of several directions stacked along a new leading dimension."""
    return tuple(torch.stack(parts) for parts in zip(*tangents))


def loss_jvp_multi(objective: PerSampleObjective, params: ParamDict, batch: Batch,
                   directions: ParamDict, ctx: Context, ctx_tangents: Context) -> tuple[Tensor, Tensor, Features]:
    """(ℓ_z, [⟨∇ℓ_z, v_k⟩]_k, features) for K stacked directions in one pass.

    ``vmap`` over the tangents keeps the primal unbatched, so the network's primal work is
    done once for all K directions (measured ≈15 % less than K separate JVPs for K = 2).
    """
    def one(v: ParamDict) -> tuple[Features, Features]:
        return jvp(lambda p: objective.features(p, batch), (params,), (v,))

    with fused_layer_norm_jvp():
        feats_all, feats_t = vmap(one, randomness="error")(directions)
    feats = tuple(f[0] for f in feats_all)  # the primal is the same for every direction

    def dloss(ft: Features, ct: Context) -> Tensor:
        return jvp(lambda f, c: objective.loss(f, c, batch), (feats, ctx), (ft, ct))[1]

    loss = objective.loss(feats, ctx, batch)
    return loss, vmap(dloss)(feats_t, ctx_tangents), feats


def loss_mixed(objective: PerSampleObjective, params: ParamDict, batch: Batch, u: ParamDict,
               g: ParamDict, ctx2: tuple[Context, Context, Context, Context]) -> Tensor:
    """⟨u, H_z g⟩ for every z: the exact mixed second derivative (nested forward mode)."""
    def along_u(p: ParamDict) -> tuple[Features, Features]:
        return jvp(lambda q: objective.features(q, batch), (p,), (u,))

    with decomposed_layer_norm():
        (f, f_u), (f_g, f_ug) = jvp(along_u, (params,), (g,))
    ctx, ctx_u, ctx_g, ctx_ug = ctx2

    def first_derivative(feats: Features, c: Context, t_feats: Features, t_c: Context) -> Tensor:
        return jvp(lambda ff, cc: objective.loss(ff, cc, batch), (feats, c), (t_feats, t_c))[1]

    return jvp(first_derivative, (f, ctx, f_u, ctx_u), (f_g, ctx_g, f_ug, ctx_ug))[1]


@dataclass
class Components:
    """Per-sample components at one checkpoint (vectors over the batch; NaN where not computed)."""

    loss: Tensor
    a: Tensor
    b: Tensor
    c: Tensor
    features: Features = ()
    a_pre: Tensor | None = None
    d: Tensor | None = None
    computed: tuple[str, ...] = ()  # the component names this scorer computed (of COMPONENT_NAMES)

    def named(self) -> dict[str, Tensor]:
        """The computed components by their score-file names (``a_adam`` for ``a_pre``)."""
        out = {name: getattr(self, name) for name in self.computed}
        if self.a_pre is not None:
            out[ADAM_TWINS["a"]] = self.a_pre
        return out


COMPONENT_NAMES = ("a", "b", "c", "d")

# The prepared vectors each component reads (d reads the unrolled direction, prepared apart).
COMPONENT_VECTORS: dict[str, tuple[str, ...]] = {"a": ("u",), "b": ("w",), "c": ("u", "g"), "d": ()}


def vectors_needed(components: tuple[str, ...]) -> frozenset[str]:
    """The prepared vectors (of u, g, w) that ``components`` read."""
    return frozenset(v for c in components for v in COMPONENT_VECTORS[c])


class CheckpointScorer:
    """Computes the requested components for batches at one checkpoint; context jets cached.

    ``components`` ⊆ {"a", "b", "c", "d"}: a = ⟨u, G_z⟩, b = ⟨w, G_z⟩, c = ⟨u, H_z g⟩ (needs
    "a"), d = ⟨acc, G_z⟩ along the unrolled direction ``unrolled``. The JVPs at
    θ share one primal pass; "d" alone costs one JVP. ``c_mode="fd"`` uses the paper's forward
    difference with step ``eps`` along ĝ; ``"exact"`` uses nested forward mode (about twice
    the cost of the difference). ``preconditioned_u`` (P_t u_t, e.g. Adam's 1/(√v̂+ε) ⊙ u_t)
    adds ``a_pre`` = ⟨P_t u_t, G_z⟩ for the optimizer-aware first-order variant.
    ``network_jvp`` (:func:`compiled_features_jvp`) runs a single-direction JVP compiled.
    """

    def __init__(self, objective: PerSampleObjective, params: ParamDict, u: ParamDict | None,
                 g: ParamDict | None, w: ParamDict | None, c_mode: CMode = "fd", eps: float = 1e-3,
                 components: tuple[str, ...] = ("a", "b", "c"),
                 preconditioned_u: ParamDict | None = None, unrolled: ParamDict | None = None,
                 network_jvp: FeaturesJVP | None = None) -> None:
        if c_mode not in ("exact", "fd"):
            raise ValueError(f"unknown c mode {c_mode!r}")
        unknown = [c for c in components if c not in COMPONENT_NAMES]
        if unknown or not components:
            raise ValueError(f"components must be a non-empty subset of {COMPONENT_NAMES}, got {components}")
        if "c" in components and "a" not in components:
            raise ValueError("component c needs component a")
        given = {"u": u, "g": g, "w": w}
        missing = sorted(n for n in vectors_needed(components) if given[n] is None)
        if "d" in components and unrolled is None:
            missing.append("unrolled")
        if missing:
            raise ValueError(f"components {components} need the vectors {missing}")
        vectors = {"u": u if "a" in components else None, "w": w if "b" in components else None,
                   "pu": preconditioned_u, "d": unrolled if "d" in components else None}
        self.objective, self.params, self.u, self.g, self.w = objective, params, u, g, w
        self.c_mode, self.eps, self.components = c_mode, eps, components
        self.network_jvp = network_jvp  # single-direction JVPs only (the vmapped path stays eager)
        self._direction_names = [n for n in ("u", "w", "pu", "d") if vectors[n] is not None]
        with torch.no_grad():
            self._jets = {n: context_jet(objective, params, vectors[n]) for n in self._direction_names}
            if "c" in components:
                self.g_norm = norm(g)
            if "c" in components and c_mode == "fd":
                self.shifted = axpy(eps / self.g_norm, g, params)
                self.ctx_u_shifted = context_jet(objective, self.shifted, u)
            elif "c" in components:
                self.ctx2 = context_jet2(objective, params, u, g)
        self._single = vectors[self._direction_names[0]] if len(self._direction_names) == 1 else None
        if len(self._direction_names) > 1:
            self._directions = stack_directions([vectors[n] for n in self._direction_names])
            first = self._jets[self._direction_names[0]]
            self._ctx = first[0]
            self._ctx_tangents = stack_context([self._jets[n][1] for n in self._direction_names]) if first[0] else ()

    def _first_order(self, batch: Batch) -> tuple[Tensor, dict[str, Tensor], Features]:
        """The loss and the JVPs along every direction at θ, sharing the primal pass."""
        if self._single is not None:
            name = self._direction_names[0]
            loss, jvp_value, features = loss_jvp(self.objective, self.params, batch, self._single, *self._jets[name],
                                                 network_jvp=self.network_jvp)
            return loss, {name: jvp_value}, features
        loss, jvps, features = loss_jvp_multi(self.objective, self.params, batch, self._directions,
                                              self._ctx, self._ctx_tangents)
        return loss, dict(zip(self._direction_names, jvps)), features

    @torch.no_grad()
    def __call__(self, batch: Batch) -> Components:
        obj = self.objective
        loss, first, features = self._first_order(batch)
        nan = torch.full_like(loss, float("nan"))
        a = first.get("u", nan)
        b = first.get("w", nan)
        if "c" not in self.components:
            c = nan
        elif self.c_mode == "fd":
            a_shifted = loss_jvp(obj, self.shifted, batch, self.u, *self.ctx_u_shifted)[1]
            c = (a_shifted - a) * (self.g_norm / self.eps)
        else:
            c = loss_mixed(obj, self.params, batch, self.u, self.g, self.ctx2)
        return Components(loss, a, b, c, features, first.get("pu"), first.get("d"), self.components)
