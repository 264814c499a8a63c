"""Unrolled Diff-In: Lanczos, the checkpoint recursion, the stabilised factor, the JVP (float64)."""

from __future__ import annotations

import pytest
import torch

from pipeline.influence.forward import CheckpointScorer
from pipeline.influence.objective import forward_mode_safe
from pipeline.influence.params import from_vector, params_of, to_vector
from pipeline.influence.prepare import BatchHessian, hvp_exact, mean_loss_grad
from pipeline.influence.unrolled import (AdamGeometry, explicit_recursion, lanczos, segment_functions,
                                         segment_updates, step_factor, unrolled_directions, unrolled_scores)
from tests.influence.conftest import make_clip_case, make_mlp_case

F64 = torch.float64


def rel(x: torch.Tensor, ref: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(x - ref) / torch.linalg.vector_norm(ref))


def symmetric(n: int, seed: int, negative: bool = True) -> torch.Tensor:
    """A random symmetric matrix with spread-out eigenvalues (some negative unless told)."""
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=F64))
    lam = torch.linspace(-2.0 if negative else 0.05, 30.0, n, dtype=F64)
    return q @ torch.diag(lam) @ q.T


def test_lanczos_full_dimension_equals_eigendecomposition() -> None:
    a = symmetric(40, 0)
    r = torch.randn(40, generator=torch.Generator().manual_seed(1), dtype=F64)
    basis = lanczos(lambda v: a @ v, r, steps=40)
    lam, vec = torch.linalg.eigh(a)
    for fn in (torch.exp, lambda x: torch.cos(x) + x**2, lambda x: segment_functions([0.01, 0.05, 0.02], x)[0]):
        exact = vec @ (fn(lam) * (vec.T @ r))
        assert rel(basis.apply(fn), exact) <= 1e-8
    assert torch.allclose(basis.basis @ basis.basis.T, torch.eye(40, dtype=F64), atol=1e-10)


def test_lanczos_stops_exactly_on_an_invariant_subspace() -> None:
    a = symmetric(30, 2)
    lam, vec = torch.linalg.eigh(a)
    r = vec[:, :3] @ torch.tensor([1.0, -2.0, 0.5], dtype=F64)  # lies in a 3-dim invariant subspace
    basis = lanczos(lambda v: a @ v, r, steps=20)
    assert basis.steps == 3
    decay = lambda x: torch.exp(-0.1 * x)  # noqa: E731 (bounded on the spectrum: a fair reference)
    assert rel(basis.apply(decay), vec @ (decay(lam) * (vec.T @ r))) <= 1e-8


def test_lanczos_zero_start_gives_zero() -> None:
    basis = lanczos(lambda v: v, torch.zeros(5, dtype=F64), steps=3)
    assert torch.equal(basis.apply(torch.exp), torch.zeros(5, dtype=F64))


def test_few_lanczos_steps_approximate_a_smooth_function() -> None:
    a = symmetric(200, 3, negative=False)
    r = torch.randn(200, generator=torch.Generator().manual_seed(4), dtype=F64)
    lrs = [0.01] * 50
    lam, vec = torch.linalg.eigh(a)
    exact = vec @ (segment_functions(lrs, lam)[0] * (vec.T @ r))
    errors = [rel(lanczos(lambda v: a @ v, r, k).apply(lambda x: segment_functions(lrs, x)[0]), exact) for k in (4, 12)]
    assert errors[1] < errors[0] and errors[1] < 0.02


def test_segment_updates_cover_every_update_once() -> None:
    segs = segment_updates([30, 60, 90], 100)
    assert [list(s)[:1] + list(s)[-1:] for s in segs] == [[0, 29], [30, 59], [60, 99]]
    assert sum(len(s) for s in segs) == 100
    with pytest.raises(ValueError):
        segment_updates([60, 30], 100)


def test_step_factor_is_bounded_with_negative_curvature() -> None:
    lam = torch.tensor([-50.0, -1.0, 0.0, 1.0, 10.0, 1e4], dtype=F64)
    for kind in ("clamp", "exp"):
        f = step_factor(0.1, lam, kind)
        assert bool((f.abs() <= 1).all())
        assert torch.equal(f[:3], torch.ones(3, dtype=F64))  # no amplification through λ <= 0
    with pytest.raises(ValueError):
        step_factor(0.1, lam, "exact")


def test_stabilised_recursion_stays_bounded_where_the_exact_one_explodes() -> None:
    a = symmetric(20, 5)  # eigenvalues down to −2
    u = torch.randn(20, generator=torch.Generator().manual_seed(6), dtype=F64)
    lrs = [[0.05] * 200, [0.05] * 200]
    exact = explicit_recursion(u, [a, a], lrs)
    assert float(torch.linalg.vector_norm(exact[0])) > 1e6 * float(torch.linalg.vector_norm(u))
    for kind in ("clamp", "exp"):
        dirs = unrolled_directions(u, lambda k: (lambda v: a @ v), lrs, lanczos_steps=20, factor=kind)
        total_lr = sum(sum(x) for x in lrs)
        for d in dirs:
            assert float(torch.linalg.vector_norm(d.direction)) <= total_lr * float(torch.linalg.vector_norm(u)) * (1 + 1e-9)
        assert dirs[0].carried_norm <= float(torch.linalg.vector_norm(u)) * (1 + 1e-9)
        reference = explicit_recursion(u, [a, a], lrs, factor=kind)
        for d, ref in zip(dirs, reference):
            assert rel(d.direction, ref) <= 1e-8


def test_checkpoint_recursion_equals_explicit_products_on_a_short_trajectory() -> None:
    """SPD Hessians and ηλ < 1: the stabilised factor is the exact 1 − ηλ, so the Lanczos
    recursion must equal the explicit loop of (I − η_s H_k) products."""
    hessians = [symmetric(25, s, negative=False) for s in (10, 11, 12)]
    u = torch.randn(25, generator=torch.Generator().manual_seed(13), dtype=F64)
    lrs = [[0.02, 0.015, 0.01], [0.01, 0.008], [0.006, 0.004, 0.002, 0.001]]
    dirs = unrolled_directions(u, lambda k: (lambda v: hessians[k] @ v), lrs, lanczos_steps=25)
    for d, ref in zip(dirs, explicit_recursion(u, hessians, lrs)):
        assert rel(d.direction, ref) <= 1e-8


def test_adam_geometry_equals_explicit_adamw_recursion() -> None:
    """v_s = (I − η(H P + D)) v_{s+1}, contribution η ⟨P v, G⟩: direction_k = Σ η_s P v_{s+1}."""
    n = 15
    hessians = [symmetric(n, s, negative=False) / 10 for s in (20, 21)]
    gen = torch.Generator().manual_seed(22)
    ps = [torch.rand(n, generator=gen, dtype=F64) * 3 + 0.2 for _ in hessians]
    decay = torch.where(torch.arange(n) % 2 == 0, 0.1, 0.0).to(F64)
    u = torch.randn(n, generator=gen, dtype=F64)
    lrs = [[0.01, 0.02], [0.02, 0.01, 0.005]]
    v, reference = u, []
    for k in reversed(range(2)):
        acc = torch.zeros(n, dtype=F64)
        for eta in reversed(lrs[k]):
            acc = acc + eta * ps[k] * v
            op = torch.eye(n, dtype=F64) - eta * (hessians[k] @ torch.diag(ps[k]) + torch.diag(decay))
            v = op @ v
        reference.append(acc)
    reference = reference[::-1]
    geometry = [AdamGeometry(p.sqrt(), decay) for p in ps]
    dirs = unrolled_directions(u, lambda k: (lambda x: hessians[k] @ x), lrs, lanczos_steps=n, geometry=geometry)
    for d, ref in zip(dirs, reference):
        assert rel(d.direction, ref) <= 1e-8


@pytest.mark.parametrize("kind", ["mlp", "clip"])
def test_batch_hessian_equals_double_backward(kind: str) -> None:
    model, objective, batch_fn = make_clip_case(F64) if kind == "clip" else make_mlp_case(F64)
    params = params_of(model)
    batches = [batch_fn(6, F64, 3), batch_fn(4, F64, 5)]
    v = {k: torch.randn_like(x) for k, x in params.items()}
    with forward_mode_safe():
        operator = BatchHessian(objective, params, batches)
        ours = operator(to_vector(v))
        ref = to_vector(hvp_exact(objective, params, batches, v))
    assert rel(ours, ref) <= 1e-10
    assert operator.dim == ours.numel()


def test_lanczos_on_a_real_hessian_with_full_dimension() -> None:
    model, objective, batch_fn = make_mlp_case(F64)
    params = params_of(model)
    batches = [batch_fn(16, F64, 3)]
    operator = BatchHessian(objective, params, batches)
    dense = torch.stack([operator(e) for e in torch.eye(operator.dim, dtype=F64)])
    dense = (dense + dense.T) / 2
    u = to_vector(mean_loss_grad(objective, params, [batch_fn(8, F64, 1)]))
    lrs = [0.05] * 30
    lam, vec = torch.linalg.eigh(dense)
    exact = vec @ (segment_functions(lrs, lam)[0] * (vec.T @ u))
    assert rel(lanczos(operator, u, operator.dim).apply(lambda x: segment_functions(lrs, x)[0]), exact) <= 1e-8


@pytest.mark.parametrize("kind", ["mlp", "clip"])
def test_jvp_along_unrolled_direction_equals_brute_force(kind: str) -> None:
    model, objective, batch_fn = make_clip_case(F64) if kind == "clip" else make_mlp_case(F64)
    params = params_of(model)
    batch = batch_fn(4, F64, 4)
    with forward_mode_safe():
        u = to_vector(mean_loss_grad(objective, params, [batch_fn(6, F64, 1)]))
        operator = BatchHessian(objective, params, [batch_fn(6, F64, 3)])
        direction = unrolled_directions(u, lambda k: operator, [[0.1] * 5], lanczos_steps=8)[0].direction
        acc = from_vector(direction, params)
        comp = CheckpointScorer(objective, params, None, None, None, components=("d",), unrolled=acc)(batch)
        brute = []
        for i in range(batch[0].shape[0]):
            grad = mean_loss_grad(objective, params, [tuple(x[i:i + 1] for x in batch)])
            brute.append(torch.dot(direction, to_vector(grad)))
    assert rel(comp.d, torch.stack(brute)) <= 1e-8
    assert bool(comp.a.isnan().all()) and bool(comp.b.isnan().all())
    assert torch.allclose(unrolled_scores(comp.d[None], 1000), comp.d / 1000)


def test_scorer_shares_the_primal_between_tracin_and_unrolled_directions() -> None:
    model, objective, batch_fn = make_clip_case(F64)
    params = params_of(model)
    batch = batch_fn(3, F64, 4)
    with forward_mode_safe():
        u = mean_loss_grad(objective, params, [batch_fn(6, F64, 1)])
        acc = {k: 0.3 * v + 0.01 for k, v in u.items()}
        both = CheckpointScorer(objective, params, u, None, None, components=("a", "d"), unrolled=acc)(batch)
        alone = CheckpointScorer(objective, params, None, None, None, components=("d",), unrolled=acc)(batch)
        first = CheckpointScorer(objective, params, u, None, None, components=("a",))(batch)
    assert rel(both.d, alone.d) <= 1e-10 and rel(both.a, first.a) <= 1e-10
    with pytest.raises(ValueError):
        CheckpointScorer(objective, params, None, None, None, components=("d",))
    with pytest.raises(ValueError):
        CheckpointScorer(objective, params, u, u, u, components=("c",))
