"""Import hygiene of ``pipeline/`` (and ``jobs/``), checked on the source like
:mod:`tests.test_floors`: no module imports another module's underscore name, and no two
files of ``pipeline/`` import each other through a circle (lazy and ``TYPE_CHECKING``
imports included — a circle hidden in a function is still a circle)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("pipeline", "jobs")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _sources(package: str) -> dict[str, Path]:
    """Module name → file, for every ``.py`` file of ``package``."""
    return {_module_name(p): p for p in sorted((ROOT / package).rglob("*.py"))}


MODULES = {name: path for package in PACKAGES for name, path in _sources(package).items()}


def _is_package(module: str) -> bool:
    return MODULES[module].name == "__init__.py"


def _absolute(module: str, node: ast.ImportFrom) -> str:
    """The absolute module a ``from ... import`` names (relative imports resolved)."""
    if not node.level:
        return node.module or ""
    base = module.split(".")
    base = base if _is_package(module) else base[:-1]
    base = base[:len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _imports(module: str) -> list[tuple[str, str | None, int]]:
    """(module imported from, name imported or None, line) for every import in the file."""
    found: list[tuple[str, str | None, int]] = []
    for node in ast.walk(ast.parse(MODULES[module].read_text(), str(MODULES[module]))):
        if isinstance(node, ast.Import):
            found += [(alias.name, None, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            source = _absolute(module, node)
            found += [(source, alias.name, node.lineno) for alias in node.names]
    return found


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def test_no_module_imports_another_modules_underscore_name() -> None:
    """A name that starts with ``_`` belongs to its module; what other modules need is
    public. (A package's modules may import its private submodules, e.g. ``jobs._common``.)"""
    offenders = []
    for module in MODULES:
        package = module if _is_package(module) else module.rsplit(".", 1)[0]
        for source, name, line in _imports(module):
            if source.split(".")[0] not in PACKAGES:
                continue
            dotted = [*source.split("."), *([name] if name else [])]
            for i, part in enumerate(dotted):
                prefix = ".".join(dotted[:i + 1])
                own_submodule = prefix in MODULES and ".".join(dotted[:i]) == package
                if _private(part) and not own_submodule:
                    offenders.append(f"{MODULES[module].relative_to(ROOT)}:{line} imports {'.'.join(dotted)}")
                    break
    assert offenders == []


def _edges(module: str) -> set[str]:
    """The ``pipeline`` files ``module`` imports (a package's ``__init__`` only when the
    import names the package itself, not one of its submodules)."""
    targets = set()
    for source, name, _ in _imports(module):
        candidate = f"{source}.{name}" if name else source
        target = candidate if candidate in MODULES else source
        if target in MODULES and target != module and target.split(".")[0] == "pipeline":
            targets.add(target)
    return targets


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []
    counter = 0
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    components.append(sorted(component))
    return components


def test_no_import_circle_between_files_of_pipeline() -> None:
    graph = {m: _edges(m) for m in MODULES if m.split(".")[0] == "pipeline"}
    assert _cycles(graph) == []


def test_the_circle_finder_finds_circles() -> None:
    """The checker itself: a circle of three, a self-contained chain and a lone module."""
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert _cycles(graph) == [["a", "b", "c"]]
