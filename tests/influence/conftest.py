"""Tiny models and data for brute-force checks of the influence math."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pipeline.influence.objective import CLIPBankObjective, ClassifierObjective
from pipeline.model.clip import build_clip

MICRO_CLIP = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 16, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 8, "vocab_size": 500, "width": 32, "heads": 2, "layers": 1},
}


def clip_batch(n: int, dtype: torch.dtype, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    images = torch.randn(n, 3, 16, 16, generator=gen, dtype=dtype)
    tokens = torch.randint(1, 499, (n, 8), generator=gen)
    tokens[:, -1] = 0  # padding, like real captions
    return images, tokens


def mlp_batch(n: int, dtype: torch.dtype, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 6, generator=gen, dtype=dtype), torch.randint(0, 3, (n,), generator=gen)


def make_clip_case(dtype: torch.dtype):
    torch.manual_seed(0)
    model = build_clip({"name": "micro", "config": MICRO_CLIP}).to(dtype)
    with torch.no_grad():  # a non-trivial temperature, like a trained model
        model.logit_scale.fill_(2.0)
    objective = CLIPBankObjective(model, *clip_batch(5, dtype, 100))
    return model, objective, clip_batch


def make_mlp_case(dtype: torch.dtype):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 12), nn.LayerNorm(12), nn.Tanh(), nn.Linear(12, 3)).to(dtype)
    return model, ClassifierObjective(model), mlp_batch


@pytest.fixture(params=["mlp", "clip"])
def case64(request):
    """(model, objective, batch_fn) in float64 for both model kinds."""
    return make_clip_case(torch.float64) if request.param == "clip" else make_mlp_case(torch.float64)
