"""constraints.txt (the exact versions tested) against pyproject.toml (the ranges the package
allows) and against the environment these tests run in."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from tests.install.deps import PROJECT, closure, distributions

REPO = Path(__file__).resolve().parents[2]


def pins() -> dict[str, str]:
    found: dict[str, str] = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        req = Requirement(line)
        [spec] = req.specifier
        assert spec.operator == "==" and not req.extras and req.marker is None, f"not an exact pin: {line}"
        name = canonicalize_name(req.name)
        assert name not in found, f"{name} pinned twice"
        found[name] = spec.version
    return found


def project_requirements() -> list[Requirement]:
    """pyproject's dependencies and every extra's, less the extras' references to the project."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    texts = project["dependencies"] + [t for extra in project["optional-dependencies"].values() for t in extra]
    reqs = [Requirement(t) for t in texts]
    return [r for r in reqs if canonicalize_name(r.name) != PROJECT]


def test_every_requirement_is_pinned_inside_its_range() -> None:
    pinned = pins()
    for req in project_requirements():
        version = pinned.get(canonicalize_name(req.name))
        assert version is not None, f"{req.name} is not in constraints.txt"
        assert req.specifier.contains(version, prereleases=True), f"constraints.txt: {req.name}=={version} " \
                                                                  f"is outside pyproject's {req}"


def test_the_test_environment_is_the_pinned_one() -> None:
    """Every installed package the project needs, with all extras, is at its pinned version (the
    CPU/CUDA local label, e.g. +cpu, aside): the suite tests what constraints.txt states."""
    pinned = pins()
    installed = distributions()
    needed = closure(PROJECT, ("all", "test")) - {PROJECT}
    assert {"torch", "torchvision", "ray", "open-clip-torch", "webdataset", "scikit-learn"} <= needed
    for name in sorted(needed):
        version = Version(installed[name].version)
        assert name in pinned, f"{name} {version} is installed but not pinned (make constraints)"
        assert version.public == Version(pinned[name]).public, f"{name}: {version} installed, {pinned[name]} pinned"


def test_setup_installs_with_the_constraints() -> None:
    makefile = (REPO / "Makefile").read_text()
    installs = re.findall(r"pip install .*", makefile)
    assert installs and all("-c constraints.txt" in line for line in installs), installs
