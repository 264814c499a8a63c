"""The cosine form: per-pair gradient norms against a per-sample autograd loop (float64)."""

from __future__ import annotations

import pytest
import torch

from pipeline.influence.cosine import cosine_form, fixed_context, gradient_norms
from pipeline.influence.params import params_of


def test_gradient_norms_equal_a_per_sample_loop(case64) -> None:
    model, objective, batch_fn = case64
    params = params_of(model)
    batch = batch_fn(4, torch.float64, 7)
    context = fixed_context(objective, params)
    live = {name: p.detach().clone().requires_grad_() for name, p in params.items()}
    expected = []
    for i in range(4):
        single = tuple(x[i:i + 1] for x in batch)
        loss = objective.loss(objective.features(live, single), context, single)[0]
        grads = torch.autograd.grad(loss, list(live.values()), allow_unused=True)
        expected.append(torch.sqrt(sum((g.double() ** 2).sum() for g in grads if g is not None)))
    got = gradient_norms(objective, params, batch)
    torch.testing.assert_close(got, torch.stack(expected), rtol=1e-10, atol=1e-12)
    assert bool((got > 0).all())


def test_cosine_form_by_hand() -> None:
    a = torch.tensor([[2.0, -3.0, 0.0], [1.0, 4.0, 5.0]])
    norms = torch.tensor([[4.0, 3.0, 0.0], [2.0, 8.0, 10.0]])
    got = cosine_form(a, [0.5, 2.0], norms)
    torch.testing.assert_close(got, torch.tensor([0.5 * 0.5 + 2.0 * 0.5, 0.5 * -1.0 + 2.0 * 0.5, 0.0 + 2.0 * 0.5],
                                                 dtype=torch.float64))
    # scaling one pair's gradient (a_t and ‖G_t‖ together) leaves its cosine score unchanged
    torch.testing.assert_close(cosine_form(a * 7.0, [0.5, 2.0], norms * 7.0), got)


def test_cosine_form_refuses_mismatched_shapes() -> None:
    with pytest.raises(ValueError, match="differ in shape"):
        cosine_form(torch.ones(2, 3), [1.0, 1.0], torch.ones(3, 2))
    with pytest.raises(ValueError, match="3 weights for 2 checkpoints"):
        cosine_form(torch.ones(2, 3), [1.0, 1.0, 1.0], torch.ones(2, 3))
