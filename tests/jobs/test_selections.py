"""Named selections side by side (issue #30): one `diffin select` makes a sweep without rescoring,
`diffin reshard --selection NAME` reshards one, shards never outlive the selection they were made
from, and bad names or overrides are one line, exit 2, nothing written.

One small corpus is trained on, prepared and scored once (module fixture); each test works on a
copy of that run directory, in process (``--executor local``).
"""

from __future__ import annotations

import json
import shutil
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
import yaml

from jobs import prepare, prune, reshard, score, select, train
from pipeline.config import NamedSelection, SelectConfig, parse_config, parse_selection_override
from pipeline.errors import UsageError
from pipeline.io.layout import RunLayout
from pipeline.report.gather import load_shards
from pipeline.stages.derived import SELECTION_KEY, current_shards, selection_done
from tests.conftest import make_tiny_corpus
from tests.stages.test_pipeline import pipeline_config

BASE_SELECT = {"rule": "top_fraction", "column": "diffin_unrolled", "fraction": 0.5}


def _config(corpus: Path, **sections: Any) -> dict:
    cfg = pipeline_config(corpus)
    cfg["target"]["bank_size"] = 3  # 48 pairs: a target set of 7
    cfg["select"] = dict(BASE_SELECT)
    cfg["reshard"] = {"shard_size": 8}
    cfg.update(sections)
    return cfg


@pytest.fixture(scope="module")
def scored(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(corpus, run dir) with trajectory, prepared checkpoints and score files (read-only)."""
    base = tmp_path_factory.mktemp("selections")
    corpus = make_tiny_corpus(base / "corpus", n=48, shard_size=16)
    config = base / "run.yaml"
    config.write_text(yaml.safe_dump(_config(corpus)))
    run = base / "run"
    args = ["--config", str(config), "--run-dir", str(run), "--executor", "local", "--no-progress"]
    assert train.main(["--config", str(config), "--out", str(run / "trajectory")]) == 0
    assert prepare.main(args) == 0 and score.main(args) == 0
    return corpus, run


class Run:
    """A copy of the scored run with its own config file: the jobs' arguments, its files."""

    def __init__(self, scored: tuple[Path, Path], tmp_path: Path, **sections: Any) -> None:
        self.corpus, self.dir = scored[0], tmp_path / "run"
        shutil.copytree(scored[1], self.dir)
        self.config = tmp_path / "run.yaml"
        self.write(**sections)

    def write(self, **sections: Any) -> None:
        self.config.write_text(yaml.safe_dump(_config(self.corpus, **sections)))

    @property
    def args(self) -> list[str]:
        return ["--config", str(self.config), "--run-dir", str(self.dir), "--executor", "local", "--no-progress"]

    def summary(self) -> dict:
        return json.loads((self.dir / "run_summary.json").read_text())

    def kept(self, name: str | None = None) -> int:
        layout = RunLayout.of(self.dir)
        return pq.read_metadata(layout.selection_dir(name) / "kept.parquet").num_rows

    def files(self) -> dict[str, int]:
        """Every file under the run dir with its mtime (what a refused command must not touch)."""
        return {str(p.relative_to(self.dir)): p.stat().st_mtime_ns for p in sorted(self.dir.rglob("*"))}


def _share(fraction: float, n: int) -> int:
    return int((Decimal(str(fraction)) * n).quantize(Decimal(1), rounding=ROUND_HALF_UP))


def _one_line_error(capsys: pytest.CaptureFixture, *needles: str) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    for needle in needles:
        assert needle in err[0], err[0]
    return err[0]


def test_one_select_makes_a_sweep_without_rescoring(scored, tmp_path: Path, capsys) -> None:
    run = Run(scored, tmp_path, selections=[{"name": "keep30", "fraction": 0.3},
                                            {"name": "keep60", "fraction": 0.6, "reshard": True},
                                            {"name": "clip50", "fraction": 0.9}])
    scores = {p.name: p.stat().st_mtime_ns for p in (run.dir / "scores").glob("*.parquet")}
    # the config's two fractions of diffin_unrolled, and clip50 replaced for this invocation only
    argv = run.args + ["--selection", "clip50:column=clip_score,fraction=0.5"]
    assert select.main(argv) == 0
    out = capsys.readouterr().out
    ok = run.summary()["selection"]["scored_ok"]
    assert ok == 48
    expected = {"keep30": _share(0.3, ok), "keep60": _share(0.6, ok), "clip50": _share(0.5, ok)}
    layout = RunLayout.of(run.dir)
    assert layout.selection_names() == sorted(expected)
    for name, kept in expected.items():
        assert run.kept(name) == kept
        assert selection_done(layout, name) is not None
        assert f"  selection {name}: {layout.selection_dir(name)}/" in out
    assert run.kept() == _share(0.5, ok)  # selection/ as before
    clip = json.loads((layout.selection_dir("clip50") / "summary.json").read_text())
    assert (clip["config"]["column"], clip["config"]["rule"]) == ("clip_score", "top_fraction")  # rule inherited
    # no rescoring, and the scores' keys of the earlier jobs are still in the summary
    assert {p.name: p.stat().st_mtime_ns for p in (run.dir / "scores").glob("*.parquet")} == scores
    summary = run.summary()
    assert summary["pairs_scored_now"] == 48 and summary["stages_run"] == ["prepare", "score", "select"]
    assert {n: s["kept"] for n, s in summary["selections"].items()} == expected
    assert not layout.shards_dir("keep30").exists()  # `diffin select` reshards nothing

    assert reshard.main(run.args + ["--selection", "keep30"]) == 0
    sizes = json.loads((layout.shards_dir("keep30") / "sizes.json").read_text())
    assert sum(sizes.values()) == expected["keep30"] and list(sizes.values())[0] == 8
    assert load_shards(run.dir, "keep30") == sizes
    summary = run.summary()
    assert summary["selections"]["keep30"]["shards"]["pairs"] == expected["keep30"]
    assert summary["selections"]["clip50"]["kept"] == expected["clip50"]  # merged per name
    assert not (run.dir / "shards").exists()  # only the named one was asked for

    # again: every selection reused, keep30's shards and its summary entry stay
    assert select.main(run.args) == 0
    summary = run.summary()
    assert not any(s["recomputed"] for n, s in summary["selections"].items() if n != "clip50")
    assert summary["selections"]["clip50"]["recomputed"] is True  # the config's clip50 (fraction 0.9) now
    assert summary["selections"]["keep30"]["shards"]["pairs"] == expected["keep30"]
    assert load_shards(run.dir, "keep30") == sizes


def test_run_then_select_keeps_every_stage_in_the_summary(scored, tmp_path: Path) -> None:
    run = Run(scored, tmp_path, selections=[{"name": "keep30", "fraction": 0.3, "reshard": True}])
    assert prune.main(run.args) == 0  # trajectory, prepare, scores reused; select, reshard
    layout = RunLayout.of(run.dir)
    assert load_shards(run.dir) is not None and load_shards(run.dir, "keep30") is not None
    assert select.main(run.args + ["--only", "keep30"]) == 0
    summary = run.summary()
    assert summary["stages"] == ["select"]
    assert {"scores", "pairs_scored_now", "selection", "reshard", "checkpoints"} <= set(summary)
    assert summary["stages_run"] == ["trajectory", "prepare", "score", "select", "reshard"]
    assert summary["selections"]["keep30"]["recomputed"] is False
    assert summary["selections"]["keep30"]["shards"]["dir"] == str(layout.shards_dir("keep30"))


def _refused(capsys, code: int, *needles: str) -> None:
    assert code == 2
    _one_line_error(capsys, *needles)


def test_shards_of_a_replaced_selection_are_removed_and_refused(scored, tmp_path: Path, capsys) -> None:
    run = Run(scored, tmp_path)
    layout = RunLayout.of(run.dir)
    trained = ["--config", str(run.config), "--out", str(tmp_path / "traj")]
    assert select.main(run.args + ["--selection", "n:fraction=0.5"]) == 0
    assert reshard.main(run.args) == 0 and reshard.main(run.args + ["--selection", "n"]) == 0
    old = {None: layout.shards_dir(None), "n": layout.shards_dir("n")}
    saved = {name: tmp_path / f"saved-{name}" for name in old}
    for name, where in old.items():
        plan = json.loads((where / "reshard_plan.json").read_text())
        assert plan[SELECTION_KEY] == selection_done(layout, name)  # the shards record their selection
        shutil.copytree(where, saved[name])
    capsys.readouterr()

    # another fraction: the shards of both selections are removed, their summary keys dropped
    run.write(select={**BASE_SELECT, "fraction": 0.3})
    assert select.main(run.args + ["--selection", "n:fraction=0.25"]) == 0
    assert not old[None].exists() and not old["n"].exists()
    summary = run.summary()
    assert "reshard" not in summary and "shards" not in summary["selections"]["n"]
    for name in old:
        assert load_shards(run.dir, name) is None  # the report: no shards to show
        with pytest.raises(UsageError, match="no complete shards"):
            current_shards(layout, name)
    _refused(capsys, train.main(trained + ["--on-selection", str(run.dir)]), "no complete shards", "diffin reshard")

    # old shards that were not removed (an interrupted job, a copied run dir): every reader refuses
    for name, where in old.items():
        shutil.copytree(saved[name], where)
    for name, spec in ((None, str(run.dir)), ("n", f"{run.dir}:n")):
        _refused(capsys, train.main(trained + ["--on-selection", spec]), "made from another selection", "stale")
        with pytest.raises(UsageError, match="made from another selection"):
            load_shards(run.dir, name)  # the report's reader
    assert not (tmp_path / "traj").exists()
    # shards written before they recorded their selection: refused too, saying to rerun reshard
    plan = old[None] / "reshard_plan.json"
    plan.write_text(json.dumps({k: v for k, v in json.loads(plan.read_text()).items() if k != SELECTION_KEY}))
    _refused(capsys, train.main(trained + ["--on-selection", str(run.dir)]), "older version", "diffin reshard")
    # reshard never resumes into them: it rewrites the shards from the current selection
    for name, extra in ((None, []), ("n", ["--selection", "n"])):
        assert reshard.main(run.args + extra) == 0
        assert sum(load_shards(run.dir, name).values()) == run.kept(name)
    assert run.kept() == _share(0.3, 48) and run.kept("n") == _share(0.25, 48)

    # now current: train on the selection's shards (the proxy run sees exactly its pairs)
    assert train.main(trained + ["--on-selection", f"{run.dir}:n"]) == 0
    trajectory = json.loads((tmp_path / "traj" / "trajectory.json").read_text())
    assert trajectory["num_samples"] <= run.kept("n")


BAD_CONFIGS = {
    "path separator": ([{"name": "a/b", "fraction": 0.3}], "selections.0.name"),
    "dot name": ([{"name": "..", "fraction": 0.3}], "selection name '..'"),
    "same name twice": ([{"name": "a", "fraction": 0.3}, {"name": "a", "fraction": 0.4}], "two entries are named 'a'"),
    "unknown key": ([{"name": "a", "fractoin": 0.3}], "unknown key 'fractoin'"),
    "bad value": ([{"name": "a", "fraction": 2}], "selections.0 (a): fraction"),
}


@pytest.mark.parametrize("case", sorted(BAD_CONFIGS))
def test_bad_selections_config_is_one_line(scored, tmp_path: Path, capsys, case: str) -> None:
    entries, needle = BAD_CONFIGS[case]
    run = Run(scored, tmp_path, selections=entries)
    before = run.files()
    _refused(capsys, select.main(run.args), needle)
    assert run.files() == before


BAD_COMMANDS = {
    "reshard unknown": (reshard, ["--selection", "nope"], "unknown selection 'nope'"),
    "reshard bad name": (reshard, ["--selection", "../x"], "selection name '../x'"),
    "only unknown": (select, ["--only", "keep30,nope"], "unknown selection 'nope'"),
    "override no colon": (select, ["--selection", "keep30"], "expected NAME:key=value"),
    "override no value": (select, ["--selection", "keep30:fraction"], "expected NAME:key=value"),
    "override key twice": (select, ["--selection", "keep30:fraction=0.3,fraction=0.4"], "'fraction' given twice"),
    "override unknown key": (select, ["--selection", "keep30:fractoin=0.3"], "unknown key 'fractoin'"),
    "override bad value": (select, ["--selection", "keep30:fraction=2"], "--selection 'keep30': fraction"),
    "override bad name": (select, ["--selection", "a/b:fraction=0.3"], "selection name 'a/b'"),
    "override twice": (select, ["--selection", "x:k=3,rule=top_k", "--selection", "x:fraction=0.2"], "given twice"),
    "override column": (select, ["--selection", "x:column=tracin"], "selections.x.column: 'tracin' is not computed"),
}


@pytest.mark.parametrize("case", sorted(BAD_COMMANDS))
def test_bad_selection_arguments_are_one_line(scored, tmp_path: Path, capsys, case: str) -> None:
    job, extra, needle = BAD_COMMANDS[case]
    run = Run(scored, tmp_path, selections=[{"name": "keep30", "fraction": 0.3}])
    before = run.files()
    _refused(capsys, job.main(run.args + extra), needle)
    assert run.files() == before


def test_train_on_unknown_selection_is_one_line(scored, tmp_path: Path, capsys) -> None:
    run = Run(scored, tmp_path)
    out = tmp_path / "traj"
    argv = ["--config", str(run.config), "--out", str(out)]
    _refused(capsys, train.main(argv + ["--on-selection", f"{run.dir}:nope"]), "unknown selection 'nope'")
    _refused(capsys, train.main(argv + ["--on-selection", str(tmp_path / "nowhere")]), "not found")
    assert not out.exists()


def test_entries_inherit_the_given_select_fields() -> None:
    base = SelectConfig.model_validate({"rule": "top_fraction", "column": "clip_score", "fraction": 0.5})
    entry = NamedSelection.model_validate({"name": "k10", "rule": "top_k", "k": 10})
    resolved = entry.resolve(base)  # the inherited fraction is not top_k's: left out
    assert (resolved.rule, resolved.column, resolved.k) == ("top_k", "clip_score", 10)
    # one of a set of alternatives replaces the inherited one
    drop = SelectConfig.model_validate({"drop_below": 0.1, "k": 20})
    mine = NamedSelection.model_validate({"name": "q", "drop_fraction": 0.2, "fraction": 0.4}).resolve(drop)
    assert (mine.drop_below, mine.drop_fraction, mine.k, mine.fraction) == (None, 0.2, None, 0.4)
    # otherwise exactly the given fields: a contradiction the entry did not choose is an error
    with pytest.raises(ValueError, match="'fraction' is not used by rule 'top_k'"):
        NamedSelection.model_validate({"name": "x", "fraction": 0.4}).resolve(
            SelectConfig.model_validate({"rule": "top_k", "k": 10}))
    # a config written back in full (config.json) gives the same: defaults are not "given"
    full = SelectConfig.model_validate(base.model_dump(mode="json"))
    assert entry.resolve(full) == resolved
    # without a select: section, the defaults (the recipe) are the base
    assert NamedSelection.model_validate({"name": "d", "fraction": 0.2}).resolve(None).rule == "drop_fill"
    assert parse_selection_override("c:column=clip_score, fraction=0.5,reshard=true") == {
        "name": "c", "column": "clip_score", "fraction": 0.5, "reshard": True}


def test_config_written_back_reads_the_same(tmp_path: Path) -> None:
    corpus = make_tiny_corpus(tmp_path / "corpus", n=4, shard_size=4)
    config = parse_config(_config(corpus, selections=[{"name": "keep30", "fraction": 0.3, "reshard": True}]))
    again = parse_config(config.model_dump(mode="json"))
    assert again.named_selections() == config.named_selections()
    assert again.model_dump(mode="json")["selections"] == [{"name": "keep30", "reshard": True, "fraction": 0.3}]
