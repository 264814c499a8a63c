"""A tiny but complete run directory for the report tests, built from real writers."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.config import SelectConfig
from pipeline.data.shards import Pair, ShardWriter
from pipeline.data.uids import make_uid
from pipeline.influence.scores import SCORE_COLUMNS
from pipeline.io.atomic import write_json_atomic
from pipeline.io.layout import RunLayout
from pipeline.stages.select import DONE_FILE, select
from tests.conftest import COLOURS
from tests.stages.scorefiles import write_score_file

N_PAIRS, SHARD_SIZE = 48, 16
NASTY_INDEX = 5  # its caption must be escaped in the page
NASTY_CAPTION = '<b>bold</b> & "quoted" <script>alert(1)</script>'
FAILED = {3: "decode_error", 20: "missing_text", 41: "non_finite"}  # pair index -> status


def caption(i: int) -> str:
    """The caption of pair ``i``."""
    return NASTY_CAPTION if i == NASTY_INDEX else f"a {list(COLOURS)[i % 4]} square number {i}"


def make_corpus(out: Path, size: int = 64) -> Path:
    """48 coloured-square pairs (PNG with transparency for odd i, JPEG otherwise) in 3 shards."""
    names = list(COLOURS)
    with ShardWriter(out, max_count=SHARD_SIZE) as writer:
        for i in range(N_PAIRS):
            arr = np.zeros((size, size, 4), np.uint8)
            arr[..., :3] = 255
            arr[..., 3] = 255 if i % 2 == 0 else 0
            q = size // 4
            arr[q:3 * q, q:3 * q, :3] = COLOURS[names[i % 4]]
            arr[q:3 * q, q:3 * q, 3] = 255
            buf = io.BytesIO()
            image = Image.fromarray(arr, "RGBA")
            ext = "png" if i % 2 else "jpg"
            (image if ext == "png" else image.convert("RGB")).save(buf, format="PNG" if ext == "png" else "JPEG")
            writer.write_pair(Pair(f"pair{i:05d}", buf.getvalue(), caption(i),
                                   {"uid": make_uid("tiny", str(i))}, image_ext=ext))
    return out


def scores_of(seed: int = 0) -> dict[str, np.ndarray]:
    """Deterministic, distinct scores per column for the 48 pairs."""
    rng = np.random.default_rng(seed)
    return {"tracin": rng.permutation(N_PAIRS) / 1000.0, "diffin": rng.normal(size=N_PAIRS),
            "diffin_eq9": rng.normal(size=N_PAIRS) * 1e-4, "clip_score": rng.uniform(0.1, 0.9, N_PAIRS),
            "diffin_unrolled": rng.normal(size=N_PAIRS) * 1e-3, "tracin_adam": rng.normal(size=N_PAIRS),
            "diffin_unrolled_adam": rng.normal(size=N_PAIRS) * 1e-2, "neg_clip_loss": rng.uniform(-0.2, 0.1, N_PAIRS),
            "norm_sim_2": rng.uniform(1.0, 4.0, N_PAIRS), "norm_sim_inf": rng.uniform(0.3, 0.95, N_PAIRS)}


def make_run(run: Path, corpus: Path, *, tracin_only: bool = False, stats: bool = False,
             select_column: str = "tracin", clusters: bool = False) -> Path:
    """Score files (3 failed rows), a top-50 % selection, config.json and run_summary.json
    (``clusters``: the ``cluster`` column holds pair index mod 3, else it is null)."""
    values = scores_of()
    files = []
    for s in range(N_PAIRS // SHARD_SIZE):
        idx = range(s * SHARD_SIZE, (s + 1) * SHARD_SIZE)
        statuses = [FAILED.get(i, "ok") for i in idx]

        def column(name: str) -> list[float | None]:
            null = (tracin_only and name not in ("tracin", "clip_score"))
            return [None if null or FAILED.get(i) else float(values[name][i]) for i in idx]

        files.append(write_score_file(
            run / "scores" / f"{s:05d}.parquet", str(corpus / f"{s:05d}.tar"), column("tracin"),
            statuses=statuses, uids=[make_uid("tiny", str(i)) for i in idx], keys=[f"pair{i:05d}" for i in idx],
            overrides={**{name: column(name) for name in SCORE_COLUMNS if name != "tracin"},
                       **({"cluster": [i % 3 for i in idx]} if clusters else {})}))
    select(files, SelectConfig(column=select_column, rule="top_fraction", fraction=0.5), run / "selection")
    (run / "config.json").write_text(json.dumps({"select": {"column": select_column, "note": "<i>x</i>"}}))
    (run / "run_summary.json").write_text(json.dumps({
        "seconds": 12.5, "stages": ["trajectory", "score"], "stage_seconds": {"score": 8.5, "trajectory": 4.0},
        "checkpoints": [{"step": 3, "lr": 0.001}, {"step": 6, "lr": 0.0005}]}))
    if stats:
        (run / "stats").mkdir()
        for s in range(N_PAIRS // SHARD_SIZE):
            failed = {st: 1 for i, st in FAILED.items() if i // SHARD_SIZE == s}
            (run / "stats" / f"{s:05d}.json").write_text(json.dumps({
                "shard": str(corpus / f"{s:05d}.tar"), "status": "ok", "expected": SHARD_SIZE,
                "read": SHARD_SIZE, "rows": SHARD_SIZE, "ok": SHARD_SIZE - len(failed), "failed": failed,
                "seconds": 0.5 + s, "scores": "x.parquet", "worker": {"peak_rss_mb": 100 + s, "pid": 4242}}))
    return run


def add_selection(run: Path, name: str, cfg: SelectConfig, *, done: bool = True) -> Path:
    """A named selection ``selections/NAME/`` of the run's score files (``done``: with done.json,
    as a complete one has)."""
    out = RunLayout(run).selection_dir(name)
    select(sorted((run / "scores").glob("*.parquet")), cfg, out)
    if done:
        write_json_atomic(out / DONE_FILE, {"fingerprint": f"test-{name}"})
    return out


def expected_order(column: str = "tracin") -> list[int]:
    """Pair indices of the ok rows, best first (all scores distinct)."""
    values = scores_of()[column]
    ok = [i for i in range(N_PAIRS) if i not in FAILED]
    return sorted(ok, key=lambda i: -values[i])


@pytest.fixture(scope="session")
def report_corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The 48-pair corpus (read-only)."""
    return make_corpus(tmp_path_factory.mktemp("report_corpus"))


@pytest.fixture
def run_dir(tmp_path: Path, report_corpus: Path) -> Path:
    """A complete run directory with per-shard stats."""
    return make_run(tmp_path / "run", report_corpus, stats=True)
