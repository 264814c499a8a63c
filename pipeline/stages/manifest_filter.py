"""Load-time filtering: keep a run's selected pairs while reading the *input* shards.

``selection/manifest.parquet`` (written by :mod:`pipeline.stages.select`; a named selection's:
``selections/NAME/manifest.parquet``, ``from_run(..., name=NAME)``) lists, per input shard, the
keys to keep. It reads the selection itself, never the resharded copy, so it cannot be stale. :class:`KeptKeys` turns it into a sample predicate for a WebDataset
pipeline, so a loader can train on the kept pairs without the resharded copy::

    keep = KeptKeys.from_run("runs/demo")
    dataset = wds.WebDataset(urls, shardshuffle=False, handler=wds.reraise_exception).select(keep)

A sample is kept iff its ``__key__`` is among the kept keys of its shard. The shard is found
from the sample's ``__url__``: the manifest's URL itself, else the input shard with the same
file stem (:func:`pipeline.io.layout.shard_stem`; a run's input stems are unique), so shards
copied elsewhere (``s3://…`` → local) still match. A shard the manifest does not list (not an
input of the run, or one that had no rows) raises :class:`UsageError` by default
(``unknown="drop"`` drops its samples instead).

:class:`KeptUids` keeps by identity instead: a sample is kept iff its uid — derived from its
own members by the run's uid rule (``data.uid_from``, :mod:`pipeline.data.uids`) — is in
``selection/kept_uids.npy``. It needs no shard name or key, so it also filters copies that were
resharded or renamed (e.g. img2dataset shards re-packed elsewhere).

Memory: the manifest's shard column (one string per input shard); the kept keys of one shard
at a time, read when a sample of a new shard arrives (a Parquet filter on the shard column).
Works on local paths and fsspec URLs (:func:`pipeline.io.storage.as_path`) and pickles, so
DataLoader workers each hold their own cache.
"""

from __future__ import annotations

import io
import json
import os
from dataclasses import dataclass, field
from typing import Any, Literal, Mapping

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.data.pairs import raw_sample_uid
from pipeline.data.uids import DEFAULT_UID_FROM, check_uid_from, uid_to_u8u8
from pipeline.errors import UsageError
from pipeline.io.layout import RunLayout, shard_stem
from pipeline.io.storage import StorageOptions, StoragePath, arrow_source, as_path
from pipeline.stages.select import KEPT_UIDS_FILE, MANIFEST_FILE, UID_DTYPE

SHARD_COLUMN, KEYS_COLUMN = "shard", "keys"  # of MANIFEST_SCHEMA (pipeline.stages.select)
UNKNOWN_SHARD = ("error", "drop")


def _read_shards(manifest: StoragePath) -> list[str]:
    """The manifest's input shard URLs (its shard column only), after a schema check."""
    where, filesystem = arrow_source(manifest)
    try:
        schema = pq.read_schema(where, filesystem=filesystem)
        missing = [n for n in (SHARD_COLUMN, KEYS_COLUMN) if n not in schema.names]
        if missing:
            raise UsageError(f"{manifest} is not a selection manifest (no column {missing[0]!r})")
        table = pq.read_table(where, columns=[SHARD_COLUMN], filesystem=filesystem)
    except (OSError, pa.ArrowInvalid) as exc:
        raise UsageError(f"cannot read manifest {manifest}: {exc}") from None
    return table.column(SHARD_COLUMN).to_pylist()


def _stem_index(shards: list[str], manifest: StoragePath) -> dict[str, str]:
    """Input shard stem → manifest URL; a stem named twice is refused."""
    by_stem: dict[str, str] = {}
    for url in shards:
        stem = shard_stem(url)
        if stem in by_stem:
            raise UsageError(f"manifest {manifest} names two shards with the file name {stem}: "
                             f"{by_stem[stem]} and {url}")
        by_stem[stem] = url
    return by_stem


@dataclass
class KeptKeys:
    """A WebDataset sample predicate: keep a sample iff the manifest keeps its key in its shard."""

    manifest: str | os.PathLike  # selection/manifest.parquet (local or fsspec URL)
    unknown: Literal["error", "drop"] = "error"
    _shards: list[str] = field(init=False, repr=False)
    _by_url: set[str] = field(init=False, repr=False)
    _by_stem: dict[str, str] = field(init=False, repr=False)
    _current: tuple[str, frozenset[str]] | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.unknown not in UNKNOWN_SHARD:
            raise UsageError(f"unknown={self.unknown!r}: expected one of {UNKNOWN_SHARD}")
        self.manifest = as_path(self.manifest)
        self._shards = _read_shards(self.manifest)
        self._by_url, self._by_stem = set(self._shards), _stem_index(self._shards, self.manifest)

    @classmethod
    def from_run(cls, run_dir: str | os.PathLike, storage: StorageOptions | None = None,
                 unknown: Literal["error", "drop"] = "error", name: str | None = None) -> "KeptKeys":
        """The filter of run directory ``run_dir`` (local or fsspec URL; ``storage``: its options):
        its ``selection/``, or the named selection ``name`` (``selections/NAME/``)."""
        return cls(RunLayout.of(run_dir, storage).selection_dir(name) / MANIFEST_FILE, unknown)

    @property
    def shards(self) -> list[str]:
        """The input shard URLs the manifest lists, in its (input) order."""
        return list(self._shards)

    def shard_of(self, url: str) -> str | None:
        """The manifest's URL for input shard ``url`` (same URL, else same stem); None if unlisted."""
        return url if url in self._by_url else self._by_stem.get(shard_stem(url))

    def keys(self, url: str) -> frozenset[str]:
        """The kept keys of input shard ``url`` (read once per run of samples from one shard)."""
        shard = self.shard_of(url)
        if shard is None:
            raise UsageError(f"shard {url} is not in manifest {self.manifest} "
                             "(not an input of the run, or it had no rows)")
        if self._current is None or self._current[0] != shard:
            self._current = (shard, self._read_keys(shard))
        return self._current[1]

    def _read_keys(self, shard: str) -> frozenset[str]:
        where, filesystem = arrow_source(self.manifest)
        table = pq.read_table(where, columns=[KEYS_COLUMN], filesystem=filesystem,
                              filters=pc.field(SHARD_COLUMN) == shard)
        return frozenset(key for keys in table.column(KEYS_COLUMN).to_pylist() for key in keys)

    def __call__(self, sample: Mapping[str, Any]) -> bool:
        """Whether to keep ``sample`` (a WebDataset sample with ``__key__`` and ``__url__``)."""
        url, key = sample.get("__url__"), sample.get("__key__")
        if url is None or key is None:
            raise UsageError("a sample without __url__ / __key__: apply the filter to samples "
                             "as WebDataset reads them (before renaming or to_tuple)")
        if self.unknown == "drop" and self.shard_of(url) is None:
            return False
        return key in self.keys(url)



@dataclass
class KeptUids:
    """A WebDataset sample predicate: keep a sample iff its uid (by the rule ``uid_from``) is in
    ``kept_uids.npy`` (DataComp's sorted ``u8,u8`` array)."""

    kept_uids: str | os.PathLike  # selection/kept_uids.npy (local or fsspec URL)
    uid_from: tuple[str, ...] = DEFAULT_UID_FROM
    _sorted: np.ndarray = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.uid_from = check_uid_from(self.uid_from)
        path = as_path(self.kept_uids)
        try:
            array = np.load(io.BytesIO(path.read_bytes()), allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise UsageError(f"cannot read kept uids {path}: {exc}") from None
        if array.dtype != UID_DTYPE or array.ndim != 1:
            raise UsageError(f"{path} is not a kept-uid array (dtype u8,u8)")
        self._sorted = np.sort(array)

    @classmethod
    def from_run(cls, run_dir: str | os.PathLike, storage: StorageOptions | None = None,
                 name: str | None = None) -> "KeptUids":
        """The filter of run directory ``run_dir``: the kept uids of its ``selection/`` (or of the
        named selection ``name``) under its own uid rule (``config.json``)."""
        layout = RunLayout.of(run_dir, storage)
        from pipeline.config import DataConfig

        try:
            data = DataConfig.model_validate(json.loads(layout.config.read_text())["data"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise UsageError(f"cannot read data.uid_from from the run's configuration {layout.config}: {exc}") from None
        return cls(layout.selection_dir(name) / KEPT_UIDS_FILE, data.uid_from)

    def uid(self, sample: Mapping[str, Any]) -> str | None:
        """The uid of a WebDataset sample (member bytes by field) by the rule, or None."""
        return raw_sample_uid({k: v for k, v in sample.items() if not k.startswith("__") and isinstance(v, bytes)},
                              self.uid_from)

    def __call__(self, sample: Mapping[str, Any]) -> bool:
        """Whether to keep ``sample`` (as WebDataset reads it: before decoding)."""
        uid = self.uid(sample)
        if uid is None:
            return False
        wanted = np.array(uid_to_u8u8(uid), dtype=UID_DTYPE)
        at = int(np.searchsorted(self._sorted, wanted))
        return at < len(self._sorted) and self._sorted[at] == wanted
