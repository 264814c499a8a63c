"""Fashion-MNIST corpus: labelled 28×28 clothing images with templated captions.

``OUT/train/`` and ``OUT/test/`` are each a shard directory (``sizes.json``, ``corpus.json``).
A fraction ``noise`` of the TRAIN captions (exactly ``round(noise * n)``, chosen by a seeded
RNG) describe another, randomly chosen class: a label-noise corpus with known ground truth
(json ``label``, ``caption_label``, ``noisy``). The test split is always noise-free. A uid
names the image (split, index), so an image keeps its uid at every noise level, seed and
noise kind.

``noise_kind`` (``--noise-kind``) says which class a noisy caption names:

- ``uniform`` (default): any of the 9 other classes, uniformly.
- ``lookalike``: a class that looks like the image's, drawn uniformly from its partners in
  :data:`LOOKALIKES` — the hardest case for a filter, since the caption is nearly right::

      T-shirt/top -> Shirt, Pullover        Coat       -> Pullover, Shirt
      Trouser     -> Dress                  Sandal     -> Sneaker
      Pullover    -> Coat, Shirt            Shirt      -> T-shirt/top, Pullover
      Dress       -> Coat, Trouser          Sneaker    -> Sandal, Ankle boot
      Bag         -> (none)                 Ankle boot -> Sneaker, Sandal

  A bag has no look-alike, so bags are never made noisy: the ``round(noise * n)`` noisy
  pairs are drawn among the non-bag images (a UsageError if there are fewer). The noise kind
  is recorded in ``corpus.json`` (details ``noise_kind``) when it is not ``uniform``; a
  ``uniform`` build is byte-identical to one made before the option existed.

Images are stored losslessly as 28×28 grayscale PNG: JPEG at this size visibly smears the
few pixels there are, and the source is grayscale, so RGB would only triple the bytes.
Readers that need RGB convert on decode (``PIL.Image.convert("RGB")``).
"""

from __future__ import annotations

import dataclasses
import gzip
import io
import os
from pathlib import Path
from typing import Any, Iterator

import numpy as np
from PIL import Image

from pipeline.data.corpora.common import (
    CorpusInfo, check_fraction, check_min, prepare_out_dir, write_corpus,
)
from pipeline.data.shards import Pair
from pipeline.data.uids import make_uid
from pipeline.errors import DataError, UsageError
from pipeline.io.atomic import atomic_path

SOURCE = "fashion-mnist"
DEFAULT_ROOT = "/usr/share/datasets/fashion-mnist"
SPLITS = ("train", "test")
FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
CLASS_NAMES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
               "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
# Noun phrases (with article) used in captions, by class.
CAPTION_NOUNS = ("a t-shirt", "a pair of trousers", "a pullover", "a dress", "a coat",
                 "a sandal", "a shirt", "a sneaker", "a bag", "an ankle boot")
TEMPLATES = (
    "a photo of {}.",
    "a black and white picture of {}.",
    "a low resolution photo of {}.",
    "a grayscale image of {}.",
    "a small picture of {}.",
    "a product photo of {}.",
    "{} on a black background.",
    "a cropped photo of {}.",
)
ATTRIBUTION = (
    "Images and labels: Fashion-MNIST, Copyright (c) 2017 Zalando SE, MIT License\n"
    "(https://github.com/zalandoresearch/fashion-mnist), via the Debian package\n"
    "dataset-fashion-mnist. Captions are generated from the class labels.\n"
)
_IDX_DTYPES = {0x08: np.uint8}
NOISE_KINDS = ("uniform", "lookalike")
# Look-alike partners by class name: a ``lookalike`` noisy caption names one of these.
LOOKALIKES: dict[str, tuple[str, ...]] = {
    "T-shirt/top": ("Shirt", "Pullover"),
    "Trouser": ("Dress",),
    "Pullover": ("Coat", "Shirt"),
    "Dress": ("Coat", "Trouser"),
    "Coat": ("Pullover", "Shirt"),
    "Sandal": ("Sneaker",),
    "Shirt": ("T-shirt/top", "Pullover"),
    "Sneaker": ("Sandal", "Ankle boot"),
    "Bag": (),
    "Ankle boot": ("Sneaker", "Sandal"),
}


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read a gzipped idx file (the MNIST format) into an array; DataError if malformed."""
    with gzip.open(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise DataError(f"{path} is not an unsigned-byte idx file")
    ndim = data[3]
    header = 4 + 4 * ndim
    shape = tuple(int(d) for d in np.frombuffer(data[4:header], dtype=">u4"))
    body = np.frombuffer(data, dtype=_IDX_DTYPES[data[2]], offset=header)
    if body.size != int(np.prod(shape)):
        raise DataError(f"{path} holds {body.size} values but its header says {shape}")
    return body.reshape(shape)


def source_files(root: str | os.PathLike) -> dict[str, tuple[Path, Path]]:
    """Image and label files per split; UsageError naming the first one missing."""
    files: dict[str, tuple[Path, Path]] = {}
    for split, (images_name, labels_name) in FILES.items():
        files[split] = (Path(root) / images_name, Path(root) / labels_name)
        for path in files[split]:
            if not path.is_file():
                raise UsageError(f"Fashion-MNIST file {path} not found "
                                 "(install the Debian package dataset-fashion-mnist)")
    return files


def load_split(root: str | os.PathLike, split: str,
               limit: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Images (n, 28, 28) uint8 and labels (n,) of one split, the first ``limit`` only."""
    images_path, labels_path = source_files(root)[split]
    images, labels = read_idx(images_path), read_idx(labels_path)
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise DataError(f"Fashion-MNIST {split}: {images.shape} images vs {labels.shape} labels")
    if labels.size and int(labels.max()) >= len(CLASS_NAMES):
        raise DataError(f"Fashion-MNIST {split}: label {int(labels.max())} out of range")
    return images[:limit], labels[:limit]


def noisy_caption_labels(labels: np.ndarray, noise: float,
                         rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Caption labels with exactly ``round(noise * n)`` entries changed to another class.

    Returns ``(caption_labels, noisy_mask)``; the other class is uniform over the 9 others.
    """
    n = len(labels)
    k = round(noise * n)
    noisy = np.zeros(n, dtype=bool)
    noisy[rng.choice(n, size=k, replace=False)] = True
    shift = rng.integers(1, len(CLASS_NAMES), size=n)
    caption_labels = np.where(noisy, (labels.astype(np.int64) + shift) % len(CLASS_NAMES),
                              labels)
    return caption_labels.astype(np.int64), noisy


def lookalike_partners() -> list[tuple[int, ...]]:
    """:data:`LOOKALIKES` as class indices: entry ``c`` lists the partners of class ``c``."""
    return [tuple(CLASS_NAMES.index(p) for p in LOOKALIKES[name]) for name in CLASS_NAMES]


def lookalike_caption_labels(labels: np.ndarray, noise: float,
                             rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Caption labels with exactly ``round(noise * n)`` entries changed to a look-alike class.

    Returns ``(caption_labels, noisy_mask)``. The noisy entries are drawn among the images
    whose class has partners (never a bag), each caption class uniformly from those partners;
    UsageError if there are fewer such images than noisy captions.
    """
    partners = lookalike_partners()
    counts = np.array([len(p) for p in partners], dtype=np.int64)
    width = int(counts.max())
    table = np.array([p + (-1,) * (width - len(p)) for p in partners], dtype=np.int64)
    labels = labels.astype(np.int64)
    n, k = len(labels), round(noise * len(labels))
    eligible = np.flatnonzero(counts[labels] > 0)
    if k > len(eligible):
        raise UsageError(f"--noise {noise} needs {k} look-alike captions but only "
                         f"{len(eligible)} of the {n} train images have a look-alike class "
                         "(bags have none)")
    chosen = np.sort(rng.choice(eligible, size=k, replace=False))
    noisy = np.zeros(n, dtype=bool)
    noisy[chosen] = True
    caption_labels = labels.copy()
    caption_labels[chosen] = table[labels[chosen], rng.integers(0, counts[labels[chosen]])]
    return caption_labels, noisy


def check_noise_kind(noise_kind: str) -> None:
    """Raise UsageError unless ``noise_kind`` is one of :data:`NOISE_KINDS`."""
    if noise_kind not in NOISE_KINDS:
        raise UsageError(f"--noise-kind must be one of {', '.join(NOISE_KINDS)}, "
                         f"got {noise_kind!r}")


def encode_png(pixels: np.ndarray) -> bytes:
    """Lossless grayscale PNG of a 2-D uint8 array (deterministic)."""
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(pixels, dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def iter_split_pairs(images: np.ndarray, labels: np.ndarray, caption_labels: np.ndarray,
                     noisy: np.ndarray, split: str, rng: np.random.Generator) -> Iterator[Pair]:
    """Yield the pairs of one split; ``rng`` picks each caption's template."""
    templates = rng.integers(0, len(TEMPLATES), size=len(labels))
    for index in range(len(labels)):
        label, caption_label = int(labels[index]), int(caption_labels[index])
        caption = TEMPLATES[templates[index]].format(CAPTION_NOUNS[caption_label])
        meta: dict[str, Any] = {
            "uid": make_uid(SOURCE, f"{split}/{index}"), "source": SOURCE, "split": split,
            "index": index, "label": label, "label_name": CLASS_NAMES[label],
            "caption_label": caption_label, "noisy": bool(noisy[index]),
        }
        yield Pair(f"fmnist_{split}_{index:05d}", encode_png(images[index]), caption, meta,
                   image_ext="png")


def build_fashion_mnist(out_dir: str | os.PathLike, *, root: str | os.PathLike = DEFAULT_ROOT,
                        noise: float = 0.0, seed: int = 0, shard_size: int = 1000,
                        overwrite: bool = False, limit: int | None = None,
                        noise_kind: str = "uniform") -> dict[str, CorpusInfo]:
    """Build ``out_dir/train`` and ``out_dir/test``; the whole directory appears atomically.

    ``noise_kind`` is ``"uniform"`` or ``"lookalike"`` (see the module docstring). Every
    option is checked, and the noise drawn, before anything is written.
    """
    check_fraction("--noise", noise)
    check_noise_kind(noise_kind)
    check_min("--limit", limit, 1)
    check_min("--shard-size", shard_size, 1)
    source_files(root)
    target = prepare_out_dir(out_dir, overwrite)
    train_rng, noise_rng, test_rng = (np.random.default_rng(s)
                                      for s in np.random.SeedSequence(seed).spawn(3))
    draw_noise = lookalike_caption_labels if noise_kind == "lookalike" else noisy_caption_labels
    splits: dict[str, tuple[np.ndarray, np.ndarray, float, np.ndarray, np.ndarray]] = {}
    for split in SPLITS:
        images, labels = load_split(root, split, limit)
        split_noise = noise if split == "train" else 0.0
        splits[split] = (images, labels, split_noise,
                         *draw_noise(labels, split_noise, noise_rng))
    infos: dict[str, CorpusInfo] = {}
    with atomic_path(target) as tmp:
        for split, rng in (("train", train_rng), ("test", test_rng)):
            images, labels, split_noise, caption_labels, noisy = splits[split]
            details = {"split": split, "noise": split_noise, "seed": seed, "limit": limit,
                       "num_noisy": int(noisy.sum()), "classes": list(CLASS_NAMES),
                       "image_format": "png (grayscale, 28x28, lossless)"}
            if noise_kind != "uniform":
                details["noise_kind"] = noise_kind
            pairs = iter_split_pairs(images, labels, caption_labels, noisy, split, rng)
            info = write_corpus(pairs, tmp / split, source=SOURCE, shard_size=shard_size,
                                details=details,
                                extra_files={"ATTRIBUTION.txt": ATTRIBUTION.encode("utf-8")})
            infos[split] = dataclasses.replace(info, out_dir=str(target / split))
    return infos
