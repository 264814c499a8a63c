"""The project's installed dependency tree, read from package metadata (importlib.metadata)."""

from __future__ import annotations

import importlib.metadata as md

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

PROJECT = "diffin-prune"


def distributions() -> dict[str, md.Distribution]:
    """Canonical name → installed distribution."""
    return {canonicalize_name(d.metadata["Name"]): d for d in md.distributions()}


def requirements(dist: md.Distribution, extras: tuple[str, ...] = ()) -> list[Requirement]:
    """What ``dist`` requires with ``extras`` (and with no extra)."""
    reqs = [Requirement(text) for text in dist.requires or []]
    return [r for r in reqs if r.marker is None
            or any(r.marker.evaluate({"extra": e}) for e in ("", *extras))]


def closure(name: str, extras: tuple[str, ...] = ()) -> set[str]:
    """Canonical names of ``name`` and every installed distribution it needs (with ``extras``)."""
    installed = distributions()
    seen: set[tuple[str, tuple[str, ...]]] = set()
    todo = [(canonicalize_name(name), tuple(sorted(extras)))]
    while todo:
        key = todo.pop()
        if key in seen or key[0] not in installed:
            continue
        seen.add(key)
        todo += [(canonicalize_name(r.name), tuple(sorted(r.extras)))
                 for r in requirements(installed[key[0]], key[1])]
    return {n for n, _ in seen}


def top_level_modules(names: set[str]) -> set[str]:
    """The import names the distributions ``names`` provide."""
    return {module for module, dists in md.packages_distributions().items()
            if any(canonicalize_name(d) in names for d in dists) and module.isidentifier()}


def extras_only_modules(extras: tuple[str, ...]) -> set[str]:
    """Import names that only ``extras`` bring: none of them may be needed by the core."""
    core = closure(PROJECT)
    return top_level_modules(closure(PROJECT, extras) - core) - top_level_modules(core)
