"""The bounded reducer: its pure parts (keys, search, quantiles, merge), and its outputs
compared byte for byte with the in-memory reducer's on the same score files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from pydantic import ValidationError

from pipeline.config import SelectConfig
from pipeline.data.uids import make_uid
from pipeline.errors import UsageError
from pipeline.stages.keep_rule import Rows, rule_order
from pipeline.stages.select import files as select_files
from pipeline.stages.select.bounded import driver
from pipeline.stages.select.bounded.driver import _row_groups
from pipeline.stages.select.bounded.keys import (RULE_WIDTHS, Search, count_le, depth, digits, interpolate, lex_le,
                                                lex_order, prefix_mask, quantile_positions, rule_key,
                                                score_from_key, score_key)
from pipeline.stages.select.bounded.merge import merge_sorted
from pipeline.stages.select import KEPT_FILE, KEPT_UIDS_FILE, MANIFEST_FILE, QUANTILES, SUMMARY_FILE, select
from tests.stages.scorefiles import write_score_file
from tests.stages.test_s3 import s3_server  # noqa: F401  (the moto S3 server fixture)

OUTPUTS = (KEPT_FILE, KEPT_UIDS_FILE, MANIFEST_FILE, SUMMARY_FILE)


# ----------------------------------------------------------------------------- pure parts


def test_score_key_sorts_like_the_scores() -> None:
    scores = np.array([3.5, -0.0, 0.0, -1e300, 1e-300, -2.0, 7.0, -1e-310, 5e-324, np.finfo(float).max])
    keys = score_key(scores)
    assert keys.dtype == np.uint64
    assert list(np.argsort(keys, kind="stable")) == list(np.argsort(scores, kind="stable"))
    assert keys[1] < keys[2]  # -0.0 just before +0.0
    assert [score_from_key(int(k)) for k in keys] == scores.tolist()
    assert np.signbit(score_from_key(int(keys[1])))


@pytest.mark.parametrize("rule", ["top_fraction", "random"])
def test_rule_key_orders_like_rule_order(rule: str) -> None:
    rng = np.random.default_rng(0)
    n = 400
    scores = rng.choice([0.5, -0.0, 0.0, 1.25, -3.0, 2.0], n)  # heavy ties, both zeros
    hi = rng.choice(np.array([1, 2, 2**63 + 5], np.uint64), n)  # repeated uids, too
    rows = Rows(hi=hi, lo=rng.integers(0, 3, n).astype(np.uint64), score=scores,
                file=rng.integers(0, 3, n).astype(np.int32), index=np.arange(n, dtype=np.int32)[::-1].copy(),
                stratum=np.zeros(n, np.int32))
    cfg = SelectConfig(rule=rule, seed=3) if rule == "random" else SelectConfig(rule=rule)
    primary = rule_key(rows, cfg.rule, cfg.seed)
    columns = [primary, rows.hi, rows.lo, rows.file.astype(np.uint64), rows.index.astype(np.uint64)]
    assert list(lex_order(columns)) == list(rule_order(rows, cfg))


def test_digits_prefixes_and_lex_le() -> None:
    rng = np.random.default_rng(1)
    n = 300
    columns = [rng.integers(0, 4, n).astype(np.uint64) << np.uint64(62), rng.integers(0, 2**63, n).astype(np.uint64),
               rng.integers(0, 2, n).astype(np.uint64), rng.integers(0, 3, n).astype(np.uint64),
               rng.integers(0, 5, n).astype(np.uint64)]
    assert depth(RULE_WIDTHS) == 16
    assert list(digits(columns, RULE_WIDTHS, 0)) == list((columns[0] >> np.uint64(48)).astype(int))
    assert list(digits(columns, RULE_WIDTHS, 13)) == list(columns[3].astype(int))  # file: 2 digits, the low one
    row = 17
    full = [int(d) for d in (digits(columns, RULE_WIDTHS, level)[row] for level in range(16))]
    same = np.all([c == c[row] for c in columns], axis=0)
    assert np.array_equal(prefix_mask(columns, RULE_WIDTHS, full), same)
    assert prefix_mask(columns, RULE_WIDTHS, full[:1]).sum() == (digits(columns, RULE_WIDTHS, 0) == full[0]).sum()
    keys = list(zip(*[c.tolist() for c in columns]))
    order = lex_order(columns)
    assert [keys[i] for i in order] == sorted(keys)
    ordered = [c[order] for c in columns]
    for bound in (keys[row], keys[0], (0, 0, 0, 0, 0), (2**64 - 1,) * 5, (keys[row][0], 0, 0, 0, 0)):
        expected = [k <= tuple(bound) for k in keys]
        assert lex_le(columns, bound).tolist() == expected
        for start in (0, 5, 299, 300):  # count_le: on sorted rows, from a start
            assert count_le(ordered, start, bound) == sum(k <= tuple(bound) for k in sorted(keys)[start:])


def test_search_descends_to_the_position() -> None:
    values = np.sort(np.random.default_rng(2).integers(0, 2**64 - 1, 1000, dtype=np.uint64, endpoint=True))
    for k in (0, 1, 499, 998, 999):
        search = Search("score", k, (), 1000)
        while not search.complete:
            level = len(search.prefix)
            inside = prefix_mask([values], (64,), search.prefix)
            search = search.descend(np.bincount(digits([values[inside]], (64,), level), minlength=1 << 16))
        assert search.count >= 1 and 0 <= search.k < search.count
        assert int(values[k]) == sum(d << (16 * (3 - i)) for i, d in enumerate(search.prefix))


@pytest.mark.parametrize("n", [1, 2, 3, 7, 10, 100, 101, 997])
def test_quantile_emulation_is_numpys_bits(n: int) -> None:
    rng = np.random.default_rng(n)
    for values in (rng.standard_normal(n), rng.standard_normal(n) * 1e300, rng.integers(-3, 3, n) * 0.1,
                   np.full(n, -0.0), rng.choice([-0.0, 1.0, -1e-320], n)):
        ordered = np.sort(values)
        lower, upper, gamma = quantile_positions(n, QUANTILES)
        ours = interpolate(ordered[lower], ordered[upper], gamma)
        with np.errstate(all="ignore"):
            theirs = np.quantile(values, QUANTILES)
        assert ours.tobytes() == theirs.tobytes()


def _runs(rng: np.random.Generator, n_runs: int, separated: bool) -> list[list[pa.RecordBatch]]:
    runs = []
    for r in range(n_runs):
        n = int(rng.integers(0, 60))
        a = np.sort(rng.integers(0, 5, n).astype(np.uint64) + np.uint64(100 * r if separated else 0))
        b = np.arange(n, dtype=np.uint64)  # with a: sorted, and unique per run (run number breaks ties)
        batch = pa.record_batch({"a": a, "run": np.full(n, r, np.uint64), "b": b})
        cuts = np.sort(rng.integers(0, n + 1, 3)) if n else []
        pieces = np.split(np.arange(n), cuts)
        runs.append([batch.take(pa.array(p)) for p in pieces])
    return runs


@pytest.mark.parametrize("separated", [False, True])
def test_merge_sorted_equals_sorting_everything(separated: bool) -> None:
    rng = np.random.default_rng(int(separated))
    for _ in range(20):
        runs = _runs(rng, int(rng.integers(1, 9)), separated)
        merged = list(merge_sorted(runs, ["a", "run", "b"]))
        got = pa.Table.from_batches(merged, schema=runs[0][0].schema) if merged else None
        everything = pa.Table.from_batches([b for r in runs for b in r])
        expected = everything.sort_by([("a", "ascending"), ("run", "ascending"), ("b", "ascending")])
        assert (got.to_pydict() if got is not None else {"a": [], "run": [], "b": []}) == expected.to_pydict()


def test_row_groups_recut_exactly() -> None:
    batches = [pa.record_batch({"x": np.arange(s, s + n)}) for s, n in ((0, 3), (3, 0), (3, 9), (12, 1))]
    cut = list(_row_groups(iter(batches), 5))
    assert [b.num_rows for b in cut] == [5, 5, 3]
    assert np.concatenate([b.column("x").to_numpy() for b in cut]).tolist() == list(range(13))


def test_budget_is_a_positive_setting_outside_the_effective_config() -> None:
    with pytest.raises(ValidationError, match="max_rows_in_memory"):
        SelectConfig(max_rows_in_memory=0)
    assert "max_rows_in_memory" not in SelectConfig(max_rows_in_memory=5).effective()


# ------------------------------------------------------------ bounded == in memory, bytes


def corpus(tmp_path: Path) -> list[Path]:
    """Five score files: ties within and across files (also on ±0.0), failed rows of every
    kind, a repeated uid within a file and across files, an empty file."""
    rng = np.random.default_rng(7)
    files = []
    shared = make_uid("dup", "x")
    for i in range(4):
        n = 23 + 5 * i
        scores: list[float | None] = list(rng.choice([0.25, 0.5, 1.0, 2.0], n // 2)) + list(rng.standard_normal(n - n // 2))
        scores[1], scores[2] = -0.0, 0.0
        statuses = ["ok"] * n
        statuses[3] = "decode_error"
        scores[4], scores[5], scores[6] = None, float("nan"), float("-inf")
        statuses[7] = "missing_text"
        uids = [make_uid(f"f{i}", str(j)) for j in range(n)]
        uids[8] = uids[9] = shared  # within the file, and the same uid in every file
        files.append(write_score_file(tmp_path / f"scores/{i:05d}.parquet", f"in/{i:05d}.tar", scores,
                                      statuses=statuses, uids=uids))
    files.append(write_score_file(tmp_path / "scores/empty.parquet", "in/empty.tar", []))
    return files


def zeros_at_the_cut(tmp_path: Path) -> list[Path]:
    """100 distinct scores over 3 files, ascending positions 30-33 being -0.0, 0.0, -0.0, 0.0:
    the top 70 % ends inside that tie; no quantile lands on it (positions 0, 1, 4, 5, 24, 25,
    49, 50, 74, 75, 94, 95, 98, 99)."""
    scores = np.concatenate([-np.arange(30, 0, -1) / 7.0, [-0.0, 0.0, -0.0, 0.0], np.arange(1, 67) / 3.0])
    order = np.random.default_rng(3).permutation(100)
    return [write_score_file(tmp_path / f"zeros/{i}.parquet", f"z/{i}.tar", list(scores[order[i::3]]))
            for i in range(3)]


CONFIGS = [
    SelectConfig(rule="top_fraction", fraction=0.3), SelectConfig(rule="top_fraction", fraction=0.7), SelectConfig(rule="top_fraction", fraction=1.0), SelectConfig(rule="top_fraction", fraction=0.01),
    SelectConfig(rule="top_k", k=1), SelectConfig(rule="top_k", k=37), SelectConfig(rule="top_k", k=10_000),
    SelectConfig(rule="threshold", threshold=0.5), SelectConfig(rule="threshold", threshold=0.0),
    SelectConfig(rule="threshold", threshold=99.0), SelectConfig(rule="random", fraction=0.4, seed=5),
    SelectConfig(rule="random", k=9, seed=0), SelectConfig(rule="top_fraction", column="tracin", fraction=0.5),
]


def same_outputs(files: list[Path], cfg: SelectConfig, tmp_path: Path, name: str) -> dict:
    reference = select(files, cfg, tmp_path / f"{name}-memory", strategy="memory")
    bounded = select(files, cfg, tmp_path / f"{name}-bounded", strategy="bounded")
    for output in OUTPUTS:
        assert ((tmp_path / f"{name}-memory" / output).read_bytes()
                == (tmp_path / f"{name}-bounded" / output).read_bytes()), (name, output)
    assert bounded == reference
    assert sorted(p.name for p in (tmp_path / f"{name}-bounded").iterdir()) == sorted(OUTPUTS)
    assert not list(tmp_path.glob(".*parts*"))  # the scratch directory is gone
    return bounded


@pytest.mark.parametrize("budget", [1, 4, 40, 1_000_000])
def test_bounded_outputs_are_byte_identical(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, budget: int) -> None:
    monkeypatch.setattr(select_files, "WRITE_BATCH_ROWS", 7)  # several row groups and manifest tables
    monkeypatch.setattr(driver, "_MIN_RUN_BATCH", 2)  # merges of many small batches
    files = corpus(tmp_path)
    kept = set()
    for i, cfg in enumerate(CONFIGS):
        cfg = cfg.model_copy(update={"max_rows_in_memory": budget})
        summary = same_outputs(files, cfg, tmp_path, f"c{i}")
        kept.add(summary["counts"]["kept"])
        assert summary["counts"]["failed"] == 20 and summary["failed_by_status"] == {
            "decode_error": 4, "missing_text": 4}
    assert summary["duplicate_kept_uids"] >= 0 and len(kept) > 5


def test_duplicates_and_both_zeros_at_the_cut(tmp_path: Path) -> None:
    summary = same_outputs(corpus(tmp_path), SelectConfig(rule="top_fraction", fraction=1.0, max_rows_in_memory=3), tmp_path, "all")
    assert summary["duplicate_kept_uids"] == 7  # one uid on 8 rows (2 in each of 4 files)
    files = zeros_at_the_cut(tmp_path)
    for budget in (1, 2, 1000):
        summary = same_outputs(files, SelectConfig(rule="top_fraction", fraction=0.7, max_rows_in_memory=budget), tmp_path, f"z{budget}")
        assert summary["threshold_applied"] == 0.0 and summary["counts"]["kept"] == 70
    for threshold in (0.0, -0.0):
        summary = same_outputs(files, SelectConfig(rule="threshold", threshold=threshold), tmp_path, f"t{threshold}")
        assert summary["counts"]["kept"] == 70


def test_many_equal_scores_beyond_the_budget(tmp_path: Path) -> None:
    """Most rows share one score: the searches run past the score bits into the uid."""
    files = [write_score_file(tmp_path / f"eq/{i}.parquet", f"eq/{i}.tar", [1.5] * 30 + [float(i)])
             for i in range(3)]
    for cfg in (SelectConfig(rule="top_k", k=40, max_rows_in_memory=5), SelectConfig(rule="top_fraction", fraction=0.5, max_rows_in_memory=2)):
        same_outputs(files, cfg, tmp_path, f"k{cfg.k}")


def test_empty_and_all_failed(tmp_path: Path) -> None:
    failed = write_score_file(tmp_path / "f.parquet", "f.tar", [None, None], statuses=["decode_error"] * 2)
    empty = write_score_file(tmp_path / "e.parquet", "e.tar", [])
    summary = same_outputs([failed, empty], SelectConfig(), tmp_path, "none")
    assert summary["counts"]["kept"] == 0 and summary["score_quantiles"] is None


def test_bounded_refuses_what_the_in_memory_path_refuses(tmp_path: Path) -> None:
    files = corpus(tmp_path)
    with pytest.raises(UsageError, match=r"20 rows are not scored ok.*decode_error: 4"):
        select(files, SelectConfig(rule="top_fraction", failed="error"), tmp_path / "out", strategy="bounded")
    assert not (tmp_path / "out").exists()
    with pytest.raises(UsageError, match="does not stratify"):
        select(files, SelectConfig(rule="top_fraction", stratify_by="lang"), tmp_path / "out", strategy="bounded")


@pytest.mark.ray
@pytest.mark.slow  # the default suite compares a Ray run's selection with the in-memory reducer: tests/stages/test_e2e_ray.py
def test_bounded_as_ray_tasks(tmp_path: Path) -> None:
    """The per-file work as Ray tasks (embedded local Ray) writes the same bytes."""
    import ray

    from pipeline.runtime.executor import RayExecutor, Resources

    files = corpus(tmp_path)
    cfg = SelectConfig(rule="top_fraction", fraction=0.4)  # one search pass: Ray tasks are slow to start (refining is tested above)
    select(files, cfg, tmp_path / "memory", strategy="memory")
    ray.init(address="local", num_cpus=2, include_dashboard=False)
    try:
        select(files, cfg, tmp_path / "ray", executor=RayExecutor(), resources=Resources(num_cpus=0.5))
    finally:
        ray.shutdown()
    for output in OUTPUTS:
        assert (tmp_path / "memory" / output).read_bytes() == (tmp_path / "ray" / output).read_bytes(), output


def test_bounded_reads_and_writes_a_bucket(s3_server, tmp_path: Path) -> None:
    """Score files and outputs in an S3 bucket (moto): the tasks run in process on a local
    scratch directory, and the objects equal the in-memory path's local files."""
    import s3fs

    from pipeline.io.storage import as_path

    fs = s3fs.S3FileSystem(**s3_server)
    fs.mkdir("reducer-test")
    files = corpus(tmp_path)
    for f in files:
        fs.put_file(str(f), f"reducer-test/scores/{f.name}")
    storage = {"s3": s3_server}
    cfg = SelectConfig(rule="top_fraction", fraction=0.4, max_rows_in_memory=4)
    select(files, cfg, tmp_path / "memory", strategy="memory")
    select([as_path(f"s3://reducer-test/scores/{f.name}", storage) for f in files], cfg,
           as_path("s3://reducer-test/selection", storage), strategy="bounded")
    for output in OUTPUTS:
        assert fs.cat_file(f"reducer-test/selection/{output}") == (tmp_path / "memory" / output).read_bytes(), output
    assert sorted(p.rsplit("/", 1)[1] for p in fs.ls("reducer-test/selection")) == sorted(OUTPUTS)
