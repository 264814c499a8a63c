"""The score Parquet contract: one file per input shard, committed atomically.

One row per input sample, in shard order, failed samples included. File-level metadata
carries the configuration fingerprint, the trajectory fingerprint and the package version;
a shard whose file exists with the same configuration fingerprint is done.
"""

from __future__ import annotations

import json
import os
from typing import Any, Sequence

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.influence.scores import COMPONENTS, SCORE_COLUMNS
from pipeline.io.atomic import atomic_path
from pipeline.io.storage import StoragePath, arrow_source, as_path

META_CONFIG = b"diffin.config_fingerprint"
META_TRAJECTORY = b"diffin.trajectory_fingerprint"
META_VERSION = b"diffin.version"
META_SHARD = b"diffin.shard"  # JSON: what reading the shard found (status, expected, read, rows, ok, failed)
CLUSTER_COLUMN = "cluster"  # k-means cluster of the pair's image embedding at the last checkpoint (null: none)

SCHEMA = pa.schema([
    pa.field("uid", pa.string(), nullable=False),
    pa.field("key", pa.string(), nullable=False),
    pa.field("shard", pa.string(), nullable=False),
    pa.field("index", pa.int32(), nullable=False),
    pa.field("status", pa.string(), nullable=False),
    pa.field("error", pa.string()),
    *(pa.field(name, pa.float64()) for name in SCORE_COLUMNS),
    pa.field(CLUSTER_COLUMN, pa.int32()),
    *(pa.field(name, pa.list_(pa.float64())) for name in COMPONENTS),
])


def write_scores(path: str | os.PathLike, rows: dict[str, Sequence[Any]], config_fingerprint: str,
                 trajectory_fingerprint: str, version: str,
                 extra: dict[str, Sequence[str | None]] | None = None,
                 shard: dict[str, Any] | None = None) -> None:
    """Write one shard's rows (column name → values, SCHEMA order) atomically, with metadata.

    ``extra`` adds string columns after the schema's (e.g. ``json.<field>`` copied from the
    samples' json for stratified selection); ``shard`` is stored as JSON in the file's
    metadata (the shard-level status and counts, for reconciliation). A ``rows`` without the
    ``cluster`` column (clustering off) writes it as nulls. The writer is configured for
    byte-stable output (no timestamps, fixed compression).
    """
    schema = SCHEMA
    if CLUSTER_COLUMN not in rows:
        rows = {**rows, CLUSTER_COLUMN: [None] * len(rows["uid"])}
    for name in extra or {}:
        schema = schema.append(pa.field(name, pa.string()))
    data = {**rows, **(extra or {})}
    table = pa.table({f.name: pa.array(data[f.name], type=f.type) for f in schema}, schema=schema)
    table = table.replace_schema_metadata({
        META_CONFIG: config_fingerprint.encode(), META_TRAJECTORY: trajectory_fingerprint.encode(),
        META_VERSION: version.encode(),
        **({META_SHARD: json.dumps(shard, sort_keys=True).encode()} if shard is not None else {}),
    })
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, compression="zstd", write_statistics=True, use_dictionary=["status", "shard"])


def read_file_metadata(path: StoragePath) -> dict[bytes, bytes] | None:
    """A score file's key-value metadata (None if the file cannot be read)."""
    where, filesystem = arrow_source(as_path(path))
    try:
        return pq.read_schema(where, filesystem=filesystem).metadata or {}
    except (OSError, pa.ArrowInvalid):
        return None


def read_fingerprint(path: StoragePath) -> str | None:
    """The configuration fingerprint recorded in a score file (None if unreadable)."""
    value = (read_file_metadata(path) or {}).get(META_CONFIG)
    return value.decode() if value is not None else None


def read_shard_meta(path: StoragePath) -> dict[str, Any] | None:
    """The shard record stored in a score file's metadata (None when absent or unreadable)."""
    value = (read_file_metadata(path) or {}).get(META_SHARD)
    return json.loads(value) if value is not None else None
