"""The objective module's layer-norm routes: the fused first-order JVP against PyTorch's own."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.func import jvp, vmap

from pipeline.influence.objective import ZeroShotObjective, fused_layer_norm_jvp
from pipeline.influence.prepare import mean_loss_grad, per_sample_loss, prepare_checkpoint
from tests.influence.conftest import clip_batch, make_clip_case


@pytest.mark.parametrize("affine", [True, False])
def test_fused_layer_norm_jvp_equals_the_stock_one(affine: bool) -> None:
    g = torch.Generator().manual_seed(0)
    x, x_t = (torch.randn(4, 5, 16, generator=g, dtype=torch.float64) * 3 for _ in range(2))
    w, w_t, b, b_t = (torch.randn(16, generator=g, dtype=torch.float64) for _ in range(4))
    if not affine:
        w = w_t = b = b_t = None

    def norm(x, w, b):
        return F.layer_norm(x, (16,), w, b, 1e-5)

    primals, tangents = (x, w, b), (x_t, w_t, b_t)
    if not affine:
        primals, tangents = (x,), (x_t,)
    original = F.layer_norm
    ref = jvp(lambda *a: norm(*a, *([None, None] if not affine else [])), primals, tangents)
    with fused_layer_norm_jvp():
        assert F.layer_norm is not original  # the fused route is in place
        got = jvp(lambda *a: norm(*a, *([None, None] if not affine else [])), primals, tangents)
    assert F.layer_norm is original  # and restored
    torch.testing.assert_close(got[0], ref[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got[1], ref[1], rtol=1e-10, atol=1e-12)


def test_fused_layer_norm_jvp_under_vmap_of_tangents() -> None:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 8, generator=g, dtype=torch.float64)
    w, b = torch.randn(8, generator=g, dtype=torch.float64), torch.randn(8, generator=g, dtype=torch.float64)
    tangents = torch.randn(4, 3, 8, generator=g, dtype=torch.float64)

    def tangent(t):
        return jvp(lambda x: F.layer_norm(x, (8,), w, b), (x,), (t,))[1]

    ref = vmap(tangent)(tangents)
    with fused_layer_norm_jvp():
        got = vmap(tangent)(tangents)
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-12)


def test_fused_layer_norm_refuses_backward() -> None:
    x = torch.randn(2, 4, requires_grad=True)
    with fused_layer_norm_jvp():
        y = F.layer_norm(x, (4,))
    with pytest.raises(RuntimeError, match="forward-mode"):
        y.sum().backward()


def _brute_zero_shot_losses(model, images, labels, class_tokens, per_class):
    """The zero-shot cross-entropy written out with the model's own encoders, one image at a time."""
    texts = model.encode_text(class_tokens, normalize=True)
    classes = torch.stack([texts[c * per_class:(c + 1) * per_class].mean(0)
                           for c in range(class_tokens.shape[0] // per_class)])
    classes = classes / classes.norm(dim=-1, keepdim=True)
    losses = []
    for image, label in zip(images, labels):
        x = model.encode_image(image[None], normalize=True)[0]
        logits = model.logit_scale.exp() * torch.stack([x @ c for c in classes])
        losses.append(torch.logsumexp(logits, 0) - logits[label])
    return torch.stack(losses)


def test_zero_shot_objective_loss_and_gradient_match_brute_force() -> None:
    model, _, _ = make_clip_case(torch.float64)
    images, _ = clip_batch(6, torch.float64, 7)
    _, class_tokens = clip_batch(3 * 2, torch.float64, 8)  # 3 classes × 2 prompts
    labels = torch.tensor([0, 1, 2, 2, 1, 0])
    objective = ZeroShotObjective(model, class_tokens, prompts_per_class=2)
    params = {n: p.detach() for n, p in model.named_parameters()}
    got = per_sample_loss(objective, params, (images, labels))
    want = _brute_zero_shot_losses(model, images, labels, class_tokens, 2)
    torch.testing.assert_close(got, want.detach(), rtol=1e-10, atol=1e-12)
    grad = mean_loss_grad(objective, params, [(images[:4], labels[:4]), (images[4:], labels[4:])])
    model.zero_grad()
    want.mean().backward()
    for name, p in model.named_parameters():
        expected = p.grad if p.grad is not None else torch.zeros_like(p)
        torch.testing.assert_close(grad[name], expected, rtol=1e-9, atol=1e-12)
    with pytest.raises(ValueError, match="do not split"):
        ZeroShotObjective(model, class_tokens[:5], prompts_per_class=2)


def test_prepare_checkpoint_takes_u_and_the_target_loss_from_the_target_objective() -> None:
    model, objective, _ = make_clip_case(torch.float64)
    params = {n: p.detach() for n, p in model.named_parameters()}
    images, _ = clip_batch(4, torch.float64, 7)
    _, class_tokens = clip_batch(2, torch.float64, 8)
    target = [(images, torch.tensor([0, 1, 1, 0]))]
    zero_shot = ZeroShotObjective(model, class_tokens, prompts_per_class=1)
    train = [clip_batch(3, torch.float64, 9)]
    prepared = prepare_checkpoint(objective, params, target, train, vectors=("u", "g"), target_objective=zero_shot)
    want_u = mean_loss_grad(zero_shot, params, target)
    for name in params:
        torch.testing.assert_close(prepared.u[name], want_u[name])
        torch.testing.assert_close(prepared.g[name], mean_loss_grad(objective, params, train)[name])
    assert prepared.target_loss == pytest.approx(float(_brute_zero_shot_losses(model, *target[0], class_tokens, 1).mean()))
