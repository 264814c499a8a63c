"""Parameter dictionaries (name → tensor) as vectors: the only vector type the math uses."""

from __future__ import annotations

import torch
from torch import Tensor, nn

ParamDict = dict[str, Tensor]


def params_of(model: nn.Module) -> ParamDict:
    """Detached copies of the trainable parameters of ``model``, by name."""
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def dot(a: ParamDict, b: ParamDict) -> Tensor:
    """Inner product ⟨a, b⟩ over all parameters (in the dtype of ``a``)."""
    return sum((a[k] * b[k]).sum() for k in a)  # type: ignore[return-value]


def norm(a: ParamDict) -> Tensor:
    """Euclidean norm of ``a``."""
    return torch.sqrt(dot(a, a))


def axpy(alpha: float | Tensor, x: ParamDict, y: ParamDict) -> ParamDict:
    """``y + alpha * x`` as a new dict."""
    return {k: y[k] + alpha * x[k] for k in y}


def scale(alpha: float | Tensor, x: ParamDict) -> ParamDict:
    """``alpha * x`` as a new dict."""
    return {k: alpha * v for k, v in x.items()}


def sub(a: ParamDict, b: ParamDict) -> ParamDict:
    """``a - b``."""
    return {k: a[k] - b[k] for k in a}


def zeros_like(a: ParamDict) -> ParamDict:
    return {k: torch.zeros_like(v) for k, v in a.items()}


def to_vector(a: ParamDict) -> Tensor:
    """All entries of ``a`` in one flat tensor (name order of the dict)."""
    return torch.cat([v.reshape(-1) for v in a.values()])


def cast(a: ParamDict, dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> ParamDict:
    """``a`` with every tensor moved to ``dtype``/``device``."""
    return {k: v.to(dtype=dtype or v.dtype, device=device or v.device) for k, v in a.items()}


def from_vector(flat: Tensor, like: ParamDict) -> ParamDict:
    """The inverse of :func:`to_vector`: ``flat`` cut into tensors shaped like ``like``."""
    out, offset = {}, 0
    for k, v in like.items():
        out[k] = flat[offset:offset + v.numel()].view_as(v)
        offset += v.numel()
    if offset != flat.numel():
        raise ValueError(f"vector has {flat.numel()} entries, the parameters {offset}")
    return out
