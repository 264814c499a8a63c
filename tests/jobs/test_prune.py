"""`diffin run` / jobs.prune on an embedded local Ray: outputs, resume, refusal on changed config."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from jobs import prune
from pipeline.model.trajectory import Trajectory
from tests.conftest import EVERY_STAGE, write_config


@pytest.mark.ray
def test_prune_on_local_ray_then_resume(tiny_corpus: Path, tmp_path: Path, capsys) -> None:
    config = write_config(tmp_path / "run.yaml", tiny_corpus)
    run_dir = tmp_path / "run"
    assert prune.main(["--config", str(config), "--run-dir", str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert str(run_dir) in out and "trajectory" in out
    traj = Trajectory.load(run_dir / "trajectory")
    assert [c.step for c in traj.checkpoints] == [2, 4, 6]
    summary = json.loads((run_dir / "run_summary.json").read_text())
    assert summary["pairs_in"] == 48 and summary["shards"] == 3
    mtime = (run_dir / "trajectory" / "trajectory.json").stat().st_mtime_ns
    # Rerun: the finished trajectory is reused, not retrained.
    assert prune.main(["--config", str(config), "--run-dir", str(run_dir), "--executor", "local"]) == 0
    assert (run_dir / "trajectory" / "trajectory.json").stat().st_mtime_ns == mtime
    # A changed configuration never mixes with the old results.
    changed = write_config(tmp_path / "changed.yaml", tiny_corpus, steps=8)
    assert prune.main(["--config", str(changed), "--run-dir", str(run_dir), "--executor", "local"]) == 2
    assert "different configuration" in capsys.readouterr().err
    assert (run_dir / "trajectory" / "trajectory.json").stat().st_mtime_ns == mtime


def test_bad_config_exits_2_and_writes_nothing(tiny_corpus: Path, tmp_path: Path, capsys) -> None:
    config = write_config(tmp_path / "run.yaml", tiny_corpus, model="no-such-model")
    run_dir = tmp_path / "run"
    assert prune.main(["--config", str(config), "--run-dir", str(run_dir)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "trajectory.train.model: unknown model" in err
    assert not run_dir.exists()


def test_shards_with_the_same_file_name_refused_before_any_work(tmp_path: Path, capsys) -> None:
    """Two input shards named 00000.tar in different folders would share one score file:
    refused up front (exit 2, one line naming both), nothing trained or written."""
    import yaml

    from tests.conftest import make_tiny_corpus

    a = make_tiny_corpus(tmp_path / "a", n=16, shard_size=16)
    b = make_tiny_corpus(tmp_path / "b", n=16, shard_size=16)
    config = write_config(tmp_path / "run.yaml", a)
    cfg = yaml.safe_load(config.read_text())
    cfg["data"] = {"shards": [str(a / "00000.tar"), str(b / "00000.tar")]}
    config.write_text(yaml.safe_dump(cfg))
    run_dir = tmp_path / "run"
    assert prune.main(["--config", str(config), "--run-dir", str(run_dir)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(a / "00000.tar") in err[0] and str(b / "00000.tar") in err[0]
    assert not run_dir.exists()


def test_train_cli_with_exclusions(tiny_corpus: Path, tmp_path: Path, capsys) -> None:
    from jobs import train

    config = write_config(tmp_path / "run.yaml", tiny_corpus, steps=4, warmup=1, checkpoints=2)
    uids = tmp_path / "drop.txt"
    first_uid = json.loads(subprocess.run(
        ["tar", "-xOf", str(tiny_corpus / "00000.tar"), "pair00000.json"],
        check=True, capture_output=True, text=True).stdout)["uid"]
    uids.write_text(first_uid + "\n")
    assert train.main(["--config", str(config), "--out", str(tmp_path / "t"), "--exclude-uids", str(uids)]) == 0
    assert Trajectory.load(tmp_path / "t").num_samples == 47
    assert "trajectory:" in capsys.readouterr().out
    # Refuses to clobber; missing exclusion file is a usage error; nothing new written.
    assert train.main(["--config", str(config), "--out", str(tmp_path / "t")]) == 2
    assert train.main(["--config", str(config), "--out", str(tmp_path / "u"), "--exclude-uids", "/nope"]) == 2
    assert not (tmp_path / "u").exists()


def test_train_cli_trains_what_run_would(tiny_corpus: Path, tmp_path: Path, capsys) -> None:
    """`diffin train` leaves the held-out target pairs out exactly as `diffin run` does, and a
    finished trajectory of the same configuration is reused, not retrained or refused."""
    import yaml

    from jobs import train
    from pipeline.config import load_config
    from pipeline.data.pairs import in_holdout, load_pairs
    from pipeline.data.shards import expand_shards, load_sizes
    from pipeline.model.train import proxy_fingerprint
    from pipeline.stages.trajectory import holdout_of

    config = write_config(tmp_path / "run.yaml", tiny_corpus, steps=4, warmup=1, checkpoints=2)
    cfg = yaml.safe_load(config.read_text())
    cfg["target"] = {"holdout_fraction": 0.25, "seed": 3}
    config.write_text(yaml.safe_dump(cfg))
    out = tmp_path / "t"
    assert train.main(["--config", str(config), "--out", str(out)]) == 0
    run = load_config(str(config))
    urls = expand_shards(run.data.shards)
    held = sum(in_holdout(u, 0.25, 3) for u in load_pairs(urls, 32).uids)
    assert 0 < held < 48
    trajectory = Trajectory.load(out)
    assert trajectory.num_samples == 48 - held
    assert trajectory.source["fingerprint"] == proxy_fingerprint(
        urls, run.trajectory.train, load_sizes(run.data.sizes), holdout=holdout_of(run))
    stamp = (out / "trajectory.json").stat().st_mtime_ns
    assert train.main(["--config", str(config), "--out", str(out)]) == 0  # reused
    assert (out / "trajectory.json").stat().st_mtime_ns == stamp
    assert train.main(["--config", str(config), "--out", str(out), "--overwrite"]) == 0  # retrained
    assert (out / "trajectory.json").stat().st_mtime_ns != stamp
    assert "trajectory:" in capsys.readouterr().out


def test_console_script_help() -> None:
    """The installed ``diffin`` script runs (one process: the subcommands' help is in process below)."""
    exe = Path(sys.executable).with_name("diffin")
    result = subprocess.run([str(exe), "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "usage:" in result.stdout and "COMMAND" in result.stdout


@pytest.mark.parametrize("argv", [["run", "--help"], ["train", "--help"], ["data", "--help"],
                                  ["data", "openmoji", "--help"], ["trajectory", "import", "--help"]])
def test_subcommand_help(argv: list[str], capsys) -> None:
    from jobs import cli

    with pytest.raises(SystemExit) as info:
        cli.main(argv)
    assert info.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: diffin {' '.join(a for a in argv if a != '--help')}")


BAD_INPUTS = [
    ("unknown key", {"trajectory.train.stepz": 5}, "trajectory.train.stepz: unknown key"),
    ("wrong type", {"trajectory.train.batch_size": "big"}, "trajectory.train.batch_size"),
    ("missing path", {"data.sizes": "/nonexistent/sizes.json"}, "data.sizes: file not found"),
    ("unknown model", {"trajectory.train.model": "ViT-Nope"}, "unknown model 'ViT-Nope'"),
    ("empty shard list", {"data.shards": []}, "data.shards: shard list"),
]


@pytest.mark.parametrize("label,change,expected", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_input_one_line_exit_2_nothing_written(tiny_corpus: Path, tmp_path: Path, capsys,
                                                   label: str, change: dict, expected: str) -> None:
    import yaml

    config = yaml.safe_load(write_config(tmp_path / "run.yaml", tiny_corpus).read_text())
    for dotted, value in change.items():
        *parents, leaf = dotted.split(".")
        node = config
        for p in parents:
            node = node[p]
        node[leaf] = value
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(config))
    run_dir = tmp_path / "run"
    for job in (prune, __import__("jobs.train", fromlist=["main"])):
        args = ["--config", str(tmp_path / "bad.yaml")]
        args += ["--run-dir", str(run_dir)] if job is prune else ["--out", str(run_dir)]
        assert job.main(args) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and expected in err, err
        assert not run_dir.exists()


def test_absent_local_shard_is_data_and_a_rerun_scores_it_alone(tiny_corpus: Path, tmp_path: Path,
                                                                 capsys) -> None:
    """A partly downloaded corpus: one listed shard is absent. The run goes on and records it;
    once the shard exists, a rerun scores that shard and nothing else."""
    import shutil

    import yaml

    corpus = tmp_path / "corpus"
    shutil.copytree(tiny_corpus, corpus)
    absent = corpus / "00001.tar"
    parked = tmp_path / "00001.tar.parked"
    absent.rename(parked)
    config = write_config(tmp_path / "run.yaml", corpus)
    settings = yaml.safe_load(config.read_text())
    settings["data"]["shards"] = str(corpus / "{00000..00002}.tar")  # a brace list: 00001 is named
    settings["data"]["max_failed_fraction"] = 0.5  # 16 of 48 promised pairs are missing
    settings |= EVERY_STAGE
    config.write_text(yaml.safe_dump(settings))
    run_dir = tmp_path / "run"
    args = ["--config", str(config), "--run-dir", str(run_dir), "--executor", "local", "--no-progress"]
    assert prune.main(args) == 0, capsys.readouterr().err
    summary = json.loads((run_dir / "selection" / "summary.json").read_text())
    assert summary["counts"]["missing"] == 16
    problem = {Path(s["shard"]).name: s["status"] for s in summary["shards"]["problems"]}
    assert problem == {"00001.tar": "unreadable"}
    stats = json.loads((run_dir / "stats" / "00001.json").read_text())
    assert stats["status"] == "unreadable" and "No such file" in stats["error"]
    kept_before = json.loads((run_dir / "shards" / "sizes.json").read_text())

    parked.rename(absent)  # the download finishes
    done = {p.name: p.stat().st_mtime_ns for p in (run_dir / "scores").glob("*.parquet")}
    assert prune.main(args) == 0, capsys.readouterr().err
    after = json.loads((run_dir / "run_summary.json").read_text())
    assert after["shards_scored_now"] == 1 and after["pairs_scored_now"] == 16
    for name in ("00000.parquet", "00002.parquet"):
        assert (run_dir / "scores" / name).stat().st_mtime_ns == done[name]
    summary = json.loads((run_dir / "selection" / "summary.json").read_text())
    assert summary["counts"]["missing"] == 0 and summary["counts"]["in"] == 48
    assert sum(json.loads((run_dir / "shards" / "sizes.json").read_text()).values()) > sum(kept_before.values())
