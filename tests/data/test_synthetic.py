"""Synthetic corpus: determinism, exact recorded noise, streaming, speed."""

from __future__ import annotations

import io
import itertools
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.data.corpora import synthetic as syn
from pipeline.data.uids import make_uid
from tests.data.corpus_checks import read_corpus, tar_digests


def test_same_seed_same_bytes_other_seed_differs(tmp_path: Path) -> None:
    for name, seed in (("a", 7), ("b", 7), ("c", 8)):
        syn.build_synthetic(tmp_path / name, num_pairs=300, noise=0.2, seed=seed, shard_size=128)
    assert tar_digests(tmp_path / "a") == tar_digests(tmp_path / "b")
    assert tar_digests(tmp_path / "a")["00000.tar"] != tar_digests(tmp_path / "c")["00000.tar"]


@pytest.mark.parametrize("n, noise", [(400, 0.25), (101, 0.5), (50, 0.0), (50, 1.0)])
def test_noise_exact_and_recorded(tmp_path: Path, n: int, noise: float) -> None:
    info = syn.build_synthetic(tmp_path / "c", num_pairs=n, noise=noise, seed=3, shard_size=64)
    samples = read_corpus(tmp_path / "c")
    assert len(samples) == info.num_pairs == n
    noisy = [s for s in samples if s["meta"]["noisy"]]
    assert len(noisy) == round(noise * n) == info.details["num_noisy"]
    for s in samples:
        meta = s["meta"]
        truth = syn.Attributes(**meta["attributes"])
        assert meta["uid"] == make_uid("synthetic-3", str(meta["index"]))
        assert s["key"] == f"synthetic_{meta['index']:010d}"
        if meta["noisy"]:
            told = syn.Attributes(**meta["caption_attributes"])
            assert (told.shape, told.color) != (truth.shape, truth.color)
            assert told.shape in s["caption"] and told.color in s["caption"]
        else:
            assert "caption_attributes" not in meta
            assert truth.shape in s["caption"] and truth.color in s["caption"]
            assert truth.background in s["caption"]


def test_noisy_pairs_spread_over_the_stream(tmp_path: Path) -> None:
    pairs = list(syn.iter_synthetic_pairs(2000, noise=0.5, seed=0))
    flags = np.array([p.meta["noisy"] for p in pairs])
    assert flags.sum() == 1000
    assert 350 < flags[:1000].sum() < 650  # not all at one end


def test_image_matches_attributes() -> None:
    attrs = syn.Attributes("square", "red", "blue", "large", "center")
    image = np.asarray(syn.draw_image(attrs, 32))
    assert image.shape == (32, 32, 3)
    assert tuple(image[16, 16]) == syn.COLORS["red"]
    assert tuple(image[0, 0]) == syn.COLORS["blue"]
    corner = syn.Attributes("circle", "yellow", "black", "small", "top left")
    image = np.asarray(syn.draw_image(corner, 64))
    assert tuple(image[int(0.3 * 64), int(0.3 * 64)]) == syn.COLORS["yellow"]
    assert tuple(image[48, 48]) == syn.COLORS["black"]


def test_every_shape_draws_something() -> None:
    for shape in syn.SHAPES:
        image = np.asarray(syn.draw_image(syn.Attributes(shape, "white", "black", "medium",
                                                         "center"), 32))
        assert image.max() == 250, shape


def test_image_size_option(tmp_path: Path) -> None:
    syn.build_synthetic(tmp_path / "c", num_pairs=5, image_size=48)
    image = Image.open(io.BytesIO(read_corpus(tmp_path / "c")[0]["image"]))
    assert image.size == (48, 48) and image.mode == "RGB"


def test_generation_is_lazy() -> None:
    """A billion-pair stream starts at once: nothing is materialised up front."""
    start = time.perf_counter()
    first = list(itertools.islice(syn.iter_synthetic_pairs(10**9, noise=0.1, seed=0), 3))
    assert [p.meta["index"] for p in first] == [0, 1, 2]
    assert time.perf_counter() - start < 2.0


@pytest.mark.slow
def test_throughput_at_32px(tmp_path: Path) -> None:
    n = 20_000
    start = time.perf_counter()
    syn.build_synthetic(tmp_path / "c", num_pairs=n, noise=0.1)
    rate = n / (time.perf_counter() - start)
    assert rate >= 2000, f"{rate:.0f} pairs/s"
