"""Forward-mode components against brute-force autograd (per-sample gradients, exact HVPs)."""

from __future__ import annotations

import pytest
import torch

from pipeline.influence.forward import CheckpointScorer, compiled_features_jvp, vectors_needed
from pipeline.influence.objective import forward_mode_safe
from pipeline.influence.params import dot, params_of
from pipeline.influence.prepare import hvp_exact, hvp_fd, mean_loss_grad, prepare_checkpoint
from tests.influence.conftest import make_clip_case, make_mlp_case


def rel(x: torch.Tensor, ref: torch.Tensor) -> float:
    return float((x - ref).abs().max() / ref.abs().max())


def brute_force(objective, params, prep, batch):
    """a, b, c per sample from per-sample backward passes and exact per-sample HVPs."""
    a, b, c = [], [], []
    n = batch[0].shape[0]
    for i in range(n):
        single = tuple(x[i:i + 1] for x in batch)
        grad = mean_loss_grad(objective, params, [single])
        a.append(dot(prep.u, grad))
        b.append(dot(prep.w, grad))
        c.append(dot(prep.u, hvp_exact(objective, params, [single], prep.g)))
    return torch.stack(a), torch.stack(b), torch.stack(c)


def _setup(case, dtype=torch.float64):
    model, objective, batch_fn = case
    params = params_of(model)
    target = [batch_fn(6, dtype, 1), batch_fn(3, dtype, 2)]
    train = [batch_fn(6, dtype, 3)]
    return objective, params, target, train, batch_fn(4, dtype, 4)


@pytest.mark.parametrize("kind,dtype,tol", [("mlp", torch.float64, 1e-8), ("clip", torch.float64, 1e-8),
                                            ("clip", torch.float32, 1e-4)])
def test_exact_components_match_brute_force(kind: str, dtype: torch.dtype, tol: float) -> None:
    case = make_clip_case(dtype) if kind == "clip" else make_mlp_case(dtype)
    objective, params, target, train, batch = _setup(case, dtype)
    with forward_mode_safe():
        prep = prepare_checkpoint(objective, params, target, train, hvp="exact")
        comp = CheckpointScorer(objective, params, prep.u, prep.g, prep.w, c_mode="exact")(batch)
        a, b, c = brute_force(objective, params, prep, batch)
    assert rel(comp.a, a) <= tol
    assert rel(comp.b, b) <= tol
    assert rel(comp.c, c) <= tol


def test_finite_differences_within_expected_error(case64) -> None:
    """Forward differences have O(ε) truncation error: 10× smaller ε → ~10× smaller error."""
    objective, params, target, train, batch = _setup(case64)
    with forward_mode_safe():
        prep = prepare_checkpoint(objective, params, target, train, hvp="exact")
        exact_c = CheckpointScorer(objective, params, prep.u, prep.g, prep.w, c_mode="exact")(batch).c
        errs_c, errs_w = [], []
        for eps in (1e-4, 1e-5):
            fd_c = CheckpointScorer(objective, params, prep.u, prep.g, prep.w, c_mode="fd", eps=eps)(batch).c
            errs_c.append(rel(fd_c, exact_c))
            w_fd = hvp_fd(objective, params, train, prep.u, eps=eps)
            errs_w.append(float(sum((w_fd[k] - prep.w[k]).abs().max() for k in w_fd)
                                / sum(prep.w[k].abs().max() for k in w_fd)))
    assert errs_c[0] <= 2e-2 and errs_w[0] <= 2e-2
    assert errs_c[1] <= errs_c[0] / 5 and errs_w[1] <= errs_w[0] / 5  # first-order truncation


def test_components_do_not_depend_on_batch_neighbours(case64) -> None:
    objective, params, target, train, batch = _setup(case64)
    with forward_mode_safe():
        prep = prepare_checkpoint(objective, params, target, train, hvp="exact")
        scorer = CheckpointScorer(objective, params, prep.u, prep.g, prep.w, c_mode="fd")
        full = scorer(batch)
        other = tuple(torch.cat([x[2:3], y]) for x, y in zip(batch, train[0]))  # sample 2 among others
        alone = scorer(other)
    for name in ("loss", "a", "b", "c"):
        x, y = getattr(full, name)[2], getattr(alone, name)[0]
        assert torch.allclose(x, y, rtol=1e-10, atol=0), name


def test_tracin_only_leaves_second_order_empty(case64) -> None:
    objective, params, target, train, batch = _setup(case64)
    with forward_mode_safe():
        prep = prepare_checkpoint(objective, params, target, train, hvp="exact")
        comp = CheckpointScorer(objective, params, prep.u, prep.g, prep.w, components=("a",))(batch)
    assert torch.isfinite(comp.a).all() and torch.isnan(comp.b).all() and torch.isnan(comp.c).all()


@pytest.mark.parametrize("components,vectors", [(("d",), set()), (("a",), {"u"}), (("a", "b"), {"u", "w"}),
                                                (("a", "c"), {"u", "g"}), (("a", "b", "c", "d"), {"u", "g", "w"})])
def test_prepare_computes_only_the_vectors_the_components_read(case64, components, vectors) -> None:
    objective, params, target, train, batch = _setup(case64)
    with forward_mode_safe():
        full = prepare_checkpoint(objective, params, target, train, hvp="fd")
        some = prepare_checkpoint(objective, params, target, train, hvp="fd", vectors=vectors_needed(components))
        comp = CheckpointScorer(objective, params, some.u, some.g, some.w, components=components,
                                unrolled=full.u)(batch)
    assert (some.g is None) == ("g" not in vectors) and (some.w is None) == ("w" not in vectors)
    for name in ("u", "g", "w"):
        if getattr(some, name) is not None:  # what is computed equals the full preparation
            assert all(torch.equal(getattr(some, name)[k], getattr(full, name)[k]) for k in params), name
    assert some.target_loss == full.target_loss
    for name in ("a", "b", "c", "d"):
        value = getattr(comp, name)  # not computed: NaN (d: None)
        assert (value is not None and bool(torch.isfinite(value).all())) == (name in components), name


def test_scorer_names_the_missing_vector(case64) -> None:
    objective, params, target, train, _ = _setup(case64)
    with forward_mode_safe():
        prep = prepare_checkpoint(objective, params, target, train, vectors=("u",))
        with pytest.raises(ValueError, match=r"\['w'\]"):
            CheckpointScorer(objective, params, prep.u, prep.g, prep.w, components=("a", "b"))
        with pytest.raises(ValueError, match=r"\['g'\]"):
            CheckpointScorer(objective, params, prep.u, prep.g, prep.w, components=("a", "c"))
        with pytest.raises(ValueError, match="unrolled"):
            CheckpointScorer(objective, params, prep.u, None, None, components=("d",))


def test_unknown_modes_rejected(case64) -> None:
    objective, params, target, train, _ = _setup(case64)
    with pytest.raises(ValueError, match="hvp mode"):
        prepare_checkpoint(objective, params, target, train, hvp="magic")
    with pytest.raises(ValueError, match="c mode"):
        CheckpointScorer(objective, params, params, params, params, c_mode="magic")


def test_bank_infonce_self_index_equals_removing_the_bank_row() -> None:
    from pipeline.influence.objective import bank_infonce

    gen = torch.Generator().manual_seed(0)
    unit = lambda x: x / x.norm(dim=-1, keepdim=True)  # noqa: E731
    img, txt = unit(torch.randn(3, 4, generator=gen, dtype=torch.float64)), unit(torch.randn(3, 4, generator=gen, dtype=torch.float64))
    bank_img, bank_txt = unit(torch.randn(5, 4, generator=gen, dtype=torch.float64)), unit(torch.randn(5, 4, generator=gen, dtype=torch.float64))
    scale = torch.tensor(1.5, dtype=torch.float64)
    masked = bank_infonce(img, txt, scale, bank_img, bank_txt, torch.tensor([2, -1, 0]))
    for i, own in enumerate([2, -1, 0]):
        keep = [k for k in range(5) if k != own]
        ref = bank_infonce(img[i:i + 1], txt[i:i + 1], scale, bank_img[keep], bank_txt[keep])
        assert torch.allclose(masked[i], ref[0], rtol=1e-12)


@pytest.mark.slow  # compiling takes about a minute on 2 CPU cores
def test_compiled_network_jvp_equals_the_eager_one() -> None:
    objective, params, target, train, batch = _setup(make_clip_case(torch.float32), torch.float32)
    v = mean_loss_grad(objective, params, target)
    with forward_mode_safe():
        eager = CheckpointScorer(objective, params, v, None, None, components=("a",))(batch)
        compiled = CheckpointScorer(objective, params, v, None, None, components=("a",),
                                    network_jvp=compiled_features_jvp(objective))(batch)
    assert rel(compiled.a, eager.a) <= 1e-4 and rel(compiled.loss, eager.loss) <= 1e-5
