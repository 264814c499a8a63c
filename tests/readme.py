"""Code blocks of README.md, for tests that run the documented commands as written."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_block(heading: str, language: str) -> str:
    """The first ```LANGUAGE block under the README heading line ``heading`` (e.g. ``## Outputs``)."""
    text = README.read_text()
    start = text.index(f"\n{heading}\n")
    level = heading.split(" ", 1)[0]
    end = text.find(f"\n{level} ", start + len(heading) + 2)
    section = text[start:end if end >= 0 else len(text)]
    match = re.search(rf"^```{re.escape(language)}\n(.*?)^```$", section, re.S | re.M)
    if match is None:
        raise ValueError(f"README section {heading!r} has no {language} block")
    return match.group(1)
