"""WebDataset shards: deterministic writing, shard lists, sizes, reading.

A sample is a group of tar members sharing a key (the member name up to the first dot);
keys never contain dots. Pairs carry ``jpg`` (or ``png``/``webp``), ``txt`` and ``json``
(with a 32-hex ``uid``).
"""

from __future__ import annotations

import glob as _glob
import io
import json
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import braceexpand
# Imported at module load, never lazily: importing webdataset's submodules from several
# threads at once (the shard readers run in a thread pool) trips a circular import.
from webdataset.gopen import gopen
from webdataset.tariterators import group_by_keys, tar_file_expander

from pipeline.errors import UsageError
from pipeline.io.atomic import atomic_path, write_json_atomic

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
SIZES_FILE = "sizes.json"
_FIXED_MTIME = 0  # byte-reproducible tars: no wall-clock time in member headers


def split_member(name: str) -> tuple[str, str] | None:
    """(key, field) of a tar member name, as WebDataset splits it: the key is the path up to
    the first dot of the file name, the field (lower-cased) what follows. None when the name
    has no key or no field (``noext``, ``.hidden.jpg``, ``abc.``): such members belong to no
    sample. The one key rule: the reader, validation and reshard all use it.
    """
    slash = name.rfind("/")
    dot = name.find(".", slash + 1)
    if dot <= slash + 1 or dot == len(name) - 1:
        return None
    return name[:dot], name[dot + 1:].lower()


def check_key(key: str) -> str:
    """Return ``key`` if it is a valid sample key (non-empty, no dot, no slash)."""
    if not key or "." in key or "/" in key:
        raise ValueError(f"invalid sample key {key!r}: keys must be non-empty, without '.' or '/'")
    return key


@dataclass(frozen=True)
class Pair:
    """One image–text pair ready to be written to a shard."""

    key: str
    image: bytes
    caption: str
    meta: dict[str, Any]
    image_ext: str = "jpg"

    def members(self) -> dict[str, bytes]:
        """The tar members of this pair, by extension."""
        return {
            self.image_ext: self.image,
            "json": json.dumps(self.meta, sort_keys=True, ensure_ascii=False).encode("utf-8"),
            "txt": self.caption.encode("utf-8"),
        }


def add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    """Append one member with fixed metadata (mtime 0, mode 0444, uid/gid 0, no user names)."""
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = _FIXED_MTIME
    info.mode = 0o444
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))


class ShardWriter:
    """Write samples into numbered tar shards of at most ``max_count`` samples each.

    Each shard is written under a temporary name and renamed when complete; ``close()``
    writes ``sizes.json`` (shard file name → sample count) last. Output is byte-identical
    for identical input (fixed member metadata, sorted members within a sample).

    A key repeated within one shard is rejected (WebDataset would merge or split the
    samples). Only the current shard's keys are remembered, so memory stays bounded by
    ``max_count`` however many samples are streamed; samples are identified across shards
    by (shard, key) and by their json uid.
    """

    def __init__(self, out_dir: str | os.PathLike, max_count: int = 1000,
                 name_format: str = "{:05d}.tar") -> None:
        if max_count < 1:
            raise ValueError("max_count must be >= 1")
        self.out_dir = Path(out_dir)
        self.max_count = max_count
        self.name_format = name_format
        self.sizes: dict[str, int] = {}
        self._keys: set[str] = set()
        self._tar: tarfile.TarFile | None = None
        self._ctx: Any = None
        self._count = 0
        self.out_dir.mkdir(parents=True, exist_ok=True)

    def _open_next(self) -> None:
        name = self.name_format.format(len(self.sizes))
        self._ctx = atomic_path(self.out_dir / name)
        tmp = self._ctx.__enter__()
        self._tar = tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT)
        self._name, self._count = name, 0
        self._keys.clear()

    def _finish_current(self) -> None:
        if self._tar is None:
            return
        self._tar.close()
        self._ctx.__exit__(None, None, None)
        self.sizes[self._name] = self._count
        self._tar = None

    def write(self, key: str, members: dict[str, bytes]) -> None:
        """Append one sample (its members by extension) to the current shard."""
        check_key(key)
        if self._tar is None or self._count >= self.max_count:
            self._finish_current()
            self._open_next()
        if key in self._keys:
            raise ValueError(f"duplicate sample key {key!r} in shard {self._name}")
        self._keys.add(key)
        for ext in sorted(members):
            add_member(self._tar, f"{key}.{ext}", members[ext])
        self._count += 1

    def write_pair(self, pair: Pair) -> None:
        """Append one image–text pair."""
        self.write(pair.key, pair.members())

    def close(self) -> dict[str, int]:
        """Finish the last shard and write ``sizes.json``; return the sizes."""
        self._finish_current()
        write_json_atomic(self.out_dir / SIZES_FILE, self.sizes)
        return self.sizes

    def abort(self) -> None:
        """Discard the shard in progress (its temporary file is removed)."""
        if self._tar is not None:
            self._tar.close()
            try:
                self._ctx.__exit__(RuntimeError, RuntimeError("aborted"), None)
            except RuntimeError:
                pass
            self._tar = None

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def expand_shards(spec: str | Sequence[str]) -> list[str]:
    """Expand a shard spec — brace pattern, glob, or list of either — into shard URLs.

    Brace patterns (``data/{00000..00007}.tar``) expand without touching storage; a local
    glob (``data/*.tar``) is expanded and sorted. An empty result is a usage error.
    """
    items = [spec] if isinstance(spec, str) else list(spec)
    urls: list[str] = []
    for item in items:
        for url in braceexpand.braceexpand(item):
            if any(ch in url for ch in "*?[") and "://" not in url:
                urls.extend(sorted(_glob.glob(url)))
            else:
                urls.append(url)
    if not urls:
        raise UsageError(f"shard list {spec!r} expands to no shards{_no_shards_hint(items)}")
    return urls


def _no_shards_hint(items: Sequence[str]) -> str:
    """What to do when a local shard pattern matches nothing (a first run's usual mistake)."""
    from pipeline.data.corpora import BUILDERS

    local = [item for item in items if "://" not in item]
    if not local:
        return ""
    folder = Path(next(iter(braceexpand.braceexpand(local[0])))).parent
    name = folder.name if folder.name in BUILDERS else "openmoji"
    state = "does not exist" if not folder.exists() else "holds no matching shards"
    return (f": {folder} {state}; build a corpus there first (`diffin data {name} --out {folder}`; "
            f"`diffin data --help` lists the corpora, `make demo` builds and runs the demo) "
            f"or point data.shards at existing shards")


def load_sizes(path: str | os.PathLike, storage: Any = None) -> dict[str, int]:
    """Read a ``sizes.json`` (shard file name → sample count), local or at an fsspec URL."""
    from pipeline.io.storage import as_path

    p = as_path(path, storage)
    try:
        text = p.read_text()
    except FileNotFoundError:
        raise UsageError(f"sizes file not found: {path}") from None
    except IsADirectoryError:
        raise UsageError(f"sizes file is a directory: {path}") from None
    try:
        sizes = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UsageError(f"sizes file {path} is not valid JSON: {exc.msg}") from None
    if not isinstance(sizes, dict) or not all(isinstance(v, int) for v in sizes.values()):
        raise UsageError(f"sizes file {path} must map shard names to integer counts")
    return sizes


def expected_count(url: str, sizes: dict[str, int] | None) -> int | None:
    """The sample count ``sizes`` records for shard ``url`` (matched by file name), if any."""
    if not sizes:
        return None
    return sizes.get(os.path.basename(url))


def iter_raw_samples(url: str) -> Iterator[dict[str, Any]]:
    """Yield raw samples (``__key__``, ``__url__``, member bytes by extension) of one shard.

    Uses webdataset's tar reader; a read error is raised, never silently swallowed. The
    shard's stream is closed when the iteration ends or is abandoned (webdataset's own
    ``url_opener`` leaves it to the garbage collector).
    """
    def _raise(exc: Exception) -> bool:
        raise exc

    stream = gopen(url)
    try:
        files = tar_file_expander([{"url": url, "stream": stream}], handler=_raise)
        yield from group_by_keys(files, handler=_raise)
    finally:
        stream.close()
