"""Diff-In data pruning for CLIP pre-training corpora.

Importing the package first declares the two torchvision operator schemas that the CUDA
build of ``torchvision==0.28.0`` expects from its C++ extension. On a CPU-only torch build
that extension cannot load, and ``import torchvision`` (pulled in by open_clip and timm)
then fails with "operator torchvision::nms does not exist". Declaring the schemas is
harmless where the extension did load (the RuntimeError "already defined" is ignored).
"""

from __future__ import annotations

import torch as _torch

from pipeline.env import apply_defaults as _apply_env_defaults

# Defaults (never overrides): no hub downloads at run time, no Ray auth on loopback clusters.
# Set on import so that every process the project starts — CLI, jobs, Ray workers — has
# them before open_clip / huggingface_hub read them.
_apply_env_defaults()

__version__ = "0.1.0"


def _declare_torchvision_ops() -> None:
    library = _torch.library.Library("torchvision", "FRAGMENT")  # noqa: keep alive via module
    for name in ("nms", "qnms"):
        try:
            library.define(f"{name}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        except RuntimeError:
            pass  # already declared by torchvision's own extension
    globals()["_TORCHVISION_FRAGMENT"] = library


_declare_torchvision_ops()
