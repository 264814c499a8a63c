"""Diff-In data pruning for CLIP pre-training corpora.

Importing the package first makes sure the torchvision operators that ``import torchvision``
(pulled in by open_clip and timm) registers fake kernels for exist. torchvision's C++ extension
defines them; on a CPU-only torch with a CUDA build of torchvision (PyPI's) that extension
cannot load, and ``import torchvision`` then fails with "operator torchvision::nms does not
exist". So: load torchvision's own extension first (found without importing torchvision); only
where it does not load, declare the two schemas here. Never both: a schema declared here and
then again by the extension aborts the process ("registered multiple times"). Without
torchvision installed there is nothing to do.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util

import torch as _torch

from pipeline.env import apply_defaults as _apply_env_defaults

# Defaults (never overrides): no hub downloads at run time, no Ray auth on loopback clusters.
# Set on import so that every process the project starts — CLI, jobs, Ray workers — has
# them before open_clip / huggingface_hub read them.
_apply_env_defaults()

__version__ = "0.1.0"


def _extension_path(spec: importlib.machinery.ModuleSpec) -> str | None:
    """Path of torchvision's C++ extension ``_C``, looked up as torchvision itself does."""
    loader = (importlib.machinery.ExtensionFileLoader, importlib.machinery.EXTENSION_SUFFIXES)
    for directory in spec.submodule_search_locations or []:
        found = importlib.machinery.FileFinder(directory, loader).find_spec("_C")
        if found is not None and found.origin:
            return found.origin
    return None


def _declare_torchvision_ops() -> None:
    if hasattr(_torch.ops.torchvision, "nms"):
        return  # torchvision's extension (or this function) already ran
    try:
        spec = importlib.util.find_spec("torchvision")
    except (ImportError, ValueError):
        spec = None
    if spec is None:
        return  # no torchvision: nothing will import it
    extension = _extension_path(spec)
    if extension is not None:
        try:
            _torch.ops.load_library(extension)  # a matching build defines the ops itself
            return
        except OSError:
            pass  # e.g. PyPI's CUDA build on a CPU-only torch: declare what it would have
    library = _torch.library.Library("torchvision", "FRAGMENT")
    for name in ("nms", "qnms"):
        library.define(f"{name}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    globals()["_TORCHVISION_FRAGMENT"] = library  # keep the registration alive


_declare_torchvision_ops()
