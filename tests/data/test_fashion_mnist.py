"""Fashion-MNIST corpus: idx reading, splits, exact recorded label noise (uniform, look-alike)."""

from __future__ import annotations

import gzip
import io
import json
import struct
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from jobs import data as data_job
from pipeline.data.corpora import fashion_mnist as fm
from pipeline.errors import DataError, UsageError
from tests.data.corpus_checks import read_corpus, tar_digests

REAL_ROOT = Path(fm.DEFAULT_ROOT)
# The Debian package dataset-fashion-mnist is installed by `make setup`: without it these
# tests fail (they are never skipped).


def write_idx(path: Path, array: np.ndarray) -> None:
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(
        f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def make_source(root: Path, n_train: int = 40, n_test: int = 12) -> Path:
    """A tiny Fashion-MNIST look-alike in the original file layout."""
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("test", n_test)):
        images_name, labels_name = fm.FILES[split]
        write_idx(root / images_name, rng.integers(0, 256, (n, 28, 28)))
        write_idx(root / labels_name, np.arange(n) % 10)
    return root


def test_read_idx_round_trip_and_errors(tmp_path: Path) -> None:
    array = np.arange(2 * 3 * 4).reshape(2, 3, 4)
    write_idx(tmp_path / "a.gz", array)
    assert np.array_equal(fm.read_idx(tmp_path / "a.gz"), array)
    with gzip.open(tmp_path / "bad.gz", "wb") as f:
        f.write(b"\x00\x00\x0d\x01" + struct.pack(">I", 3) + b"\x00" * 12)  # float32 code
    with pytest.raises(DataError):
        fm.read_idx(tmp_path / "bad.gz")
    with gzip.open(tmp_path / "short.gz", "wb") as f:
        f.write(b"\x00\x00\x08\x01" + struct.pack(">I", 5) + b"\x00" * 3)
    with pytest.raises(DataError):
        fm.read_idx(tmp_path / "short.gz")


@pytest.mark.parametrize("n, noise", [(10, 0.0), (10, 1.0), (7, 0.5), (1000, 0.137)])
def test_noise_is_exact_and_always_another_class(n: int, noise: float) -> None:
    labels = np.arange(n) % 10
    caption_labels, noisy = fm.noisy_caption_labels(labels, noise, np.random.default_rng(1))
    assert noisy.sum() == round(noise * n)
    assert np.array_equal(noisy, caption_labels != labels)
    assert caption_labels.min() >= 0 and caption_labels.max() < 10


def test_build_small_source(tmp_path: Path) -> None:
    src = make_source(tmp_path / "src")
    infos = fm.build_fashion_mnist(tmp_path / "out", root=src, noise=0.25, seed=5, shard_size=16)
    assert set(infos) == {"train", "test"}
    train, test = read_corpus(tmp_path / "out" / "train"), read_corpus(tmp_path / "out" / "test")
    assert len(train) == 40 and len(test) == 12
    assert infos["train"].out_dir == str(tmp_path / "out" / "train")
    assert sum(s["meta"]["noisy"] for s in train) == 10
    assert not any(s["meta"]["noisy"] for s in test)
    image = Image.open(io.BytesIO(train[0]["image"]))
    assert train[0]["ext"] == "png" and image.size == (28, 28) and image.mode == "L"
    assert (tmp_path / "out" / "train" / "ATTRIBUTION.txt").is_file()
    assert not [p for p in (tmp_path).iterdir() if p.name.startswith(".")]  # no temporaries


def _check_records(samples: list[dict], split: str) -> None:
    for s in samples:
        meta = s["meta"]
        assert meta["split"] == split and s["key"] == f"fmnist_{split}_{meta['index']:05d}"
        assert meta["noisy"] == (meta["label"] != meta["caption_label"])
        assert fm.CAPTION_NOUNS[meta["caption_label"]] in s["caption"]
        assert meta["label_name"] == fm.CLASS_NAMES[meta["label"]]


def test_real_data_noise_exact_and_recorded(tmp_path: Path) -> None:
    fm.build_fashion_mnist(tmp_path / "a", noise=0.3, seed=3, limit=250, shard_size=100)
    train = read_corpus(tmp_path / "a" / "train")
    test = read_corpus(tmp_path / "a" / "test")
    assert len(train) == len(test) == 250
    assert sum(s["meta"]["noisy"] for s in train) == round(0.3 * 250)
    assert sum(s["meta"]["noisy"] for s in test) == 0
    _check_records(train, "train")
    _check_records(test, "test")
    assert {s["meta"]["label"] for s in train} == set(range(10))
    assert len({s["caption"].replace(fm.CAPTION_NOUNS[s["meta"]["caption_label"]], "{}")
                for s in train}) > 1  # several templates


def test_real_data_determinism_and_seed(tmp_path: Path) -> None:
    for name, seed in (("a", 1), ("b", 1), ("c", 2)):
        fm.build_fashion_mnist(tmp_path / name, noise=0.2, seed=seed, limit=100)
    assert tar_digests(tmp_path / "a" / "train") == tar_digests(tmp_path / "b" / "train")
    noisy = {name: [s["meta"]["noisy"] for s in read_corpus(tmp_path / name / "train")]
             for name in "ac"}
    assert noisy["a"] != noisy["c"] and sum(noisy["a"]) == sum(noisy["c"]) == 20


@pytest.mark.parametrize("noise", [-0.1, 1.01, float("nan")])
def test_bad_noise_rejected_before_writing(tmp_path: Path, noise: float) -> None:
    with pytest.raises(UsageError):
        fm.build_fashion_mnist(tmp_path / "out", root=make_source(tmp_path / "src"), noise=noise)
    assert not (tmp_path / "out").exists()


def test_missing_source_rejected(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="not found"):
        fm.build_fashion_mnist(tmp_path / "out", root=tmp_path / "nowhere")
    assert not (tmp_path / "out").exists()


# --- look-alike noise -------------------------------------------------------------------------

BAG = fm.CLASS_NAMES.index("Bag")
PARTNERS = fm.lookalike_partners()


def _check_lookalike(labels: list[int], caption_labels: list[int], noisy: list[bool]) -> None:
    """Noisy captions name a partner of the image's class, clean ones its own; no noisy bag."""
    for label, caption_label, is_noisy in zip(labels, caption_labels, noisy):
        assert is_noisy == (caption_label != label)
        assert caption_label in PARTNERS[label] if is_noisy else caption_label == label
        assert not (is_noisy and label == BAG)


def test_lookalike_map_covers_every_class() -> None:
    assert tuple(fm.LOOKALIKES) == fm.CLASS_NAMES
    for name, partners in fm.LOOKALIKES.items():
        assert set(partners) <= set(fm.CLASS_NAMES) - {name}
        assert len(set(partners)) == len(partners)
        assert bool(partners) == (name != "Bag")
        assert f"{name} -> " in " ".join(fm.__doc__.split())  # documented


@pytest.mark.parametrize("n, noise", [(10, 0.0), (10, 0.9), (7, 0.5), (1000, 0.137), (1000, 0.9)])
def test_lookalike_noise_exact_partner_and_never_a_bag(n: int, noise: float) -> None:
    labels = np.arange(n) % 10
    caption_labels, noisy = fm.lookalike_caption_labels(labels, noise, np.random.default_rng(1))
    assert noisy.sum() == round(noise * n)
    _check_lookalike(labels.tolist(), caption_labels.tolist(), noisy.tolist())


def test_lookalike_draws_every_partner() -> None:
    labels = np.arange(2000) % 10
    caption_labels, noisy = fm.lookalike_caption_labels(labels, 0.9, np.random.default_rng(0))
    for c, partners in enumerate(PARTNERS):
        assert set(caption_labels[noisy & (labels == c)].tolist()) == set(partners)


def test_lookalike_too_few_non_bags_is_a_usage_error(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="36 of the 40 train images"):
        fm.build_fashion_mnist(tmp_path / "out", root=make_source(tmp_path / "src"),
                               noise=0.95, noise_kind="lookalike")
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporaries


def _corpus_json(out_dir: Path) -> dict:
    return json.loads((out_dir / "corpus.json").read_text())


def test_real_data_lookalike(tmp_path: Path) -> None:
    for name, seed, kind in (("a", 4, "lookalike"), ("b", 4, "lookalike"), ("c", 5, "lookalike"),
                             ("u", 4, "uniform")):
        fm.build_fashion_mnist(tmp_path / name, noise=0.3, seed=seed, limit=120, shard_size=50,
                               noise_kind=kind)
    train = {name: read_corpus(tmp_path / name / "train") for name in "acu"}
    metas = [s["meta"] for s in train["a"]]
    assert sum(m["noisy"] for m in metas) == round(0.3 * 120)
    assert any(m["label"] == BAG for m in metas)
    _check_lookalike([m["label"] for m in metas], [m["caption_label"] for m in metas],
                     [m["noisy"] for m in metas])
    _check_records(train["a"], "train")
    assert not any(s["meta"]["noisy"] for s in read_corpus(tmp_path / "a" / "test"))
    for split in fm.SPLITS:  # same seed: same bytes
        assert tar_digests(tmp_path / "a" / split) == tar_digests(tmp_path / "b" / split)
    assert [m["noisy"] for m in metas] != [s["meta"]["noisy"] for s in train["c"]]
    # the same images under the same uids as the uniform corpus, only captions differ
    assert [(s["meta"]["uid"], s["image"]) for s in train["a"]] == \
        [(s["meta"]["uid"], s["image"]) for s in train["u"]]
    assert _corpus_json(tmp_path / "a" / "train")["details"]["noise_kind"] == "lookalike"
    assert "noise_kind" not in _corpus_json(tmp_path / "u" / "train")["details"]


def test_cli_noise_kind(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = make_source(tmp_path / "src", n_train=20, n_test=10)
    code = data_job.main(["fashion-mnist", "--out", str(tmp_path / "fm"), "--source", str(src),
                          "--noise", "0.5", "--noise-kind", "lookalike", "--seed", "3"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "train 20 pairs (10 noisy captions)" in out
    metas = [s["meta"] for s in read_corpus(tmp_path / "fm" / "train")]
    _check_lookalike([m["label"] for m in metas], [m["caption_label"] for m in metas],
                     [m["noisy"] for m in metas])
    assert _corpus_json(tmp_path / "fm" / "train")["details"]["noise_kind"] == "lookalike"


@pytest.mark.parametrize("argv, message", [
    (["--noise-kind", "similar"], "--noise-kind must be one of uniform, lookalike"),
    (["--noise-kind", "lookalike", "--noise", "1"], "have a look-alike class"),
])
def test_cli_bad_noise_kind_one_line_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                            argv: list[str], message: str) -> None:
    src = make_source(tmp_path / "src", n_train=20, n_test=10)
    code = data_job.main(["fashion-mnist", "--out", str(tmp_path / "out"), "--source", str(src),
                          "--noise", "0.2", *argv])
    out, err = capsys.readouterr()
    assert code == 2 and out == ""
    assert err.startswith("diffin: error: ") and message in err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()
