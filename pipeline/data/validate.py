"""Check shards before a run (``diffin validate``): structure, keys, fields, decodability, counts.

Every sample goes through the same tolerant reader and parser as the score stage, so a
shard that validates clean scores without failed rows (non-finite scores aside).
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from pipeline.data.pairs import parse_sample
from pipeline.data.scan import ShardReader
from pipeline.data.shards import SIZES_FILE, expected_count, load_sizes
from pipeline.data.uids import DEFAULT_UID_FROM
from pipeline.io.storage import is_remote

DECODE_SIZE = 32  # decodability is checked at a small size: the decoder still reads every byte


@dataclass
class ShardCheck:
    """What validating one shard found."""

    url: str
    status: str
    error: str | None
    expected: int | None
    read: int
    ok: int
    problems: dict[str, int] = field(default_factory=dict)
    examples: list[dict[str, str]] = field(default_factory=list)

    @property
    def clean(self) -> bool:
        return self.status == "ok" and not self.problems

    def as_dict(self) -> dict[str, Any]:
        return {"shard": self.url, "status": self.status, "error": self.error, "expected": self.expected,
                "read": self.read, "ok": self.ok, "problems": self.problems, "examples": self.examples}


def validate_shard(url: str, expected: int | None = None, *, decode: bool = True,
                   uid_from: Sequence[str] = DEFAULT_UID_FROM, max_examples: int = 5) -> ShardCheck:
    """Read every sample of ``url`` and classify it; never raises for bad data."""
    reader = ShardReader(url, expected)
    statuses: list[tuple[str, str, str | None]] = []
    for raw in reader:
        parsed = parse_sample(raw.key, raw.members, DECODE_SIZE, uid_from=uid_from,
                              problem=raw.problem, detail=raw.detail, decode=decode)
        statuses.append((raw.key, parsed.status, parsed.error))
    for index, (status, error) in reader.report.late.items():
        statuses[index] = (statuses[index][0], status, error)
    problems: dict[str, int] = {}
    examples: list[dict[str, str]] = []
    for key, status, error in statuses:
        if status == "ok":
            continue
        problems[status] = problems.get(status, 0) + 1
        if len(examples) < max_examples:
            examples.append({"key": key, "status": status, "error": error or ""})
    report = reader.report
    return ShardCheck(url, report.status, report.error, report.expected, report.read,
                      len(statuses) - sum(problems.values()), dict(sorted(problems.items())), examples)


def find_sizes(urls: Sequence[str]) -> tuple[dict[str, int] | None, str | None]:
    """The ``sizes.json`` beside the (local) shards, when all of them share one directory that has one."""
    dirs = {os.path.dirname(u) for u in urls if not is_remote(u)}
    if len(dirs) == 1:
        candidate = Path(dirs.pop() or ".") / SIZES_FILE
        if candidate.is_file():
            return load_sizes(candidate), str(candidate)
    return None, None


def validate_shards(urls: Sequence[str], sizes: dict[str, int] | None, *, decode: bool = True,
                    uid_from: Sequence[str] = DEFAULT_UID_FROM, threads: int = 2) -> list[ShardCheck]:
    """Validate every shard (``threads`` at a time), in input order."""
    def check(url: str) -> ShardCheck:
        return validate_shard(url, expected_count(url, sizes), decode=decode, uid_from=uid_from)

    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        return list(pool.map(check, urls))
