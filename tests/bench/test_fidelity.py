"""Fidelity benchmark: metrics on hand-made inputs, the retraining protocol, the digits SGD
trainer's determinism and exact leave-out semantics, and a tiny end-to-end run (JSON schema)."""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr

from jobs import bench_fidelity
from pipeline.bench import fidelity
from pipeline.bench.digits import (DigitsSettings, MLPConfig, build_mlp, load_digits_data, mean_loss, unrolled_scores_of,
                                   score_run, train_mlp)
from pipeline.bench.metrics import METRIC_KEYS, lds, method_metrics, pearson, relative_error, spearman
from pipeline.bench.openmoji_clip import OpenMojiSettings, corpus_is_complete, ensure_openmoji
from pipeline.bench.protocol import half_subsets, loo_samples, measure_ground_truth, split_by_rank, with_renamed
from pipeline.config import TrainConfig
from pipeline.errors import UsageError
from pipeline.influence.objective import ClassifierObjective
from pipeline.influence.prepare import mean_loss_grad
from pipeline.influence.unrolled import UnrolledSettings
from pipeline.model.scorer import InfluenceSettings
from pipeline.model.train import batch_indices

# --------------------------------------------------------------------------- metrics


def test_pearson_by_hand() -> None:
    # x − x̄ = (−1, 0, 1), y − ȳ = (−4/3, −1/3, 5/3): r = 3 / √(2 · 42/9)
    assert pearson([1, 2, 3], [1, 2, 4]) == pytest.approx(3 / math.sqrt(2 * 42 / 9), rel=1e-12)
    assert pearson([1, 2, 3], [-2, -4, -6]) == pytest.approx(-1.0)
    assert pearson([1, 2, 3], [5, 5, 5]) is None  # undefined, not 0 and not NaN
    assert pearson([1], [2]) is None
    with pytest.raises(ValueError):
        pearson([1, 2, 3], [1, 2])


def test_spearman_by_hand() -> None:
    assert spearman([1, 2, 3, 4], [1, 4, 9, 100]) == pytest.approx(1.0)  # monotone, not linear
    assert pearson([1, 2, 3, 4], [1, 4, 9, 100]) < 0.9
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # ties get average ranks: (1.5, 1.5, 3) vs (1, 2, 3) → 1.5 / √(1.5 · 2)
    assert spearman([1, 1, 2], [1, 2, 3]) == pytest.approx(1.5 / math.sqrt(3.0))
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal(30), rng.standard_normal(30)
    assert spearman(x, y) == pytest.approx(spearmanr(x, y).statistic, rel=1e-12)
    assert spearman([1, 2, float("nan")], [1, 2, 3]) is None


def test_relative_error_by_hand() -> None:
    assert relative_error([3, 4], [3, 4]) == 0.0
    assert relative_error([0, 0], [3, 4]) == pytest.approx(1.0)  # the all-zero estimate
    assert relative_error([6, 8], [3, 4]) == pytest.approx(1.0)
    assert relative_error([3, 0], [0, 4]) == pytest.approx(5 / 4)
    assert relative_error([1, 1], [0, 0]) is None


def test_lds_uses_the_sum_over_removed_samples() -> None:
    scores = {"a": 1.0, "b": 2.0, "c": 3.0, "d": 4.0}
    removed = [["a", "b"], ["c", "d"], ["a", "d"]]  # predicted: 3, 7, 5
    assert lds(scores, removed, [0.1, 0.9, 0.5]) == pytest.approx(1.0)
    assert lds(scores, removed, [0.9, 0.1, 0.5]) == pytest.approx(-1.0)
    assert lds(scores, removed, [0.1, 0.5, 0.9]) == pytest.approx(0.5)
    with pytest.raises(ValueError):
        lds(scores, removed, [0.1, 0.2])


def test_method_metrics() -> None:
    scores = {"a": 1.0, "b": 2.0, "c": 3.0, "d": 4.0}
    loo_actual = np.array([2.0, 4.0, 6.0])
    got = method_metrics(scores, ["a", "b", "c"], loo_actual, [["a"], ["d"]], np.array([0.0, 1.0]))
    assert got == {"spearman_loo": pytest.approx(1.0), "pearson_loo": pytest.approx(1.0),
                   "relerr_loo": pytest.approx(0.5), "lds": pytest.approx(1.0)}
    assert method_metrics(None, ["a"], loo_actual, [], np.array([])) == dict.fromkeys(METRIC_KEYS)
    baseline = method_metrics(scores, ["a", "b", "c"], loo_actual, [["a"], ["d"]], np.array([0.0, 1.0]),
                              is_estimate=False)
    assert baseline["relerr_loo"] is None and baseline["spearman_loo"] == pytest.approx(1.0)


# --------------------------------------------------------------------------- protocol


UIDS = [f"{i:032x}" for i in range(50)]


def test_choices_are_by_uid_rank_not_position() -> None:
    train, target = split_by_rank(UIDS, 20, 10, seed=0)
    assert len(set(train)) == 20 and len(set(target)) == 10 and not set(train) & set(target)
    rev = list(reversed(UIDS))
    train_r, target_r = split_by_rank(rev, 20, 10, seed=0)
    assert {rev[i] for i in train_r} == {UIDS[i] for i in train}
    assert {rev[i] for i in target_r} == {UIDS[i] for i in target}
    assert split_by_rank(UIDS, 20, 10, seed=1) != (train, target)
    assert set(loo_samples(UIDS, 5, 0)) == set(loo_samples(rev, 5, 0))
    subsets = half_subsets(UIDS, 4, 0)
    assert [len(s) for s in subsets] == [25] * 4 and len({tuple(sorted(s)) for s in subsets}) == 4
    with pytest.raises(UsageError):
        split_by_rank(UIDS, 40, 20, seed=0)
    with pytest.raises(ValueError):
        with_renamed(UIDS, "f" * 32)


def test_measure_ground_truth_differences() -> None:
    weights = {u: float(i) for i, u in enumerate(UIDS[:10])}

    def loss(removed: set[str]) -> float:  # an additive "model": L_V rises by the removed weights
        return 1.0 + sum(weights[u] for u in removed)

    truth = measure_ground_truth(UIDS[:10], 1.0, loss, loo_count=4, lds_subsets=3, seed=0,
                                 renamed_loss=lambda uid: 1.0, noise_count=2)
    assert truth.loo_actual.tolist() == [weights[u] for u in truth.loo_uids]
    assert truth.lds_actual.tolist() == [sum(weights[u] for u in s) for s in truth.removed_sets]
    assert truth.noise_actual.tolist() == [0.0, 0.0]
    exact = method_metrics(weights, truth.loo_uids, truth.loo_actual, truth.removed_sets, truth.lds_actual)
    assert exact["relerr_loo"] == 0.0 and exact["lds"] == pytest.approx(1.0)


# --------------------------------------------------------------------------- digits trainer

CFG = MLPConfig(hidden=8, steps=24, batch_size=16, lr=0.3, checkpoints=3, seed=2)


@pytest.fixture(scope="module")
def digits():
    return load_digits_data().subset(range(400))


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_digits_data() -> None:
    data = load_digits_data()
    assert len(data) == 1797 and data.x.shape == (1797, 64) and data.x.dtype == torch.float64
    assert float(data.x.min()) == 0.0 and float(data.x.max()) == 1.0 and set(data.y.tolist()) == set(range(10))
    assert len(set(data.uids)) == 1797


def test_trainer_is_plain_sgd(digits) -> None:
    cfg = replace(CFG, steps=2, checkpoints=1)
    model = build_mlp(cfg)
    objective = ClassifierObjective(model)
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    schedule = cfg.lr_schedule()
    for step, idx in enumerate(batch_indices(digits.uids, cfg.seed, cfg.batch_size, cfg.steps)):
        grad = mean_loss_grad(objective, params, [(digits.x[idx], digits.y[idx])])
        params = {k: params[k] - schedule.lr_at(step) * grad[k] for k in params}
    run = train_mlp(digits, cfg, keep_checkpoints=True)
    assert _same(run.params, params)
    assert [s.step for s in run.checkpoints] == [2] and _same(run.checkpoints[0].params, params)


def test_trainer_is_deterministic_and_order_follows_uids(digits) -> None:
    a = train_mlp(digits, CFG, keep_checkpoints=True)
    b = train_mlp(digits, CFG, keep_checkpoints=True)
    assert _same(a.params, b.params) and a.losses == b.losses
    assert [(s.step, s.lr) for s in a.checkpoints] == [(8, CFG.lr_schedule().lr_at(8)),
                                                       (16, CFG.lr_schedule().lr_at(16)),
                                                       (24, CFG.lr_schedule().lr_at(23))]
    shuffled = digits.subset(list(reversed(range(len(digits)))))  # same samples, other positions
    assert _same(train_mlp(shuffled, CFG).params, a.params)
    assert not _same(train_mlp(digits, replace(CFG, seed=3)).params, a.params)


def test_leave_out_changes_only_what_it_must(digits) -> None:
    full = train_mlp(digits, CFG, keep_checkpoints=True)
    order = list(batch_indices(digits.uids, CFG.seed, CFG.batch_size, CFG.steps))
    seen_before = {digits.uids[i] for batch in order[:8] for i in batch}
    victim = next(digits.uids[i] for i in order[9] if digits.uids[i] not in seen_before)
    loo = train_mlp(digits, CFG, exclude=[victim], keep_checkpoints=True)
    assert _same(loo.checkpoints[0].params, full.checkpoints[0].params)  # step 8: victim not yet seen
    assert not _same(loo.checkpoints[1].params, full.checkpoints[1].params)  # step 16: it was
    assert _same(loo.params, train_mlp(digits.without([victim]), CFG).params)  # exclusion = absence
    assert _same(train_mlp(digits, CFG, exclude=["f" * 32]).params, full.params)  # unknown uid: no-op
    renamed = train_mlp(replace(digits, uids=with_renamed(digits.uids, victim)), CFG)
    assert not _same(renamed.params, full.params)  # same data, other order: the noise floor


def test_digits_scores_have_the_design_identity(digits) -> None:
    train, target = digits.subset(range(80)), digits.subset(range(80, 120))
    model = build_mlp(CFG)
    run = train_mlp(train, CFG, keep_checkpoints=True)
    scores = score_run(run, model, train, target, CFG)
    assert set(scores) == {"tracin", "diffin_eq9", "diffin"}
    unrolled = unrolled_scores_of(run, model, train, target, CFG, proxy_batch_size=16)
    assert unrolled.shape == (80,) and torch.isfinite(unrolled).all()
    assert all(v.shape == (80,) and torch.isfinite(v).all() for v in scores.values())
    assert torch.allclose(scores["diffin"], scores["tracin"] + CFG.steps * scores["diffin_eq9"], rtol=1e-10)
    assert math.isfinite(mean_loss(model, run.params, target))


# --------------------------------------------------------------------------- end to end

TINY_OPENMOJI = OpenMojiSettings(
    num_train=24, num_target=20,
    train=TrainConfig(model="tiny-clip-32", steps=4, batch_size=8, lr=1e-3, warmup=1, checkpoints=2, seed=0),
    influence=InfluenceSettings(bank_size=7, batch_size=16, proxy_batch_size=8, adam=True,
                              unrolled=UnrolledSettings(lanczos_steps=4)),
    loo=3, lds_subsets=3, noise=1, corpus_limit=120)
TINY_DIGITS = DigitsSettings(num_train=60, num_target=40, mlp=replace(CFG, steps=12), loo=4, lds_subsets=3, noise=1)


def test_corpus_reuse_rules(tmp_path: Path) -> None:
    built = ensure_openmoji(tmp_path, limit=20)
    assert corpus_is_complete(built, limit=20) and not corpus_is_complete(built, limit=None)
    mtime = (built / "sizes.json").stat().st_mtime_ns
    assert ensure_openmoji(tmp_path, limit=20) == built and (built / "sizes.json").stat().st_mtime_ns == mtime
    with pytest.raises(UsageError, match="not a complete OpenMoji corpus"):
        ensure_openmoji(tmp_path, limit=None)  # never overwrites a directory it cannot reuse


def test_tiny_run_writes_the_schema(tmp_path: Path) -> None:
    settings = fidelity.FidelitySettings(openmoji=TINY_OPENMOJI, digits=TINY_DIGITS)
    out = tmp_path / "results" / "fidelity.json"
    report = fidelity.run_benchmark(settings, out, data_dir=tmp_path / "data", command="test")
    on_disk = json.loads(out.read_text())
    assert on_disk == json.loads(json.dumps(report))
    assert set(on_disk) == {"openmoji", "digits", "_meta"}
    for dataset in ("openmoji", "digits"):
        assert set(on_disk[dataset]) == set(fidelity.METHODS)
        for metrics in on_disk[dataset].values():
            assert set(metrics) == set(METRIC_KEYS)
            for key in ("spearman_loo", "pearson_loo", "lds"):
                assert metrics[key] is None or -1.0 - 1e-9 <= metrics[key] <= 1.0 + 1e-9
            assert metrics["relerr_loo"] is None or metrics["relerr_loo"] >= 0.0
        assert on_disk[dataset]["random"]["relerr_loo"] is None
    for method in ("tracin_adam", "clip_score"):
        assert on_disk["digits"][method] == dict.fromkeys(METRIC_KEYS)
    for method in ("diffin", "diffin_eq9", "tracin", "tracin_adam"):
        assert on_disk["openmoji"][method]["relerr_loo"] is not None
    meta = on_disk["_meta"]
    assert meta["command"] == "test" and meta["seconds_total"] > 0
    for dataset, counts in (("openmoji", TINY_OPENMOJI), ("digits", TINY_DIGITS)):
        truth = meta["datasets"][dataset]["truth"]
        assert (truth["loo_count"], truth["lds_subsets"], truth["noise_count"]) == (counts.loo, counts.lds_subsets, 1)
        assert meta["datasets"][dataset]["settings"]["seed"] == 0
    assert meta["datasets"]["openmoji"]["data"]["bank"] == 7
    assert set(meta["datasets"]["digits"]["score_stats"]) == {"diffin_unrolled", "diffin", "diffin_eq9", "tracin"}
    assert set(meta["datasets"]["openmoji"]["score_stats"]) == {"diffin_unrolled", "diffin_unrolled_adam", "diffin",
                                                                "diffin_eq9", "tracin", "tracin_adam", "clip_score",
                                                                "neg_clip_loss", "norm_sim_2", "norm_sim_inf"}
    for method in ("diffin_unrolled", "diffin_unrolled_adam"):
        assert on_disk["openmoji"][method]["relerr_loo"] is not None
    assert on_disk["digits"]["diffin_unrolled"]["relerr_loo"] is not None
    assert set(meta["datasets"]["digits"]["variants"]) == {
        "unrolled_f_exp", "unrolled_full_hessian", "unrolled_K5", "unrolled_K10", "unrolled_K40",
        "unrolled_m1", "unrolled_m2", "unrolled_m5", "unrolled_m10"}  # 12 steps: m = 20 does not fit
    assert set(meta["datasets"]["openmoji"]["variants"]) == {"unrolled_f_exp", "unrolled_adam_floor0.0001",
                                                             "unrolled_adam_floor0.001"}
    for dataset in ("openmoji", "digits"):
        assert meta["datasets"][dataset]["truth"]["lds_ceiling"] is None or 0 <= meta["datasets"][dataset]["truth"]["lds_ceiling"] <= 1
    assert "unrolled_m1" in fidelity.format_table(on_disk)


def test_presets_and_command_line(tmp_path: Path) -> None:
    quick = fidelity.settings_for(quick=True, seed=3, datasets=["digits"])
    assert quick.datasets == ("digits",) and quick.seed == 3 and quick.digits.mlp.seed == 3
    assert quick.openmoji.train.seed == 3 and quick.openmoji.influence.seed == 3
    full = fidelity.full_settings()
    assert fidelity.settings_for() == full
    assert full.openmoji.loo >= 40 and full.digits.loo >= 40
    assert full.openmoji.lds_subsets >= 32 and full.digits.lds_subsets >= 32
    assert quick.digits.loo < full.digits.loo and quick.openmoji.train.steps < full.openmoji.train.steps
    tuned = fidelity.settings_for(loo=7, lds_fraction=0.25, sweep=False, digits_steps=50, threads=2)
    assert (tuned.openmoji.loo, tuned.openmoji.lds_fraction, tuned.openmoji.sweep) == (7, 0.25, False)
    assert tuned.digits.mlp.steps == 50 and tuned.threads == 2 and tuned.datasets == full.datasets
    parser = argparse.ArgumentParser()
    bench_fidelity.add_arguments(parser)
    assert bench_fidelity.settings(parser.parse_args(["--quick", "--seed", "3", "--datasets", "digits"])) == quick
    assert bench_fidelity.settings(parser.parse_args(["--loo", "7", "--lds-fraction", "0.25", "--no-sweep",
                                                      "--digits-steps", "50", "--threads", "2"])) == tuned
    assert bench_fidelity.command(parser.parse_args(["--quick"]), fidelity.DEFAULT_QUICK_OUT) == (
        "diffin bench fidelity --quick --out benchmarks/results/fidelity_quick.json --data-dir data --threads 1")
    assert bench_fidelity.command(parser.parse_args(["--datasets", "digits", "--no-sweep", "--seed", "1"]), "a b.json") == (
        "diffin bench fidelity --out 'a b.json' --data-dir data --threads 1 --datasets digits --seed 1 --no-sweep")
    with pytest.raises(UsageError):
        fidelity.run_benchmark(replace(full, datasets=("mnist",)), tmp_path / "x.json")
