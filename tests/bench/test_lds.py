"""``diffin bench lds``: the CLIP LDS machinery on tiny data (``--quick``): resumption skips
finished cells, the LDS is a hand-computed Spearman of the recorded cells, the standard error
is finite, subsets and orders are deterministic, the full retrain under order 0 is the proxy
the scores were computed on. The quick run checks the machinery, not the outcome."""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import spearmanr

from jobs import bench as bench_job
from jobs import bench_lds
from pipeline.bench import lds
from pipeline.bench.fidelity import random_scores
from pipeline.bench.metrics import bootstrap_rows, bootstrap_spearman, spearman, standard_error
from pipeline.bench.protocol import (half_subsets, lds_ceiling, order_noise, order_noise_variance,
                                     order_split_reliability, reordered_uid)
from pipeline.bench.quality import read_cells
from pipeline.errors import UsageError


@pytest.fixture(scope="module")
def quick(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path, Path]:
    root = tmp_path_factory.mktemp("lds")
    out, data = root / "results" / "fidelity_clip.json", root / "data"
    assert bench_job.main(["lds", "--quick", "--out", str(out), "--data-dir", str(data)]) == 0
    return json.loads(out.read_text()), out, data


def _cells(out: Path) -> list[dict]:
    return read_cells(lds.cells_path(out))


def test_quick_run_schema_and_counts(quick: tuple[dict, Path, Path]) -> None:
    report, out, _ = quick
    settings = lds.quick_settings()
    meta = report["_meta"]
    assert meta["command"].startswith("diffin bench lds --quick --out ")
    assert meta["counts"]["retrains_done"] == meta["counts"]["retrains_wanted"] == (settings.subsets + 1) * 2
    cells = _cells(out)
    assert sum(c["kind"] == "scores" for c in cells) == 1
    scores = next(c for c in cells if c["kind"] == "scores")
    assert {"diffin_unrolled", "diffin_unrolled_adam", "tracin", "tracin_adam", "diffin", "diffin_eq9", "clip_score",
            "neg_clip_loss", "norm_sim_2", "norm_sim_inf", "diffin_unrolled_zs", "tracin_zs"} == set(scores["scores"])
    for target in lds.TARGETS:
        part = report["seed0"][target]
        assert part["truth"]["subsets"] == settings.subsets and part["truth"]["orders"] == 2
        columns = part["columns"]
        assert "diffin_unrolled" in columns and "random" in columns
        for name, entry in columns.items():
            assert -1 <= entry["lds"] <= 1 and np.isfinite(entry["lds_se"]) and entry["lds_se"] >= 0
            assert len(entry["lds_per_order"]) == 2
            assert ("gap_to_default" in entry) == (name != "diffin_unrolled")
        assert part["goal"] is None or set(part["goal"]) >= {"lds_met", "closest", "above_every_method_met"}
    assert "diffin_unrolled_zs" in lds.format_table(report)


def test_full_retrain_under_order_zero_is_the_scored_proxy(quick: tuple[dict, Path, Path]) -> None:
    _, out, _ = quick
    cells = _cells(out)
    scores = next(c for c in cells if c["kind"] == "scores")
    full = {c["order"]: c for c in cells if c["kind"] == "retrain" and c["subset"] == lds.FULL}
    # same data, seed and order as the proxy: L_V with the scores' bank and V is the last checkpoint's
    assert full[0]["target_loss"] == pytest.approx(scores["target_loss"][-1], abs=1e-5)
    assert full[0]["zero_shot_loss"] == pytest.approx(scores["zero_shot_target_loss"][-1], abs=1e-5)
    assert full[1]["target_loss"] != full[0]["target_loss"]  # another visiting order, another model
    assert 0 <= full[0]["acc"] <= 1


def test_lds_is_the_spearman_of_the_recorded_cells(quick: tuple[dict, Path, Path]) -> None:
    report, out, _ = quick
    settings = lds.quick_settings()
    cells = _cells(out)
    scores = next(c for c in cells if c["kind"] == "scores")
    loss = {(c["subset"], c["order"]): c["target_loss"] for c in cells if c["kind"] == "retrain"}
    effect = [np.mean([loss[(j, o)] - loss[(-1, o)] for o in (0, 1)]) for j in range(settings.subsets)]
    sets = half_subsets(scores["uids"], settings.subsets, 0, settings.fraction)
    for column, values in (("diffin_unrolled", dict(zip(scores["uids"], scores["scores"]["diffin_unrolled"]))),
                           ("random", random_scores(scores["uids"], 0))):
        predicted = [sum(values[u] for u in s) for s in sets]
        assert report["seed0"]["bank"]["columns"][column]["lds"] == pytest.approx(
            spearmanr(predicted, effect).statistic, abs=1e-12)
    truth = report["seed0"]["bank"]["truth"]
    first = [loss[(j, 0)] - loss[(-1, 0)] for j in range(settings.subsets)]
    second = [loss[(j, 1)] - loss[(-1, 1)] for j in range(settings.subsets)]
    assert truth["order_split"]["spearman"] == pytest.approx(spearmanr(first, second).statistic, abs=1e-12)


def test_a_rerun_resumes_and_skips_finished_cells(quick: tuple[dict, Path, Path]) -> None:
    report, out, data = quick
    settings = lds.quick_settings()
    cells_file = lds.cells_path(out)
    lines = cells_file.read_text().splitlines()
    again = lds.run_benchmark(settings, out, data)
    assert again["_meta"]["counts"]["cells_written_this_run"] == 0
    assert cells_file.read_text().splitlines() == lines
    assert again["seed0"]["bank"]["columns"] == report["seed0"]["bank"]["columns"]
    # a killed run: its last retrain missing, a torn line after it; the rerun redoes that cell only
    last = json.loads(lines[-1])
    cells_file.write_text("\n".join(lines[:-1]) + "\n" + lines[-1][:20])
    resumed = lds.run_benchmark(settings, out, data)
    assert resumed["_meta"]["counts"]["cells_written_this_run"] == 1
    key = (last["subset"], last["order"])
    redone = [c for c in _cells(out) if c["kind"] == "retrain" and (c["subset"], c["order"]) == key]
    assert len(redone) == 1 and redone[0]["target_loss"] == pytest.approx(last["target_loss"], abs=1e-9)
    only = lds.run_benchmark(dataclasses.replace(settings, subsets=6), out, data, report_only=True)
    assert only["_meta"]["counts"]["cells_written_this_run"] == 0
    assert only["seed0"]["bank"]["truth"]["subsets"] == settings.subsets  # what is measured, nothing more


def test_more_subsets_or_orders_keep_the_finished_cells(quick: tuple[dict, Path, Path]) -> None:
    _, out, _ = quick
    settings = lds.quick_settings()
    cells, print_ = _cells(out), lds.fingerprint(settings)
    assert lds.pending_work(settings, cells, print_) == ([], [])
    assert lds.pending_work(dataclasses.replace(settings, subsets=5), cells, print_) == ([], [(0, 4, 0), (0, 4, 1)])
    score, retrains = lds.pending_work(dataclasses.replace(settings, orders=3, seeds=(0, 1)), cells, print_)
    assert score == [1] and retrains[:2] == [(0, -1, 2), (0, 0, 2)] and len(retrains) == 5 + 5 * 3
    assert lds.fingerprint(dataclasses.replace(settings, subsets=50, orders=4, workers=3)) == print_
    assert lds.fingerprint(dataclasses.replace(settings, fraction=0.1)) != print_
    jobs = lds.plan_chunks(dataclasses.replace(settings, workers=2), "d", Path("c"), print_, Path("w"), [0, 1],
                           [(0, j, 0) for j in range(5)])
    assert [j.score_seeds for j in jobs] == [(0,), (1,)] and [len(j.retrains) for j in jobs] == [3, 2]


def test_subsets_and_orders_are_deterministic() -> None:
    uids = [f"u{i:03d}" for i in range(200)]
    first = half_subsets(uids, 20, 0, 0.1)
    assert first == half_subsets(uids, 20, 0, 0.1) and half_subsets(uids, 5, 0, 0.1) == first[:5]
    assert all(len(s) == 20 == len(set(s)) for s in first) and first != half_subsets(uids, 20, 1, 0.1)
    assert reordered_uid("a", 0) == "a" and len({"a", reordered_uid("a", 1), reordered_uid("a", 2)}) == 3
    assert reordered_uid("a", 1) == reordered_uid("a", 1)
    with pytest.raises(ValueError):
        reordered_uid("a", -1)


def test_noise_floor_and_standard_error_by_hand() -> None:
    effects = np.array([[1.0, 1.2], [2.0, 1.8], [3.0, 3.4], [4.0, 3.6]])
    d = effects[:, 0] - effects[:, 1]
    # two orders: the residual variance is var(d, ddof 1) / 2; of the mean of the 2 orders, half that
    assert order_noise_variance(effects) == pytest.approx(d.var(ddof=1) / 2)
    assert order_noise(effects) == pytest.approx(np.abs(d - d.mean()) / 2 * np.sqrt(4 / 3))
    shifted = effects + np.array([0.0, 5.0])  # the full set's own noise shifts a whole order: not noise
    assert order_noise_variance(shifted) == pytest.approx(order_noise_variance(effects))
    split = order_split_reliability(effects)
    r = np.corrcoef(effects[:, 0], effects[:, 1])[0, 1]
    assert split["spearman"] == pytest.approx(1.0) and split["pearson"] == pytest.approx(r)
    assert split["mean_reliability"] == pytest.approx(2 * r / (1 + r))
    mean = effects.mean(1)
    noise = d.var(ddof=1) / 4
    assert lds_ceiling(mean, order_noise(effects)) == pytest.approx(np.sqrt(1 - noise / mean.var()))
    rows = bootstrap_rows(4, 200, seed=3)
    assert (rows == bootstrap_rows(4, 200, seed=3)).all() and rows.shape == (200, 4)
    x, y = np.array([1.0, 3.0, 2.0, 4.0]), np.array([0.1, 0.2, 0.3, 0.4])
    identity = np.tile(np.arange(4), (3, 1))
    assert bootstrap_spearman(x, y, identity) == pytest.approx([spearman(x, y)] * 3)
    boots = bootstrap_spearman(x, y, rows)  # a resample of one distinct subset has no correlation: NaN
    se = standard_error(boots)
    assert se is not None and np.isfinite(se) and se == pytest.approx(np.nanstd(boots, ddof=1))
    with pytest.raises(ValueError):
        order_noise(effects[:, :1])


def test_goal_check_compares_with_the_other_methods() -> None:
    columns = {"diffin_unrolled": {"lds": 0.6}, "unrolled_f_exp": {"lds": 0.6, "gap_to_default": 0.0, "gap_se": 0.01},
               "tracin": {"lds": 0.3, "gap_to_default": 0.3, "gap_se": 0.1},
               "random": {"lds": 0.0, "gap_to_default": 0.6, "gap_se": 0.1}}
    goal = lds.goal_check(columns)
    assert goal is not None and goal["lds_met"] and goal["closest"] == "tracin"
    assert goal["closest_gap_in_se"] == pytest.approx(3.0) and goal["above_every_method_met"]
    columns["tracin"] = {"lds": 0.5, "gap_to_default": 0.1, "gap_se": 0.1}
    assert not lds.goal_check(columns)["above_every_method_met"]
    assert lds.goal_check({"diffin_unrolled": {"lds": None}}) is None
    columns["tracin"] = {"lds": 0.6, "gap_to_default": 0.0, "gap_se": 0.0}  # the same ranking: not above it
    assert lds.goal_check(columns)["closest"] == "tracin" and not lds.goal_check(columns)["above_every_method_met"]


def test_settings_and_command_line() -> None:
    full = lds.full_settings()
    assert (full.subsets, full.orders, full.seeds, full.fraction) == (200, 2, (0, 1), 0.1)
    assert not full.cosine and full.zero_shot and full.influence.adam
    assert full.warm_start == 300 and full.train.checkpoint_steps() == list(range(50, 401, 50))
    assert lds.seeded(full, 1)[1].checkpoints == (5, 6, 7)  # the scores read steps 300, 350, 400
    scratch = lds.scratch_settings()
    assert scratch.warm_start is None and scratch.train.checkpoints == 4 and lds.seeded(scratch, 0)[1].checkpoints is None
    # the first design's 97 committed cells (benchmarks/results/fidelity_clip_scratch_cells.jsonl) stay its own
    assert lds.fingerprint(scratch) == "eb2309f0415fb9b7" != lds.fingerprint(full)
    parser = argparse.ArgumentParser()
    bench_lds.add_arguments(parser)
    assert bench_lds.settings(parser.parse_args([])) == full
    args = parser.parse_args(["--seeds", "1", "--subsets", "50", "--orders", "3", "--workers", "1", "--cosine"])
    assert bench_lds.settings(args) == lds.settings_for(seeds=1, subsets=50, orders=3, workers=1, cosine=True)
    assert bench_lds.command(parser.parse_args(["--workers", "2"]), lds.DEFAULT_OUT) == (
        "diffin bench lds --out benchmarks/results/fidelity_clip.json --data-dir data --threads 1 --workers 2")
    for bad in ({"fraction": 0.0}, {"fraction": 1.5}, {"seeds": 0}):
        with pytest.raises(UsageError):
            lds.settings_for(**bad)
    with pytest.raises(UsageError, match="orders"):
        lds.check_settings(dataclasses.replace(full, orders=1))
    assert bench_lds.settings(parser.parse_args(["--from-scratch"])) == lds.scratch_settings()
    assert bench_lds.default_out(parser.parse_args(["--from-scratch"])) == lds.DEFAULT_SCRATCH_OUT
    assert bench_lds.default_out(parser.parse_args([])) == lds.DEFAULT_OUT
    assert bench_lds.settings(parser.parse_args(["--warm-start", "200"])).warm_start == 200
    for bad in (["--warm-start", "310"], ["--warm-start", "400"], ["--from-scratch", "--quick"]):
        with pytest.raises(UsageError):
            bench_lds.settings(parser.parse_args(bad))
