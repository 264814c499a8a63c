"""The report rendered by a real browser (headless Chromium): the page paints, with its images,
and writes nothing to the console; a run with several selections, scrolled to their comparison.

Chromium is a Debian package installed by ``make setup``; without it this test fails (it
never skips), because CI must run it.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
from PIL import Image

import pytest

from pipeline.config import SelectConfig
from pipeline.io.scores import SCORE_COLUMNS
from pipeline.report.build import write_report
from pipeline.report.plots import set_style
from tests.conftest import COLOURS
from tests.report.conftest import add_selection, make_run
from tests.report.pagecheck import parse

pytestmark = pytest.mark.browser

CHROMIUM_CANDIDATES = ("/usr/bin/chromium", "chromium", "chromium-browser")
WINDOW = (1280, 2000)


def chromium() -> str:
    """The Chromium executable; a clear failure when it is not installed."""
    for candidate in CHROMIUM_CANDIDATES:
        path = shutil.which(candidate)
        if path:
            return path
    pytest.fail("chromium not found: install the Debian package `chromium` (`make setup` does) "
                "to run the report's browser test")


def run_chromium(page: Path, profile: Path, *action: str,
                 window: tuple[int, int] = WINDOW) -> subprocess.CompletedProcess:
    """Headless Chromium on a local page with one action (``--dump-dom`` or ``--screenshot=``);
    the page's console messages go to stderr (:func:`console_messages`)."""
    args = [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            "--hide-scrollbars", f"--user-data-dir={profile}", "--virtual-time-budget=5000",
            "--enable-logging=stderr", "--v=0",
            f"--window-size={window[0]},{window[1]}", *action, page.resolve().as_uri()]
    env = {**os.environ, "HOME": str(profile)}
    result = subprocess.run(args, capture_output=True, text=True, timeout=180, env=env)
    assert result.returncode == 0, f"chromium failed ({result.returncode}): {result.stderr[-2000:]}"
    return result


def console_messages(result: subprocess.CompletedProcess) -> list[str]:
    """What the page wrote to its console (errors and uncaught exceptions included)."""
    return [line for line in result.stderr.splitlines() if ":CONSOLE" in line]


def paint(page: Path, profile: Path, window: tuple[int, int] = WINDOW, min_painted: float = 0.08) -> np.ndarray:
    """Load ``page``: every image decodes, nothing is written to the console, and a screenshot
    of the top ``window`` is not blank (at least ``min_painted`` of it off the background); its
    pixels (RGB rows, int16)."""
    n_images = len(parse(page.read_text()).images)
    loaded = run_chromium(page, profile, "--dump-dom", window=window)
    marker = re.search(r'<body[^>]*data-images-loaded="(\d+)/(\d+)"', loaded.stdout)
    assert marker, "the page's load script did not run (no data-images-loaded on <body>)"
    assert (int(marker.group(1)), int(marker.group(2))) == (n_images, n_images)
    assert console_messages(loaded) == []

    shot = profile.parent / "shot.png"
    run_chromium(page, profile, f"--screenshot={shot}", window=window)
    with Image.open(shot) as image:
        assert image.size == window
        pixels = np.asarray(image.convert("RGB")).reshape(-1, 3).astype(np.int16)
    packed = (pixels[:, 0].astype(np.int32) << 16) | (pixels[:, 1] << 8) | pixels[:, 2]
    colours, counts = np.unique(packed, return_counts=True)
    background = pixels[np.argmax(packed == colours[counts.argmax()])]
    painted = (np.abs(pixels - background).max(axis=1) > 30).mean()
    assert len(colours) > 1000, f"only {len(colours)} distinct colours: a blank page?"
    assert painted > min_painted, f"only {painted:.1%} of the screenshot differs from the background"
    return pixels


def _near(pixels: np.ndarray, rgb: tuple[int, int, int] | str) -> int:
    """Pixels within 30 of ``rgb`` (a tuple or ``#rrggbb``) in every channel."""
    if isinstance(rgb, str):
        rgb = tuple(int(rgb[i:i + 2], 16) for i in (1, 3, 5))
    return int((np.abs(pixels - np.array(rgb)).max(axis=1) < 30).sum())


def test_report_renders_in_headless_chromium(run_dir: Path, tmp_path: Path) -> None:
    page = write_report(run_dir, n_examples=8)
    assert len(parse(page.read_text()).images) == 1 + len(SCORE_COLUMNS) + 1 + 2 * 8
    pixels = paint(page, tmp_path / "profile")
    # the thumbnails are painted: each square colour of the corpus covers a visible area
    for name, rgb in COLOURS.items():
        near = _near(pixels, rgb)
        assert near > 1000, f"{name} thumbnails not visible in the screenshot ({near} pixels)"


def test_selections_compared_render_in_headless_chromium(tmp_path: Path, report_corpus: Path) -> None:
    """Three selections: the comparison's tables and plots paint (a window as tall as the page)."""
    run = make_run(tmp_path / "run", report_corpus, clusters=True)
    add_selection(run, "clip", SelectConfig(column="clip_score", rule="top_fraction", fraction=0.3))
    add_selection(run, "neg", SelectConfig(column="neg_clip_loss", rule="top_fraction", fraction=0.5))
    page = write_report(run, n_examples=0)
    # status, histograms, scatter; kept scores on tracin, clip_score, neg_clip_loss; coverage by cluster
    assert len(parse(page.read_text()).images) == 1 + len(SCORE_COLUMNS) + 1 + 3 + 1
    pixels = paint(page, tmp_path / "profile", window=(WINDOW[0], 4800), min_painted=0.04)  # the whole page
    # each selection's colour in the plots (the third's, green, is in no other plot of the page)
    for i, label in enumerate(["(default)", "clip", "neg"]):
        colour, _ = set_style(i)
        near = _near(pixels, colour)
        assert near > 1000, f"{label}'s colour {colour} hardly in the screenshot ({near} pixels)"


def test_console_messages_are_caught(tmp_path: Path) -> None:
    page = tmp_path / "broken.html"
    page.write_text('<html><body><script>console.error("boom"); missing();</script></body></html>')
    messages = console_messages(run_chromium(page, tmp_path / "profile", "--dump-dom"))
    assert any('"boom"' in m for m in messages) and any("Uncaught ReferenceError" in m for m in messages)
