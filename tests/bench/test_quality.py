"""Quality benchmark: selection through the real reducer, the noise-AUC sign convention,
retrieval recall by hand, the corpora's ground truth, and ``--quick`` end to end (schema,
subset sizes, seeded random rule). The quick run checks the machinery, not the outcome."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from jobs import bench as bench_job
from jobs import bench_quality
from pipeline.bench import quality
from pipeline.data.pairs import PairTable
from pipeline.data.uids import make_uid
from pipeline.errors import UsageError
from pipeline.influence.scores import COMPONENTS


def _half_up(fraction: float, n: int) -> int:
    return math.floor(fraction * n + 0.5)


# --------------------------------------------------------------------------- selection


def _table(n: int) -> PairTable:
    uids = [make_uid("quality-test", str(i)) for i in range(n)]
    shards = [f"mem/{i % 2:05d}.tar" for i in range(n)]  # two input shards, interleaved
    return PairTable(uids, [f"k{i}" for i in range(n)], shards, torch.zeros(n, 3, 4, 4, dtype=torch.uint8),
                     [f"caption {i}" for i in range(n)], {})


def _scores(values: np.ndarray, m: int = 2) -> dict[str, torch.Tensor]:
    n = len(values)
    col = torch.tensor(values, dtype=torch.float64)
    return {"diffin_unrolled": col * 3, "diffin": col, "diffin_eq9": -col, "tracin": col * 2, "clip_score": col.flip(0),
            **{c: torch.zeros(m, n, dtype=torch.float64) for c in COMPONENTS}}


def test_selection_goes_through_the_reducer(tmp_path: Path) -> None:
    n = 21
    table = _table(n)
    values = np.arange(n, dtype=np.float64) % 7  # ties: each value 3 times
    files = quality.write_score_files(table, _scores(values), tmp_path / "scores", "fp")
    assert len(files) == 2  # one score file per input shard
    kept = quality.select_uids(files, quality.selection_config("diffin", 0.3, 0), tmp_path / "s1")
    k = _half_up(0.3, n)
    # top by score, ties broken by uid ascending (the reducer's rule), computed independently
    expected = sorted(range(n), key=lambda i: (-values[i], table.uids[i]))[:k]
    assert sorted(kept) == sorted(table.uids[i] for i in expected) and len(kept) == k
    low = quality.select_uids(files, quality.selection_config("diffin_eq9", 0.3, 0), tmp_path / "s2")
    assert not set(low) & set(kept)  # the reversed column keeps the other end


def test_random_rule_is_seeded_and_matches_its_score(tmp_path: Path) -> None:
    n = 40
    table = _table(n)
    files = quality.write_score_files(table, _scores(np.zeros(n)), tmp_path / "scores", "fp")

    def pick(seed: int, name: str) -> list[str]:
        return quality.select_uids(files, quality.selection_config("random", 0.5, seed), tmp_path / name)

    first, again, other = pick(0, "a"), pick(0, "b"), pick(1, "c")
    assert first == again and first != other and len(first) == len(other) == 20
    # the score used for the random baseline's AUC orders pairs exactly as the rule keeps them
    score = quality.random_rule_scores(table.uids, 0)
    top = np.argsort(-score, kind="stable")[:20]
    assert sorted(table.uids[i] for i in top) == first


def test_fashion_ground_truth_and_corpus_reuse(tmp_path: Path) -> None:
    settings = quality.quick_settings()
    spec = quality.dataclasses.replace(settings.fashion_mnist, num_train=40, num_target=12, num_eval=20)
    data = quality.load_fashion_mnist(spec, tmp_path, 0.3)
    assert (len(data.train), len(data.target), len(data.eval)) == (40, 12, 20)
    assert int(data.noisy.sum()) == 12  # exactly round(0.3 * 40)
    meta = quality.read_json_meta(Path(data.corpus) / "train")
    for uid, flag in zip(data.train.uids, data.noisy):
        assert flag == meta[uid]["noisy"] == (meta[uid]["label"] != meta[uid]["caption_label"])
    assert not set(data.target.uids) & set(data.eval.uids)
    stamp = (Path(data.corpus) / "train" / "sizes.json").stat().st_mtime_ns
    assert quality.ensure_fashion_mnist(tmp_path, 0.3, 40) == Path(data.corpus)  # reused, not rebuilt
    assert (Path(data.corpus) / "train" / "sizes.json").stat().st_mtime_ns == stamp
    (Path(data.corpus) / "test" / "sizes.json").unlink()
    with pytest.raises(UsageError, match="not a complete"):
        quality.ensure_fashion_mnist(tmp_path, 0.3, 40)  # never overwrites what it cannot reuse


def test_presets_and_command() -> None:
    full, quick = quality.settings_for(), quality.settings_for(quick=True)
    assert full == quality.full_settings() and quick == quality.quick_settings()
    assert full.seeds == (0, 1, 2) and quick.seeds == (0,)
    assert quality.settings_for(seeds=2).seeds == (0, 1)
    assert quick.fashion_mnist.num_train < full.fashion_mnist.num_train
    for spec in (full.fashion_mnist, full.openclipart):
        assert spec.train.checkpoint_steps()[-1] == spec.train.steps
    with pytest.raises(UsageError, match="seeds"):
        quality.settings_for(seeds=0)
    assert quality.settings_for(noise=0.1).noise == 0.1 and full.noise == 0.3
    with pytest.raises(UsageError, match="--noise"):
        quality.settings_for(noise=1.0)
    with pytest.raises(UsageError, match="datasets"):
        quality.run_benchmark(quality.dataclasses.replace(quick, datasets=("mnist",)), "unused.json")
    parser = argparse.ArgumentParser()
    bench_quality.add_arguments(parser)
    assert bench_quality.settings(parser.parse_args([])) == full
    assert bench_quality.settings(parser.parse_args(["--quick", "--seeds", "2", "--workers", "3",
                                                     "--datasets", "openclipart", "--threads", "2", "--noise", "0.5"])) == (
        quality.settings_for(quick=True, seeds=2, workers=3, datasets=["openclipart"], threads=2, noise=0.5))
    assert bench_quality.command(parser.parse_args(["--quick"]), quality.DEFAULT_QUICK_OUT) == (
        "diffin bench quality --quick --out benchmarks/results/quality_quick.json --data-dir data --threads 1")


def test_checkpoint_window_keeps_the_recorded_cells_valid() -> None:
    """``InfluenceSettings.checkpoint_window``: at its default the settings fingerprint is the
    one the recorded cells carry (they stay valid); ``falling`` is other settings."""
    cells = quality.cells_path(Path(__file__).resolve().parents[2] / quality.DEFAULT_OUT)
    recorded = {c["settings"] for c in quality.read_cells(cells) if c["dataset"] == "fashion_mnist"}
    spec = quality.full_settings().fashion_mnist
    assert spec.influence.checkpoint_window == "all"
    assert quality.settings_fingerprint(spec, 0.3) in recorded
    falling = quality.dataclasses.replace(
        spec, influence=quality.dataclasses.replace(spec.influence, checkpoint_window="falling"))
    assert quality.settings_fingerprint(falling, 0.3) != quality.settings_fingerprint(spec, 0.3)


# --------------------------------------------------------------------------- --quick end to end


@pytest.fixture(scope="module")
def quick_report(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path]:
    root = tmp_path_factory.mktemp("quality")
    out = root / "results" / "quality.json"
    code = bench_job.main(["quality", "--quick", "--out", str(out), "--data-dir", str(root / "data")])
    assert code == 0
    return json.loads(out.read_text()), out


def _fraction(value: float) -> bool:
    return isinstance(value, float) and 0.0 <= value <= 1.0


def test_quick_run_schema(quick_report: tuple[dict, Path]) -> None:
    report, _ = quick_report
    assert set(report) == {"fashion_mnist", "openclipart", "_meta"}
    fm, oc = report["fashion_mnist"], report["openclipart"]
    assert set(fm) == {"keep_50", "keep_30", "full", "noise_auc"}
    assert set(oc) == {"keep_50", "keep_30", "full"}
    methods = set(quality.QUICK_METHODS)
    for budget in ("keep_50", "keep_30"):
        assert set(fm[budget]) == methods and set(oc[budget]) == methods - {"oracle"}  # no labels: no oracle
        for method in methods:
            entry = fm[budget][method]
            assert entry["seeds"] == 1 and _fraction(entry["acc_mean"]) and entry["acc_std"] is None  # one seed
        for method in methods - {"oracle"}:
            entry = oc[budget][method]
            assert {"r1_mean", "r1_std", "r5_mean", "r5_std"} <= set(entry)
            assert _fraction(entry["r1_mean"]) and _fraction(entry["r5_mean"]) and entry["r5_mean"] >= entry["r1_mean"]
    assert _fraction(fm["full"]["acc_mean"]) and _fraction(oc["full"]["r5_mean"])
    assert set(quality.SCORED) | {"random"} == set(fm["noise_auc"])
    assert {"neg_clip_loss", "norm_sim_2", "norm_sim_inf"} <= set(fm["noise_auc"])
    assert all(_fraction(v) for v in fm["noise_auc"].values())


def test_quick_run_subsets_and_ground_truth(quick_report: tuple[dict, Path]) -> None:
    report, out = quick_report
    meta = report["_meta"]
    settings = quality.quick_settings()
    retrains = [c for c in meta["cells"] if c["kind"] == "retrain"]
    scored = {c["dataset"]: c for c in meta["cells"] if c["kind"] == "scores"}
    assert set(scored) == {"fashion_mnist", "openclipart"} and all(c["seed"] == 0 for c in scored.values())
    for name in ("fashion_mnist", "openclipart"):
        n = settings.dataset(name).num_train
        assert meta["data"][name]["train"] == n
        for budget, fraction in (("keep_50", 0.5), ("keep_30", 0.3)):
            mine = [c for c in retrains if c["dataset"] == name and c["budget"] == budget]
            assert {c["n_kept"] for c in mine} == {_half_up(fraction, n)}
            assert len({c["kept_digest"] for c in mine}) > 3  # methods keep different pairs
    fm = scored["fashion_mnist"]
    assert fm["noisy_in_train"] == round(0.3 * settings.fashion_mnist.num_train)  # ground truth, exact
    assert report["fashion_mnist"]["noise_auc"] == pytest.approx(fm["noise_auc"])  # one seed: mean = the cell
    for cell in retrains:
        if cell["dataset"] == "fashion_mnist":
            assert _fraction(cell["kept_noisy_fraction"]) and sum(cell["class_counts"]) == cell["n_kept"]
            if cell["method"] == "oracle":  # 168 clean pairs fill both budgets: no mismatched pair kept
                assert cell["kept_noisy_fraction"] == 0.0
    assert meta["command"].startswith("diffin bench quality --quick --out ")
    assert Path(meta["cells_file"]) == quality.cells_path(out)


def test_quick_run_resumes_from_its_results_file(quick_report: tuple[dict, Path]) -> None:
    """A rerun computes nothing: every cell is in the results file, the scores are cached."""
    report, out = quick_report
    cells = quality.cells_path(out)
    before = cells.read_text()
    code = bench_job.main(["quality", "--quick", "--out", str(out), "--data-dir", str(out.parent.parent / "data")])
    assert code == 0 and cells.read_text() == before
    again = json.loads(out.read_text())
    assert again["fashion_mnist"] == report["fashion_mnist"] and again["openclipart"] == report["openclipart"]
    only = out.with_name("report_only.json")  # --report-only: nothing computed, the report from the cells
    quality.cells_path(only).write_text(before)
    code = bench_job.main(["quality", "--quick", "--report-only", "--out", str(only), "--data-dir", str(out.parent.parent / "data")])
    assert code == 0 and json.loads(only.read_text())["fashion_mnist"] == report["fashion_mnist"]


# --------------------------------------------------------------------------- methods and cells


def test_method_names_map_to_reducer_rules() -> None:
    from pipeline.bench.selections import CHEAP_DROP_FRACTION, Method

    top = Method.parse("clip_score").select_config(0.3, 0)
    assert (top.rule, top.column, top.fraction) == ("top_fraction", "clip_score", 0.3)
    drop = Method.parse("diffin_unrolled+drop").select_config(0.5, 7)
    assert (drop.rule, drop.fill, drop.drop_below, drop.drop_fraction, drop.seed) == ("drop_fill", "random", 0.0, None, 7)
    cheap = Method.parse("neg_clip_loss+cluster").select_config(0.5, 1)
    assert (cheap.fill, cheap.drop_fraction, cheap.drop_below) == ("cluster", CHEAP_DROP_FRACTION, None)
    # each method's drop reads its own column, whatever the config's defaults (the default recipe is
    # neg_clip_loss+share, whose drop column is neg_clip_loss; clip_score+share's is clip_score)
    assert (drop.drop_by, drop.drop_share_from, cheap.drop_by, cheap.drop_share_from) == (
        "diffin_unrolled", None, "neg_clip_loss", None)
    share = Method.parse("clip_score+share").select_config(0.5, 1)
    assert (share.column, share.drop_by, share.drop_share_from, share.fill) == (
        "clip_score", "clip_score", "diffin_unrolled", "cluster")
    chain = Method.parse("chain").select_config(0.3, 0)
    assert [(s.column, s.fraction) for s in chain.steps] == [("neg_clip_loss", 0.45), ("norm_sim_inf", 0.3)]
    assert Method.parse("oracle").select_config(0.3, 0) is None and Method.parse("oracle").needs_labels
    with pytest.raises(UsageError, match="unknown method 'clip_score\\+top'"):
        Method.parse("clip_score+top")
    assert quality.settings_for(methods=["random", "chain"]).methods == ("random", "chain")


def test_oracle_drops_every_mismatched_pair_then_follows_the_random_order() -> None:
    uids = [make_uid("oracle", str(i)) for i in range(10)]
    noisy = np.array([i % 3 == 0 for i in range(10)])  # 4 mismatched, 6 clean
    order = np.argsort(-quality.random_rule_scores(uids, 3), kind="stable")
    clean_first = [i for i in order if not noisy[i]] + [i for i in order if noisy[i]]
    assert quality.oracle_uids(uids, noisy, 0.5, 3) == sorted(uids[i] for i in clean_first[:5])
    assert quality.oracle_uids(uids, noisy, 0.8, 3) == sorted(uids[i] for i in clean_first[:8])  # 2 mismatched fill


def test_results_file_skips_a_torn_line_and_headroom_is_by_hand(tmp_path: Path) -> None:
    path = quality.cells_path(tmp_path / "q.json")
    assert path.name == "q_cells.jsonl"
    quality.append_cell(path, {"a": 1})
    with open(path, "a") as handle:
        handle.write('{"torn": ')  # a run killed mid-line
    assert quality.read_cells(path) == [{"a": 1}]
    rows = {"random": {"acc_mean": 0.6}, "oracle": {"acc_mean": 0.8}, "x": {"acc_mean": 0.75}}
    quality._add_headroom(rows, "acc")
    assert rows["x"]["headroom"] == pytest.approx(0.75) and rows["random"]["headroom"] == 0.0


def test_a_seed_whose_target_loss_does_not_fall_is_withheld() -> None:
    def scores(seed: int, losses: list[float], window: list[int] | None = None) -> dict:
        cell = {"kind": "scores", "seed": seed, "target_loss": losses, "full": {"acc": 0.5}}
        return {**cell, "scored_checkpoints": window} if window is not None else cell

    def retrain(seed: int, acc: float) -> dict:
        return {"kind": "retrain", "seed": seed, "budget": "keep_50", "method": "random", "metrics": {"acc": acc}}

    cells = [scores(0, [5.0, 4.0]), scores(1, [5.0, 4.0, 6.0]), scores(2, [5.0, 4.0, 6.0], window=[0, 1]),
             retrain(0, 0.6), retrain(1, 0.9), retrain(2, 0.7)]
    assert quality.target_loss_check(cells[0]) is None and quality.target_loss_check(cells[2]) is None
    assert "does not fall" in quality.target_loss_check(cells[1])
    report = quality.aggregate("fashion_mnist", cells, [0, 1, 2], ["random"])
    assert list(report["withheld"]) == ["1"] and "does not fall" in report["withheld"]["1"]
    assert report["keep_50"]["random"]["acc_mean"] == pytest.approx(0.65)  # seeds 0 and 2 only
    assert "seed 1 withheld" in quality.format_table({"fashion_mnist": report})
