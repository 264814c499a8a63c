"""Per-sample objectives: how a model maps a batch to one loss per sample.

An objective splits the loss into a heavy, per-sample part that runs the network —
``features(params, batch)`` — and a shared part computed once per parameter point and
direction — ``context(params)`` (for CLIP: the temperature and the negative bank's
embeddings) — joined by a light ``loss(features, context, batch)``. Forward-mode
derivatives then run the network once per batch and direction, and the bank once per
checkpoint and direction, while a pair's loss never depends on its batch neighbours.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from pipeline.influence.params import ParamDict

Batch = Any
Features = tuple[Tensor, ...]
Context = tuple[Tensor, ...]


class PerSampleObjective(Protocol):
    """A per-sample loss split into network features, shared context and a light loss."""

    def features(self, params: ParamDict, batch: Batch) -> Features: ...

    def context(self, params: ParamDict) -> Context: ...

    def loss(self, features: Features, context: Context, batch: Batch) -> Tensor: ...


def per_sample_loss(objective: PerSampleObjective, params: ParamDict, batch: Batch) -> Tensor:
    """ℓ_z(θ) for every sample z of ``batch`` (a vector)."""
    return objective.loss(objective.features(params, batch), objective.context(params), batch)


@contextlib.contextmanager
def forward_mode_safe() -> Iterator[None]:
    """Switch off the fused attention paths that have no forward-mode derivative.

    ``nn.MultiheadAttention``'s fast path (``_native_multi_head_attention``, taken in eval
    mode) and the fused SDPA kernels (flash / memory-efficient) define no JVP, so
    ``torch.func.jvp`` through an open_clip model fails with them. Inside this context the
    fast path is off and SDPA uses its MATH backend, which is differentiable in both modes.
    The previous fast-path setting is restored on exit.
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel

    previous = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with sdpa_kernel(SDPBackend.MATH):
            yield
    finally:
        torch.backends.mha.set_fastpath_enabled(previous)


def _layer_norm_decomposed(x: Tensor, normalized_shape, weight: Tensor | None = None,
                           bias: Tensor | None = None, eps: float = 1e-5) -> Tensor:
    """Layer norm from elementary ops (mean, variance, rsqrt): exact under nested forward mode."""
    dims = tuple(range(-len(normalized_shape), 0))
    mean = x.mean(dims, keepdim=True)
    centered = x - mean
    y = centered * torch.rsqrt((centered * centered).mean(dims, keepdim=True) + eps)
    if weight is not None:
        y = y * weight
    return y + bias if bias is not None else y


@contextlib.contextmanager
def decomposed_layer_norm() -> Iterator[None]:
    """Route ``F.layer_norm`` through elementary ops while nested forward mode runs.

    In torch 2.13 the forward derivative of ``native_layer_norm`` is not itself correctly
    forward-differentiable: forward-over-forward through ``nn.LayerNorm`` is off by ~1 %
    (measured against double backward in float64; see tests/influence). The elementary-op
    version is exact. This swaps a module attribute for the duration of the block — call
    it from one thread at a time.
    """
    original = F.layer_norm
    F.layer_norm = _layer_norm_decomposed
    try:
        yield
    finally:
        F.layer_norm = original


class _LayerNormTangent(torch.autograd.Function):
    """Layer norm over the last dimension whose forward derivative is one fused kernel.

    Normalisation's Jacobian J (x ↦ (x − μ)/σ) is symmetric, so its JVP J·ẋ equals the
    input gradient of layer norm without affine weights, which ``native_layer_norm_backward``
    computes in one pass. The tangent of the output is then w ⊙ J·ẋ + x̂ ⊙ ẇ + ḃ. Forward
    mode only (no backward); first-order JVPs only (not nested: see decomposed_layer_norm).
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float):
        return torch.native_layer_norm(x, (x.shape[-1],), weight, bias, eps)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        x, weight, _, _ = inputs
        _, mean, rstd = output
        ctx.save_for_forward(x, weight, mean, rstd)
        ctx.mark_non_differentiable(mean, rstd)

    @staticmethod
    def jvp(ctx, x_t: Tensor | None, weight_t: Tensor | None, bias_t: Tensor | None, _eps_t):
        x, weight, mean, rstd = ctx.saved_tensors
        if x_t is not None:
            y_t = torch.ops.aten.native_layer_norm_backward(x_t, x, (x.shape[-1],), mean, rstd, None, None,
                                                            [True, False, False])[0]
            y_t = y_t * weight if weight is not None else y_t
        else:
            y_t = torch.zeros_like(x)
        if weight_t is not None:
            y_t = torch.addcmul(y_t, (x - mean) * rstd, weight_t)
        if bias_t is not None:
            y_t = y_t + bias_t
        return y_t, None, None

    @staticmethod
    def backward(ctx, *grads):
        raise RuntimeError("this layer norm is for forward-mode JVPs only")


def _layer_norm_tangent(x: Tensor, normalized_shape, weight: Tensor | None = None,
                        bias: Tensor | None = None, eps: float = 1e-5) -> Tensor:
    if len(normalized_shape) != 1:  # normalisation over several dimensions: the stock op
        return _F_LAYER_NORM(x, normalized_shape, weight, bias, eps)
    return _LayerNormTangent.apply(x, weight, bias, eps)[0]


_F_LAYER_NORM = F.layer_norm


@contextlib.contextmanager
def fused_layer_norm_jvp() -> Iterator[None]:
    """Route ``F.layer_norm`` through :class:`_LayerNormTangent` for first-order JVPs.

    PyTorch's own forward derivative of layer norm takes about a dozen elementwise passes;
    this one takes one fused kernel and two passes (measured on the tiny CLIP, CPU, 1 thread,
    20 interleaved repeats: the per-pair JVP 1–3 % faster; more where kernel launches cost).
    Same module-attribute swap as :func:`decomposed_layer_norm`: call it from one thread at a
    time, never around a backward pass or nested forward mode.
    """
    original = F.layer_norm
    F.layer_norm = _layer_norm_tangent
    try:
        yield
    finally:
        F.layer_norm = original


def bank_infonce(img: Tensor, txt: Tensor, logit_scale: Tensor, bank_img: Tensor,
                 bank_txt: Tensor, self_index: Tensor | None = None) -> Tensor:
    """Symmetric InfoNCE of each pair against a fixed bank of negatives.

    ``img``/``txt``: L2-normalised embeddings [B, D]; ``bank_*``: [K, D]; the softmax of
    pair z ranges over {z} ∪ bank, with temperature ``exp(logit_scale)``. ``self_index``
    ([B], −1 for none) names the bank entry that IS the pair: it is left out of that pair's
    softmax, so a bank pair is never its own negative.
    """
    s = logit_scale.exp()
    pos = s * (img * txt).sum(-1)
    neg_i, neg_t = s * img @ bank_txt.T, s * txt @ bank_img.T
    if self_index is not None:
        own = torch.arange(bank_img.shape[0], device=img.device)[None, :] == self_index[:, None]
        neg_i = neg_i.masked_fill(own, float("-inf"))
        neg_t = neg_t.masked_fill(own, float("-inf"))
    logits_i = torch.cat([pos[:, None], neg_i], dim=1)
    logits_t = torch.cat([pos[:, None], neg_t], dim=1)
    return 0.5 * ((torch.logsumexp(logits_i, 1) - pos) + (torch.logsumexp(logits_t, 1) - pos))


class CLIPBankObjective:
    """Per-pair CLIP loss against a negative bank, for any open_clip CLIP model.

    ``batch`` is ``(images, tokens)`` (images already normalised, model dtype), optionally
    with a third entry: each pair's position in the bank (−1 for none), for pairs of the
    corpus that are themselves bank pairs. The bank's images and tokens are fixed at
    construction (drawn once, by seed, from the target set).
    """

    def __init__(self, model: nn.Module, bank_images: Tensor, bank_tokens: Tensor) -> None:
        self.model = model.eval()
        self.bank = (bank_images, bank_tokens)

    def features(self, params: ParamDict, batch: Batch) -> Features:
        return self._embed(params, batch[0], batch[1])

    def _embed(self, params: ParamDict, images: Tensor, tokens: Tensor) -> Features:
        """L2-normalised image and text embeddings (open_clip's forward normalises both)."""
        out = functional_call(self.model, params, (images, tokens))
        return out[0], out[1]

    def context(self, params: ParamDict) -> Context:
        bank_img, bank_txt = self._embed(params, *self.bank)
        return params["logit_scale"], bank_img, bank_txt

    def loss(self, features: Features, context: Context, batch: Batch) -> Tensor:
        img, txt = features
        logit_scale, bank_img, bank_txt = context
        return bank_infonce(img, txt, logit_scale, bank_img, bank_txt, batch[2] if len(batch) > 2 else None)


class ZeroShotObjective:
    """A zero-shot classification task as the target loss L_V, for any open_clip CLIP model.

    ``batch`` is ``(images, labels)``; the context is the temperature and one embedding per
    class — the normalised mean of the normalised embeddings of its ``prompts_per_class``
    prompts (``class_tokens`` [classes × prompts, L], class-major), as zero-shot evaluation
    builds it. The loss of image x with label y is the cross-entropy of the logits
    exp(logit_scale) · ⟨x, c_k⟩ over the classes: every class appears once, so images of the
    same class are never each other's negatives (as they are in a caption bank with repeated
    captions).
    """

    def __init__(self, model: nn.Module, class_tokens: Tensor, prompts_per_class: int) -> None:
        if prompts_per_class < 1 or class_tokens.shape[0] % prompts_per_class:
            raise ValueError(f"{class_tokens.shape[0]} prompts do not split into classes of {prompts_per_class}")
        self.model = model.eval()
        self.class_tokens = class_tokens
        self.prompts_per_class = prompts_per_class

    def features(self, params: ParamDict, batch: Batch) -> Features:
        return (functional_call(self.model, params, (batch[0], None))[0],)

    def context(self, params: ParamDict) -> Context:
        texts = functional_call(self.model, params, (None, self.class_tokens))[1]
        classes = texts.reshape(-1, self.prompts_per_class, texts.shape[-1]).mean(1)
        return params["logit_scale"], classes / classes.norm(dim=-1, keepdim=True)

    def loss(self, features: Features, context: Context, batch: Batch) -> Tensor:
        logit_scale, classes = context
        return F.cross_entropy(logit_scale.exp() * features[0] @ classes.T, batch[1], reduction="none")


class ClassifierObjective:
    """Cross-entropy per sample for a classifier ``model(x) -> logits``; ``batch`` = (x, y)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model.eval()

    def features(self, params: ParamDict, batch: Batch) -> Features:
        x, _ = batch
        return (functional_call(self.model, params, (x,)),)

    def context(self, params: ParamDict) -> Context:
        return ()

    def loss(self, features: Features, context: Context, batch: Batch) -> Tensor:
        _, y = batch
        return F.cross_entropy(features[0], y, reduction="none")
