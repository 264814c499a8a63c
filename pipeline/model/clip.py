"""open_clip models from a name or an inline config, without touching global registries.

A model spec is ``{"name": NAME}`` or ``{"name": NAME, "config": {...}}``. A name resolves to
a JSON config shipped with the package (``pipeline/model/configs/``: tiny proxy models) or, failing that, to one
of open_clip's own model configs. Weights are never downloaded.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any

import pipeline  # noqa: F401  (torchvision op shim before open_clip)
import open_clip
import torch
from torch import nn

from pipeline.errors import UsageError

MODEL_CONFIG_DIRS_ENV = "DIFFIN_MODEL_CONFIGS"
IMAGE_MEAN = open_clip.OPENAI_DATASET_MEAN
IMAGE_STD = open_clip.OPENAI_DATASET_STD


SHIPPED_CONFIGS = Path(__file__).resolve().parent / "configs"  # package data: installed with the wheel


def model_config_dirs() -> list[Path]:
    """Directories searched for ``<name>.json`` model configs: those in $DIFFIN_MODEL_CONFIGS
    (optional, for a team's own models) first, then the package's own."""
    dirs = [Path(p) for p in os.environ.get(MODEL_CONFIG_DIRS_ENV, "").split(os.pathsep) if p]
    dirs.append(SHIPPED_CONFIGS)
    return dirs


def shipped_model_names() -> list[str]:
    """Names of the model configs found in :func:`model_config_dirs`."""
    return sorted({p.stem for d in model_config_dirs() if d.is_dir() for p in d.glob("*.json")})


def resolve_model_config(name: str) -> dict[str, Any]:
    """The open_clip model config for ``name`` (shipped JSON first, then open_clip's)."""
    for directory in model_config_dirs():
        path = directory / f"{name}.json"
        if path.is_file():
            return json.loads(path.read_text())
    config = open_clip.get_model_config(name)
    if config is None:
        raise UsageError(
            f"unknown model {name!r}: not a shipped model config ({', '.join(shipped_model_names())}) "
            "nor among open_clip's model configs"
        )
    return copy.deepcopy(config)


def model_spec(name: str) -> dict[str, Any]:
    """A self-contained model spec: the name plus its resolved config inline."""
    return {"name": name, "config": resolve_model_config(name)}


def build_clip(spec: dict[str, Any]) -> nn.Module:
    """Build a randomly initialised open_clip CLIP model (float32, CPU) from a spec.

    Initialisation follows torch's global RNG: seed it first for reproducible weights.
    """
    config = spec.get("config") or resolve_model_config(spec["name"])
    config = copy.deepcopy(config)
    if "timm_model_name" in config.get("vision_cfg", {}) or config.get("text_cfg", {}).get("hf_model_name"):
        raise UsageError(f"model {spec['name']!r} needs timm/HF weights or towers; use a plain open_clip ViT config")
    custom_text = config.pop("custom_text", False) or "multimodal_cfg" in config
    quick_gelu = bool(config.pop("quick_gelu", False))
    cls = open_clip.CustomTextCLIP if custom_text else open_clip.CLIP
    model = cls(**config, quick_gelu=quick_gelu)
    return model.float()


def image_size(model: nn.Module) -> int:
    """Square input resolution of the model's vision tower."""
    size = model.visual.image_size
    return int(size[0] if isinstance(size, (tuple, list)) else size)


def context_length(model: nn.Module) -> int:
    """Token context length of the model's text tower."""
    return int(model.context_length)


def normalize_images(images_uint8: torch.Tensor) -> torch.Tensor:
    """uint8 NCHW images → float32, scaled to [0, 1] and normalised with CLIP's mean/std (on the
    images' device)."""
    x = images_uint8.float().div_(255.0)
    mean = torch.tensor(IMAGE_MEAN, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGE_STD, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


def make_tokenizer(length: int) -> open_clip.SimpleTokenizer:
    """open_clip's bundled BPE tokenizer (no hub access); build once, reuse (≈0.1 s to load)."""
    return open_clip.SimpleTokenizer(context_length=length)


def tokenize(captions: list[str], length: int) -> torch.Tensor:
    """Tokenise captions with a fresh tokenizer (convenience for one-off calls)."""
    return make_tokenizer(length)(captions)
