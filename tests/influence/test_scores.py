"""Scores: the combination formulas, and Eq. 9 against the reference's per-sample algorithm."""

from __future__ import annotations

import torch

from pipeline.influence.forward import CheckpointScorer
from pipeline.influence.objective import forward_mode_safe
from pipeline.influence.params import axpy, dot, norm, params_of, scale, sub
from pipeline.influence.prepare import mean_loss_grad, prepare_checkpoint
from pipeline.influence.scores import (COLUMN_COMPONENTS, COLUMN_FORMULAS, COMPONENTS, CheckpointWeights,
                                       ScoreContext, combine, compute_columns)
from tests.influence.conftest import make_clip_case

N, T = 1000, 90
CKPTS = [CheckpointWeights(step=30, lr=0.02), CheckpointWeights(step=60, lr=0.01)]


def test_combine_formulas_and_identity() -> None:
    gen = torch.Generator().manual_seed(0)
    a, b, c = (torch.randn(2, 5, generator=gen, dtype=torch.float64) for _ in range(3))
    s = combine(a, b, c, CKPTS, N, T)
    m = len(CKPTS)
    tracin = sum(T / (N * m) * ck.lr * a[i] for i, ck in enumerate(CKPTS))
    eq9 = sum(-(ck.step * ck.lr**2) / (N * m) * (b[i] + c[i]) for i, ck in enumerate(CKPTS))
    assert torch.allclose(s["tracin"], tracin, rtol=1e-14)
    assert torch.allclose(s["diffin_eq9"], eq9, rtol=1e-14)
    assert torch.allclose(s["diffin"], s["tracin"] + T * s["diffin_eq9"], rtol=1e-12)


def test_every_column_has_one_formula_over_its_declared_components() -> None:
    """The vocabulary is the one owner: each column's formula reads exactly its declared
    components, and compute_columns gives a column iff all of them are present."""
    gen = torch.Generator().manual_seed(1)
    full = {name: torch.randn(2, 4, generator=gen, dtype=torch.float64) for name in COMPONENTS}
    ctx = ScoreContext(CKPTS, N, T)
    assert set(COLUMN_FORMULAS) == {c for c, needs in COLUMN_COMPONENTS.items() if needs}
    for column, needs in COLUMN_COMPONENTS.items():
        if not needs:
            continue
        only = compute_columns({n: full[n] for n in needs}, ctx)
        assert torch.equal(only[column], compute_columns(full, ctx)[column])  # reads nothing else
        for missing in needs:
            partial = {n: full[n] for n in needs if n != missing}
            assert column not in compute_columns(partial, ctx)
    m = len(CKPTS)
    unrolled = compute_columns({"d": full["d"], "d_adam": full["d_adam"]}, ctx)
    assert torch.allclose(unrolled["diffin_unrolled"], full["d"].sum(0) / N, rtol=1e-15)
    assert torch.allclose(unrolled["diffin_unrolled_adam"], full["d_adam"].sum(0) / N, rtol=1e-15)
    adam = compute_columns({"a_adam": full["a_adam"]}, ctx)["tracin_adam"]
    assert torch.allclose(adam, sum(T / (N * m) * ck.lr * full["a_adam"][i] for i, ck in enumerate(CKPTS)))


def reference_eq9(objective, thetas, target, train, batch, eps: float = 1e-6) -> torch.Tensor:
    """The reference's Eq. 9, per sample, as its code does it: per-sample backward passes,
    the target gradient re-evaluated at every checkpoint, and both Hessian–vector products
    by forward differences of gradients along unit directions (H v ≈ (∇L(θ+εv̂) − ∇L(θ))‖v‖/ε)."""
    scores = []
    for i in range(batch[0].shape[0]):
        z = [tuple(x[i:i + 1] for x in batch)]
        total = torch.zeros((), dtype=torch.float64)
        for theta, ck in zip(thetas, CKPTS):
            u = mean_loss_grad(objective, theta, target)
            g = mean_loss_grad(objective, theta, train)
            grad_z = mean_loss_grad(objective, theta, z)
            hb_gz = scale(norm(grad_z) / eps, sub(mean_loss_grad(objective, axpy(eps / norm(grad_z), grad_z, theta), train), g))
            hz_g = scale(norm(g) / eps, sub(mean_loss_grad(objective, axpy(eps / norm(g), g, theta), z), grad_z))
            total = total - ck.step * ck.lr**2 / (N * len(CKPTS)) * (dot(u, hb_gz) + dot(u, hz_g))
        scores.append(total)
    return torch.stack(scores)


def test_eq9_equals_reference_algorithm() -> None:
    model, objective, batch_fn = make_clip_case(torch.float64)
    theta0 = params_of(model)
    gen = torch.Generator().manual_seed(7)
    theta1 = {k: v + 0.01 * torch.randn(v.shape, generator=gen, dtype=v.dtype) for k, v in theta0.items()}
    thetas = [theta0, theta1]
    target, train, batch = [batch_fn(6, torch.float64, 1)], [batch_fn(6, torch.float64, 3)], batch_fn(3, torch.float64, 4)
    with forward_mode_safe():
        comps = []
        for theta in thetas:
            prep = prepare_checkpoint(objective, theta, target, train, hvp="exact")
            comps.append(CheckpointScorer(objective, theta, prep.u, prep.g, prep.w, c_mode="exact")(batch))
        ours = combine(torch.stack([c.a for c in comps]), torch.stack([c.b for c in comps]),
                       torch.stack([c.c for c in comps]), CKPTS, N, T)["diffin_eq9"]
        ref = reference_eq9(objective, thetas, target, train, batch)
    assert float((ours - ref).abs().max() / ref.abs().max()) <= 1e-4
