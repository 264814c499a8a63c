"""Openclipart corpus: metadata parsing, captions, dedupe, skips by reason, real SVGs."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from PIL import Image

from pipeline.data.corpora import openclipart as oc
from pipeline.data.uids import make_uid
from pipeline.errors import UsageError
from tests.data.corpus_checks import read_corpus, tar_digests

REAL_ROOT = Path(oc.DEFAULT_ROOT)


def svg(title: str | None = "red box", description: str = "", keywords: tuple[str, ...] = (),
        body: str = '<rect x="10" y="10" width="80" height="40" fill="#d22"/>',
        size: str = 'width="100" height="50"') -> str:
    """A small Inkscape-style SVG with Dublin Core metadata (the Agent titles are decoys)."""
    title_xml = f"<dc:title>{title}</dc:title>" if title is not None else ""
    items = "".join(f"<rdf:li>{k}</rdf:li>" for k in keywords)
    return f"""<?xml version="1.0" encoding="UTF-8"?>
<svg xmlns="http://www.w3.org/2000/svg" xmlns:dc="http://purl.org/dc/elements/1.1/"
     xmlns:cc="http://web.resource.org/cc/"
     xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#" {size}>
  <metadata><rdf:RDF><cc:Work rdf:about="">
    {title_xml}<dc:description>{description}</dc:description>
    <dc:subject><rdf:Bag>{items}</rdf:Bag></dc:subject>
    <dc:creator><cc:Agent><dc:title>Some Author</dc:title></cc:Agent></dc:creator>
    <dc:rights><cc:Agent><dc:title>public domain</dc:title></cc:Agent></dc:rights>
  </cc:Work></rdf:RDF></metadata>
  {body}
</svg>"""


def make_tree(root: Path) -> Path:
    files = {
        "animals/cat_01.svg": svg("Black cat", "A black cat sitting", ("cat", "animal", "hash")),
        "pets/cat_01.svg": svg("Black cat (other revision)"),  # same name: dropped
        "animals/dog_01.svg": svg("dog", "dog"),  # description equal to title: not repeated
        "animals/dog_02.svg": svg("dog", "dog"),  # same bytes as dog_01: dropped
        "animals/fish.v2_01.svg": svg("  fish\n  in water ", "HASH(0x862bbb8)"),
        "shapes/untitled_01.svg": svg(None),
        "shapes/blank_01.svg": svg("nothing", body=""),
        "shapes/broken_01.svg": "<svg><unclosed></svg>",
        "shapes/nosize_01.svg": svg("no size", size='width="0" height="0"'),
        "shapes/tall_01.svg": svg("tall", size='width="20" height="100"',
                                  body='<rect width="20" height="100" fill="#22d"/>'),
    }
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    return root


def test_parse_metadata_is_namespace_aware() -> None:
    meta = oc.parse_metadata(svg("Black cat", " A black\ncat ", ("cat", "big_cat", "Cat")).encode())
    assert meta.title == "Black cat"  # not the Agent's "Some Author" / "public domain"
    assert meta.description == "A black cat"
    assert meta.keywords == ("cat", "big cat")


@pytest.mark.parametrize("title, description, keywords, expected", [
    ("Black cat", "A black cat sitting", False, "Black cat. A black cat sitting"),
    ("Black cat.", "A black cat sitting", False, "Black cat. A black cat sitting"),
    ("dog", "Dog.", False, "dog"),
    ("fish", "HASH(0x862bbb8)", False, "fish"),
    ("fish", "Created with Inkscape", False, "fish"),
    ("fish", "mail me at someone@example.org", False, "fish"),
    ("fish", "<a href='x'>public domain</a>", False, "fish"),
    ("cat", None, True, "cat; tags: animal, pet"),
    (None, "only a description", False, None),
])
def test_make_caption(title: str | None, description: str | None, keywords: bool,
                      expected: str | None) -> None:
    meta = oc.ClipartMeta(oc.clean_text(title), oc.clean_text(description), ("animal", "pet"))
    assert oc.make_caption(meta, with_keywords=keywords) == expected


def test_long_description_is_cut_at_a_word() -> None:
    meta = oc.ClipartMeta("map", "word " * 100)
    caption = oc.make_caption(meta)
    assert caption.endswith("word…")
    assert len(caption) <= len("map. ") + oc.MAX_DESCRIPTION_CHARS + 1


def test_render_keeps_aspect_and_pads_white() -> None:
    image = oc.render_svg(svg(size='width="20" height="100"',
                              body='<rect width="20" height="100" fill="#2222dd"/>').encode(), 50)
    assert image.size == (50, 50) and image.mode == "RGB"
    assert image.getpixel((25, 25))[2] > 200 and image.getpixel((2, 25)) == (255, 255, 255)
    assert oc.render_svg(svg(body="").encode(), 32) is None  # blank


@pytest.mark.parametrize("workers", [1, 2])
def test_build_tree_dedupes_and_counts_skips(tmp_path: Path, workers: int) -> None:
    root = make_tree(tmp_path / "svg")
    info = oc.build_openclipart(tmp_path / "out", root=root, image_size=32, workers=workers)
    samples = read_corpus(tmp_path / "out")
    by_path = {s["meta"]["path"]: s for s in samples}
    assert list(by_path) == ["animals/cat_01.svg", "animals/dog_01.svg",
                             "animals/fish.v2_01.svg", "shapes/tall_01.svg"]
    assert info.details["skipped"] == {"blank_image": 1, "duplicate_content": 1,
                                       "duplicate_name": 1, "no_title": 1, "render_error": 1,
                                       "xml_error": 1}
    cat = by_path["animals/cat_01.svg"]
    assert cat["caption"] == "Black cat. A black cat sitting"
    assert cat["meta"]["uid"] == make_uid("openclipart", "animals/cat_01.svg")
    assert cat["meta"]["duplicate_paths"] == ["pets/cat_01.svg"]
    assert cat["meta"]["keywords"] == ["cat", "animal"]
    assert by_path["animals/dog_01.svg"]["caption"] == "dog"
    fish = by_path["animals/fish.v2_01.svg"]
    assert fish["caption"] == "fish in water" and fish["key"] == "openclipart_fish_v2_01"
    assert Image.open(io.BytesIO(cat["image"])).size == (32, 32)
    corpus = json.loads((tmp_path / "out" / "corpus.json").read_text())
    assert corpus["details"]["skipped"] == info.details["skipped"]


def test_workers_do_not_change_the_bytes(tmp_path: Path) -> None:
    root = make_tree(tmp_path / "svg")
    oc.build_openclipart(tmp_path / "a", root=root, workers=0)
    oc.build_openclipart(tmp_path / "b", root=root, workers=2)
    assert tar_digests(tmp_path / "a") == tar_digests(tmp_path / "b")


def test_missing_source_and_bad_options(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="not found"):
        oc.build_openclipart(tmp_path / "out", root=tmp_path / "nowhere")
    root = make_tree(tmp_path / "svg")
    for options in ({"limit": 0}, {"workers": -1}, {"image_size": 4}, {"shard_size": 0}):
        with pytest.raises(UsageError):
            oc.build_openclipart(tmp_path / "out", root=root, **options)
    assert not (tmp_path / "out").exists()


# openclipart-svg is installed by `make setup`; without it this test fails, never skips.
def test_real_openclipart_limit_40(tmp_path: Path) -> None:
    info = oc.build_openclipart(tmp_path / "out", limit=40, workers=2, shard_size=16)
    samples = read_corpus(tmp_path / "out")
    skipped = info.details["skipped"]
    dropped = sum(v for k, v in skipped.items() if k != "duplicate_name")
    assert len(samples) + dropped == 40 and len(samples) >= 30
    assert all(s["caption"].strip() for s in samples)
    paths = [s["meta"]["path"] for s in samples]
    assert paths == sorted(paths)
    for s in samples:
        assert s["meta"]["uid"] == make_uid("openclipart", s["meta"]["path"])
        assert Image.open(io.BytesIO(s["image"])).size == (64, 64)
    assert (tmp_path / "out" / "ATTRIBUTION.txt").is_file()
