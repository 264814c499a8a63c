"""The objective module's layer-norm routes: the fused first-order JVP against PyTorch's own."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.func import jvp, vmap

from pipeline.influence.objective import fused_layer_norm_jvp


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
