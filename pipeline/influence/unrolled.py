"""Unrolled Diff-In: the per-step influence differences summed to all orders.

Removing a sample z from SGD, linearised in 1/N along the recorded trajectory, gives

    ΔL_V(z) ≈ (1/N) Σ_s η_s ⟨v_{s+1}, G_z(θ_s)⟩,   v_T = ∇L_V(θ_T),   v_s = (I − η_s H_s) v_{s+1},

where update s takes θ_s to θ_{s+1} with learning rate η_s. The v's are shared by all
samples. With m checkpoints only, checkpoint k stands for the updates of its segment S_k
(:func:`segment_updates`) and its Hessian H_k stands for every H_s of the segment. Going
backward over the checkpoints from r = u (the target gradient at the last checkpoint):

    acc_k = φ_k(H_k) r,   φ_k(λ) = Σ_{s∈S_k} η_s Π_{s'∈S_k, s'>s} f(η_{s'}, λ)
    r     ← ψ_k(H_k) r,   ψ_k(λ) = Π_{s∈S_k} f(η_s, λ)

and the score of z is (1/N) Σ_k ⟨acc_k, G_z(θ_{t_k})⟩: one JVP per checkpoint, like TracIn.
φ_k(H_k) r and ψ_k(H_k) r come from one Lanczos run of K Hessian–vector products started at
r (:func:`lanczos`), with the scalar functions applied to the Ritz values. The per-step
factor f is stabilised against the negative curvature of a proxy-batch Hessian
(:func:`step_factor`): the exact 1 − ηλ grows without bound where λ < 0.

Under Adam(W) the update is η(P m̂ + λ_wd θ) with P = 1/(√v̂ + ε). The same recursion holds
for the symmetric operator λ_wd + P^{1/2} H P^{1/2} in the variable P^{1/2} v, and the
contribution of a step is η ⟨P^{1/2} y, G_z⟩ (:class:`AdamGeometry`).

:class:`UnrolledSettings` holds the knobs (K, f, proxy batches for H_k). Everything here
works on flat vectors (:func:`pipeline.influence.params.to_vector`); the
Hessian enters only through a matrix–vector callable.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal, Sequence

import torch
from torch import Tensor

MatVec = Callable[[Tensor], Tensor]
StepFactor = Literal["clamp", "exp"]
STEP_FACTORS: tuple[str, ...] = ("clamp", "exp")


@dataclass(frozen=True)
class UnrolledSettings:
    """How the unrolled directions are computed.

    ``lanczos_steps`` K Hessian–vector products per checkpoint; ``factor`` the stabilised
    per-step contraction (:func:`step_factor`); ``proxy_batches`` training batches the
    Hessian H_k is taken over at each checkpoint.
    """

    lanczos_steps: int = 20
    factor: StepFactor = "clamp"
    proxy_batches: int = 1

    def __post_init__(self) -> None:
        if self.lanczos_steps < 1 or self.proxy_batches < 1:
            raise ValueError("lanczos_steps and proxy_batches must be >= 1")
        if self.factor not in STEP_FACTORS:
            raise ValueError(f"unknown step factor {self.factor!r}; choose from {STEP_FACTORS}")


def step_factor(eta: float, lam: Tensor, kind: StepFactor = "clamp") -> Tensor:
    """The stabilised per-step contraction f(η, λ) of an eigen-direction with curvature λ.

    ``clamp``: clip(1 − η·max(λ, 0), −1, 1); ``exp``: exp(−η·max(λ, 0)). Both equal 1 on
    flat or negatively curved directions (a proxy-batch Hessian's negative eigenvalues are
    not allowed to amplify) and never exceed 1 in absolute value.
    """
    positive = lam.clamp(min=0)
    if kind == "clamp":
        return (1.0 - eta * positive).clamp(-1.0, 1.0)
    if kind == "exp":
        return torch.exp(-eta * positive)
    raise ValueError(f"unknown step factor {kind!r}; choose from {STEP_FACTORS}")


def segment_functions(lrs: Sequence[float], lam: Tensor,
                      kind: StepFactor = "clamp") -> tuple[Tensor, Tensor]:
    """(φ(λ), ψ(λ)) of one segment whose updates have learning rates ``lrs`` (in step order).

    φ(λ) = Σ_s η_s Π_{s'>s} f(η_{s'}, λ) and ψ(λ) = Π_s f(η_s, λ), evaluated elementwise on
    ``lam`` by one backward pass over the segment's updates.
    """
    acc = torch.zeros_like(lam)
    prod = torch.ones_like(lam)
    for eta in reversed(lrs):
        acc = acc + eta * prod
        prod = prod * step_factor(eta, lam, kind)
    return acc, prod


@dataclass
class LanczosResult:
    """A Krylov basis of K vectors for a symmetric operator A, started at r.

    ``basis`` [K, n] (orthonormal rows Q), the tridiagonal T (``alphas``, ``betas``), its
    eigenvalues (the Ritz values θ_i) and eigenvectors S, so that f(A) r ≈ ‖r‖ · Q S f(Θ) Sᵀ e₁.
    """

    basis: Tensor
    alphas: Tensor
    betas: Tensor
    start_norm: float
    ritz_values: Tensor
    eigvecs: Tensor

    @property
    def steps(self) -> int:
        """Number of Krylov vectors actually built (fewer than asked on breakdown)."""
        return int(self.basis.shape[0])

    def apply(self, fn: Callable[[Tensor], Tensor]) -> Tensor:
        """f(A) r from the Ritz pairs: ‖r‖ · Q S f(Θ) Sᵀ e₁ (a vector of length n)."""
        if self.start_norm == 0.0:
            return torch.zeros(self.basis.shape[1], dtype=self.basis.dtype, device=self.basis.device)
        values = fn(self.ritz_values)
        coeff = self.eigvecs @ (values * self.eigvecs[0]) * self.start_norm
        return coeff.to(self.basis.dtype) @ self.basis


def lanczos(matvec: MatVec, start: Tensor, steps: int, breakdown_tol: float = 1e-10) -> LanczosResult:
    """K = ``steps`` Lanczos iterations on the symmetric operator ``matvec`` from ``start``.

    Full re-orthogonalisation (classical Gram–Schmidt applied twice) keeps the basis
    orthonormal to working precision. The iteration stops early when the Krylov space
    becomes invariant (β below ``breakdown_tol`` relative to the largest |α|, β seen), in
    which case the result is exact. With K = n it equals an eigendecomposition.
    """
    if steps < 1:
        raise ValueError(f"Lanczos needs at least one step, got {steps}")
    if start.dim() != 1:
        raise ValueError(f"start vector must be flat, got shape {tuple(start.shape)}")
    start_norm = float(torch.linalg.vector_norm(start))
    n = start.numel()
    steps = min(steps, n)
    if start_norm == 0.0:
        empty = torch.zeros(1, dtype=torch.float64)
        return LanczosResult(torch.zeros(1, n, dtype=start.dtype, device=start.device), empty, empty[:0], 0.0,
                             empty, torch.ones(1, 1, dtype=torch.float64))
    basis = torch.empty(steps, n, dtype=start.dtype, device=start.device)  # filled row by row, never copied
    basis[0] = start / start_norm
    alphas: list[float] = []
    betas: list[float] = []
    scale = 0.0
    for j in range(steps):
        w = matvec(basis[j])
        alphas.append(float(torch.dot(basis[j], w)))
        q = basis[:j + 1]
        for _ in range(2):  # "twice is enough"
            w = torch.addmv(w, q.t(), torch.mv(q, w), alpha=-1)
        beta = float(torch.linalg.vector_norm(w))
        scale = max(scale, abs(alphas[-1]), beta)
        if j == steps - 1 or beta <= breakdown_tol * max(scale, 1e-300):
            break
        betas.append(beta)
        basis[j + 1] = w / beta
    alpha_t = torch.tensor(alphas, dtype=torch.float64)
    beta_t = torch.tensor(betas, dtype=torch.float64)
    tri = torch.diag(alpha_t) + torch.diag(beta_t, 1) + torch.diag(beta_t, -1)
    values, vectors = torch.linalg.eigh(tri)
    return LanczosResult(basis[:len(alphas)], alpha_t, beta_t, start_norm, values, vectors)


def segment_updates(checkpoint_steps: Sequence[int], total_steps: int) -> list[range]:
    """The updates s (θ_s → θ_{s+1}, 0-based) each checkpoint stands for.

    Checkpoint k (saved after t_k updates) takes t_{k−1} ≤ s < t_k; the updates before t_1
    go to the first checkpoint (t_0 = 0) and those from t_m to ``total_steps`` to the last.
    """
    steps = list(checkpoint_steps)
    if not steps or steps != sorted(steps) or len(set(steps)) != len(steps) or steps[0] < 0:
        raise ValueError(f"checkpoint steps must be distinct, increasing and >= 0, got {steps}")
    bounds = [0] + steps[:-1] + [max(total_steps, steps[-1])]
    return [range(bounds[k], bounds[k + 1]) for k in range(len(steps))]


@dataclass(frozen=True)
class AdamGeometry:
    """Adam(W)'s metric at one checkpoint: √P (P = 1/(√v̂ + ε)) and the decoupled decay λ_wd.

    ``sqrt_p`` and ``decay`` are flat vectors (``decay`` is λ_wd on decayed parameters, 0
    elsewhere); the operator of the recursion is decay + √P H √P in the variable √P v.
    """

    sqrt_p: Tensor
    decay: Tensor

    def operator(self, hvp: MatVec) -> MatVec:
        """y ↦ decay ⊙ y + √P ⊙ H(√P ⊙ y)."""
        return lambda y: self.decay * y + self.sqrt_p * hvp(self.sqrt_p * y)


@dataclass
class UnrolledCheckpoint:
    """What the recursion produced at one checkpoint.

    ``direction`` is the JVP tangent of the score (acc_k, or √P acc_k under Adam);
    ``ritz_values`` the operator's Ritz values from the Lanczos run (diagnostics);
    ``carried_norm`` ‖r‖ handed to the previous checkpoint.
    """

    direction: Tensor
    ritz_values: Tensor
    lanczos_steps: int
    carried_norm: float


def unrolled_directions(target_grad: Tensor, hessian_at: Callable[[int], MatVec],
                        segment_lrs: Sequence[Sequence[float]], lanczos_steps: int, factor: StepFactor = "clamp",
                        geometry: Sequence[AdamGeometry] | None = None) -> list[UnrolledCheckpoint]:
    """The per-checkpoint score directions acc_k of unrolled Diff-In, in checkpoint order.

    ``target_grad`` is u = ∇L_V at the last checkpoint (flat); ``hessian_at(k)`` returns
    v ↦ H_k v at checkpoint k (called once per checkpoint, last first, so only one operator
    need be alive at a time); ``segment_lrs[k]`` are the learning rates of the updates
    checkpoint k stands for (:func:`segment_updates`). With ``geometry`` (one
    :class:`AdamGeometry` per checkpoint) the recursion runs in Adam's metric.
    The score of z is (1/N) Σ_k ⟨direction_k, G_z(θ_k)⟩.
    """
    m = len(segment_lrs)
    if geometry is not None and len(geometry) != m:
        raise ValueError(f"need one geometry per checkpoint; got {len(geometry)} for {m}")
    v = target_grad
    out: list[UnrolledCheckpoint] = []
    for k in reversed(range(m)):
        lrs = list(segment_lrs[k])
        hvp = hessian_at(k)
        if geometry is None:
            operator, start = hvp, v
        else:
            operator, start = geometry[k].operator(hvp), geometry[k].sqrt_p * v
        basis = lanczos(operator, start, lanczos_steps)
        acc = basis.apply(lambda lam: segment_functions(lrs, lam, factor)[0])
        carried = basis.apply(lambda lam: segment_functions(lrs, lam, factor)[1])
        if geometry is None:
            direction, v = acc, carried
        else:
            direction = geometry[k].sqrt_p * acc
            v = carried / geometry[k].sqrt_p
        out.append(UnrolledCheckpoint(direction, basis.ritz_values, basis.steps,
                                      float(torch.linalg.vector_norm(v.double()))))
    return out[::-1]


def unrolled_scores(d: Tensor, num_samples: int) -> Tensor:
    """``diffin_unrolled`` from per-checkpoint components d [m, n] = ⟨acc_k, G_z(θ_k)⟩."""
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    return d.to(torch.float64).sum(0) / num_samples


def explicit_recursion(target_grad: Tensor, hessians: Sequence[Tensor], segment_lrs: Sequence[Sequence[float]],
                       factor: StepFactor | None = None) -> list[Tensor]:
    """Reference: acc_k by explicit products over every update with dense Hessians.

    ``factor=None`` uses the exact (I − η H) per update; otherwise f is applied through an
    eigendecomposition of each H_k. Meant for tests and small models only.
    """
    v = target_grad
    out = []
    for k in reversed(range(len(hessians))):
        h = hessians[k]
        if factor is None:
            step_op = [torch.eye(h.shape[0], dtype=h.dtype) - eta * h for eta in segment_lrs[k]]
        else:
            lam, vec = torch.linalg.eigh(h)
            step_op = [vec @ torch.diag(step_factor(eta, lam, factor)) @ vec.T for eta in segment_lrs[k]]
        acc = torch.zeros_like(v)
        for eta, op in zip(reversed(list(segment_lrs[k])), reversed(step_op)):
            acc = acc + eta * v
            v = op @ v
        out.append(acc)
    return out[::-1]

