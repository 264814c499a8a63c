"""The chain and drop_fill rules: kept sets against hand computations on tiny score files,
cluster quotas, in-memory vs bounded, determinism, one-line config errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from pipeline.config import SelectConfig, parse_config
from pipeline.data.uids import uid_to_u8u8
from pipeline.errors import UsageError
from pipeline.stages.keep_rule import cluster_quotas, decide, rows_from_arrays, seeded_uid_hash
from pipeline.stages.select import KEPT_FILE, KEPT_UIDS_FILE, MANIFEST_FILE, SUMMARY_FILE, select, selection_fingerprint
from tests.stages.scorefiles import write_score_file

OUTPUTS = (KEPT_FILE, KEPT_UIDS_FILE, MANIFEST_FILE, SUMMARY_FILE)


def uid(i: int) -> str:
    """Uids that sort like their numbers: ties go to the smaller i."""
    return f"{i:032x}"


def score_file(tmp_path: Path, columns: dict[str, list], name: str = "s", cluster: list | None = None) -> Path:
    n = len(next(iter(columns.values())))
    overrides = {**columns, **({"cluster": cluster} if cluster is not None else {})}
    return write_score_file(tmp_path / f"{name}.parquet", f"{name}.tar", [0.0] * n,
                            uids=[uid(i) for i in range(n)], overrides=overrides)


def by_rank(out: Path) -> list[int]:
    """Kept rows' sample indices in rank order."""
    rows = sorted(pq.read_table(out / KEPT_FILE).to_pylist(), key=lambda r: r["rank"])
    return [r["index"] for r in rows]


def seeded(indices: list[int], seed: int) -> list[int]:
    """``indices`` in the random rule's order (the seeded uid hash, computed here per uid)."""
    def key(i: int) -> int:
        hi, lo = uid_to_u8u8(uid(i))
        return int(seeded_uid_hash(np.array([hi], np.uint64), np.array([lo], np.uint64), seed)[0])
    return sorted(indices, key=key)


# ------------------------------------------------------------------------------- drop_fill

ESTIMATE = [0.5, -0.1, 0.2, -0.3, 0.0, 0.8, 0.1, -0.05, 0.3, 0.4]  # diffin_unrolled, an estimate


def test_without_a_share_an_estimate_drops_below_its_zero(tmp_path: Path) -> None:
    """``drop_share_from: null`` and no drop_below / drop_fraction: the estimate column's own
    zero is the threshold, and the drop reads ``column`` (drop_column is unset with the share)."""
    f = score_file(tmp_path, {"diffin_unrolled": ESTIMATE})
    cfg = SelectConfig(rule="drop_fill", drop_share_from=None, fraction=0.4, fill="score")
    summary = select([f], cfg, tmp_path / "out")
    # below 0 dropped: 1, 3, 7; budget round(0.4 × 10) = 4 from the 7 others, best first (0.0 stays)
    assert by_rank(tmp_path / "out") == [5, 0, 9, 8]
    assert summary["drop_fill"] == {"drop_column": "diffin_unrolled", "drop_threshold": 0.0, "eligible": 10,
                                    "dropped": 3, "budget": 4, "fill": "score", "filled_from_dropped": 0}
    assert summary["config"]["drop_below"] == 0.0 and summary["counts"]["kept"] == 4


def test_drop_fraction_drops_the_bottom_share_ties_by_uid(tmp_path: Path) -> None:
    clip = [0.1, 0.2, 0.3, 0.2, 0.05, 0.9, 0.6, 0.7, 0.5, 0.4]
    f = score_file(tmp_path, {"clip_score": clip})
    cfg = SelectConfig(rule="drop_fill", column="clip_score", drop_fraction=0.25, k=7, fill="score")
    summary = select([f], cfg, tmp_path / "out")
    # round-half-up(2.5) = 3 dropped from the bottom: 0.05 (4), 0.1 (0), then of the tie at 0.2
    # the larger uid (3); the budget 7 takes every survivor, best first
    assert by_rank(tmp_path / "out") == [5, 7, 6, 8, 9, 2, 1]
    assert (summary["drop_fill"]["dropped"], summary["drop_fill"]["drop_threshold"]) == (3, 0.2)


def test_drop_share_from_an_estimate_drops_that_many_by_the_drop_column(tmp_path: Path) -> None:
    """The estimate's sign says how many pairs hurt (3 of 10 below 0); the cheap column says which."""
    clip = [0.1, 0.2, 0.3, 0.2, 0.05, 0.9, 0.6, 0.7, 0.5, 0.4]
    f = score_file(tmp_path, {"diffin_unrolled": ESTIMATE, "clip_score": clip})
    cfg = SelectConfig(rule="drop_fill", column="clip_score", drop_share_from="diffin_unrolled",
                       drop_column="clip_score", k=7, fill="score")
    summary = select([f], cfg, tmp_path / "out")
    # 3 below 0 in the estimate → the 3 lowest clip_score rows go: 4, 0, then 3 (the tie at 0.2, larger uid)
    assert by_rank(tmp_path / "out") == [5, 7, 6, 8, 9, 2, 1]
    assert summary["drop_fill"]["dropped"] == 3 and summary["drop_fill"]["below_zero"] == 3
    assert summary["drop_fill"]["drop_share_from"] == "diffin_unrolled"


def test_fill_random_takes_the_seeded_order_of_the_rest(tmp_path: Path) -> None:
    f = score_file(tmp_path, {"diffin_unrolled": ESTIMATE})
    cfg = SelectConfig(rule="drop_fill", drop_share_from=None, fraction=0.3, seed=11, fill="random")
    summary = select([f], cfg, tmp_path / "out")
    survivors = [i for i, v in enumerate(ESTIMATE) if v >= 0]
    assert by_rank(tmp_path / "out") == seeded(survivors, 11)[:3]
    assert summary["drop_fill"]["fill"] == "random" and summary["config"]["seed"] == 11


def test_short_rest_comes_from_the_dropped_rows_least_harmful_first(tmp_path: Path) -> None:
    estimate = [-0.5, 0.2, -0.1, -0.3, 0.6, -0.2, -0.05, -0.4]
    drop = {"tracin": estimate, "diffin_unrolled": [0.9, 0.1, 0.8, 0.7, 0.3, 0.6, 0.2, 0.5]}
    f = score_file(tmp_path, drop)
    cfg = SelectConfig(rule="drop_fill", drop_share_from=None, drop_column="tracin", k=5, fill="score")
    summary = select([f], cfg, tmp_path / "out")
    # 2 survive (1, 4): kept by diffin_unrolled (4 then 1); 3 more of the dropped by tracin: 6, 2, 5
    assert by_rank(tmp_path / "out") == [4, 1, 6, 2, 5]
    assert summary["drop_fill"]["filled_from_dropped"] == 3 and summary["drop_fill"]["dropped"] == 6
    kept = pq.read_table(tmp_path / "out" / KEPT_FILE).to_pylist()
    assert {r["index"]: r["score"] for r in kept}[6] == 0.2  # score: the fill column (column)


def test_cluster_quotas_by_hand() -> None:
    # shares 3.6, 1.8, 0.6 → floors 3, 1, 0; the two left: remainders .8 (c1), then .6 tie → c0
    assert cluster_quotas(6, [6, 3, 1], [6, 3, 1], 1.0) == [4, 2, 0]
    # equal shares 2, 2, 2; c2 has 1 row → 1, the 5 left split 2.5/2.5 → 3, 2
    assert cluster_quotas(6, [6, 3, 1], [6, 3, 1], 0.0) == [3, 2, 1]
    # √6, √3, 1: shares 2.84, 2.01, 1.16 → 2, 2, 1 and the remainder .84 to c0
    assert cluster_quotas(6, [6, 3, 1], [6, 3, 1], 0.5) == [3, 2, 1]
    # c1 lost 2 rows to the drop: its quota 2 > 1 → 1; the 5 left over c0, c2 (6:1) → 4.29, .71 → 4, 1
    assert cluster_quotas(6, [6, 3, 1], [6, 1, 1], 1.0) == [4, 1, 1]
    for power in (0.0, 0.3, 1.0):
        quotas = cluster_quotas(9, [5, 4, 3, 2], [1, 4, 1, 3], power)
        assert sum(quotas) == 9 and all(q <= a for q, a in zip(quotas, [1, 4, 1, 3]))


CLUSTERS = [0, 0, 0, 0, 0, 0, 1, 1, 1, None, None, 2]
CLUSTER_ESTIMATE = [0.9, 0.8, 0.7, 0.6, -0.1, 0.5, 0.4, -0.2, 0.3, 0.2, 0.1, 0.05]


@pytest.mark.parametrize("power, quotas", [
    # groups null (2 rows), 0 (6), 1 (3), 2 (1); after the drop: 2, 5, 2, 1; budget 6
    # p = 1: shares 1, 3, 1.5, .5 → 1, 3, 1, 0 + one to the first largest remainder (1) → 1, 3, 2, 0
    (1.0, [1, 3, 2, 0]),
    # p = 0: 1.5 each → 1, 1, 1, 1 + two to null, 0 → 2, 2, 1, 1
    (0.0, [2, 2, 1, 1]),
])
def test_fill_cluster_quotas_and_seeded_order(tmp_path: Path, power: float, quotas: list[int]) -> None:
    f = score_file(tmp_path, {"diffin_unrolled": CLUSTER_ESTIMATE}, cluster=CLUSTERS)
    cfg = SelectConfig(rule="drop_fill", drop_share_from=None, fraction=0.5, fill="cluster", cluster_power=power,
                       seed=2)
    summary = select([f], cfg, tmp_path / "out")
    survivors = [i for i, v in enumerate(CLUSTER_ESTIMATE) if v >= 0]
    expected = []
    for cluster, quota in zip([None, 0, 1, 2], quotas):
        expected += seeded([i for i in survivors if CLUSTERS[i] == cluster], 2)[:quota]
    assert by_rank(tmp_path / "out") == seeded(expected, 2)
    clusters = summary["drop_fill"]["clusters"]
    assert [(c["cluster"], c["eligible"], c["not_dropped"], c["kept"]) for c in clusters] == [
        (None, 2, 2, quotas[0]), (0, 6, 5, quotas[1]), (1, 3, 2, quotas[2]), (2, 1, 1, quotas[3])]
    assert sum(c["kept"] for c in clusters) == summary["counts"]["kept"] == 6


def test_fill_cluster_without_cluster_ids_is_one_line(tmp_path: Path) -> None:
    f = score_file(tmp_path, {"diffin_unrolled": ESTIMATE})
    with pytest.raises(UsageError, match="score.embeddings.clusters") as info:
        select([f], SelectConfig(rule="drop_fill", fill="cluster"), tmp_path / "out")
    assert "\n" not in str(info.value)


def test_pure_function_on_arrays() -> None:
    """What a benchmark computes without files: the kept positions of rows_from_arrays."""
    n = len(CLUSTER_ESTIMATE)
    his = np.zeros(n, np.uint64)
    los = np.array([uid_to_u8u8(uid(i))[1] for i in range(n)], np.uint64)
    rows = rows_from_arrays(his, los, np.array(CLUSTER_ESTIMATE), cluster=CLUSTERS)
    decision = decide(rows, 1, SelectConfig(rule="drop_fill", drop_share_from=None, fraction=0.5, fill="cluster",
                                            seed=2))
    assert sorted(decision.positions.tolist()) == sorted(seeded(
        [i for i, v in enumerate(CLUSTER_ESTIMATE) if v >= 0 and CLUSTERS[i] is None], 2)[:1]
        + seeded([i for i, v in enumerate(CLUSTER_ESTIMATE) if v >= 0 and CLUSTERS[i] == 0], 2)[:3]
        + seeded([i for i, v in enumerate(CLUSTER_ESTIMATE) if v >= 0 and CLUSTERS[i] == 1], 2)[:2])
    chain = SelectConfig(rule="chain", steps=[{"column": "clip_score", "fraction": 0.5},
                                              {"column": "norm_sim_inf", "fraction": 0.25}])
    rows = rows_from_arrays(his, los, np.arange(n, dtype=float), columns={"clip_score": -np.arange(n, dtype=float)})
    assert decide(rows, 1, chain).positions.tolist() == [5, 4, 3]  # first 6 by clip_score, best 3 of them


# ----------------------------------------------------------------------------------- chain

NEG_CLIP = [0.9, 0.1, 0.8, 0.7, 0.6, 0.2, 0.5, 0.4, 0.3, 0.0, 0.75]
NORM_SIM = [0.1, 0.99, 0.5, 0.6, 0.9, 0.95, 0.2, 0.3, 0.4, 0.8, float("nan")]
CHAIN = SelectConfig(rule="chain", steps=[{"column": "neg_clip_loss", "fraction": 0.5},
                                          {"column": "norm_sim_inf", "fraction": 0.2}])


def test_chain_by_hand(tmp_path: Path) -> None:
    f = score_file(tmp_path, {"neg_clip_loss": NEG_CLIP, "norm_sim_inf": NORM_SIM})
    summary = select([f], CHAIN, tmp_path / "out")
    # eligible: 10 (row 10's norm_sim_inf is NaN); step 1 keeps 5 by neg_clip_loss: 0, 2, 3, 4, 6;
    # step 2 keeps round(0.2 × 10) = 2 of those by norm_sim_inf: 4 (0.9), 3 (0.6) — not 1 or 5
    assert by_rank(tmp_path / "out") == [4, 3]
    kept = pq.read_table(tmp_path / "out" / KEPT_FILE).to_pylist()
    assert sorted(r["score"] for r in kept) == [0.6, 0.9]  # the last step's column
    assert summary["column"] == "norm_sim_inf" and summary["counts"]["scored_ok"] == 10
    assert summary["ok_without_score"] == {"null": 0, "non_finite": 1}
    assert summary["chain"] == [
        {"column": "neg_clip_loss", "fraction": 0.5, "kept": 5, "threshold_applied": 0.5},
        {"column": "norm_sim_inf", "fraction": 0.2, "kept": 2, "threshold_applied": 0.6}]
    assert summary["config"]["column"] is None and summary["config"]["fraction"] is None


# ----------------------------------------------------------------- strategies, determinism


DROP_FILL = [SelectConfig(rule="drop_fill", fraction=0.5, fill="cluster", cluster_power=0.5, seed=1),
             SelectConfig(rule="drop_fill", k=3, fill="score"), SelectConfig(rule="drop_fill", fraction=0.9),
             SelectConfig(), SelectConfig(drop_share_from=None, fill="random", fraction=0.5)]


@pytest.mark.parametrize("cfg", [CHAIN, *DROP_FILL])
def test_strategies_write_the_same_bytes_and_runs_repeat_them(tmp_path: Path, cfg: SelectConfig) -> None:
    """chain: ``auto`` runs it in memory and the bounded reducer refuses it in one line;
    drop_fill: the bounded reducer (``auto``'s choice) writes the in-memory reducer's bytes."""
    columns = {"neg_clip_loss": NEG_CLIP[:-1] + [0.1], "norm_sim_inf": NORM_SIM[:-1] + [0.9],
               "diffin_unrolled": CLUSTER_ESTIMATE[:-1]}
    files = [score_file(tmp_path, {k: v[:6] for k, v in columns.items()}, "a", CLUSTERS[:6]),
             score_file(tmp_path, {k: v[6:] for k, v in columns.items()}, "b", CLUSTERS[6:-1])]
    select(files, cfg, tmp_path / "memory", strategy="memory")
    select(files, cfg, tmp_path / "auto")
    select(files, cfg, tmp_path / "auto")  # again, over its own outputs
    for name in OUTPUTS:
        assert (tmp_path / "memory" / name).read_bytes() == (tmp_path / "auto" / name).read_bytes(), name
    assert sorted(p.name for p in (tmp_path / "auto").iterdir()) == sorted(OUTPUTS)
    if cfg.rule == "drop_fill":
        select(files, cfg, tmp_path / "bounded", strategy="bounded")
        for name in OUTPUTS:
            assert (tmp_path / "memory" / name).read_bytes() == (tmp_path / "bounded" / name).read_bytes(), name
        return
    with pytest.raises(UsageError, match=f"bounded reducer does not run rule '{cfg.rule}'") as info:
        select(files, cfg, tmp_path / "bounded", strategy="bounded")
    assert "\n" not in str(info.value) and not (tmp_path / "bounded").exists()


def test_every_new_setting_changes_the_fingerprint(tmp_path: Path) -> None:
    f = score_file(tmp_path, {"diffin_unrolled": ESTIMATE})
    base = dict(rule="drop_fill", fill="cluster", drop_below=0.1)
    changes = [dict(drop_below=0.2), dict(drop_below=None, drop_fraction=0.1), dict(drop_column="tracin"),
               dict(fill="random", cluster_power=None), dict(cluster_power=0.5), dict(k=4), dict(seed=3)]
    prints = {selection_fingerprint(SelectConfig(**base), [f])}
    for change in changes:
        settings = {k: v for k, v in {**base, **change}.items() if v is not None}
        prints.add(selection_fingerprint(SelectConfig(**settings), [f]))
    chains = [CHAIN, CHAIN.model_copy(update={"steps": [CHAIN.steps[0], CHAIN.steps[1].model_copy(
        update={"fraction": 0.1})]})]
    prints |= {selection_fingerprint(c, [f]) for c in chains}
    assert len(prints) == len(changes) + 3
    # the older rules' fingerprints and effective settings do not see the new fields
    assert set(SelectConfig(rule="top_fraction").settings()) == {"column", "rule", "fraction", "k", "threshold",
                                                                 "seed", "stratify_by", "failed"}


# --------------------------------------------------------------------------- config errors


def run_config(tmp_path: Path, select_section: dict, method: str = "unrolled") -> dict:
    shard = tmp_path / "00000.tar"
    shard.touch()
    return {"data": {"shards": str(shard)},
            "trajectory": {"train": {"steps": 6, "warmup": 1, "checkpoints": 2}},
            "target": {"holdout_fraction": 0.25},
            "score": {"method": method}, "select": select_section}


@pytest.mark.parametrize("section, method, message", [
    ({"rule": "chain", "steps": [{"column": "neg_clip_loss", "fraction": 0.2},
                                 {"column": "norm_sim_inf", "fraction": 0.3}]}, "unrolled",
     r"select: chain step 2 keeps more \(0.3\) than step 1 \(0.2\)"),
    ({"rule": "chain", "steps": [{"column": "neg_clip_loss", "fraction": 0.3}]}, "unrolled", "at least 2"),
    ({"rule": "chain", "steps": [{"column": "clip_score", "fraction": 0.3},
                                 {"column": "tracin", "fraction": 0.2}]}, "unrolled",
     r"select.steps\[1\].column: 'tracin' is not computed when score.method is 'unrolled'"),
    ({"rule": "drop_fill", "column": "norm_sim_2", "drop_share_from": None}, "unrolled",
     "rule 'drop_fill' on 'norm_sim_2' .* needs 'drop_below', 'drop_fraction' or 'drop_share_from'"),
    ({"rule": "drop_fill", "column": "tracin", "drop_column": "clip_score", "drop_share_from": None}, "tracin",
     "rule 'drop_fill' on 'clip_score'"),
    ({"rule": "drop_fill", "drop_below": 0.0, "drop_fraction": 0.1}, "unrolled",
     "one of 'drop_below', 'drop_fraction', 'drop_share_from', not 'drop_below' and 'drop_fraction'"),
    ({"rule": "drop_fill", "column": "clip_score", "drop_share_from": "clip_score"}, "unrolled",
     "select.drop_share_from: Input should be"),
    ({"rule": "drop_fill", "column": "clip_score", "drop_share_from": "tracin"}, "unrolled",
     "select.drop_share_from: 'tracin' is not computed"),
    ({"rule": "drop_fill", "fill": "cluster", "cluster_power": 1.5}, "unrolled",
     "select.cluster_power: Input should be less than or equal to 1"),
    ({"rule": "drop_fill", "fill": "cluster", "cluster_power": -0.1}, "unrolled", "greater than or equal to 0"),
    ({"rule": "drop_fill", "drop_column": "tracin"}, "unrolled", "select.drop_column: 'tracin' is not computed"),
    ({"rule": "drop_fill", "fill": "random", "cluster_power": 0.5}, "unrolled", "only with fill 'cluster'"),
    ({"rule": "drop_fill", "fraction": 0.4, "k": 5}, "unrolled", "either 'fraction' or 'k'"),
    ({"rule": "top_fraction", "drop_below": 0.0}, "unrolled", "'drop_below' is not used by rule 'top_fraction'"),
    ({"rule": "chain", "column": "clip_score", "steps": [{"column": "clip_score", "fraction": 0.3},
                                                         {"column": "norm_sim_inf", "fraction": 0.2}]},
     "unrolled", "'column' is not used by rule 'chain'"),
    ({"rule": "drop_fill", "stratify_by": "lang"}, "unrolled", "'stratify_by' is not used by rule 'drop_fill'"),
])
def test_config_errors_are_one_line(tmp_path: Path, section: dict, method: str, message: str) -> None:
    with pytest.raises(UsageError, match=message) as info:
        parse_config(run_config(tmp_path, section, method))
    assert "\n" not in str(info.value)


def test_valid_new_rules_parse(tmp_path: Path) -> None:
    chain = {"rule": "chain", "steps": [{"column": "neg_clip_loss", "fraction": 0.3},
                                        {"column": "norm_sim_inf", "fraction": 0.2}]}
    config = parse_config(run_config(tmp_path, chain, "tracin"))  # the default column is not computed: unused
    assert config.select.score_column == "norm_sim_inf"
    drop = {"rule": "drop_fill", "column": "clip_score", "drop_column": "diffin_unrolled", "drop_share_from": None,
            "fill": "cluster", "cluster_power": 0.0, "k": 100}
    cfg = parse_config(run_config(tmp_path, drop)).select
    assert cfg.effective()["drop_below"] == 0.0 and cfg.score_columns == ("clip_score", "diffin_unrolled")
