"""The reshard stage: copy the kept pairs into new WebDataset shards.

Every tar member of a kept sample (all extensions) is copied with its name and bytes
unchanged — nothing is decoded or re-encoded — under fixed member metadata (the same as
:class:`~pipeline.data.shards.ShardWriter`: mtime 0, mode 0444, uid/gid 0), so identical
inputs give byte-identical shards. Output order is global input order: input shards in
the manifest's order, then position within the shard; output shard ``i`` holds positions
``[i × shard_size, (i + 1) × shard_size)`` of that sequence.

The driver plans; one task per *output* shard reads the input shards that feed it
(streaming, skipping the members it does not need) and commits the shard by rename. An
input shard that feeds several output shards is read once by each of them.

Resume: ``reshard_plan.json`` in the output directory records a fingerprint of the plan
(the kept keys of every output shard and the configuration) and, for a run's own shards, the
fingerprint of the selection they are made from (``selection_fingerprint``: its ``done.json``).
With the same plan and selection, output shards that already exist (complete by construction:
renamed when finished) are skipped; a different plan is refused, never mixed (a run's own
``shards/`` is replaced instead). ``sizes.json`` is written last.

The shards record the selection they were made from and never outlive it: the rule and its
readers are :mod:`pipeline.stages.derived`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tarfile
import zlib
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pipeline.config import RESHARD_PLAN_FILE as PLAN_FILE
from pipeline.config import ReshardConfig
from pipeline.data.shards import SIZES_FILE, add_member, split_member
from pipeline.errors import DataError, UsageError
from pipeline.io.atomic import atomic_path, write_json_atomic
from pipeline.io.storage import StorageOptions, StoragePath, arrow_source, as_path, open_input
from pipeline.runtime.executor import Executor, Resources
from pipeline.stages.context import RunContext
from pipeline.stages.derived import SELECTION_KEY, clear_shards_dir, selection_done, selection_label

log = logging.getLogger(__name__)



@dataclass(frozen=True)
class Source:
    """The kept keys of one input shard that go into one output shard (in shard order)."""

    url: str
    keys: pa.Array  # strings; compact (not a slice of a larger buffer) so it pickles small


@dataclass(frozen=True)
class OutputShard:
    """One output shard: its name and where its samples come from."""

    name: str
    count: int
    sources: tuple[Source, ...]


@dataclass(frozen=True)
class ReshardTask:
    """What one worker does: write ``shard`` into ``out_dir``."""

    out_dir: str
    shard: OutputShard
    storage: dict[str, dict[str, Any]] = field(default_factory=dict)


# ------------------------------------------------------------------------------ planning


def _split(values: pa.Array, offsets: np.ndarray) -> list[pa.Array]:
    return [values.slice(offsets[i], offsets[i + 1] - offsets[i]) for i in range(len(offsets) - 1)]


def _manifest_from_kept(table: pa.Table) -> tuple[list[str], list[pa.Array]]:
    """(shard URLs, kept keys per shard) from a kept table, shards sorted by URL, then index."""
    table = table.select(["shard", "index", "key"]).sort_by([("shard", "ascending"), ("index", "ascending")])
    shards = table.column("shard").to_numpy()
    starts = np.flatnonzero(shards[1:] != shards[:-1]) + 1
    offsets = np.concatenate([[0], starts, [len(shards)]]) if len(shards) else np.zeros(1, np.int64)
    keys = table.column("key").combine_chunks().cast(pa.string())
    return [str(shards[i]) for i in offsets[:-1]], _split(keys, offsets)


def _manifest_from_lists(table: pa.Table) -> tuple[list[str], list[pa.Array]]:
    """(shard URLs, kept keys per shard) from a manifest table, in its row order."""
    lists = table.column("keys").combine_chunks()
    offsets = lists.offsets.to_numpy()
    values = lists.values.cast(pa.string())
    return table.column("shard").to_pylist(), _split(values, offsets)


def load_manifest(manifest: str | os.PathLike | pa.Table) -> tuple[list[str], list[pa.Array]]:
    """(input shard URLs, kept keys of each in shard order) from a manifest or a kept table.

    ``manifest`` is ``manifest.parquet`` (or its table: ``shard`` and a ``keys`` list, rows
    in input-shard order) or ``kept.parquet`` (or its table: ``shard``, ``key``, ``index``;
    its shards are then taken in URL order).
    """
    table = manifest if isinstance(manifest, pa.Table) else _read_table(manifest)
    if "keys" in table.column_names and "shard" in table.column_names:
        urls, keys = _manifest_from_lists(table)
    elif {"shard", "key", "index"} <= set(table.column_names):
        urls, keys = _manifest_from_kept(table)
    else:
        raise UsageError("reshard needs a manifest (shard, keys) or a kept table (shard, key, index)")
    if len(set(urls)) != len(urls):
        raise UsageError("the manifest names an input shard twice")
    for url, shard_keys in zip(urls, keys):
        if pc.count_distinct(shard_keys).as_py() != len(shard_keys):
            raise UsageError(f"the manifest keeps a key twice in shard {url}")
    return urls, keys


def _read_table(path: str | os.PathLike) -> pa.Table:
    where, filesystem = arrow_source(as_path(path))
    try:
        return pq.read_table(where, filesystem=filesystem)
    except (OSError, pa.ArrowInvalid) as exc:
        raise UsageError(f"cannot read manifest {path}: {exc}") from None


def plan_reshard(urls: Sequence[str], keys: Sequence[pa.Array], cfg: ReshardConfig) -> list[OutputShard]:
    """Cut the global sequence of kept samples into output shards of ``shard_size``."""
    counts = np.array([len(k) for k in keys], dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(counts)])
    total = int(starts[-1])
    plan = []
    for number, begin in enumerate(range(0, total, cfg.shard_size)):
        end = min(begin + cfg.shard_size, total)
        sources = []
        first = int(np.searchsorted(starts, begin, side="right")) - 1
        for i in range(first, len(urls)):
            if starts[i] >= end:
                break
            lo, hi = max(begin, starts[i]) - starts[i], min(end, starts[i + 1]) - starts[i]
            if hi > lo:
                sources.append(Source(urls[i], pa.concat_arrays([keys[i].slice(lo, hi - lo)])))
        plan.append(OutputShard(cfg.name_format.format(number), end - begin, tuple(sources)))
    return plan


def plan_fingerprint(plan: Sequence[OutputShard], cfg: ReshardConfig) -> str:
    """A digest of the configuration and of every output shard's name and sources."""
    digest = hashlib.sha256(cfg.model_dump_json().encode())
    for shard in plan:
        digest.update(f"\x00{shard.name}\x00{shard.count}".encode())
        for source in shard.sources:
            digest.update(f"\x01{source.url}\x01".encode())
            digest.update("\x02".join(source.keys.to_pylist()).encode())
    return digest.hexdigest()


# ------------------------------------------------------------------------------- copying


def member_key(name: str) -> str | None:
    """A member's sample key by the reader's rule (:func:`pipeline.data.shards.split_member`)."""
    parts = split_member(name)
    return parts[0] if parts else None


READ_ERRORS = (tarfile.TarError, EOFError, OSError, zlib.error)  # a damaged or vanished source


def _copy_source(out: tarfile.TarFile, source: Source, storage: StorageOptions | None = None) -> int:
    """Copy the members of ``source``'s kept samples into ``out``; return the sample count.

    A source whose tar stream breaks off (truncated, garbage after the cut) is read up to the
    damage, as the score stage read it: every kept sample lies before the cut there, so the
    copy is complete and the damage is logged. Kept samples that cannot be copied (the source
    changed since it was scored: shorter, unreadable, gone) raise one :class:`DataError`
    naming the shard and how many kept pairs are missing.
    """
    wanted = set(source.keys.to_pylist())
    copied: set[str] = set()
    current: str | None = None
    damage: str | None = None
    writing = False  # an error while writing the output (a full disk) is not the source's damage
    try:
        stream = open_input(source.url, storage)  # the shard reader's opener: local, fsspec, pipe:
    except Exception as exc:  # any opener error: missing file, permissions, network, bad URL
        damage = _describe(exc)
    else:
        try:
            with stream, tarfile.open(fileobj=stream, mode="r|*") as tar:
                for info in tar:
                    key = member_key(info.name) if info.isreg() else None
                    if key is None:  # in no sample (the reader skips it too)
                        tar.members = []
                        continue
                    if key in wanted:
                        if key != current and key in copied:
                            raise DataError(f"shard {source.url}: the members of sample {key!r} "
                                            "are not contiguous")
                        copied.add(key)
                        data = tar.extractfile(info).read()
                        if len(data) != info.size:
                            raise tarfile.ReadError(f"member {info.name} cut short")
                        writing = True
                        add_member(out, info.name, data)
                        writing = False
                    current = key
                    tar.members = []  # streaming: do not keep every header in memory
        except READ_ERRORS as exc:
            if writing:
                raise
            damage = _describe(exc)
            if current in wanted:  # the sample in progress may be incomplete (the reader drops it too)
                copied.discard(current)
    missing = [k for k in source.keys.to_pylist() if k not in copied]
    if missing:
        why = f" ({damage})" if damage else ""
        raise DataError(f"input shard {source.url}: {len(missing)} of {len(wanted)} kept pairs not found, "
                        f"e.g. key {missing[0]!r}{why}; the shard changed since it was scored: restore it "
                        "and rerun (or score it again in a new run dir)")
    if damage:
        log.warning("reshard: input shard %s is damaged (%s); its %d kept pairs lie before the damage "
                    "and were copied", source.url, damage, len(copied))
    return len(copied)


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"[:200]


@dataclass
class ReshardStage:
    """Writes output shards: each task one shard, copied member by member from its sources."""

    resources: Resources = Resources()

    def setup(self) -> None:
        """Nothing to load ahead: each task streams its own input shards."""

    def process(self, task: ReshardTask) -> int:
        """Write one output shard (temporary name, renamed when complete); return its count."""
        path = as_path(task.out_dir, task.storage) / task.shard.name
        with atomic_path(path) as tmp:
            with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as out:
                count = sum(_copy_source(out, source, task.storage) for source in task.shard.sources)
        log.info("reshard: wrote %s (%d pairs)", task.shard.name, count)
        return count


# ------------------------------------------------------------------------------ the stage


def _claim_out_dir(out_dir: StoragePath, plan: Sequence[OutputShard], fingerprint: str,
                   replace_stale: bool = False, selection: str | None = None) -> None:
    """Record the plan (and ``selection``, the fingerprint of the selection it is made from) in
    ``out_dir``, or refuse if it holds another plan's output.

    With ``replace_stale`` (a run directory's own shards, derived from its own selection) the
    output of another plan or another selection is removed instead (:func:`~pipeline.stages.derived.clear_shards_dir`).
    """
    plan_path = out_dir / PLAN_FILE
    if plan_path.is_file():
        recorded = json.loads(plan_path.read_text())
        if recorded.get("fingerprint") == fingerprint and recorded.get(SELECTION_KEY) == selection:
            return
        if not replace_stale:
            raise UsageError(f"{out_dir} holds shards of a different selection or reshard config "
                             "(plan fingerprint differs); remove it or choose another directory")
        log.info("reshard: the selection or the reshard config changed; replacing the shards in %s", out_dir)
        clear_shards_dir(out_dir)
    foreign = [p.name for p in out_dir.iterdir()] if out_dir.is_dir() else []
    if foreign:
        raise UsageError(f"{out_dir} is not empty and has no {PLAN_FILE} (e.g. {sorted(foreign)[0]}); "
                         "remove it or choose another directory")
    record = {"fingerprint": fingerprint, "shards": len(plan), "pairs": sum(s.count for s in plan)}
    write_json_atomic(plan_path, {**record, **({SELECTION_KEY: selection} if selection else {})})


def reshard(manifest: str | os.PathLike | pa.Table, out_dir: str | os.PathLike, cfg: ReshardConfig,
            executor: Executor, resources: Resources = Resources(),
            storage: StorageOptions | None = None, replace_stale: bool = False,
            selection: str | None = None) -> dict[str, int]:
    """Copy the kept pairs into new shards under ``out_dir``; return (and write) ``sizes.json``.

    ``manifest``: see :func:`load_manifest`. One executor task per output shard, with
    ``resources``. Resumable (see the module docstring). Raises :class:`DataError` when a
    kept key is not in its input shard, :class:`UsageError` when ``out_dir`` holds output
    of another plan (unless ``replace_stale``: see :func:`_claim_out_dir`). ``selection``: the
    fingerprint of the selection ``manifest`` belongs to, recorded in the plan file.
    """
    out = as_path(out_dir, storage)
    urls, keys = load_manifest(manifest)
    plan = plan_reshard(urls, keys, cfg)
    _claim_out_dir(out, plan, plan_fingerprint(plan, cfg), replace_stale, selection)
    todo = [ReshardTask(str(out), shard, dict(storage or {})) for shard in plan if not (out / shard.name).is_file()]
    log.info("reshard: %d output shards (%d already done), %d pairs",
             len(plan), len(plan) - len(todo), sum(s.count for s in plan))
    for task, count in zip(todo, executor.run_stage(ReshardStage(resources), todo)):
        if count != task.shard.count:
            raise DataError(f"output shard {task.shard.name} holds {count} pairs, planned {task.shard.count}")
    sizes = {shard.name: shard.count for shard in plan}
    write_json_atomic(out / SIZES_FILE, sizes)
    return sizes


def run_reshard(ctx: RunContext, executor: Executor, name: str | None = None) -> dict[str, int]:
    """Copy a selection's kept pairs into new shards, one task per output shard: ``selection/``
    into ``<run>/shards/`` (with the ``reshard:`` section), or the named selection ``name`` into
    ``<run>/selections/NAME/shards/`` (the ``reshard:`` section's settings, its defaults without
    one). The plan records the selection's fingerprint (module docstring)."""
    from pipeline.stages.select import MANIFEST_FILE

    if ctx.config.reshard is None and name is None:
        raise UsageError("reshard: this run's config has no reshard section")
    cfg = ctx.config.reshard or ReshardConfig()
    manifest = ctx.layout.selection_dir(name) / MANIFEST_FILE
    fingerprint = selection_done(ctx.layout, name)
    if not manifest.is_file() or fingerprint is None:
        what = manifest if not manifest.is_file() else f"{selection_label(name)}'s completion marker (done.json)"
        raise UsageError(f"reshard: {what} not found; "
                         "run `diffin select` (or `diffin run`) with this config and run dir first")
    # The run's own shards follow their selection: when a rerun changed the selection (a shard
    # that was unreadable now scored, another fraction), the old output is replaced, never mixed.
    return reshard(manifest, ctx.layout.shards_dir(name), cfg, executor, ctx.io_resources, ctx.storage,
                   replace_stale=True, selection=fingerprint)


def damaged_sources(ctx: RunContext, name: str | None = None) -> list[dict[str, Any]]:
    """The input shards that were damaged when scored (``truncated``, ``short``, …: the problem
    shards of the selection's ``summary.json``) and still gave kept pairs to the output shards:
    shard, status, error, kept count. Their kept pairs lie before the damage and are copied; the
    run summary names them so that a person can fix or replace the source."""
    from pipeline.stages.select import MANIFEST_FILE, SUMMARY_FILE

    selection = ctx.layout.selection_dir(name)
    problems = json.loads((selection / SUMMARY_FILE).read_text()).get("shards", {}).get("problems", [])
    by_url = {p["shard"]: p for p in problems if p.get("shard")}
    if not by_url:
        return []
    table = _read_table_filtered(selection / MANIFEST_FILE, list(by_url))
    kept = dict(zip(table.column("shard").to_pylist(), pc.list_value_length(table.column("keys")).to_pylist()))
    return [{"shard": url, "status": p["status"], "error": p.get("error"), "kept": kept[url]}
            for url, p in by_url.items() if kept.get(url)]


def _read_table_filtered(path: StoragePath, shards: list[str]) -> pa.Table:
    where, filesystem = arrow_source(path)
    return pq.read_table(where, columns=["shard", "keys"], filesystem=filesystem,
                         filters=pc.field("shard").isin(shards))
