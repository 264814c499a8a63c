"""``diffin report``: what the page shows, how it is written, and its errors."""

from __future__ import annotations

import base64
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from jobs.cli import main as cli_main
from pipeline.errors import UsageError
from pipeline.io.scores import SCORE_COLUMNS
from pipeline.io.layout import RunLayout
from pipeline.report.build import gather, write_report
from pipeline.report.gather import HIST_BINS
from tests.report.conftest import FAILED, NASTY_CAPTION, caption, expected_order, make_run
from tests.report.pagecheck import parse

N = 6  # examples per grid in these tests


def _kept_title(column: str = "tracin") -> str:
    return f"Best kept pairs (highest {column})"


def _pruned_title(column: str = "tracin") -> str:
    return f"Worst pruned pairs (lowest {column})"


def test_report_shows_plots_grids_counts_and_config(run_dir: Path) -> None:
    path = write_report(run_dir, n_examples=N)
    assert path == RunLayout(run_dir).report
    html = path.read_text()
    page = parse(html)
    assert page.sections[:5] == ["Rows by status", "Score distributions", "Scores vs clip_score",
                                 _kept_title(), _pruned_title()]
    assert {"Per-shard stats", "Last run", "Config"} <= set(page.sections)
    # self-contained: every image is an embedded PNG / JPEG that decodes; nothing is fetched
    assert page.external == []
    assert len(page.images) == 1 + len(SCORE_COLUMNS) + 1 + 2 * N  # status bars, a histogram per score column, scatter, thumbnails
    for image in page.images:
        mime, payload = image["src"].removeprefix("data:").split(";base64,")
        assert mime in ("image/png", "image/jpeg")
        with Image.open(io.BytesIO(base64.b64decode(payload))) as decoded:
            assert decoded.width > 0 and decoded.height > 0
    # examples: the best ok rows kept, the worst ok rows pruned, in order, with their captions
    order = expected_order()
    assert page.captions[_kept_title()] == [caption(i) for i in order[:N]]
    assert page.captions[_pruned_title()] == [caption(i) for i in reversed(order[-N:])]
    # counts by status and the config are on the page
    for status in FAILED.values():
        assert f"<td>{status}</td>" in html
    assert "&lt;i&gt;x&lt;/i&gt;" in html  # config value escaped


def test_captions_and_config_are_escaped(tmp_path: Path, report_corpus: Path) -> None:
    # every ok pair is shown, the nasty caption's included
    run = make_run(tmp_path / "run", report_corpus)
    html = write_report(run, n_examples=48).read_text()
    assert NASTY_CAPTION not in html and "<script>alert(1)" not in html
    assert "&lt;b&gt;bold&lt;/b&gt; &amp; &quot;quoted&quot; &lt;script&gt;alert(1)&lt;/script&gt;" in html
    page = parse(html)
    assert len(page.scripts) == 1 and "imagesLoaded" in page.scripts[0]
    shown = page.captions[_kept_title()] + page.captions[_pruned_title()]
    assert NASTY_CAPTION in shown  # parsed back to the original text


def test_thumbnails_are_the_pairs_images(run_dir: Path, report_corpus: Path) -> None:
    from tests.conftest import COLOURS

    html = write_report(run_dir, n_examples=N).read_text()
    thumbs = [i for i in parse(html).images if i["src"].startswith("data:image/jpeg")]
    best = expected_order()[:N]
    assert len(thumbs) == 2 * N
    for i, image in zip(best, thumbs):
        with Image.open(io.BytesIO(base64.b64decode(image["src"].split(",", 1)[1]))) as thumb:
            rgb = thumb.convert("RGB")
            centre = np.asarray(rgb)[rgb.height // 2, rgb.width // 2].astype(int)
            corner = np.asarray(rgb)[1, 1].astype(int)
        assert np.abs(centre - COLOURS[list(COLOURS)[i % 4]]).max() < 30
        assert (corner > 235).all()  # transparent PNG background flattened onto white


def test_histograms_count_every_scored_row(run_dir: Path) -> None:
    data = gather(run_dir, n_examples=N, max_points=10)
    n_ok = 48 - len(FAILED)
    assert data.scan.rows == 48 and data.scan.status["ok"] == n_ok
    assert {s: data.scan.status[s] for s in FAILED.values()} == {s: 1 for s in FAILED.values()}
    for stats in data.scan.columns.values():
        assert stats.n == n_ok and stats.n_null == 0
        assert len(stats.counts) == HIST_BINS
        assert int(stats.counts.sum()) + stats.below + stats.above == n_ok
    # every 5th row (ceil(48 / 10)), kept flags from kept_uids.npy
    sample = data.scan.sample
    assert sample.stride == 5 and len(sample) == 10
    tracin = sample.values["tracin"]
    order = expected_order()
    for position, value in zip(range(0, 48, 5), tracin):
        assert np.isnan(value) == (position in FAILED)
    kept_positions = set(order[:(len(order) + 1) // 2])  # top 50 %, rounded half up
    assert list(sample.kept) == [p in kept_positions for p in range(0, 48, 5)]


def test_tracin_only_run_shows_empty_columns(tmp_path: Path, report_corpus: Path) -> None:
    run = make_run(tmp_path / "run", report_corpus, tracin_only=True)
    html = write_report(run, n_examples=N).read_text()
    page = parse(html)
    absent = html.split("No scores in these columns", 1)[1].split("</p>", 1)[0]
    assert "diffin (" in absent and "diffin_eq9 (" in absent and "tracin (" not in absent
    assert len(page.images) == 1 + 2 + 1 + 2 * N  # tracin and clip_score histograms only
    assert "Per-shard stats" not in page.sections  # no stats/ directory: no table, no failure


def test_shard_stats_table_lists_failures_first(run_dir: Path) -> None:
    html = write_report(run_dir, n_examples=0).read_text()
    table = html.split("<h2>Per-shard stats</h2>", 1)[1].split("</table>", 1)[0]
    assert "3 shards, 3 with failed rows" in table
    assert "decode_error: 1" in table and "<th>worker.peak_rss_mb</th>" in table and "x.parquet" not in table
    assert "4242" not in table and "4,242" not in table  # worker.pid hidden


def test_stage_timings_in_pipeline_order(run_dir: Path) -> None:
    html = write_report(run_dir, n_examples=0).read_text()
    timings = html.split("<h2>Last run</h2>", 1)[1]
    assert timings.index("<td>trajectory</td>") < timings.index("<td>score</td>")


def _last_run(html: str) -> str:
    return html.split("<h2>Last run</h2>", 1)[1].split("<h2>", 1)[0]


def test_target_loss_per_checkpoint_and_its_warning(run_dir: Path) -> None:
    from pipeline.stages.pipeline import target_loss_warning

    # a summary without target losses (an older run): no column, no note
    assert "target loss" not in _last_run(write_report(run_dir, n_examples=0).read_text()).lower()
    path = run_dir / "run_summary.json"
    summary = json.loads(path.read_text())
    summary["checkpoints"][0]["target_loss"] = 2.7821
    summary["checkpoints"][1]["target_loss"] = 2.7923
    summary["target_loss_warning"] = target_loss_warning([2.7821, 2.7923])
    path.write_text(json.dumps(summary))
    section = _last_run(write_report(run_dir, n_examples=0).read_text())
    assert "<th>target loss</th>" in section
    assert '<td class="n">2.782</td>' in section and '<td class="n">2.792</td>' in section
    assert '<p class="warn">Warning: the target loss L_V does not fall' in section
    # falling: the values, no warning
    summary["checkpoints"][1]["target_loss"] = 1.5
    summary["target_loss_warning"] = target_loss_warning([2.7821, 1.5])
    path.write_text(json.dumps(summary))
    section = _last_run(write_report(run_dir, n_examples=0).read_text())
    assert "2.782 → 1.5" in section and "It falls" in section
    assert "warn" not in section
    # a checkpoint window (score.checkpoint_window): which checkpoints were scored
    summary["checkpoint_window"] = {"rule": "falling", "scored": [0, 1], "steps": [3, 6], "dropped": []}
    path.write_text(json.dumps(summary))
    section = _last_run(write_report(run_dir, n_examples=0).read_text())
    assert "Scored checkpoints (score.checkpoint_window: falling): 0, 1; dropped after L_V" in section
    assert "It falls over the scored checkpoints" in section


def test_report_is_deterministic_and_atomic(run_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "elsewhere" / "r.html"
    first = write_report(run_dir, out, n_examples=N).read_bytes()
    second = write_report(run_dir, out, n_examples=N).read_bytes()
    assert first == second
    assert sorted(p.name for p in out.parent.iterdir()) == ["r.html"]  # no temporary left


def test_missing_shards_give_placeholders_not_failure(tmp_path: Path, report_corpus: Path) -> None:
    corpus = tmp_path / "corpus"
    shutil.copytree(report_corpus, corpus)
    run = make_run(tmp_path / "run", corpus)
    shutil.rmtree(corpus)
    html = write_report(run, n_examples=N).read_text()
    assert html.count('<div class="noimg">no image</div>') == 2 * N
    assert "(caption not available)" in html


def test_run_without_selection_or_scores(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"data": {"shards": "x/*.tar"}}))
    page = parse(write_report(run).read_text())
    assert page.sections == ["Scores", "Config"] and page.images == []


def test_cli_prints_the_path(run_dir: Path, capsys: pytest.CaptureFixture) -> None:
    assert cli_main(["report", str(run_dir), "--examples", "2"]) == 0
    assert capsys.readouterr().out.strip() == str(RunLayout(run_dir).report)


@pytest.mark.parametrize("make, message", [
    (lambda tmp: tmp / "absent", "not found"),
    (lambda tmp: tmp, "is not a run directory"),
    (lambda tmp: "memory://bucket/runs/demo", "not found"),  # remote: read through fsspec
])
def test_cli_bad_run_dir_is_one_line_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture, make, message) -> None:
    assert cli_main(["report", str(make(tmp_path))]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("diffin: error:") and message in err and "\n" not in err
    assert not (tmp_path / "report").exists()


def test_bad_arguments_are_usage_errors(run_dir: Path) -> None:
    with pytest.raises(UsageError, match="max points"):
        write_report(run_dir, max_points=0)
    with pytest.raises(UsageError, match="is a directory"):
        write_report(run_dir, run_dir)


def test_unreadable_score_file_is_one_line_exit_2(run_dir: Path, capsys: pytest.CaptureFixture) -> None:
    (run_dir / "scores" / "00001.parquet").write_bytes(b"not parquet")
    assert cli_main(["report", str(run_dir)]) == 2
    err = capsys.readouterr().err.strip()
    assert "00001.parquet is not readable Parquet" in err and "\n" not in err
    assert not (RunLayout(run_dir).report).exists()


def test_score_files_without_rows(tmp_path: Path) -> None:
    from tests.stages.scorefiles import write_score_file

    run = tmp_path / "run"
    write_score_file(run / "scores" / "00000.parquet", "x/00000.tar", [])
    page = parse(write_report(run).read_text())
    assert page.sections[:2] == ["Rows by status", "Score distributions"]
    assert "Scores vs clip_score" not in page.sections


def test_new_rules_show_their_steps_and_no_cut() -> None:
    """chain / drop_fill keep no 'every score at or above a cut': no cut line; the subtitle says
    what the rule did."""
    from types import SimpleNamespace

    from pipeline.report.build import _subtitle, _threshold

    chain = {"rule": "chain", "column": "norm_sim_inf", "config": {}, "threshold_applied": 0.5,
             "chain": [{"column": "neg_clip_loss", "fraction": 0.3}, {"column": "norm_sim_inf", "fraction": 0.2}]}
    drop = {"rule": "drop_fill", "column": "tracin", "config": {"fraction": 0.3}, "threshold_applied": 0.1,
            "drop_fill": {"dropped": 7, "drop_column": "tracin", "drop_threshold": 0.0, "fill": "random",
                          "filled_from_dropped": 0}}
    for selection in (chain, drop):
        data = SimpleNamespace(selection=selection, column=selection["column"])
        assert _threshold(data, selection["column"]) is None
    assert _subtitle(SimpleNamespace(selection=chain)) == (
        "selection: chain neg_clip_loss 0.3 then norm_sim_inf 0.2")
    assert "dropped 7 with tracin below 0.0, fill random" in _subtitle(SimpleNamespace(selection=drop))
    share = {**drop, "drop_fill": {**drop["drop_fill"], "drop_column": "neg_clip_loss", "drop_threshold": -1.5,
                                   "drop_share_from": "diffin_unrolled", "fill": "cluster"}}
    assert ("dropped 7 (as many as diffin_unrolled scores below 0) with neg_clip_loss below -1.5, fill cluster"
            in _subtitle(SimpleNamespace(selection=share)))
