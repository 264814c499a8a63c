"""The report rendered by a real browser (headless Chromium): the page paints, with its images.

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

from pipeline.io.scores import SCORE_COLUMNS
from pipeline.report.build import write_report
from tests.conftest import COLOURS
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


def run_chromium(page: Path, profile: Path, *action: str) -> subprocess.CompletedProcess:
    """Headless Chromium on a local page with one action (``--dump-dom`` or ``--screenshot=``)."""
    args = [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            "--hide-scrollbars", f"--user-data-dir={profile}", "--virtual-time-budget=5000",
            f"--window-size={WINDOW[0]},{WINDOW[1]}", *action, page.resolve().as_uri()]
    env = {**os.environ, "HOME": str(profile)}
    result = subprocess.run(args, capture_output=True, text=True, timeout=180, env=env)
    assert result.returncode == 0, f"chromium failed ({result.returncode}): {result.stderr[-2000:]}"
    return result


def test_report_renders_in_headless_chromium(run_dir: Path, tmp_path: Path) -> None:
    page = write_report(run_dir, n_examples=8)
    n_images = len(parse(page.read_text()).images)
    assert n_images == 1 + len(SCORE_COLUMNS) + 1 + 2 * 8

    dom = run_chromium(page, tmp_path / "profile", "--dump-dom").stdout
    marker = re.search(r'<body[^>]*data-images-loaded="(\d+)/(\d+)"', dom)
    assert marker, "the page's load script did not run (no data-images-loaded on <body>)"
    assert (int(marker.group(1)), int(marker.group(2))) == (n_images, n_images)

    shot = tmp_path / "shot.png"
    run_chromium(page, tmp_path / "profile", f"--screenshot={shot}")
    with Image.open(shot) as image:
        assert image.size == WINDOW
        pixels = np.asarray(image.convert("RGB")).reshape(-1, 3).astype(np.int16)
    colours, counts = np.unique(pixels, axis=0, return_counts=True)
    background = colours[counts.argmax()]
    painted = (np.abs(pixels - background).max(axis=1) > 30).mean()
    assert len(colours) > 1000, f"only {len(colours)} distinct colours: a blank page?"
    assert painted > 0.08, f"only {painted:.1%} of the screenshot differs from the background"
    # the thumbnails are painted: each square colour of the corpus covers a visible area
    for name, rgb in COLOURS.items():
        near = (np.abs(pixels - np.array(rgb)).max(axis=1) < 30).sum()
        assert near > 1000, f"{name} thumbnails not visible in the screenshot ({near} pixels)"
