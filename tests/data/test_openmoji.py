"""OpenMoji corpus: captions from Unicode names, glyph shaping, the full build."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from PIL import Image

from pipeline.data.corpora import openmoji
from pipeline.data.corpora.openmoji import Emoji, EmojiRenderer, emoji_caption
from tests.data.corpus_checks import read_corpus, tar_digests


def caption(stem: str) -> str | None:
    return emoji_caption(Emoji.from_stem(stem).codepoints)


@pytest.mark.parametrize("stem, expected", [
    ("1F596", "raised hand with part between middle and ring fingers"),
    ("1F596-1F3FD", "raised hand with part between middle and ring fingers, medium skin tone"),
    ("1F44D-1F3FB", "thumbs up sign, light skin tone"),
    ("1F1FA-1F1F8", "flag of US"),
    ("1F3F4-E0067-E0062-E0073-E0063-E0074-E007F", "flag of GB-SCT"),
    ("0031-FE0F-20E3", "keycap digit one"),
    ("0023-FE0F-20E3", "keycap number sign"),
    ("1F468-200D-1F469-200D-1F467", "man, woman, girl"),
    ("1F9D1-1F3FB-200D-1F9B0", "adult, light skin tone, red hair"),
    ("1F3C4-1F3FD-200D-2640-FE0F", "surfer, medium skin tone, female"),
    ("1F6B6-200D-27A1-FE0F", "pedestrian, facing right"),
    ("2764-FE0F", "heavy black heart"),
    ("1FAEF", "fight cloud"),  # Unicode 17: needs unicodedata2, not Python 3.11's UCD 14
])
def test_caption_rules(stem: str, expected: str) -> None:
    assert caption(stem) == expected


@pytest.mark.parametrize("stem", ["E000", "E0C3", "F000", "F8FF"])
def test_private_use_extras_have_no_caption(stem: str) -> None:
    assert caption(stem) is None


def test_emoji_key_and_hex() -> None:
    emoji = Emoji.from_stem("1F596-1F3FD")
    assert emoji.key == "openmoji_1f596-1f3fd"
    assert emoji.hex == "1F596-1F3FD"
    assert emoji.text == "\U0001F596\U0001F3FD"
    with pytest.raises(ValueError):
        Emoji.from_stem("1F596--1F3FD")
    with pytest.raises(ValueError):
        Emoji.from_stem("not-hex")


# Pillow's wheels ship raqm; without it ZWJ sequences would not shape and this test fails.
@pytest.mark.parametrize("stem", [
    "1F468-200D-1F469-200D-1F467-200D-1F466",  # family
    "1F469-1F3FB-200D-2764-FE0F-200D-1F48B-200D-1F468-1F3FF",  # kiss, mixed skin tones
    "1F3F3-FE0F-200D-1F308",  # rainbow flag
    "1F1EF-1F1F5",  # flag of JP
    "1F3F4-E0067-E0062-E0077-E006C-E0073-E007F",  # flag of Wales (tag sequence)
    "0023-FE0F-20E3",  # keycap
])
def test_sequences_shape_into_one_glyph(stem: str) -> None:
    renderer = EmojiRenderer(openmoji.font_path(), 64)
    text = Emoji.from_stem(stem).text
    assert renderer.is_single_glyph(text)
    assert renderer.render(text) is not None


def test_split_sequences_are_not_one_glyph() -> None:
    renderer = EmojiRenderer(openmoji.font_path(), 64)
    assert not renderer.is_single_glyph("\U0001F468\U0001F469")  # two emoji, no joiner
    assert not renderer.is_single_glyph("\U0010FFFD")  # no glyph: .notdef
    assert renderer.render("\U0010FFFD") is None


@pytest.fixture(scope="module")
def full_build(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("openmoji") / "corpus"
    openmoji.build_openmoji(out)
    return out


def test_full_build(full_build: Path) -> None:
    samples = read_corpus(full_build)
    assert len(samples) >= 4000
    corpus = json.loads((full_build / "corpus.json").read_text())
    details = corpus["details"]
    emoji, _ = openmoji.list_emoji(openmoji.svg_dir())
    skipped = sum(details["skipped"].values())
    assert len(samples) + skipped == len(emoji)
    assert details["skipped"]["no_unicode_name"] > 0
    keys = [s["key"] for s in samples]
    assert keys == sorted(keys, key=lambda k: Emoji.from_stem(k.split("_", 1)[1]).codepoints)
    for sample in samples:
        meta = sample["meta"]
        assert sample["ext"] == "jpg" and sample["caption"]
        assert sample["key"] == f"openmoji_{meta['codepoints'].lower()}"
        assert meta["source"] == "openmoji" and meta["license"] == "CC BY-SA 4.0"
    image = Image.open(io.BytesIO(samples[0]["image"]))
    assert image.size == (64, 64) and image.mode == "RGB"
    attribution = (full_build / "ATTRIBUTION.txt").read_text()
    assert "CC BY-SA 4.0" in attribution and "creativecommons.org/licenses/by-sa/4.0" in attribution
    assert "OpenMoji" in attribution


def test_full_build_is_byte_identical(full_build: Path, tmp_path: Path) -> None:
    again = tmp_path / "again"
    openmoji.build_openmoji(again)
    assert tar_digests(again) == tar_digests(full_build)


def test_limit_image_size_and_shards(tmp_path: Path) -> None:
    info = openmoji.build_openmoji(tmp_path / "c", image_size=32, limit=30, shard_size=8)
    samples = read_corpus(tmp_path / "c")
    assert info.num_pairs == len(samples) == 30
    assert list(info.sizes.values()) == [8, 8, 8, 6]
    assert Image.open(io.BytesIO(samples[0]["image"])).size == (32, 32)


def test_svg_fallback_when_the_font_cannot_shape(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(EmojiRenderer, "is_single_glyph", lambda self, text: False)
    info = openmoji.build_openmoji(tmp_path / "c", limit=5)
    assert info.num_pairs == 5 and info.details["svg_fallback"] == 5
    image = Image.open(io.BytesIO(read_corpus(tmp_path / "c")[0]["image"])).convert("L")
    assert image.getextrema()[0] < 128  # something was drawn
