"""The select stage: rules, ties, strata, failed rows, outputs, determinism."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from pydantic import ValidationError

from pipeline.data.uids import make_uid
from pipeline.errors import UsageError
from pipeline.stages.keep_rule import largest_remainder, round_half_up
from pipeline.stages.select import KEPT_FILE, KEPT_UIDS_FILE, MANIFEST_FILE, SUMMARY_FILE, SelectConfig, select
from tests.stages.scorefiles import write_score_file

OUTPUTS = (KEPT_FILE, KEPT_UIDS_FILE, MANIFEST_FILE, SUMMARY_FILE)


def kept(out: Path) -> list[dict]:
    return pq.read_table(out / KEPT_FILE).to_pylist()


def corpus(tmp_path: Path, n_files: int = 3, n: int = 20, seed: int = 0) -> list[Path]:
    """Score files with distinct scores; shard i, sample j has uid make_uid(shard, j)."""
    rng = np.random.default_rng(seed)
    scores = rng.permutation(n_files * n) / 100.0
    return [write_score_file(tmp_path / f"scores/{i:05d}.parquet", f"in/{i:05d}.tar",
                             list(scores[i * n:(i + 1) * n])) for i in range(n_files)]


def all_rows(files: list[Path]) -> list[dict]:
    return [row for f in files for row in pq.read_table(f).to_pylist()]


@pytest.mark.parametrize("fraction, n, expected", [
    (0.3, 10, 3), (0.15, 10, 2), (0.25, 2, 1), (0.05, 10, 1), (0.04, 10, 0), (1.0, 7, 7),
    (0.5, 7, 4), (0.35, 10, 4),
])
def test_top_fraction_rounds_half_up(tmp_path: Path, fraction: float, n: int, expected: int) -> None:
    f = write_score_file(tmp_path / "s.parquet", "x.tar", [float(i) for i in range(n)])
    summary = select([f], SelectConfig(rule="top_fraction", fraction=fraction), tmp_path / "out")
    rows = kept(tmp_path / "out")
    assert summary["counts"]["kept"] == len(rows) == expected == round_half_up(fraction, n)
    assert sorted(r["score"] for r in rows) == [float(i) for i in range(n - expected, n)]
    assert sorted(r["rank"] for r in rows) == list(range(1, expected + 1))
    assert all(r["rank"] == n - r["score"] for r in rows)


def test_top_k_is_global_across_files(tmp_path: Path) -> None:
    files = corpus(tmp_path)
    select(files, SelectConfig(rule="top_k", k=7), tmp_path / "out")
    best = sorted(all_rows(files), key=lambda r: -r["diffin"])[:7]
    assert {(r["shard"], r["key"]) for r in kept(tmp_path / "out")} == {(r["shard"], r["key"]) for r in best}


def test_top_k_larger_than_eligible_keeps_all(tmp_path: Path) -> None:
    files = corpus(tmp_path, n_files=2, n=5)
    summary = select(files, SelectConfig(rule="top_k", k=1000), tmp_path / "out")
    assert summary["counts"]["kept"] == 10


def test_threshold_is_inclusive_and_reported(tmp_path: Path) -> None:
    f = write_score_file(tmp_path / "s.parquet", "x.tar", [0.1, 0.5, 0.5, 0.2, 0.9])
    summary = select([f], SelectConfig(rule="threshold", threshold=0.5), tmp_path / "out")
    assert sorted(r["score"] for r in kept(tmp_path / "out")) == [0.5, 0.5, 0.9]
    assert summary["threshold_applied"] == 0.5


def test_ties_broken_by_ascending_uid(tmp_path: Path) -> None:
    uids = [make_uid("tie", str(i)) for i in range(10)]
    f = write_score_file(tmp_path / "s.parquet", "x.tar", [1.0] * 9 + [2.0], uids=uids)
    select([f], SelectConfig(rule="top_k", k=4), tmp_path / "out")
    by_rank = sorted(kept(tmp_path / "out"), key=lambda r: r["rank"])
    assert by_rank[0]["uid"] == uids[9]  # the higher score first
    assert [r["uid"] for r in by_rank[1:]] == sorted(uids[:9])[:3]


def test_the_column_chooses_the_score(tmp_path: Path) -> None:
    f = write_score_file(tmp_path / "s.parquet", "x.tar", [0.1, 0.9, 0.5],
                         overrides={"tracin": [0.9, 0.1, 0.5]})
    select([f], SelectConfig(column="tracin", rule="top_k", k=1), tmp_path / "out")
    assert [r["key"] for r in kept(tmp_path / "out")] == ["s0000"]


def test_random_is_seeded_and_independent_of_position(tmp_path: Path) -> None:
    files = corpus(tmp_path, n_files=4, n=25)
    cfg = SelectConfig(rule="random", fraction=0.2, seed=7)
    first = {r["uid"] for r in kept_after(files, cfg, tmp_path / "a")}
    again = {r["uid"] for r in kept_after(files, cfg, tmp_path / "b")}
    other = {r["uid"] for r in kept_after(files, SelectConfig(rule="random", fraction=0.2, seed=8),
                                          tmp_path / "c")}
    assert len(first) == 20 and first == again and other != first
    # The same rows, shuffled and regrouped into other files (other shards, positions, scores):
    rows = all_rows(files)
    random.Random(0).shuffle(rows)
    moved = [write_score_file(tmp_path / f"moved/{i}.parquet", f"moved/{i}.tar",
                              [float(j) for j in range(50)], uids=[r["uid"] for r in rows[i * 50:(i + 1) * 50]])
             for i in range(2)]
    assert {r["uid"] for r in kept_after(moved, cfg, tmp_path / "d")} == first


def kept_after(files: list[Path], cfg: SelectConfig, out: Path) -> list[dict]:
    select(files, cfg, out)
    return kept(out)


def test_random_with_k(tmp_path: Path) -> None:
    files = corpus(tmp_path, n_files=2, n=10)
    summary = select(files, SelectConfig(rule="random", k=3, seed=1), tmp_path / "out")
    assert summary["counts"]["kept"] == 3


def stratified(tmp_path: Path) -> list[Path]:
    # lang: a ×5 (scores 0..4), b ×3 (10..12), c ×2 (20, 21), null ×1 — over two files
    langs = ["a"] * 5 + ["b"] * 3 + ["c"] * 2 + [None]
    scores = [0.0, 1.0, 2.0, 3.0, 4.0, 10.0, 11.0, 12.0, 20.0, 21.0, 30.0]
    return [write_score_file(tmp_path / "s0.parquet", "s0.tar", scores[:6], strata={"lang": langs[:6]}),
            write_score_file(tmp_path / "s1.parquet", "s1.tar", scores[6:], strata={"lang": langs[6:]})]


def test_stratified_top_fraction_applies_per_stratum(tmp_path: Path) -> None:
    summary = select(stratified(tmp_path), SelectConfig(rule="top_fraction", fraction=0.5, stratify_by="lang"), tmp_path / "out")
    rows = kept(tmp_path / "out")
    # round half up per stratum: a 2.5→3, b 1.5→2, c 1→1, null 0.5→1
    assert sorted(r["score"] for r in rows) == [2.0, 3.0, 4.0, 11.0, 12.0, 21.0, 30.0]
    assert sorted(r["rank"] for r in rows) == list(range(1, 8))
    assert {r["json.lang"] for r in rows} == {"a", "b", "c", None}
    strata = {s["value"]: (s["in"], s["scored_ok"], s["kept"]) for s in summary["strata"]}
    assert strata == {None: (1, 1, 1), "a": (5, 5, 3), "b": (3, 3, 2), "c": (2, 2, 1)}
    assert [s["value"] for s in summary["strata"]] == [None, "a", "b", "c"]


def test_stratified_top_k_splits_by_largest_remainder(tmp_path: Path) -> None:
    # eligible a 5, b 3, c 2, null 1 (total 11); k = 5 → exact shares 2.27, 1.36, 0.91, 0.45
    # floors 2, 1, 0, 0 (3); the 2 left go to the largest remainders: c (0.91), null (0.45)
    assert largest_remainder(5, [1, 5, 3, 2]) == [1, 2, 1, 1]
    summary = select(stratified(tmp_path), SelectConfig(rule="top_k", k=5, stratify_by="lang"),
                     tmp_path / "out")
    assert {s["value"]: s["kept"] for s in summary["strata"]} == {None: 1, "a": 2, "b": 1, "c": 1}
    assert sorted(r["score"] for r in kept(tmp_path / "out")) == [3.0, 4.0, 12.0, 21.0, 30.0]


def test_largest_remainder_ties_go_to_the_first_stratum() -> None:
    assert largest_remainder(5, [5, 3, 2]) == [3, 1, 1]  # shares 2.5, 1.5, 1.0
    assert largest_remainder(3, [1, 1, 1, 1]) == [1, 1, 1, 0]
    assert largest_remainder(0, [4, 4]) == [0, 0]
    assert sum(largest_remainder(97, [13, 29, 31, 37, 1])) == 97


def test_missing_stratum_column_is_a_usage_error(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="json.lang"):
        select(corpus(tmp_path, 1, 4), SelectConfig(rule="top_fraction", stratify_by="lang"), tmp_path / "out")


def failing(tmp_path: Path) -> Path:
    return write_score_file(
        tmp_path / "s.parquet", "x.tar", [5.0, 9.0, None, float("nan"), float("inf"), 1.0, 2.0],
        statuses=["ok", "decode_error", "ok", "ok", "ok", "missing_text", "ok"])


def test_failed_rows_are_dropped_and_counted(tmp_path: Path) -> None:
    summary = select([failing(tmp_path)], SelectConfig(rule="top_fraction", fraction=1.0), tmp_path / "out")
    assert sorted(r["key"] for r in kept(tmp_path / "out")) == ["s0000", "s0006"]
    assert summary["counts"] == {"in": 7, "scored_ok": 2, "failed": 5, "kept": 2, "missing": 0}
    assert summary["failed_by_status"] == {"decode_error": 1, "missing_text": 1}
    assert summary["ok_without_score"] == {"null": 1, "non_finite": 2}
    manifest = pq.read_table(tmp_path / "out" / MANIFEST_FILE).to_pylist()
    assert manifest == [{"shard": "x.tar", "n_in": 7, "n_scored_ok": 2, "n_kept": 2,
                         "keys": ["s0000", "s0006"]}]


def test_failed_rows_refused_in_error_mode(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match=r"5 rows are not scored ok.*decode_error: 1"):
        select([failing(tmp_path)], SelectConfig(rule="top_fraction", failed="error"), tmp_path / "out")
    assert not (tmp_path / "out").exists()
    summary = select(corpus(tmp_path, 1, 5), SelectConfig(rule="top_fraction", failed="error", fraction=1.0), tmp_path / "ok")
    assert summary["counts"]["kept"] == 5


def test_outputs_are_consistent(tmp_path: Path) -> None:
    files = corpus(tmp_path, n_files=3, n=20)
    summary = select(files, SelectConfig(rule="top_fraction", fraction=0.3), tmp_path / "out")
    out = tmp_path / "out"
    rows = kept(out)
    assert len(rows) == 18 == summary["counts"]["kept"]
    assert [r["uid"] for r in rows] == sorted(r["uid"] for r in rows)
    assert sorted(r["rank"] for r in rows) == list(range(1, 19))
    by_rank = sorted(rows, key=lambda r: r["rank"])
    assert [r["score"] for r in by_rank] == sorted((r["score"] for r in rows), reverse=True)
    assert summary["threshold_applied"] == by_rank[-1]["score"]
    # kept_uids.npy: DataComp's subset format, as its resharder loads it
    uids = np.load(out / KEPT_UIDS_FILE, mmap_mode="r")
    assert uids.dtype == np.dtype("u8,u8") and uids.ndim == 1
    assert uids.tolist() == sorted(uids.tolist())
    expected = np.array([(int(r["uid"][:16], 16), int(r["uid"][16:32], 16)) for r in rows], np.dtype("u8,u8"))
    assert np.array_equal(uids, expected)
    # manifest: input-shard order, keys in shard order, counts
    manifest = pq.read_table(out / MANIFEST_FILE).to_pylist()
    assert [m["shard"] for m in manifest] == [f"in/{i:05d}.tar" for i in range(3)]
    for m in manifest:
        mine = sorted((r for r in rows if r["shard"] == m["shard"]), key=lambda r: r["index"])
        assert m["keys"] == [r["key"] for r in mine] and m["n_kept"] == len(mine)
        assert m["n_in"] == m["n_scored_ok"] == 20
    # rows carry the right key/shard/index/score for their uid
    source = {r["uid"]: r for r in all_rows(files)}
    assert all((source[r["uid"]]["key"], source[r["uid"]]["shard"], source[r["uid"]]["index"],
                source[r["uid"]]["diffin"]) == (r["key"], r["shard"], r["index"], r["score"]) for r in rows)
    scores = np.array([r["diffin"] for r in source.values()])
    assert summary["score_quantiles"]["0.5"] == pytest.approx(float(np.median(scores)))
    assert summary["score_quantiles"]["0"] == scores.min() and summary["score_quantiles"]["1"] == scores.max()
    assert json.loads((out / SUMMARY_FILE).read_text()) == summary


def test_selection_is_byte_identical_when_run_twice(tmp_path: Path) -> None:
    files = stratified(tmp_path)
    cfg = SelectConfig(rule="top_k", k=4, stratify_by="lang")
    select(files, cfg, tmp_path / "a")
    select(files, cfg, tmp_path / "b")
    select(files, cfg, tmp_path / "b")  # re-run over existing outputs
    for name in OUTPUTS:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == sorted(OUTPUTS)  # no temporaries


def test_empty_selection_writes_valid_outputs(tmp_path: Path) -> None:
    f = write_score_file(tmp_path / "s.parquet", "x.tar", [None, None], statuses=["decode_error"] * 2)
    summary = select([f], SelectConfig(), tmp_path / "out")
    assert summary["counts"]["kept"] == 0 and summary["threshold_applied"] is None
    assert summary["score_quantiles"] is None
    assert kept(tmp_path / "out") == [] and len(np.load(tmp_path / "out" / KEPT_UIDS_FILE)) == 0


def test_mixed_fingerprints_refused(tmp_path: Path) -> None:
    a = write_score_file(tmp_path / "a.parquet", "a.tar", [1.0])
    b = write_score_file(tmp_path / "b.parquet", "b.tar", [1.0], fingerprint="other")
    c = write_score_file(tmp_path / "c.parquet", "c.tar", [1.0], trajectory="other")
    for pair in ([a, b], [a, c]):
        with pytest.raises(UsageError, match="different runs"):
            select(pair, SelectConfig(), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_bad_inputs_refused(tmp_path: Path) -> None:
    a = write_score_file(tmp_path / "a.parquet", "a.tar", [1.0, 2.0])
    dup = write_score_file(tmp_path / "dup.parquet", "a.tar", [1.0])
    bad_uid = write_score_file(tmp_path / "u.parquet", "u.tar", [1.0], uids=["XYZ"])
    pq.write_table(pq.read_table(a).replace_schema_metadata({}), tmp_path / "plain.parquet")
    cases = [([], "no score files"), ([a, a], "listed twice"), ([a, dup], "scored by two files"),
             ([bad_uid], "not 32 lowercase hex"), ([tmp_path / "plain.parquet"], "not a score file"),
             ([tmp_path / "missing.parquet"], "cannot read")]
    for files, message in cases:
        with pytest.raises(UsageError, match=message):
            select(files, SelectConfig(), tmp_path / "out")


@pytest.mark.parametrize("settings, message", [
    ({"fraction": 0}, "greater than 0"), ({"fraction": 1.5}, "less than or equal to 1"),
    ({"rule": "top_k"}, "needs 'k'"), ({"rule": "top_k", "k": 0}, "greater than 0"),
    ({"rule": "threshold"}, "needs a finite 'threshold'"),
    ({"rule": "threshold", "threshold": float("nan")}, "finite"),
    ({"rule": "top_k", "k": 3, "fraction": 0.5}, "'fraction' is not used by rule 'top_k'"),
    ({"rule": "top_fraction", "threshold": 0.1}, "'threshold' is not used"),
    ({"rule": "random", "k": 3, "fraction": 0.5}, "either 'fraction' or 'k'"),
    ({"column": "loss"}, "column"), ({"failed": "keep"}, "failed"), ({"stratify_by": ""}, "stratify_by"),
    ({"colum": "diffin"}, "Extra inputs"),
])
def test_config_validation(settings: dict, message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        SelectConfig(**settings)


@pytest.mark.parametrize("settings", [
    {"rule": "top_k", "k": 5}, {"rule": "threshold", "threshold": 0.1}, {"rule": "random", "k": 4},
    {"rule": "chain", "steps": [{"column": "neg_clip_loss", "fraction": 0.5}, {"column": "norm_sim_inf", "fraction": 0.3}]},
    {"rule": "drop_fill", "fill": "cluster", "cluster_power": 0.5}, {"rule": "top_fraction", "fraction": 0.4},
])
def test_a_config_written_in_full_reads_back_the_same(settings: dict) -> None:
    """config.json holds every field at its value (defaults included): it must parse again."""
    cfg = SelectConfig(**settings)
    assert SelectConfig(**cfg.model_dump(mode="json")) == cfg


def test_config_defaults_are_valid() -> None:
    cfg = SelectConfig()
    assert (cfg.column, cfg.rule, cfg.fraction, cfg.failed) == ("diffin_unrolled", "drop_fill", 0.3, "drop")
    assert SelectConfig(rule="random").fraction == 0.3
    assert SelectConfig(rule="top_fraction").fraction == 0.3


def test_summary_shows_the_settings_as_applied() -> None:
    assert SelectConfig(rule="top_k", k=5).effective() == {
        "column": "diffin_unrolled", "rule": "top_k", "fraction": None, "k": 5, "threshold": None,
        "seed": None, "stratify_by": None, "failed": "drop"}
    random_k = SelectConfig(rule="random", k=5, seed=3).effective()
    assert (random_k["fraction"], random_k["k"], random_k["seed"]) == (None, 5, 3)
    assert SelectConfig().effective()["fraction"] == 0.3
