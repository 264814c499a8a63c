"""``diffin report`` with several selections: the comparison's numbers against a hand computation
on a 10-pair run, and the page of a one-selection run left as it was."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from jobs.cli import main as cli_main
from pipeline.config import SelectConfig
from pipeline.data.uids import make_uid
from pipeline.errors import UsageError
from pipeline.io.scores import SCORE_COLUMNS
from pipeline.report.build import gather, write_report
from pipeline.report.compare_view import comparison_sections
from pipeline.report.compare import (DEFAULT_LABEL, POOL_LABEL, QUANTILES, distinct_count, overlap,
                                     shared_count)
from pipeline.stages.select import UID_DTYPE, select
from tests.report.conftest import add_selection
from tests.report.pagecheck import parse
from tests.stages.scorefiles import write_score_file

# 10 pairs in 2 files; pair 9 failed. tracin (and neg_clip_loss) fall and clip_score rises with
# the index; the other score columns are empty (fewer plots: a fast test).
TRACIN = [0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1, None]
CLIP = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, None]
CLUSTER = [0, 0, 0, 1, 1, 1, 2, 2, 2, None]
SOURCE = ["a", "a", "b", "b", "b", "c", "c", "c", "c", None]
# by hand: (default) top 50 % of 9 on tracin keeps 5 (round half up): pairs 0-4; clip top 3 on
# clip_score: 6-8; mid clip_score >= 0.35: 3-8
KEPT = {DEFAULT_LABEL: [0, 1, 2, 3, 4], "clip": [6, 7, 8], "mid": [3, 4, 5, 6, 7, 8]}


def _uid(i: int) -> str:
    return make_uid("cmp", str(i))


def _score_files(scores: Path, fingerprint: str = "cfg-fp") -> list[Path]:
    files = []
    for part, rows in enumerate((range(0, 5), range(5, 10))):
        rows = list(rows)
        files.append(write_score_file(
            scores / f"{part:05d}.parquet", f"corpus/{part:05d}.tar", [TRACIN[i] for i in rows],
            statuses=["ok" if i != 9 else "decode_error" for i in rows], uids=[_uid(i) for i in rows],
            keys=[f"pair{i}" for i in rows], strata={"source": [SOURCE[i] for i in rows]},
            overrides={**{c: [None] * len(rows) for c in SCORE_COLUMNS if c not in ("tracin", "neg_clip_loss")},
                       "clip_score": [CLIP[i] for i in rows], "cluster": [CLUSTER[i] for i in rows]},
            fingerprint=fingerprint))
    return files


@pytest.fixture
def tiny_run(tmp_path: Path) -> Path:
    """The 10-pair run: selection/, two complete named selections, one without done.json and
    one selected from other scores (stale)."""
    run = tmp_path / "run"
    files = _score_files(run / "scores")
    (run / "config.json").write_text(json.dumps({"select": {"column": "tracin"}}))
    select(files, SelectConfig(column="tracin", rule="top_fraction", fraction=0.5), run / "selection")
    add_selection(run, "clip", SelectConfig(column="clip_score", rule="top_k", k=3))
    add_selection(run, "mid", SelectConfig(column="clip_score", rule="threshold", threshold=0.35))
    add_selection(run, "partial", SelectConfig(column="clip_score", rule="top_k", k=2), done=False)
    other = _score_files(tmp_path / "other", fingerprint="older-fp")
    select(other, SelectConfig(column="tracin", rule="top_k", k=2), run / "selections" / "old")
    (run / "selections" / "old" / "done.json").write_text("{}")
    return run


def test_counts_overlap_and_states_by_hand(tiny_run: Path) -> None:
    comparison = gather(tiny_run, n_examples=0).comparison
    states = {ref.label: ref.problem for ref in comparison.selections}
    assert states == {DEFAULT_LABEL: None, "clip": None, "mid": None, "old": "stale: selected from other "
                      "scores than the run's", "partial": "incomplete: no done.json"}
    assert comparison.labels == [DEFAULT_LABEL, "clip", "mid"]
    assert comparison.distinct == [5, 3, 6]
    assert [ref.kept for ref in comparison.compared] == [5, 3, 6]
    assert comparison.shared.tolist() == [[5, 0, 2], [0, 3, 3], [2, 3, 6]]
    expected = np.array([[1, 0, 2 / 9], [0, 1, 3 / 6], [2 / 9, 3 / 6, 1]])
    np.testing.assert_allclose(comparison.jaccard, expected)


def test_kept_scores_by_hand(tiny_run: Path) -> None:
    comparison = gather(tiny_run, n_examples=0).comparison
    assert [c.column for c in comparison.columns] == ["tracin", "clip_score"]  # the run's column, then own
    values = {"tracin": TRACIN, "clip_score": CLIP}
    sets = {POOL_LABEL: list(range(9)), **KEPT}
    for column in comparison.columns:
        for label, rows in sets.items():
            scores = column.sets[label]
            expected = np.array([values[column.column][i] for i in rows])
            assert scores.n == len(rows) and not scores.sampled and scores.outside == 0
            assert scores.mean == pytest.approx(expected.mean())
            np.testing.assert_allclose(scores.quantiles(), np.quantile(expected, QUANTILES))
            assert int(scores.counts.sum()) == len(rows)
    # a set larger than max_points: quantiles from every ceil(9 / 4) = 3rd pool row
    pool = gather(tiny_run, n_examples=0, max_points=4).comparison.columns[0].sets[POOL_LABEL]
    assert pool.sampled and pool.n == 9
    np.testing.assert_allclose(pool.quantiles(), np.quantile([0.9, 0.6, 0.3], QUANTILES))


@pytest.mark.parametrize("field, column, pool, kept", [
    (None, "cluster", {0: 3, 1: 3, 2: 3},
     {DEFAULT_LABEL: {0: 3, 1: 2}, "clip": {2: 3}, "mid": {1: 3, 2: 3}}),
    ("source", "json.source", {"a": 2, "b": 3, "c": 4},
     {DEFAULT_LABEL: {"a": 2, "b": 3}, "clip": {"c": 3}, "mid": {"b": 2, "c": 4}}),
])
def test_coverage_per_value_by_hand(tiny_run: Path, field, column, pool, kept) -> None:
    comparison = gather(tiny_run, n_examples=0, field=field).comparison
    coverage = comparison.coverage
    assert coverage.column == column
    assert dict(coverage.counts[POOL_LABEL]) == pool
    assert {label: dict(+coverage.counts[label]) for label in kept} == kept
    section = comparison_sections(comparison)[-1]
    assert section.title == f"Coverage by {column}"
    if column == "json.source":  # value, pool, then per selection kept and kept / pool
        assert ('<tr><td>b</td><td class="n">3</td><td class="n">3</td><td>100.0 %</td><td class="n">0</td>'
                '<td>0.0 %</td><td class="n">2</td><td>66.7 %</td></tr>') in section.body


def test_page_shows_the_comparison(tiny_run: Path) -> None:
    html = write_report(tiny_run, n_examples=0).read_text()
    page = parse(html)
    assert page.sections == ["Rows by status", "Score distributions", "Scores vs clip_score",
                             "Selections compared", "Kept scores by selection", "Coverage by cluster",
                             "Best kept pairs (highest tracin)", "Worst pruned pairs (lowest tracin)", "Config"]
    overview = html.split("<h2>Selections compared</h2>", 1)[1].split("</section>", 1)[0]
    assert '<section id="selections">' in html
    for text in ("<td>selections/partial/</td>", "incomplete: no done.json", "<td>top_k</td>", "<td>k 3</td>",
                 "<td>fraction 0.5</td>", '<td class="n">0.2222</td>', '<td class="n">0.5</td>'):
        assert text in overview
    # status bars, 3 histograms (tracin, clip_score, neg_clip_loss), scatter; kept scores (tracin,
    # clip_score), coverage
    assert len(page.images) == 1 + 3 + 1 + 2 + 1
    assert page.external == []
    assert write_report(tiny_run, n_examples=0).read_text() == html  # deterministic


def test_one_selection_run_is_unchanged(run_dir: Path, tmp_path: Path) -> None:
    """One selection: the page has no comparison; an incomplete named one makes two (listed)."""
    html = write_report(run_dir, n_examples=0, field="cluster").read_text()  # --field: checked, unused
    assert parse(html).sections == ["Rows by status", "Score distributions", "Scores vs clip_score",
                                    "Best kept pairs (highest tracin)", "Worst pruned pairs (lowest tracin)",
                                    "Per-shard stats", "Last run", "Config"]
    assert 'id="selections' not in html
    add_selection(run_dir, "wip", SelectConfig(column="clip_score", rule="top_fraction", fraction=0.2), done=False)
    comparison = gather(run_dir, n_examples=0).comparison
    assert [r.problem for r in comparison.selections] == [None, "incomplete: no done.json"]
    assert comparison.labels == [] and comparison.columns == [] and comparison.coverage is None
    [overview] = comparison_sections(comparison)
    assert "<td>selections/wip/</td>" in overview.body
    assert "Fewer than two complete selections: nothing to compare." in overview.body


def test_overlap_in_chunks_counts_distinct_uids() -> None:
    def uids(*pairs: tuple[int, int]) -> np.ndarray:
        return np.sort(np.array(list(pairs), dtype=UID_DTYPE))

    a = uids((0, 1), (0, 1), (0, 2), (1, 0), (1, 0), (2, 5))  # repeats, as kept_uids.npy may
    b = uids((0, 2), (1, 0), (3, 3))
    for chunk in (1, 2, 4, 100):  # the repeats straddle chunk boundaries
        assert distinct_count(a, chunk) == 4
        assert shared_count(a, b, chunk) == shared_count(b, a, chunk) == 2
    shared, jaccard = overlap([a, b, uids()], chunk=2)
    assert shared.tolist() == [[4, 2, 0], [2, 3, 0], [0, 0, 0]]
    assert jaccard[0, 1] == pytest.approx(2 / 5) and np.isnan(jaccard[2, 2])


def test_unknown_field_or_column_is_one_line_exit_2(tiny_run: Path, capsys: pytest.CaptureFixture) -> None:
    assert cli_main(["report", str(tiny_run), "--by", "json.nope"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--field json.nope: the score files have no column 'json.nope' (fields there: cluster, json.source)" \
        in err and "\n" not in err
    assert cli_main(["report", str(tiny_run), "--compare-column", "nope"]) == 2
    assert "--compare-column nope: not a score column" in capsys.readouterr().err
    with pytest.raises(UsageError, match="no column 'json.colour'"):
        write_report(tiny_run, field="colour")
    assert cli_main(["report", str(tiny_run), "--examples", "0", "--field", "source",
                     "--compare-column", "neg_clip_loss"]) == 0
    html = Path(capsys.readouterr().out.strip()).read_text()
    assert "<h2>Coverage by json.source</h2>" in html and "kept neg_clip_loss by selection" in html
