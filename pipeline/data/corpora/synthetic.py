"""Synthetic corpus: procedural shapes with captions, for scale tests.

Each image is one colored shape (circle, square, …) of some size at one of nine positions on
a plain background; its caption describes shape, color, size, position and background. A
fraction ``noise`` of the pairs (exactly ``round(noise * n)``, chosen by selection sampling,
so in constant memory) get the caption of a different random image: one whose (shape, color)
differs from the true one. The json keeps the true attributes, ``noisy`` and, for noisy pairs,
the attributes the caption describes.

Generation streams: attributes are drawn from one seeded NumPy generator in fixed-size blocks
and images drawn with PIL primitives, so any number of pairs is produced in constant memory,
identically for the same seed.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
from PIL import Image, ImageDraw

from pipeline.data.corpora.common import (
    CorpusInfo, check_fraction, check_min, encode_jpeg, write_corpus,
)
from pipeline.data.shards import Pair
from pipeline.data.uids import make_uid

SOURCE = "synthetic"
MIN_IMAGE_SIZE = 8
BLOCK = 4096  # attributes drawn per NumPy call

SHAPES = ("circle", "square", "triangle", "diamond", "cross", "star", "ring")
COLORS = {
    "red": (215, 40, 40), "orange": (245, 140, 20), "yellow": (240, 220, 30),
    "green": (40, 170, 60), "cyan": (40, 200, 210), "blue": (40, 70, 210),
    "purple": (130, 50, 180), "pink": (245, 130, 190), "brown": (130, 80, 40),
    "black": (15, 15, 15), "white": (250, 250, 250), "gray": (128, 128, 128),
}
COLOR_NAMES = tuple(COLORS)
SIZES = {"small": 0.2, "medium": 0.35, "large": 0.55}  # shape extent / image side
SIZE_NAMES = tuple(SIZES)
# (name, caption phrase, centre as fractions of the side)
POSITIONS = (
    ("top left", "in the top left corner", (0.3, 0.3)),
    ("top", "at the top", (0.5, 0.3)),
    ("top right", "in the top right corner", (0.7, 0.3)),
    ("left", "on the left", (0.3, 0.5)),
    ("center", "in the center", (0.5, 0.5)),
    ("right", "on the right", (0.7, 0.5)),
    ("bottom left", "in the bottom left corner", (0.3, 0.7)),
    ("bottom", "at the bottom", (0.5, 0.7)),
    ("bottom right", "in the bottom right corner", (0.7, 0.7)),
)
TEMPLATES = (
    "{a_size} {color} {shape} {position} on {a_background} background",
    "{a_color} {shape} {position}, {size}, on {a_background} background",
    "a picture of {a_size} {color} {shape} {position}, {background} background",
    "{a_background} background with {a_size} {color} {shape} {position}",
    "{size} {color} {shape}, {position}, {background} background",
)
_JITTER = 0.03  # centre jitter, fraction of the side


def _unit_star(points: int = 5, inner: float = 0.45) -> tuple[tuple[float, float], ...]:
    coords = []
    for i in range(2 * points):
        radius = 1.0 if i % 2 == 0 else inner
        angle = -math.pi / 2 + i * math.pi / points
        coords.append((radius * math.cos(angle), radius * math.sin(angle)))
    return tuple(coords)


_POLYGONS = {
    "triangle": ((0.0, -1.0), (0.866, 0.5), (-0.866, 0.5)),
    "diamond": ((0.0, -1.0), (1.0, 0.0), (0.0, 1.0), (-1.0, 0.0)),
    "star": _unit_star(),
}


@dataclass(frozen=True)
class Attributes:
    """What one synthetic image shows."""

    shape: str
    color: str
    background: str
    size: str
    position: str


def _article(word: str) -> str:
    return f"an {word}" if word[0] in "aeiou" else f"a {word}"


def describe(attrs: Attributes, template: int) -> str:
    """The caption of ``attrs`` with template number ``template``."""
    phrase = next(p for name, p, _ in POSITIONS if name == attrs.position)
    return TEMPLATES[template % len(TEMPLATES)].format(
        shape=attrs.shape, color=attrs.color, a_color=_article(attrs.color),
        size=attrs.size, a_size=_article(attrs.size), position=phrase,
        background=attrs.background, a_background=_article(attrs.background))


def draw_image(attrs: Attributes, image_size: int, jitter: tuple[float, float] = (0.0, 0.0),
               ) -> Image.Image:
    """Draw ``attrs`` on a ``image_size`` square; ``jitter`` shifts the centre (in sides)."""
    image = Image.new("RGB", (image_size, image_size), COLORS[attrs.background])
    draw = ImageDraw.Draw(image)
    fx, fy = next(c for name, _, c in POSITIONS if name == attrs.position)
    cx, cy = (fx + jitter[0]) * image_size, (fy + jitter[1]) * image_size
    r = SIZES[attrs.size] * image_size / 2
    fill = COLORS[attrs.color]
    box = (cx - r, cy - r, cx + r, cy + r)
    if attrs.shape == "circle":
        draw.ellipse(box, fill=fill)
    elif attrs.shape == "square":
        draw.rectangle(box, fill=fill)
    elif attrs.shape == "ring":
        draw.ellipse(box, outline=fill, width=max(1, round(r * 0.35)))
    elif attrs.shape == "cross":
        t = r * 0.3
        draw.rectangle((cx - r, cy - t, cx + r, cy + t), fill=fill)
        draw.rectangle((cx - t, cy - r, cx + t, cy + r), fill=fill)
    else:
        draw.polygon([(cx + r * x, cy + r * y) for x, y in _POLYGONS[attrs.shape]], fill=fill)
    return image


class _Block:
    """``BLOCK`` samples' worth of random draws (true and caption attributes)."""

    def __init__(self, rng: np.random.Generator, n: int) -> None:
        n_shapes, n_colors = len(SHAPES), len(COLORS)
        self.shape = rng.integers(0, n_shapes, n)
        self.color = rng.integers(0, n_colors, n)
        self.background = (self.color + rng.integers(1, n_colors, n)) % n_colors
        self.size = rng.integers(0, len(SIZES), n)
        self.position = rng.integers(0, len(POSITIONS), n)
        self.jitter = rng.uniform(-_JITTER, _JITTER, (n, 2))
        self.template = rng.integers(0, len(TEMPLATES), n)
        self.select = rng.random(n)
        # The caption of "a different random image": another (shape, color) combination,
        # uniformly among the others, with its own background, size and position.
        combos = n_shapes * n_colors
        other = (self.shape * n_colors + self.color + rng.integers(1, combos, n)) % combos
        self.alt_shape, self.alt_color = other // n_colors, other % n_colors
        self.alt_background = (self.alt_color + rng.integers(1, n_colors, n)) % n_colors
        self.alt_size = rng.integers(0, len(SIZES), n)
        self.alt_position = rng.integers(0, len(POSITIONS), n)

    def attributes(self, i: int) -> Attributes:
        """The true attributes of sample ``i`` of the block."""
        return Attributes(SHAPES[self.shape[i]], COLOR_NAMES[self.color[i]],
                          COLOR_NAMES[self.background[i]], SIZE_NAMES[self.size[i]],
                          POSITIONS[self.position[i]][0])

    def caption_attributes(self, i: int) -> Attributes:
        """The attributes of the different image a noisy sample ``i`` is captioned with."""
        return Attributes(SHAPES[self.alt_shape[i]], COLOR_NAMES[self.alt_color[i]],
                          COLOR_NAMES[self.alt_background[i]], SIZE_NAMES[self.alt_size[i]],
                          POSITIONS[self.alt_position[i]][0])


def iter_synthetic_pairs(num_pairs: int, *, image_size: int = 32, noise: float = 0.0,
                         seed: int = 0) -> Iterator[Pair]:
    """Yield ``num_pairs`` synthetic pairs; exactly ``round(noise * num_pairs)`` are noisy."""
    rng = np.random.default_rng(seed)
    namespace = f"{SOURCE}-{seed}"
    remaining_noisy = round(noise * num_pairs)
    index = 0
    while index < num_pairs:
        block = _Block(rng, min(BLOCK, num_pairs - index))
        for i in range(len(block.shape)):
            # Selection sampling (Knuth's algorithm S): exactly k of n, uniformly, streaming.
            noisy = block.select[i] * (num_pairs - index) < remaining_noisy
            remaining_noisy -= noisy
            yield _make_pair(block, i, index, bool(noisy), image_size, namespace, seed)
            index += 1


def _make_pair(block: _Block, i: int, index: int, noisy: bool, image_size: int,
               namespace: str, seed: int) -> Pair:
    truth = block.attributes(i)
    told = block.caption_attributes(i) if noisy else truth
    image = draw_image(truth, image_size, (float(block.jitter[i, 0]), float(block.jitter[i, 1])))
    meta: dict[str, Any] = {"uid": make_uid(namespace, str(index)), "source": SOURCE,
                            "seed": seed, "index": index, "noisy": noisy,
                            "attributes": dict(vars(truth))}
    if noisy:
        meta["caption_attributes"] = dict(vars(told))
    return Pair(f"synthetic_{index:010d}", encode_jpeg(image), describe(told, block.template[i]),
                meta)


def build_synthetic(out_dir: str | os.PathLike, *, num_pairs: int, image_size: int = 32,
                    noise: float = 0.0, seed: int = 0, shard_size: int = 10000,
                    overwrite: bool = False) -> CorpusInfo:
    """Build a synthetic corpus of ``num_pairs`` pairs into ``out_dir``."""
    check_min("--num-pairs", num_pairs, 1)
    check_min("--image-size", image_size, MIN_IMAGE_SIZE)
    check_fraction("--noise", noise)
    details = {"num_pairs": num_pairs, "image_size": image_size, "noise": noise, "seed": seed,
               "num_noisy": round(noise * num_pairs)}
    pairs = iter_synthetic_pairs(num_pairs, image_size=image_size, noise=noise, seed=seed)
    return write_corpus(pairs, out_dir, source=SOURCE, shard_size=shard_size,
                        overwrite=overwrite, details=details)
