"""``diffin config show`` (issue #30): every key of a config file or of a run's config.json,
defaults filled in and the values that differ marked; the output reads back as the same config;
bad input is one line and exit code 2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

import jobs.cli
from jobs import config as config_job
from pipeline.config import RunConfig, load_config
from pipeline.io.atomic import write_json_atomic
from pipeline.io.layout import RunLayout
from tests.conftest import write_config


@pytest.fixture
def config_file(tmp_path: Path, tiny_corpus: Path) -> Path:
    """A small valid config: some keys given, select and reshard sections with a few keys."""
    path = write_config(tmp_path / "run.yaml", tiny_corpus)
    data = yaml.safe_load(path.read_text())
    data["select"] = {"rule": "top_fraction", "fraction": 0.5}
    data["reshard"] = {"shard_size": 8}
    path.write_text(yaml.safe_dump(data))
    return path


def _show(capsys: pytest.CaptureFixture, *argv: str) -> str:
    assert jobs.cli.main(["config", "show", *argv]) == 0
    captured = capsys.readouterr()
    assert captured.err == ""
    return captured.out


def _keys(model: type, data: dict) -> None:
    """``data`` has every field of ``model``, recursively into the sections that are set."""
    assert list(data) == list(model.model_fields)
    for name, field in model.model_fields.items():
        value = data[name]
        section = next((t for t in getattr(field.annotation, "__args__", (field.annotation,))
                        if isinstance(t, type) and hasattr(t, "model_fields")), None)
        if section is not None and isinstance(value, dict):
            _keys(section, value)


def test_every_section_and_key_with_defaults_filled_in(config_file: Path, capsys) -> None:
    out = _show(capsys, "--config", str(config_file))
    data = yaml.safe_load(out)
    _keys(RunConfig, data)
    assert data["score"]["embeddings"]["pools"] == 10  # a section the file does not name
    assert data["select"]["seed"] == 0 and data["reshard"]["name_format"] == "{:05d}.tar"
    lines = out.splitlines()
    # a value at the default has no comment; one the config sets names the default; required keys say so
    assert "  batch_size: 128" in lines  # score.batch_size, not in the file
    assert any(line.startswith("    steps: 6 ") and line.endswith("# default: 200") for line in lines)
    assert any(line.startswith("  fraction: 0.5 ") and line.endswith("# default: 0.3") for line in lines)
    assert any(line.startswith("  rule: top_fraction ") and line.endswith("# default: drop_fill") for line in lines)
    assert any(line.startswith("select: ") and line.endswith("# default: null") for line in lines)
    assert any(line.startswith("  shards: ") and line.endswith("# required") for line in lines)
    assert "storage: {}" in lines


def test_printed_yaml_and_json_read_back_as_the_same_config(config_file: Path, tmp_path: Path, capsys) -> None:
    original = load_config(config_file)
    for argv, name in (((), "full.yaml"), (("--diff",), "diff.yaml"), (("--format", "json"), "full.json"),
                       (("--diff", "--format", "json"), "diff.json")):
        printed = tmp_path / name
        printed.write_text(_show(capsys, "--config", str(config_file), *argv))
        assert load_config(printed) == original, argv


def test_diff_keeps_only_what_differs(config_file: Path, capsys) -> None:
    data = json.loads(_show(capsys, "--config", str(config_file), "--diff", "--format", "json"))
    assert data["select"] == {"rule": "top_fraction", "fraction": 0.5}
    assert data["reshard"] == {"shard_size": 8}
    assert data["resources"] == {"num_cpus": 0.5}
    assert "score" not in data and "storage" not in data and "target" not in data


def test_diff_keeps_a_default_another_key_changes(tiny_corpus: Path, tmp_path: Path, capsys) -> None:
    """select.drop_share_from follows an estimate column when left out: at its own default it
    must stay in the diff, or the diff would read back differently."""
    path = write_config(tmp_path / "run.yaml", tiny_corpus)
    data = yaml.safe_load(path.read_text())
    data["score"] = {"method": "all"}
    data["select"] = {"column": "tracin", "drop_share_from": "diffin_unrolled"}
    path.write_text(yaml.safe_dump(data))
    printed = tmp_path / "diff.yaml"
    printed.write_text(_show(capsys, "--config", str(path), "--diff"))
    assert yaml.safe_load(printed.read_text())["select"]["drop_share_from"] == "diffin_unrolled"
    assert load_config(printed) == load_config(path)


def test_run_dir_shows_its_config_json(config_file: Path, tmp_path: Path, capsys) -> None:
    config = load_config(config_file)
    layout = RunLayout.of(tmp_path / "run")
    layout.root.mkdir()
    write_json_atomic(layout.config, config.model_dump(mode="json"))  # as run_pipeline writes it
    from_run = _show(capsys, "--run-dir", str(layout.root))
    from_file = _show(capsys, "--config", str(config_file))
    assert from_run.splitlines()[1:] == from_file.splitlines()[1:]  # all but the header naming the source
    assert str(layout.config) in from_run.splitlines()[0]
    assert json.loads(_show(capsys, "--run-dir", str(layout.root), "--format", "json")) == json.loads(
        layout.config.read_text())


BAD = {
    "missing-file": (lambda d: ["--config", str(d / "nope.yaml")], "config file not found"),
    "not-yaml": (lambda d: ["--config", _write(d / "bad.yaml", "data: [")], "not valid YAML"),
    "not-a-mapping": (lambda d: ["--config", _write(d / "bad.yaml", "- 1")], "top level must be a mapping"),
    "unknown-key": (lambda d: ["--config", _write(d / "bad.yaml", "data: {shards: x, shardz: y}\n"
                                                                  "trajectory: {path: t}")],
                    "data.shardz: unknown key"),
    "invalid-value": (lambda d: ["--config", _write(d / "bad.yaml", "data: {shards: x}\ntrajectory: {path: t}\n"
                                                                    "score: {batch_size: 0}")],
                      "score.batch_size"),
    "missing-path-checked": (lambda d: ["--config", _write(d / "bad.yaml", "data: {shards: x.tar}\n"
                                                                           "trajectory: {path: t}"),
                                        "--check-paths"], "data.shards: shard not found"),
    "dir-without-config-json": (lambda d: ["--run-dir", str(d)], "is not a run directory: no config.json"),
    "missing-run-dir": (lambda d: ["--run-dir", str(d / "nope")], "run directory not found"),
    "config-json-not-json": (lambda d: ["--run-dir", str(Path(_write(d / "config.json", "{")).parent)],
                             "not valid JSON"),
}


def _write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_one_line_exit_2(case: str, tmp_path: Path, capsys) -> None:
    argv, message = BAD[case]
    assert jobs.cli.main(["config", "show", *argv(tmp_path)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("diffin: error: "), captured.err
    assert message in lines[0], lines[0]


def test_paths_are_not_opened_unless_asked(tmp_path: Path, capsys) -> None:
    """A config whose inputs do not exist yet (e.g. before the demo's corpus is built) shows."""
    path = _write(tmp_path / "later.yaml", "data: {shards: not/built/yet/*.tar}\ntrajectory: {path: t}")
    assert "not/built/yet/*.tar" in _show(capsys, "--config", path)


def test_standalone_entry_point(config_file: Path, capsys) -> None:
    assert config_job.main(["show", "--config", str(config_file), "--format", "json"]) == 0
    assert json.loads(capsys.readouterr().out) == load_config(config_file).model_dump(mode="json")
