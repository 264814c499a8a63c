"""The trajectory stage's checks: the proxy model name is known before any work starts."""

from __future__ import annotations

from pathlib import Path

import pytest

from jobs import train
from pipeline.config import load_config
from pipeline.errors import UsageError
from pipeline.stages.context import RunContext, check_train_model
from tests.conftest import write_config


def test_unknown_model_named_in_one_line(tiny_corpus: Path, tmp_path: Path) -> None:
    path = write_config(tmp_path / "run.yaml", tiny_corpus, model="no-such-model")
    config = load_config(path)
    resolve = lambda config, source: RunContext.resolve(config, tmp_path / "run", source)  # noqa: E731
    for check in (check_train_model, resolve):  # RunContext.resolve: what jobs call before Ray
        with pytest.raises(UsageError) as info:
            check(config, str(path))
        assert str(info.value).startswith(f"{path}: trajectory.train.model: unknown model 'no-such-model'")
        assert "\n" not in str(info.value)


def test_known_models_pass(tiny_corpus: Path, tmp_path: Path) -> None:
    for model in ("tiny-clip-32", "ViT-B-32"):  # a shipped config, an open_clip name
        check_train_model(load_config(write_config(tmp_path / f"{model}.yaml", tiny_corpus, model=model)))


def test_train_overwrite_with_bad_model_removes_nothing(tiny_corpus: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "traj"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    config = write_config(tmp_path / "run.yaml", tiny_corpus, model="no-such-model")
    code = train.main(["--config", str(config), "--out", str(out), "--overwrite", "--executor", "local"])
    assert code == 2 and "trajectory.train.model: unknown model" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "mine"
