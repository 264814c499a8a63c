"""A tolerant shard reader: every sample comes out, with what is wrong with it.

WebDataset reads a damaged shard silently short or merges samples; this reader streams a
tar member by member and reports instead:

- *row-level* problems, where the sample is known: ``dotted_key`` (a member named like
  ``a.b.jpg``: the key ``a.b`` holds a dot, so loaders see key ``a`` with field ``b.jpg``),
  ``duplicate_key`` (a key whose fields occur twice in the shard) and ``non_contiguous``
  (one key's members split by another key's). Both occurrences of a repeated key are marked;
  the earlier one through :attr:`ShardReport.late`, since it was already yielded.
- *shard-level* problems: ``unreadable`` (cannot be opened), ``truncated`` (the tar stream
  breaks off; the sample in progress is dropped), ``empty`` (no samples), ``short`` / ``long``
  (the count differs from ``sizes.json``).

Samples are grouped as WebDataset groups them: key = member path up to the first dot of its
file name, field = the rest, lower-cased; members without a dot are ignored.
"""

from __future__ import annotations

import tarfile
import zlib
from dataclasses import dataclass, field
from typing import Any, Iterator

from pipeline.data.shards import IMAGE_EXTS, split_member
from pipeline.io.storage import StorageOptions, open_input

PAIR_FIELDS = (*IMAGE_EXTS, "txt", "json")
SHARD_STATUSES = ("ok", "short", "long", "truncated", "empty", "unreadable")
STRUCTURE_STATUSES = ("dotted_key", "duplicate_key", "non_contiguous")


def is_dotted_field(field_name: str) -> bool:
    """Whether a field looks like the tail of a dotted key (``b.jpg`` in ``a.b.jpg``)."""
    head, _, last = field_name.rpartition(".")
    return bool(head) and field_name not in PAIR_FIELDS and last in PAIR_FIELDS


@dataclass
class RawSample:
    """One sample as read: position in the shard, key, member bytes by field, any problem."""

    index: int
    key: str
    members: dict[str, bytes]
    problem: str | None = None
    detail: str | None = None


@dataclass
class ShardReport:
    """What reading one shard found (complete once the iteration has ended)."""

    url: str
    expected: int | None = None
    read: int = 0
    status: str = "ok"
    error: str | None = None
    late: dict[int, tuple[str, str]] = field(default_factory=dict)

    @property
    def missing(self) -> int:
        """Pairs ``sizes.json`` promises that were not read."""
        return max(0, self.expected - self.read) if self.expected is not None else 0

    def as_dict(self) -> dict[str, Any]:
        return {"shard": self.url, "status": self.status, "error": self.error,
                "expected": self.expected, "read": self.read, "missing": self.missing}


class _Grouper:
    """Collects consecutive members into samples and tracks keys seen in the shard."""

    def __init__(self, report: ShardReport) -> None:
        self.report = report
        self.current: RawSample | None = None
        self.seen: dict[str, tuple[int, frozenset[str]]] = {}

    def start(self, key: str) -> RawSample | None:
        """A member of ``key`` follows: return the previous sample if this one starts a new one."""
        if self.current is not None and key == self.current.key:
            return None
        finished = self.finish()
        self.current = RawSample(-1, key, {})  # index set when finished
        return finished

    def add(self, field_name: str, data: bytes) -> None:
        """Add a member to the sample in progress."""
        sample = self.current
        if field_name in sample.members:
            sample.problem, sample.detail = "duplicate_key", f"member {sample.key}.{field_name} repeated"
        sample.members[field_name] = data
        if is_dotted_field(field_name) and sample.problem is None:
            sample.problem = "dotted_key"
            sample.detail = f"member {sample.key}.{field_name}: keys must not contain dots"

    def finish(self) -> RawSample | None:
        """Close the sample in progress (if any) and return it with its index and problems."""
        sample, self.current = self.current, None
        if sample is None:
            return None
        sample.index = self.report.read
        self.report.read += 1
        fields = frozenset(sample.members)
        if sample.key in self.seen:
            first, first_fields = self.seen[sample.key]
            status = "duplicate_key" if fields & first_fields else "non_contiguous"
            detail = (f"key {sample.key} also at index {first}" if status == "duplicate_key"
                      else f"members of key {sample.key} are split (also at index {first})")
            sample.problem, sample.detail = status, detail
            self.report.late.setdefault(first, (status, f"key {sample.key} also at index {sample.index}"))
        else:
            self.seen[sample.key] = (sample.index, fields)
        return sample


class ShardReader:
    """Iterate the samples of one shard; :attr:`report` says what was wrong with the shard.

    Never raises for bad data: an unopenable URL, a broken tar stream or a count that
    disagrees with ``expected`` end the iteration and are recorded in the report.
    """

    def __init__(self, url: str, expected: int | None = None, storage: StorageOptions | None = None) -> None:
        self.url = url
        self.storage = storage
        self.report = ShardReport(url, expected)

    def __iter__(self) -> Iterator[RawSample]:
        try:
            stream = open_input(self.url, self.storage)
        except Exception as exc:  # any opener error: missing file, permissions, network, bad URL
            self._fail("unreadable", exc)
            return
        grouper = _Grouper(self.report)
        try:
            with stream, tarfile.open(fileobj=stream, mode="r|*") as tar:
                for info in tar:
                    parts = split_member(info.name) if info.isfile() else None
                    if parts is None:
                        tar.members = []
                        continue
                    finished = grouper.start(parts[0])
                    if finished is not None:  # yielded before this member's data is read
                        yield finished
                    data = tar.extractfile(info).read()
                    if len(data) != info.size:
                        raise tarfile.ReadError(f"member {info.name} cut short")
                    grouper.add(parts[1], data)
                    tar.members = []  # streaming: do not keep every member header in memory
        except (tarfile.TarError, EOFError, OSError, zlib.error) as exc:
            if self.report.read == 0 and grouper.current is None and "empty file" in str(exc):
                self._check_counts()
                return
            grouper.current = None  # the sample in progress may be incomplete: never yield it
            self._fail("truncated", exc)
            return
        last = grouper.finish()
        if last is not None:
            yield last
        self._check_counts()

    def _fail(self, status: str, exc: BaseException) -> None:
        self.report.status = status
        self.report.error = f"{type(exc).__name__}: {exc}"[:300]

    def _check_counts(self) -> None:
        report = self.report
        if report.read == 0:
            report.status = "empty"
            report.error = "shard holds no samples"
        elif report.expected is not None and report.read != report.expected:
            report.status = "short" if report.read < report.expected else "long"
            report.error = f"{report.read} samples read, sizes.json says {report.expected}"
