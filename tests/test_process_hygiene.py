"""No test may stop Ray host-wide: `ray stop` (with or without --force) ends every Ray cluster on
the machine, not only the one a test started. Tests stop their own cluster by its --temp-dir
(tests/processes.py)."""

from __future__ import annotations

import ast
from pathlib import Path

TESTS = Path(__file__).resolve().parent


def ray_stop_calls(source: str) -> list[list[str]]:
    """String arguments of calls (or string lists/tuples) that spell `ray stop`: ["ray", "stop", …],
    "ray stop …", or a helper called as ray("stop", …)."""
    found = []
    for node in ast.walk(ast.parse(source)):
        items = node.args if isinstance(node, ast.Call) else node.elts if isinstance(node, (ast.List, ast.Tuple)) else []
        strings = [n.value for n in items if isinstance(n, ast.Constant) and isinstance(n.value, str)]
        words = " ".join(strings).split()
        if words and (words[0] == "stop" or "ray stop" in " ".join(words)):
            found.append(strings)
    return found


def test_no_test_runs_ray_stop() -> None:
    offenders = {str(p.relative_to(TESTS)): calls for p in sorted(TESTS.rglob("*.py"))
                 if p != Path(__file__).resolve() and (calls := ray_stop_calls(p.read_text()))}
    assert not offenders


def test_the_guard_catches_the_known_forms() -> None:
    for source in ('subprocess.run(["ray", "stop", "--force"])', 'subprocess.run("ray stop --force", shell=True)',
                   '_ray("stop", "--force", env=env)'):
        assert ray_stop_calls(source), source
    assert not ray_stop_calls('_ray("start", "--head")')
