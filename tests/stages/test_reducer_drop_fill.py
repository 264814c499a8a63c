"""The bounded reducer runs ``drop_fill``: every output file byte-identical to the in-memory
reducer's for each drop (``drop_below``, ``drop_fraction``, ``drop_share_from``) and fill
(``random``, ``score``, ``cluster``), the short rest refilled from the dropped rows, ties,
null cluster ids, several score files, and budgets small enough to force the digit passes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pipeline.config import SelectConfig
from pipeline.data.uids import make_uid
from pipeline.errors import UsageError
from pipeline.stages import select as select_stage
from pipeline.stages.select import files as select_files
from pipeline.stages.select import select
from pipeline.stages.select.bounded import driver
from tests.stages.scorefiles import write_score_file
from tests.stages.test_reducer import same_outputs

ESTIMATE_VALUES = [-0.5, -0.1, 0.0, 0.1, 0.3, 0.7]  # ties, a harmful share, rows at the default drop_below
CLIP_VALUES = [0.1, 0.2, 0.25, 0.5]
CLUSTER_VALUES = [None, 0, 1, 2, 5, 7, 7, 1]


def drop_corpus(tmp_path: Path) -> list[Path]:
    """Four score files and an empty one: estimate and clip scores with heavy ties, tracin
    with both -0.0 and 0.0 (a drop column only: numpy's quantiles may return either zero, see
    :mod:`pipeline.stages.select.bounded`), cluster ids with nulls (one file has none at all),
    failed rows of every kind (a failed drop or share column makes a row failed too), a uid
    repeated within a file and across files."""
    rng = np.random.default_rng(11)
    shared = make_uid("dup", "x")
    files = []
    for i in range(4):
        n = 19 + 6 * i
        estimate: list[float | None] = list(rng.choice(ESTIMATE_VALUES, n))
        clip: list[float | None] = list(rng.choice(CLIP_VALUES, n))
        tracin: list[float | None] = list(np.round(rng.standard_normal(n), 1) + 0.0)
        tracin[6:10] = [-0.0, 0.0, -0.0, 0.0]
        clusters = [None] * n if i == 2 else [CLUSTER_VALUES[j] for j in rng.integers(0, len(CLUSTER_VALUES), n)]
        statuses = ["ok"] * n
        statuses[0] = "decode_error"
        estimate[1], clip[2], tracin[3] = float("nan"), None, float("-inf")
        uids = [make_uid(f"d{i}", str(j)) for j in range(n)]
        uids[4] = uids[5] = shared
        files.append(write_score_file(tmp_path / f"scores/{i:05d}.parquet", f"in/{i:05d}.tar", clip,
                                      statuses=statuses, uids=uids,
                                      overrides={"clip_score": clip, "diffin_unrolled": estimate,
                                                 "tracin": tracin, "cluster": clusters}))
    files.append(write_score_file(tmp_path / "scores/empty.parquet", "in/empty.tar", []))
    return files


def drop_fill(**settings) -> SelectConfig:
    return SelectConfig(rule="drop_fill", **settings)


DROPS = {
    "below": dict(column="diffin_unrolled", drop_share_from=None),  # drop_below 0.0 on the estimate (0.0 survives)
    "fraction": dict(column="clip_score", drop_column="tracin", drop_fraction=0.35),
    "share": dict(column="clip_score", drop_share_from="diffin_unrolled", drop_column="clip_score"),
}
FILLS = {"random": dict(fill="random", seed=3), "score": dict(fill="score"), "cluster": dict(fill="cluster", seed=5)}
MORE = [
    drop_fill(column="diffin_unrolled", drop_share_from=None, fraction=0.9, fill="score"),  # short rest: refilled
    drop_fill(column="clip_score", drop_column="tracin", drop_share_from=None, fraction=0.6,
              fill="cluster"),  # -0.0 >= 0.0 survives
    drop_fill(column="clip_score", drop_below=0.25, k=60, fill="cluster", cluster_power=0.0),  # short rest, cluster
    drop_fill(column="clip_score", drop_column="tracin", drop_fraction=0.8, fraction=0.5, fill="cluster",
              cluster_power=0.5),
    drop_fill(column="clip_score", drop_column="diffin_unrolled", drop_share_from=None, k=1, fill="random", seed=9),
    drop_fill(column="clip_score", drop_fraction=0.0, fraction=0.5, fill="score"),  # nothing dropped
    drop_fill(column="clip_score", drop_below=99.0, fraction=0.4, fill="cluster"),  # everything dropped
    drop_fill(column="diffin_unrolled", drop_column="tracin", drop_share_from=None, k=10_000,
              fill="random"),  # every row kept
    drop_fill(column="clip_score", drop_column="tracin", drop_fraction=0.45, k=30, fill="score"),  # cut in ±0.0
    drop_fill(column="diffin_unrolled", drop_share_from="tracin", drop_column="clip_score", k=25, fill="cluster"),
]
CONFIGS = {f"{d}-{f}": drop_fill(**DROPS[d], **FILLS[f], fraction=0.3) for d in DROPS for f in FILLS}
CONFIGS.update({f"more{i}": cfg for i, cfg in enumerate(MORE)})
CONFIGS["default"] = SelectConfig()  # the default recipe: diffin_unrolled's share, by neg_clip_loss, per cluster


@pytest.mark.parametrize("budget", [1, 3, 1_000_000])
def test_drop_fill_outputs_are_byte_identical(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, budget: int) -> None:
    monkeypatch.setattr(select_files, "WRITE_BATCH_ROWS", 7)  # several row groups and manifest tables
    monkeypatch.setattr(driver, "_MIN_RUN_BATCH", 2)  # merges of many small batches
    files = drop_corpus(tmp_path)
    seen = set()
    for name, cfg in CONFIGS.items():
        summary = same_outputs(files, cfg.model_copy(update={"max_rows_in_memory": budget}), tmp_path, name)
        details = summary["drop_fill"]
        seen.add((details["dropped"] > 0, details["filled_from_dropped"] > 0, "clusters" in details))
        assert summary["counts"]["kept"] == details["budget"]
        if "clusters" in details:
            assert sum(c["kept"] for c in details["clusters"]) == details["budget"]
            assert details["clusters"][0]["cluster"] is None  # the null cluster, first
    assert {(True, True, True), (True, True, False), (True, False, True), (True, False, False),
            (False, False, False)} <= seen


def test_drop_fill_ties_beyond_the_budget(tmp_path: Path) -> None:
    """Most rows share one drop value and one fill score: the drop cut and the keep cut fall
    inside ties, the searches run past the value bits into the uid."""
    files = [write_score_file(tmp_path / f"eq/{i}.parquet", f"eq/{i}.tar", [1.5] * 30 + [float(i)],
                              overrides={"tracin": [-1.0] * 10 + [2.0] * 21, "cluster": [i % 2] * 15 + [None] * 16})
             for i in range(3)]
    for i, cfg in enumerate([drop_fill(column="clip_score", drop_fraction=0.5, fraction=0.3, fill="score"),
                             drop_fill(column="clip_score", drop_share_from="tracin", drop_column="clip_score",
                                       k=40, fill="score"),
                             drop_fill(column="clip_score", drop_fraction=0.2, k=50, fill="cluster"),
                             drop_fill(column="tracin", drop_below=1.5, fraction=0.5, fill="random")]):
        same_outputs(files, cfg.model_copy(update={"max_rows_in_memory": 2}), tmp_path, f"eq{i}")


def test_drop_fill_empty_and_all_failed(tmp_path: Path) -> None:
    failed = write_score_file(tmp_path / "f.parquet", "f.tar", [None, None], statuses=["decode_error"] * 2)
    empty = write_score_file(tmp_path / "e.parquet", "e.tar", [])
    for i, fill in enumerate(FILLS.values()):
        summary = same_outputs([failed, empty], drop_fill(**DROPS["fraction"], **fill), tmp_path, f"none{i}")
        assert summary["counts"]["kept"] == 0 and summary["drop_fill"]["drop_threshold"] is None


def test_drop_fill_without_cluster_ids_is_one_line_in_both_reducers(tmp_path: Path) -> None:
    f = write_score_file(tmp_path / "s.parquet", "s.tar", [0.5, -0.1, 0.2])
    for strategy in ("memory", "bounded"):
        with pytest.raises(UsageError, match="score.embeddings.clusters") as info:
            select([f], drop_fill(fill="cluster"), tmp_path / strategy, strategy=strategy)
        assert "\n" not in str(info.value) and not (tmp_path / strategy).exists()


def test_auto_runs_drop_fill_in_the_bounded_reducer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``auto`` picks the bounded reducer for drop_fill as for top_fraction (chain stays in memory)."""
    used = []
    bounded = select_stage.select_bounded
    monkeypatch.setattr(select_stage, "select_bounded", lambda *a, **k: used.append(1) or bounded(*a, **k))
    files = drop_corpus(tmp_path)
    cfg = CONFIGS["share-cluster"]
    select(files, cfg, tmp_path / "auto")
    select(files, cfg, tmp_path / "memory", strategy="memory")
    assert used == [1]
    for name in ("kept.parquet", "kept_uids.npy", "manifest.parquet", "summary.json"):
        assert (tmp_path / "auto" / name).read_bytes() == (tmp_path / "memory" / name).read_bytes(), name
