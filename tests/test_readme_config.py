"""README.md's configuration block tells the truth about defaults (issue #30).

Its convention: a value without a ``default:`` note is the code's default (the pydantic field
defaults of ``pipeline/config.py``); ``# default: X`` at the start of a key's comment marks a
value chosen for the demo, X being the code's default. Checked both ways for every key the
block writes, so a README that claims a wrong default, or shows a changed value as if it were
the default, fails here.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from jobs.config import Entry, config_entries, leaves, validate
from tests.readme import README, readme_block

_KEY_LINE = re.compile(r"^( *)([A-Za-z_]\w*):(.*)$")
_NOTE = re.compile(r"^default: (.*?)\s*(?:;|$)")


def config_block() -> str:
    """The YAML block of the README's Configuration section."""
    return readme_block("## Configuration", "yaml")


def key_comments(block: str) -> dict[tuple[str, ...], str]:
    """The comment on each key's own line, by key path (``("select", "fraction")``)."""
    comments: dict[tuple[str, ...], str] = {}
    stack: list[str] = []
    for line in block.splitlines():
        match = _KEY_LINE.match(line)
        if match is None:  # blank, a comment line, a continuation
            continue
        indent, key, rest = match.groups()
        stack = stack[:len(indent) // 2] + [key]
        comment = re.search(r"\s#\s?(.*)$", rest)
        comments[tuple(stack)] = comment.group(1).strip() if comment else ""
    return comments


def _comment_texts(block: str) -> list[str]:
    """The text of every comment in the block (trailing or whole-line)."""
    return [m.group(1) for m in re.finditer(r"(?:^|\s)#\s?(.*)$", block, re.M)]


def default_violations(block: str) -> list[str]:
    """Every way the block's values and ``default:`` notes disagree with the code."""
    config = validate(yaml.safe_load(block), "README configuration block")
    keys = leaves(config_entries(config))
    comments = key_comments(block)
    problems = []
    for path, comment in comments.items():
        if path in keys:
            problems += _check_key(".".join(path), keys[path], comment)
    notes = sum(bool(_NOTE.match(c)) for p, c in comments.items() if p in keys)
    if sum("default:" in text for text in _comment_texts(block)) != notes:
        problems.append("a 'default:' note not at the start of a key's own comment (use other words there)")
    return problems


def _check_key(name: str, entry: Entry, comment: str) -> list[str]:
    """The ways one key's value and note disagree with the code's default."""
    note = _NOTE.match(comment)
    if entry.required:
        return [f"{name}: a required key has no default, but the README notes one"] if note else []
    if note is None:
        if entry.value != entry.default:
            return [f"{name}: {entry.value!r} is not the code default; note '# default: {entry.default}'"]
        return []
    claimed: Any = yaml.safe_load(note.group(1))
    if claimed != entry.default:
        return [f"{name}: README says default {claimed!r}, the code's is {entry.default!r}"]
    if entry.value == entry.default:
        return [f"{name}: {entry.value!r} is the default; drop its 'default:' note"]
    return []


def test_every_value_is_the_default_or_notes_the_code_default() -> None:
    assert default_violations(config_block()) == []
    notes = [c for c in key_comments(config_block()).values() if _NOTE.match(c)]
    assert len(notes) >= 10  # the demo's choices are noted (fraction, shard_size, batch_size, actors, …)


def test_the_check_catches_a_wrong_or_missing_note() -> None:
    block = config_block()
    wrong = block.replace("# default: 0.3;", "# default: 0.4;", 1)
    assert any("select.fraction: README says default 0.4" in p for p in default_violations(wrong))
    missing = re.sub(r"(shard_size: 1000\s+)# default: 10000;", r"\1#", block, count=1)
    assert any(p.startswith("reshard.shard_size: 1000 is not the code default") for p in default_violations(missing))
    needless = block.replace("max_failed_fraction: 0.1             #", "max_failed_fraction: 0.1  # default: 0.1;")
    assert any("is the default; drop" in p for p in default_violations(needless))
    stray = block.replace("# cosine | const", "# cosine | const (default: cosine)")
    assert any("not at the start" in p for p in default_violations(stray))


def test_the_block_is_the_demo_config() -> None:
    """The block is configs/demo.yaml with more keys written out (and a storage example)."""
    readme = validate(yaml.safe_load(config_block()), "README")
    demo_path = Path(README.parent / "configs" / "demo.yaml")
    demo = validate(yaml.safe_load(demo_path.read_text()), str(demo_path))
    assert readme.storage and readme.model_copy(update={"storage": demo.storage}) == demo
