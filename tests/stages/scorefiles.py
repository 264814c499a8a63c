"""Helpers for stage tests: tiny score files written with the real score-file writer."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from pipeline.data.uids import make_uid
from pipeline.io.scores import COMPONENTS, SCORE_COLUMNS, write_scores


def write_score_file(path: Path, shard: str, scores: Sequence[float | None], *,
                     statuses: Sequence[str] | None = None, uids: Sequence[str] | None = None,
                     keys: Sequence[str] | None = None, strata: dict[str, Sequence[str | None]] | None = None,
                     overrides: dict[str, Sequence] | None = None,
                     fingerprint: str = "cfg-fp", trajectory: str = "traj-fp") -> Path:
    """One shard's score file: every score column holds ``scores`` unless ``overrides`` gives
    it; ``strata`` adds ``json.<field>`` string columns (as the scorer writes them for
    stratified selection)."""
    n = len(scores)
    statuses = list(statuses or ["ok"] * n)
    rows = {
        "uid": list(uids or [make_uid(shard, str(i)) for i in range(n)]),
        "key": list(keys or [f"s{i:04d}" for i in range(n)]),
        "shard": [shard] * n, "index": list(range(n)), "status": statuses,
        "error": [None if s == "ok" else "boom" for s in statuses],
        **{column: list(scores) for column in SCORE_COLUMNS},
        **{name: [[0.0]] * n for name in COMPONENTS},
        **(overrides or {}),
    }
    write_scores(path, rows, fingerprint, trajectory, "0.1.0",
                 extra={f"json.{name}": values for name, values in (strata or {}).items()})
    return path
