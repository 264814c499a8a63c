"""The run directory: every path a run writes, and the input-shard → file-stem rule.

One owner for the layout; stages, jobs and the report ask it for paths::

    <run>/
      config.json            the configuration as applied
      run_summary.json       what the jobs did (each job merges its stages' keys in)
      trajectory/            the proxy trajectory (trajectory.json = completion marker)
      prepared/              bank.pt, ckpt_XXX.pt, embeddings.pt, unrolled.pt (each stamped with a fingerprint)
      scores/<stem>.parquet  one score file per input shard (fingerprint in its metadata)
      stats/<stem>.json      per-shard statistics of the score stage
      selection/             kept.parquet, kept_uids.npy, manifest.parquet, summary.json, done.json
      shards/                the filtered shards (reshard_plan.json, sizes.json)
      selections/NAME/       a named selection: the files of selection/, and its own shards/
      report/index.html      ``diffin report``
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Sequence

from pipeline.errors import UsageError
from pipeline.io.storage import StorageOptions, StoragePath, as_path

CONFIG_FILE = "config.json"
SUMMARY_FILE = "run_summary.json"
TRAJECTORY_DIR = "trajectory"
PREPARED_DIR = "prepared"
SCORES_DIR = "scores"
STATS_DIR = "stats"
SELECTION_DIR = "selection"
SHARDS_DIR = "shards"
SELECTIONS_DIR = "selections"
SELECTION_NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-")
REPORT_DIR = "report"
REPORT_FILE = "index.html"
BANK_FILE = "bank.pt"
UNROLLED_FILE = "unrolled.pt"
EMBEDDINGS_FILE = "embeddings.pt"  # the embedding columns' reference sets (corpus sample, pools, targets, centroids)


PREPARED_CHECKPOINT_GLOB = "ckpt_*.pt"


def prepared_checkpoint_name(k: int) -> str:
    """File name of the k-th selected checkpoint's prepared vectors (in ``prepared/``)."""
    return f"ckpt_{k:03d}.pt"


def shard_stem(url: str) -> str:
    """The stem of an input shard's per-shard files: its file name without ``.tar``."""
    name = os.path.basename(url.rstrip("/"))
    return name[:-4] if name.endswith(".tar") else name


def check_unique_stems(urls: Sequence[str]) -> None:
    """Raise UsageError when two input shards share a stem (their score files would collide)."""
    seen: dict[str, str] = {}
    for url in urls:
        stem = shard_stem(url)
        if stem in seen:
            raise UsageError(f"data.shards: {seen[stem]} and {url} have the same file name ({stem}); "
                             "each shard's scores are stored by file name, so rename one")
        seen[stem] = url


def check_selection_name(name: str) -> str:
    """``name`` if it can name a selection directory, else UsageError in one line: letters,
    digits, ``.``, ``_``, ``-``; not starting with ``.`` (no path separators, no ``..``)."""
    if not isinstance(name, str) or not name or name.startswith(".") or not set(name) <= SELECTION_NAME_CHARS:
        raise UsageError(f"selection name {name!r}: use letters, digits, '.', '_' and '-' "
                         "(not starting with '.'; no path separators)")
    return name


@dataclass(frozen=True)
class RunLayout:
    """Paths of one run directory (local or remote: ``root`` is a path object)."""

    root: StoragePath

    @classmethod
    def of(cls, run_dir: str | os.PathLike, storage: StorageOptions | None = None) -> "RunLayout":
        """The layout of ``run_dir`` (a local path or an fsspec URL)."""
        return cls(as_path(run_dir, storage))

    @property
    def config(self) -> StoragePath:
        return self.root / CONFIG_FILE

    @property
    def summary(self) -> StoragePath:
        return self.root / SUMMARY_FILE

    @property
    def trajectory(self) -> StoragePath:
        return self.root / TRAJECTORY_DIR

    @property
    def prepared(self) -> StoragePath:
        return self.root / PREPARED_DIR

    @property
    def scores(self) -> StoragePath:
        return self.root / SCORES_DIR

    @property
    def stats(self) -> StoragePath:
        return self.root / STATS_DIR

    @property
    def selection(self) -> StoragePath:
        return self.root / SELECTION_DIR

    @property
    def shards(self) -> StoragePath:
        return self.root / SHARDS_DIR

    def selection_dir(self, name: str | None = None) -> StoragePath:
        """``selection/`` (the ``select:`` section's), or ``selections/NAME/`` of a named one."""
        return self.selection if name is None else self.root / SELECTIONS_DIR / check_selection_name(name)

    def shards_dir(self, name: str | None = None) -> StoragePath:
        """``shards/`` (from ``selection/``), or ``selections/NAME/shards/`` of a named selection."""
        return self.shards if name is None else self.selection_dir(name) / SHARDS_DIR

    def selection_names(self) -> list[str]:
        """The named selections present (``selections/*/``), sorted."""
        where = self.root / SELECTIONS_DIR
        if not where.is_dir():
            return []
        return sorted(p.name for p in where.iterdir() if p.is_dir() and not p.name.startswith("."))

    @property
    def report(self) -> StoragePath:
        return self.root / REPORT_DIR / REPORT_FILE

    def bank_file(self) -> StoragePath:
        return self.prepared / BANK_FILE

    def unrolled_file(self) -> StoragePath:
        return self.prepared / UNROLLED_FILE

    def embeddings_file(self) -> StoragePath:
        return self.prepared / EMBEDDINGS_FILE

    def prepared_checkpoint(self, k: int) -> StoragePath:
        """``prepared/ckpt_XXX.pt`` of the k-th selected checkpoint."""
        return self.prepared / prepared_checkpoint_name(k)

    def prepared_checkpoints(self) -> list[StoragePath]:
        """The prepared checkpoint files present now (``prepared/ckpt_*.pt``), sorted."""
        return sorted(self.prepared.glob(PREPARED_CHECKPOINT_GLOB))

    def score_file(self, url: str) -> StoragePath:
        """``scores/<stem>.parquet`` of input shard ``url``."""
        return self.scores / f"{shard_stem(url)}.parquet"

    def stats_file(self, url: str) -> StoragePath:
        """``stats/<stem>.json`` of input shard ``url``."""
        return self.stats / f"{shard_stem(url)}.json"
