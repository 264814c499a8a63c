"""``diffin trajectory import CHECKPOINT``: a released open_clip checkpoint as a one-checkpoint trajectory.

The weights are saved the ways open_clip's ``load_checkpoint`` (``pretrained=FILE``) accepts
them — a bare state dict, ``{"state_dict": ...}``, ``module.``-prefixed, ``.safetensors`` —
imported, and scored with ``diffin run`` (unrolled and TracIn, m = 1).
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
import yaml
from open_clip.factory import load_checkpoint
from safetensors.torch import save_file

from jobs import prune
from jobs.trajectory import main
from pipeline.data.pairs import load_pairs
from pipeline.data.shards import expand_shards
from pipeline.errors import UsageError
from pipeline.influence.unrolled import UnrolledSettings
from pipeline.model.clip import build_clip, model_spec
from pipeline.model.released import ReleasedFacts, import_released
from pipeline.model.scorer import InfluenceSettings, TrajectoryInfluence, segment_lrs
from pipeline.model.trajectory import Trajectory

MODEL = "tiny-clip-32"
STEPS, LR, N, BATCH = 50, 2e-3, 48, 16
FACTS = ReleasedFacts(model=MODEL, steps=STEPS, lr=LR, num_samples=N, batch_size=BATCH)
FLAGS = ["--model", MODEL, "--steps", str(STEPS), "--lr", str(LR), "--train-num-samples", str(N),
         "--batch-size", str(BATCH)]


@pytest.fixture(scope="module")
def weights() -> dict[str, torch.Tensor]:
    """The state dict of a tiny CLIP (the released weights)."""
    torch.manual_seed(0)
    return build_clip(model_spec(MODEL)).state_dict()


@pytest.fixture(scope="module")
def released(weights: dict[str, torch.Tensor], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The weights saved in each form open_clip loads with ``pretrained=FILE``."""
    out = tmp_path_factory.mktemp("released")
    forms = {"bare": weights, "wrapped": {"state_dict": weights},
             "ddp": {"state_dict": {f"module.{k}": v for k, v in weights.items()}}}
    paths = {}
    for name, obj in forms.items():
        paths[name] = out / f"{name}.pt"
        torch.save(obj, paths[name])
    paths["safetensors"] = out / "model.safetensors"
    save_file({k: v.contiguous() for k, v in weights.items()}, paths["safetensors"])
    return paths


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("form", ["bare", "wrapped", "ddp", "safetensors"])
def test_each_open_clip_form_imports_and_loads(form: str, released: dict[str, Path],
                                               weights: dict[str, torch.Tensor], tmp_path: Path) -> None:
    path = released[form]
    assert not any(load_checkpoint(build_clip(model_spec(MODEL)), str(path), strict=True))  # open_clip takes it
    before = _sha(path)
    trajectory = import_released(path, tmp_path, FACTS)
    trajectory.save()
    loaded = Trajectory.load(tmp_path)
    assert loaded == trajectory
    assert [(c.path, c.step, c.lr) for c in loaded.checkpoints] == [(str(path.resolve()), STEPS, LR)]
    assert (loaded.total_steps, loaded.num_samples, loaded.batch_size) == (STEPS, N, BATCH)
    assert loaded.model == model_spec(MODEL)
    assert loaded.schedule["kind"] == "const" and loaded.schedule["warmup"] == 0
    assert segment_lrs(loaded, [STEPS]) == [[LR] * STEPS]  # every update of the horizon at rate η
    assert loaded.source["kind"] == "released" and loaded.source["sha256"] == before
    assert loaded.source["stated"] == {"model": MODEL, "steps": STEPS, "lr": LR, "num_samples": N,
                                       "batch_size": BATCH}
    assert _sha(path) == before  # referenced, never rewritten
    scorer = TrajectoryInfluence(loaded)
    assert all(torch.equal(scorer.params[0][k], weights[k]) for k in scorer.params[0])


def test_checkpoint_inside_out_dir_is_relative_and_weights_enter_the_fingerprint(
        weights: dict[str, torch.Tensor], tmp_path: Path) -> None:
    path = tmp_path / "weights" / "model.pt"
    path.parent.mkdir()
    torch.save(weights, path)
    trajectory = import_released(path, tmp_path, FACTS)
    assert trajectory.checkpoints[0].path == "weights/model.pt"
    torch.save({k: v + 1 for k, v in weights.items()}, path)
    assert import_released(path, tmp_path, FACTS).fingerprint() != trajectory.fingerprint()


def _run_config(path: Path, corpus: Path, trajectory: Path, method: str) -> Path:
    config = {"data": {"shards": str(corpus / "*.tar"), "sizes": str(corpus / "sizes.json")},
              "trajectory": {"path": str(trajectory)},
              "target": {"shards": str(corpus / "*.tar"), "max_pairs": 16, "bank_size": 7, "seed": 0},
              "score": {"method": method, "batch_size": 8, "proxy_batch_size": 8,
                        "unrolled": {"lanczos_steps": 4}},
              "resources": {"num_cpus": 0.5}}
    path.write_text(yaml.safe_dump(config))
    return path


def _ok_values(run_dir: Path, column: str) -> list[float]:
    values = []
    for file in sorted((run_dir / "scores").glob("*.parquet")):
        rows = pq.read_table(file, columns=["status", column]).to_pylist()
        values += [r[column] for r in rows if r["status"] == "ok"]
    return values


def test_cli_import_then_run_unrolled_and_tracin(released: dict[str, Path], tiny_corpus: Path,
                                                 tmp_path: Path, capsys) -> None:
    out = tmp_path / "traj"
    assert main(["import", str(released["bare"]), *FLAGS, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "1 released checkpoint at T=50" in printed and "trajectory.json" in printed
    for method, column in (("unrolled", "diffin_unrolled"), ("tracin", "tracin")):
        config = _run_config(tmp_path / f"{method}.yaml", tiny_corpus, out, method)
        run_dir = tmp_path / f"run_{method}"
        assert prune.main(["--config", str(config), "--run-dir", str(run_dir), "--executor", "local",
                           "--no-progress"]) == 0
        values = _ok_values(run_dir, column)
        assert len(values) == 48 and all(v is not None and math.isfinite(v) for v in values)
        assert len(set(values)) > 1  # a real per-pair score, not a constant
        (checkpoint,) = json.loads((run_dir / "run_summary.json").read_text())["checkpoints"]
        assert (checkpoint["step"], checkpoint["lr"]) == (STEPS, LR) and math.isfinite(checkpoint["target_loss"])


def test_one_checkpoint_unrolled_covers_the_whole_horizon(released: dict[str, Path], tiny_corpus: Path,
                                                          tmp_path: Path) -> None:
    """m = 1: the single checkpoint stands for all T updates (the damped influence function)."""
    trajectory = import_released(released["wrapped"], tmp_path, FACTS)
    table = load_pairs(expand_shards(str(tiny_corpus / "*.tar")), 32)
    settings = InfluenceSettings(bank_size=7, proxy_batch_size=8, batch_size=8, components=("d",),
                                 unrolled=UnrolledSettings(lanczos_steps=3))
    unrolled = TrajectoryInfluence(trajectory, settings).prepare_unrolled(table, table)
    assert unrolled.diagnostics["segment_updates"] == [STEPS]
    assert all(torch.isfinite(v).all() for v in unrolled.directions[0].values())


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize("drop, flag", [("--steps", "--steps"), ("--lr", "--lr"), ("--model", "--model"),
                                        ("--train-num-samples", "--train-num-samples"),
                                        ("--batch-size", "--batch-size")])
def test_missing_stated_value_exits_2_naming_the_flag(drop: str, flag: str, released: dict[str, Path],
                                                      tmp_path: Path, capsys) -> None:
    i = FLAGS.index(drop)
    argv = ["import", str(released["bare"]), *FLAGS[:i], *FLAGS[i + 2:], "--out", str(tmp_path / "t")]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"{flag} is required" in err
    assert not (tmp_path / "t").exists()


@pytest.mark.parametrize("extra, message", [(["--lr", "0"], "--lr must be a positive number"),
                                            (["--lr", "nan"], "--lr must be a positive number"),
                                            (["--world-size", "2"], "--world-size: not for a checkpoint file"),
                                            (["--no-verify-lr"], "--no-verify-lr: not for a checkpoint file")])
def test_bad_or_foreign_options_exit_2(extra: list[str], message: str, released: dict[str, Path],
                                       tmp_path: Path, capsys) -> None:
    assert main(["import", str(released["bare"]), *FLAGS, *extra, "--out", str(tmp_path / "t")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err
    assert not (tmp_path / "t").exists()


def test_out_is_required_and_run_dir_refuses_released_options(released: dict[str, Path], tmp_path: Path,
                                                              capsys) -> None:
    assert main(["import", str(released["bare"]), *FLAGS]) == 2
    assert "--out is required" in capsys.readouterr().err
    assert not (released["bare"].parent / "trajectory.json").exists()
    assert main(["import", str(tmp_path), "--steps", "5", "--lr", "0.1"]) == 2
    assert "--steps, --lr: not for a run directory" in capsys.readouterr().err
    assert main(["import", str(tmp_path / "missing.pt"), *FLAGS, "--out", str(tmp_path / "t")]) == 2
    assert "not found" in capsys.readouterr().err


def test_state_dict_that_does_not_fit_the_model(weights: dict[str, torch.Tensor], released: dict[str, Path],
                                                tmp_path: Path, capsys) -> None:
    other = [*FLAGS[:1], "tiny-clip-64", *FLAGS[2:]]
    assert main(["import", str(released["bare"]), *other, "--out", str(tmp_path / "t")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "does not load into model 'tiny-clip-64'" in err
    assert "missing" in err and "shape mismatch" in err and "more)" in err
    assert not (tmp_path / "t").exists()
    edited = dict(weights)
    del edited["logit_scale"]
    edited["visual.extra_head"] = torch.zeros(3)
    path = tmp_path / "edited.pt"
    torch.save(edited, path)
    with pytest.raises(UsageError, match=r"missing logit_scale; unexpected visual\.extra_head$"):
        import_released(path, tmp_path / "t", FACTS)


@pytest.mark.parametrize("content, message", [
    (b"not a checkpoint", "cannot read checkpoint"),
    ([1, 2, 3], "does not hold a dict"),
    ({"epoch": 3, "name": "run"}, "is not a model checkpoint"),
    ({}, "is not a model checkpoint"),
])
def test_file_that_is_not_a_checkpoint(content: object, message: str, tmp_path: Path, capsys) -> None:
    path = tmp_path / "file.pt"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        torch.save(content, path)
    assert main(["import", str(path), *FLAGS, "--out", str(tmp_path / "t")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err
    assert not (tmp_path / "t").exists()


def test_broken_safetensors_file(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{broken}")
    with pytest.raises(UsageError, match="cannot read checkpoint"):
        import_released(path, tmp_path / "t", FACTS)


def test_adam_twins_refused_without_optimizer_state(released: dict[str, Path], tiny_corpus: Path,
                                                    tmp_path: Path) -> None:
    trajectory = import_released(released["bare"], tmp_path, FACTS)
    table = load_pairs(expand_shards(str(tiny_corpus / "*.tar")), 32)
    settings = InfluenceSettings(bank_size=7, proxy_batch_size=8, batch_size=8, components=("a",), adam=True)
    with pytest.raises(UsageError, match="score.adam needs the optimizer state.*step 50 has none"):
        TrajectoryInfluence(trajectory, settings).prepare_checkpoint(0, table, table)
