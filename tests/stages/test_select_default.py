"""The default ``select:`` section is the recipe the quality benchmark measured best
(docs/QUALITY.md, method ``neg_clip_loss+share``): drop_fill, as many dropped as
``diffin_unrolled`` scores below 0, the lowest by ``neg_clip_loss``, the budget filled per
cluster. Every other rule, named, selects as before with the fingerprint it had; the defaults
that depend on other keys (``column``, ``drop_below`` / ``drop_fraction``, ``stratify_by``,
``score.method``, ``score.embeddings.clusters``) give the user's choice or one line naming the
key to set; config.json reads back the same, including one written before the change."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from pipeline.bench.selections import Method
from pipeline.config import RunConfig, SelectConfig, parse_config
from pipeline.errors import UsageError
from pipeline.stages import select as select_stage
from pipeline.stages.keep_rule import round_half_up
from pipeline.stages.select import KEPT_FILE, KEPT_UIDS_FILE, MANIFEST_FILE, SUMMARY_FILE, select
from tests.stages.scorefiles import write_score_file
from tests.stages.test_select_rules import run_config

OUTPUTS = (KEPT_FILE, KEPT_UIDS_FILE, MANIFEST_FILE, SUMMARY_FILE)
RECIPE = {"column": "diffin_unrolled", "rule": "drop_fill", "drop_share_from": "diffin_unrolled",
          "drop_column": "neg_clip_loss", "fill": "cluster", "fraction": 0.3}


def uid(i: int) -> str:
    return f"{i:032x}"


def scored_corpus(tmp_path: Path, n_files: int = 2, n: int = 30) -> list[Path]:
    """Score files with an estimate that is negative for about a third of the pairs, a
    negCLIPLoss that is never above 0 (−τ × a loss), a clip score and 4 clusters."""
    rng = np.random.default_rng(7)
    files = []
    for i in range(n_files):
        estimate = list(np.round(rng.normal(0.05, 0.1, n), 3))
        ncl = list(-np.round(rng.uniform(0.1, 3.0, n), 2))
        clip = list(np.round(rng.uniform(0.0, 0.4, n), 3))
        files.append(write_score_file(tmp_path / f"scores/{i:05d}.parquet", f"in/{i:05d}.tar", estimate,
                                      uids=[uid(i * n + j) for j in range(n)],
                                      overrides={"neg_clip_loss": ncl, "clip_score": clip,
                                                 "cluster": [int(c) for c in rng.integers(0, 4, n)]}))
    return files


def rows_of(files: list[Path]) -> list[dict]:
    return [r for f in files for r in pq.read_table(f).to_pylist()]


def same_bytes(a: Path, b: Path, names: tuple[str, ...] = OUTPUTS) -> bool:
    return all((a / name).read_bytes() == (b / name).read_bytes() for name in names)


# ------------------------------------------------------------------------------- the default


def test_the_default_is_the_recipe() -> None:
    cfg = SelectConfig()
    assert {name: getattr(cfg, name) for name in RECIPE} == RECIPE and cfg == SelectConfig(**RECIPE)
    assert cfg.effective() == {
        "column": "diffin_unrolled", "rule": "drop_fill", "fraction": 0.3, "k": None, "threshold": None, "seed": 0,
        "drop_below": None, "drop_fraction": None, "drop_share_from": "diffin_unrolled",
        "drop_column": "neg_clip_loss", "fill": "cluster", "cluster_power": 1.0, "stratify_by": None,
        "failed": "drop"}
    assert cfg.score_columns == ("diffin_unrolled", "neg_clip_loss") and cfg.reads_clusters
    assert SelectConfig(fraction=0.5) == SelectConfig(**{**RECIPE, "fraction": 0.5})
    # an empty select section is the recipe too
    assert RunConfig.model_validate({"data": {"shards": "x.tar"}, "trajectory": {"path": "t"},
                                     "select": {}}).select == SelectConfig(**RECIPE)


def test_a_default_selection_is_the_explicit_recipe_and_the_benchmarks(tmp_path: Path) -> None:
    files = scored_corpus(tmp_path)
    summary = select(files, SelectConfig(), tmp_path / "default")
    select(files, SelectConfig(**RECIPE), tmp_path / "explicit")
    assert same_bytes(tmp_path / "default", tmp_path / "explicit")
    # the benchmark's neg_clip_loss+share keeps the same pairs (its column, what kept.parquet carries
    # and the files' metadata record, is neg_clip_loss)
    select(files, Method.parse("neg_clip_loss+share").select_config(0.3, 0), tmp_path / "bench")
    assert same_bytes(tmp_path / "default", tmp_path / "bench", (KEPT_UIDS_FILE,))
    assert (pq.read_table(tmp_path / "default" / MANIFEST_FILE).to_pylist()
            == pq.read_table(tmp_path / "bench" / MANIFEST_FILE).to_pylist())
    # by hand: as many dropped as diffin_unrolled scores below 0, the lowest negCLIPLoss (ties by uid)
    rows = rows_of(files)
    harmful = sum(r["diffin_unrolled"] < 0 for r in rows)
    dropped = {r["uid"] for r in sorted(rows, key=lambda r: (r["neg_clip_loss"], -int(r["uid"], 16)))[:harmful]}
    kept = pq.read_table(tmp_path / "default" / KEPT_FILE).to_pylist()
    details = summary["drop_fill"]
    assert 0 < harmful < len(rows) - round_half_up(0.3, len(rows))  # the budget fills from the rest
    assert (details["below_zero"], details["dropped"], details["budget"]) == (harmful, harmful, 18)
    assert (details["drop_column"], details["drop_share_from"], details["fill"]) == (
        "neg_clip_loss", "diffin_unrolled", "cluster")
    assert len(kept) == 18 and not {r["uid"] for r in kept} & dropped
    assert [c["kept"] for c in details["clusters"]] == [c["quota"] for c in details["clusters"]]
    by_uid = {r["uid"]: r for r in rows}
    assert all(r["score"] == by_uid[r["uid"]]["diffin_unrolled"] for r in kept)  # kept.parquet: column


def test_the_default_runs_through_the_bounded_reducer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    files = scored_corpus(tmp_path)
    select(files, SelectConfig(), tmp_path / "memory", strategy="memory")

    def refuse(*args, **kwargs):
        raise AssertionError("the default select ran in memory")

    monkeypatch.setattr(select_stage, "select_in_memory", refuse)
    select(files, SelectConfig(), tmp_path / "auto")  # strategy auto
    assert same_bytes(tmp_path / "memory", tmp_path / "auto")


# ------------------------------------------------------------------------- the other rules


def test_top_fraction_named_selects_as_before(tmp_path: Path) -> None:
    files = scored_corpus(tmp_path)
    summary = select(files, SelectConfig(rule="top_fraction"), tmp_path / "out")
    rows = rows_of(files)
    best = sorted(rows, key=lambda r: (-r["diffin_unrolled"], int(r["uid"], 16)))[:18]
    kept = sorted(pq.read_table(tmp_path / "out" / KEPT_FILE).to_pylist(), key=lambda r: r["rank"])
    assert [r["uid"] for r in kept] == [r["uid"] for r in best]
    assert summary["rule"] == "top_fraction" and "drop_fill" not in summary
    assert summary["threshold_applied"] == best[-1]["diffin_unrolled"]
    assert summary["config"] == {"column": "diffin_unrolled", "rule": "top_fraction", "fraction": 0.3, "k": None,
                                 "threshold": None, "seed": None, "stratify_by": None, "failed": "drop"}


# sha256 of the settings (the selection fingerprint's select part) at the commit before the
# default changed: explicit configs of every other rule, and drop_fill with its drop named, keep them
BEFORE = {
    "top_fraction": ({"rule": "top_fraction"}, "64f0c0ac26ae9df9"),
    "top_fraction_tracin": ({"rule": "top_fraction", "column": "tracin", "fraction": 0.5}, "1d9b00c8398a4e53"),
    "top_k": ({"rule": "top_k", "k": 5}, "1fb951659518973c"),
    "threshold": ({"rule": "threshold", "threshold": 0.1}, "b600e7bddf061de1"),
    "random": ({"rule": "random", "fraction": 0.2, "seed": 3}, "a346b085658039ea"),
    "stratified": ({"rule": "top_fraction", "stratify_by": "lang"}, "144a1cd6b804ca9a"),
    "chain": ({"rule": "chain", "steps": [{"column": "neg_clip_loss", "fraction": 0.3},
                                          {"column": "norm_sim_inf", "fraction": 0.2}]}, "8c53f89d5dfbbccb"),
    "drop_below": ({"rule": "drop_fill", "drop_below": 0.0, "fill": "random"}, "277ea7da7d613270"),
    "drop_fraction": ({"rule": "drop_fill", "column": "clip_score", "drop_fraction": 0.35, "fill": "cluster"},
                      "d6ad02e30e02b8ed"),
}


@pytest.mark.parametrize("name", BEFORE)
def test_explicit_configs_keep_their_fingerprints(name: str) -> None:
    settings, digest = BEFORE[name]
    payload = json.dumps(SelectConfig(**settings).settings(), sort_keys=True)
    assert hashlib.sha256(payload.encode()).hexdigest()[:16] == digest


def test_the_drop_fill_defaults_do_not_touch_another_rule() -> None:
    cfg = SelectConfig(rule="top_fraction", fraction=0.5)
    assert cfg.score_columns == ("diffin_unrolled",) and not cfg.reads_clusters and cfg.drop_by == "diffin_unrolled"
    assert set(cfg.settings()) == {"column", "rule", "fraction", "k", "threshold", "seed", "stratify_by", "failed"}
    with pytest.raises(ValueError, match=r"'fill' is not used by rule 'top_fraction' \["):  # no default-rule hint
        SelectConfig(rule="top_fraction", fill="score")


# ----------------------------------------------------- defaults that depend on other keys


def parsed(tmp_path: Path, section: dict, method: str = "unrolled", **score) -> SelectConfig:
    config = run_config(tmp_path, section, method)
    config["score"].update(score)
    return parse_config(config).select


def one_line_error(tmp_path: Path, section: dict, method: str = "unrolled", **score) -> str:
    with pytest.raises(UsageError) as info:
        parsed(tmp_path, section, method, **score)
    assert "\n" not in str(info.value)
    return str(info.value)


def test_an_influence_column_brings_its_own_harm_count(tmp_path: Path) -> None:
    """``column: tracin`` under ``score.method: tracin``: the recipe counts tracin's harmful
    pairs (the estimate the user chose, one the method computes), no word about diffin_unrolled."""
    cfg = parsed(tmp_path, {"column": "tracin"}, "tracin")
    assert (cfg.rule, cfg.drop_share_from, cfg.drop_by, cfg.fill) == ("drop_fill", "tracin", "neg_clip_loss", "cluster")
    assert parsed(tmp_path, {"column": "tracin", "rule": "top_fraction"}, "tracin").score_columns == ("tracin",)
    # a column that is not an estimate leaves the count to diffin_unrolled
    assert parsed(tmp_path, {"column": "clip_score"}).drop_share_from == "diffin_unrolled"
    # a method without diffin_unrolled: one line naming the key to set, and to what
    message = one_line_error(tmp_path, {"column": "clip_score"}, "tracin")
    assert ("select.drop_share_from: the default 'diffin_unrolled' is not computed when score.method is 'tracin'"
            in message)
    assert message.endswith("set select.drop_share_from to one of tracin")
    message = one_line_error(tmp_path, {}, "tracin")
    assert "select.column: the default 'diffin_unrolled' is not computed when score.method is 'tracin'" in message
    assert "set select.column to one of tracin, clip_score" in message
    # named by the user: the message as before
    assert "select.drop_share_from: 'diffin_unrolled' is not computed" in one_line_error(
        tmp_path, {"column": "clip_score", "drop_share_from": "diffin_unrolled"}, "tracin")


def test_a_named_threshold_or_quantile_reads_column(tmp_path: Path) -> None:
    """drop_below / drop_fraction are the drop's size (the share is unset) on ``column`` unless
    drop_column is named: drop_below 0.0 on neg_clip_loss (never above 0) would drop everything."""
    below = parsed(tmp_path, {"drop_below": 0.0})
    assert (below.drop_share_from, below.drop_by, below.drop_below_applied) == (None, "diffin_unrolled", 0.0)
    quantile = parsed(tmp_path, {"column": "clip_score", "drop_fraction": 0.3})
    assert (quantile.drop_share_from, quantile.drop_by) == (None, "clip_score")
    assert parsed(tmp_path, {"drop_fraction": 0.3, "drop_column": "neg_clip_loss"}).drop_by == "neg_clip_loss"
    zero = parsed(tmp_path, {"drop_share_from": None})  # the estimate's own zero, on column
    assert (zero.drop_by, zero.drop_below_applied) == ("diffin_unrolled", 0.0)
    assert "not 'drop_below' and 'drop_share_from'" in one_line_error(
        tmp_path, {"drop_below": 0.0, "drop_share_from": "diffin_unrolled"})


def test_keys_of_another_rule_name_select_rule(tmp_path: Path) -> None:
    """drop_fill is unstratified: stratify_by without a rule is one line naming select.rule
    (never a silent switch to another rule); named with a rule that stratifies, it works."""
    fields = {"keep_json_fields": ["lang"]}
    message = one_line_error(tmp_path, {"stratify_by": "lang"}, **fields)
    assert "'stratify_by' is not used by rule 'drop_fill' (the default rule" in message
    assert "set select.rule, e.g. top_fraction, to stratify" in message
    assert parsed(tmp_path, {"rule": "top_fraction", "stratify_by": "lang"}, **fields).stratify_by == "lang"
    message = one_line_error(tmp_path, {"rule": "drop_fill", "stratify_by": "lang"}, **fields)
    assert message.endswith("'stratify_by' is not used by rule 'drop_fill'")
    assert "'threshold' is not used by rule 'drop_fill' (the default rule; set select.rule to use it)" in (
        one_line_error(tmp_path, {"threshold": 0.5}))


def test_the_default_fill_needs_clusters(tmp_path: Path) -> None:
    message = one_line_error(tmp_path, {}, embeddings={"clusters": 0})
    assert message.endswith("select.fill: 'cluster' (the default) needs the score files' cluster column; set "
                            "score.embeddings.clusters > 0, or select.fill: random")
    assert parsed(tmp_path, {"fill": "random"}, embeddings={"clusters": 0}).fill == "random"
    assert parsed(tmp_path, {"rule": "top_fraction"}, embeddings={"clusters": 0}).rule == "top_fraction"


# ------------------------------------------------------------------------------ config.json


@pytest.mark.parametrize("section, method", [
    ({}, "unrolled"), ({"column": "tracin"}, "tracin"), ({"drop_fraction": 0.3}, "unrolled"),
    ({"drop_share_from": None}, "unrolled"), ({"rule": "top_fraction", "fraction": 0.5}, "unrolled"),
    ({"rule": "drop_fill", "column": "clip_score", "drop_below": 0.2, "fill": "random"}, "unrolled"),
])
def test_config_json_reads_back_the_same(tmp_path: Path, section: dict, method: str) -> None:
    """config.json (pipeline.stages.pipeline: model_dump, every field) parses to the same config."""
    config = parse_config(run_config(tmp_path, section, method))
    again = parse_config(json.loads(json.dumps(config.model_dump(mode="json"))))
    assert again == config and again.select.settings() == config.select.settings()


def test_a_config_json_written_before_the_change_reads_as_it_was() -> None:
    """Before the recipe, config.json listed the drop_fill fields at their old defaults under
    every rule (fill: random, drop_share_from and drop_column null)."""
    old = {"cluster_power": 1.0, "column": "diffin_unrolled", "drop_below": None, "drop_column": None,
           "drop_fraction": None, "drop_share_from": None, "failed": "drop", "fill": "random", "fraction": 0.5,
           "k": None, "max_rows_in_memory": 1000000, "rule": "top_fraction", "seed": 0, "steps": None,
           "stratify_by": None, "threshold": None}
    top = SelectConfig(**old)
    assert top.settings() == SelectConfig(rule="top_fraction", fraction=0.5).settings()
    drop = SelectConfig(**{**old, "rule": "drop_fill"})  # the old drop_fill defaults: below 0 on column, random
    assert (drop.drop_share_from, drop.drop_by, drop.drop_below_applied, drop.fill) == (
        None, "diffin_unrolled", 0.0, "random")
