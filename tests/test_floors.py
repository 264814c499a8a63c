"""The floors of docs/ARCHITECTURE.md, checked on the source: who may import what."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PIPELINE = Path(__file__).resolve().parents[1] / "pipeline"


def _imports(path: Path) -> set[str]:
    """Top-level module names a file imports (anywhere in it, lazy imports included)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def _files(folder: str) -> list[Path]:
    return sorted((PIPELINE / folder).rglob("*.py")) if folder else sorted(PIPELINE.rglob("*.py"))


@pytest.mark.parametrize("folder, forbidden", [
    ("", ("argparse", "jobs")),  # the library parses no command line and never calls the jobs
    ("influence", ("ray", "open_clip", "pyarrow", "webdataset", "pipeline.io", "pipeline.stages",
                   "pipeline.model", "pipeline.data")),  # pure math
])
def test_floor(folder: str, forbidden: tuple[str, ...]) -> None:
    offenders = [f"{path.relative_to(PIPELINE.parent)} imports {name}"
                 for path in _files(folder) for name in sorted(_imports(path))
                 if any(name == f or name.startswith(f + ".") for f in forbidden)]
    assert offenders == []


def test_only_the_executor_imports_ray_below_the_stages() -> None:
    """Nothing below ``stages/`` imports Ray; ``runtime/executor.py`` is the Ray adapter."""
    below = [p for folder in ("model", "data", "io", "influence") for p in _files(folder)] + [PIPELINE / "config.py"]
    assert [str(p) for p in below if any(n == "ray" or n.startswith("ray.") for n in _imports(p))] == []
