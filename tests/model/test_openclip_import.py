"""``diffin trajectory import``: steps and learning rates of open_clip runs.

Two real runs are produced with ``open_clip_train.main`` itself (CPU, synthetic data, a micro
model config registered in the training process); distributed webdataset / csv runs are
written in exactly open_clip's format (params.txt from open_clip's own argument parser,
checkpoints with its keys) and their batch counts checked against open_clip's own loaders.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
from argparse import Namespace
from pathlib import Path
from typing import Callable

import pytest
import torch

import pipeline  # noqa: F401  (torchvision shim before open_clip)
from open_clip_train.data import get_csv_dataset, get_wds_dataset
from open_clip_train.params import parse_args
from open_clip_train.scheduler import const_lr_cooldown, cosine_lr

from jobs.trajectory import main
from pipeline.errors import UsageError
from pipeline.model.openclip_import import import_run
from pipeline.model.scorer import segment_lrs
from pipeline.model.trajectory import Trajectory
from tests.openclip_runner import MICRO, start_train, write_micro_config

COMMON_ARGS = ["--dataset-type", "synthetic", "--model", MICRO, "--device", "cpu",
               "--precision", "fp32", "--workers", "0", "--log-every-n-steps", "1"]

# Run A: cosine; 45 samples / batch 8 -> 5 batches per epoch (drop_last), 3 epochs, T = 15.
RUN_A = dict(args=["--train-num-samples", "45", "--batch-size", "8", "--epochs", "3",
                   "--warmup", "4", "--lr", "2e-3", "--seed", "1", "--save-most-recent"],
             lr=2e-3, warmup=4, steps_per_epoch=5, epochs=3)
# Run B: const-cooldown with accum_freq 3: 60 / 8 -> 7 micro-batches -> 2 steps per epoch
# and one left-over micro-batch (whose scheduler call assigns the next epoch's first lr).
RUN_B = dict(args=["--train-num-samples", "60", "--batch-size", "8", "--epochs", "2",
                   "--accum-freq", "3", "--warmup", "1", "--lr", "1e-3",
                   "--lr-scheduler", "const-cooldown", "--epochs-cooldown", "1",
                   "--lr-cooldown-end", "1e-4", "--lr-cooldown-power", "2.0", "--seed", "2"],
             lr=1e-3, warmup=1, steps_per_epoch=2, epochs=2, cooldown=2, end=1e-4, power=2.0)


# --------------------------------------------------------------------------- independent formulas


def cosine_formula(step: int, base: float, warmup: int, total: int) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / (total - warmup))) * base


def cooldown_formula(step: int, base: float, warmup: int, total: int, cooldown: int,
                     power: float, end: float) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    if step < total - cooldown:
        return base
    return (1 - (step - (total - cooldown)) / cooldown) ** power * (base - end) + end


def simulate_open_clip_loop(make_scheduler: Callable, num_batches: int, accum: int,
                            epochs: int) -> list[float]:
    """Drive open_clip's scheduler as train_one_epoch does (one call per micro-batch) and
    return the optimizer's lr at the end of each epoch."""
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = make_scheduler(opt)
    per_epoch = num_batches // accum
    out = []
    for epoch in range(epochs):
        for i in range(num_batches):
            scheduler(per_epoch * epoch + i // accum)
        out.append(opt.param_groups[0]["lr"])
    return out


# --------------------------------------------------------------------------- a real open_clip run


def _train(logs: Path, name: str, config: Path, args: list[str]) -> subprocess.Popen:
    return start_train(config, [*COMMON_ARGS, *args, "--logs", str(logs), "--name", name])


@pytest.fixture(scope="module")
def open_clip_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Run directories of two real (tiny, CPU) open_clip_train runs, trained in parallel."""
    logs = tmp_path_factory.mktemp("open_clip_logs")
    config = write_micro_config(logs)
    procs = {name: _train(logs, name, config, spec["args"])
             for name, spec in (("run_a", RUN_A), ("run_b", RUN_B))}
    for name, proc in procs.items():
        output, _ = proc.communicate(timeout=240)
        if proc.returncode != 0:
            pytest.fail(f"open_clip_train {name} failed ({proc.returncode}):\n{output[-3000:]}")
    return {name: logs / name for name in procs}


def _logged_lrs(run_dir: Path) -> list[float]:
    text = (run_dir / "out.log").read_text()
    return [float(x) for x in re.findall(r"Train Epoch: .* LR: ([0-9.]+)", text)]


def _saved_lr(path: Path) -> float:
    return torch.load(path, map_location="cpu", weights_only=True)["optimizer"]["param_groups"][0]["lr"]


def test_real_cosine_run_steps_and_lrs(open_clip_runs: dict[str, Path], tmp_path: Path) -> None:
    run = open_clip_runs["run_a"]
    spe, epochs, base, warmup = RUN_A["steps_per_epoch"], RUN_A["epochs"], RUN_A["lr"], RUN_A["warmup"]
    total = spe * epochs
    names = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert (run / "params.txt").is_file()
    assert names == ["epoch_1.pt", "epoch_2.pt", "epoch_3.pt", "epoch_latest.pt"]

    # What open_clip actually applied: one logged lr per step (6 decimals) ...
    logged = _logged_lrs(run)
    assert len(logged) == total
    assert logged == pytest.approx([cosine_formula(s, base, warmup, total) for s in range(total)],
                                   abs=1e-6)
    # ... and the lr left in each checkpoint's optimizer: the lr of step t - 1.
    for k in range(1, epochs + 1):
        assert _saved_lr(run / "checkpoints" / f"epoch_{k}.pt") == pytest.approx(
            cosine_formula(k * spe - 1, base, warmup, total), rel=1e-12)

    traj = import_run(run)
    traj.save()
    loaded = Trajectory.load(run)
    assert loaded == traj
    assert [c.path for c in loaded.checkpoints] == [f"checkpoints/epoch_{k}.pt" for k in (1, 2, 3)]
    assert [c.step for c in loaded.checkpoints] == [5, 10, 15]
    expected = [cosine_formula(min(t, total - 1), base, warmup, total) for t in (5, 10, 15)]
    assert [c.lr for c in loaded.checkpoints] == pytest.approx(expected, rel=1e-12)
    assert loaded.total_steps == total and loaded.num_samples == 45 and loaded.batch_size == 8
    assert loaded.seed == 1
    assert loaded.model == {"name": MICRO}  # not registered in this process: name only
    assert loaded.optimizer == {"name": "adamw", "lr": base, "betas": [0.9, 0.999], "eps": 1e-8,
                                "weight_decay": 0.2}
    assert loaded.schedule["kind"] == "cosine" and loaded.schedule["warmup"] == warmup
    # The unrolled score's per-update rates η_s, from the imported schedule, are what open_clip applied.
    per_update = [lr for segment in segment_lrs(loaded, [c.step for c in loaded.checkpoints]) for lr in segment]
    assert per_update == pytest.approx(logged, abs=1e-6) and len(per_update) == total
    assert loaded.source["kind"] == "open_clip" and loaded.source["run_dir"] == str(run.resolve())
    assert loaded.source["params"]["model"] == MICRO
    assert os.path.isfile(loaded.checkpoint_path(2))


def test_real_cooldown_run_with_accumulation(open_clip_runs: dict[str, Path]) -> None:
    run = open_clip_runs["run_b"]
    spe, epochs, base = RUN_B["steps_per_epoch"], RUN_B["epochs"], RUN_B["lr"]
    total = spe * epochs

    def lr(step: int) -> float:
        return cooldown_formula(step, base, RUN_B["warmup"], total, RUN_B["cooldown"],
                                RUN_B["power"], RUN_B["end"])

    assert _logged_lrs(run) == pytest.approx([lr(s) for s in range(total)], abs=1e-6)
    # The left-over 7th micro-batch of each epoch made the scheduler assign lr(K * spe).
    for k in (1, 2):
        assert _saved_lr(run / "checkpoints" / f"epoch_{k}.pt") == pytest.approx(lr(k * spe), rel=1e-12)
    # And open_clip's own scheduler, driven like train_one_epoch, agrees.
    simulated = simulate_open_clip_loop(
        lambda opt: const_lr_cooldown(opt, base, RUN_B["warmup"], total, RUN_B["cooldown"],
                                      RUN_B["power"], RUN_B["end"]), 7, 3, epochs)
    assert simulated == [_saved_lr(run / "checkpoints" / f"epoch_{k}.pt") for k in (1, 2)]

    traj = import_run(run)
    assert [c.step for c in traj.checkpoints] == [2, 4]
    assert [c.lr for c in traj.checkpoints] == pytest.approx([lr(2), lr(3)], rel=1e-12)
    assert traj.batch_size == 8 * 3  # samples per optimizer step
    assert traj.schedule["cooldown_steps"] == 2 and traj.schedule["cooldown_end_lr"] == 1e-4


def test_cli_import_to_other_dir_and_world_size_check(open_clip_runs: dict[str, Path],
                                                     tmp_path: Path, capsys) -> None:
    run = open_clip_runs["run_a"]
    out = tmp_path / "traj"
    assert main(["import", str(run), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "trajectory.json" in printed and "epoch_3.pt" in printed
    loaded = Trajectory.load(out)
    assert [c.path for c in loaded.checkpoints] == [str((run / "checkpoints" / f"epoch_{k}.pt").resolve())
                                                    for k in (1, 2, 3)]
    assert os.path.isfile(loaded.checkpoint_path(0))
    # A wrong world size changes the batch count; the saved optimizer lrs expose it.
    assert main(["import", str(run), "--out", str(tmp_path / "bad"), "--world-size", "2"]) == 2
    assert "recomputed lr" in capsys.readouterr().err
    assert not (tmp_path / "bad" / "trajectory.json").exists()
    assert main(["import", str(run), "--out", str(tmp_path / "bad"), "--world-size", "2",
                 "--no-verify-lr"]) == 0
    assert [c.step for c in Trajectory.load(tmp_path / "bad").checkpoints] == [2, 4, 6]


# --------------------------------------------------------------------------- runs in open_clip's format


def open_clip_args(argv: list[str], run_dir: Path, world_size: int) -> Namespace:
    """open_clip_train's parsed arguments plus what its main() sets before writing params.txt."""
    args = parse_args(argv)
    args.distributed = world_size > 1
    args.world_size, args.rank, args.local_rank, args.device = world_size, 0, 0, "cuda:0"
    args.name, args.log_path = run_dir.name, str(run_dir / "out.log")
    args.log_level, args.wandb, args.tensorboard, args.tensorboard_path = 20, False, False, ""
    args.checkpoint_path, args.distill = str(run_dir / "checkpoints"), False
    return args


def write_params_txt(run_dir: Path, args: Namespace) -> None:
    """params.txt as open_clip_train.main writes it: sorted ``name: value`` lines."""
    run_dir.mkdir(parents=True, exist_ok=True)
    lines = [f"{name}: {getattr(args, name)}\n" for name in sorted(vars(args))]
    (run_dir / "params.txt").write_text("".join(lines))


def write_checkpoint(path: Path, epoch: int, lr: float, name: str = "run") -> None:
    """A checkpoint with open_clip's keys; its AdamW state holds ``lr`` in every group."""
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW([{"params": [model.bias], "weight_decay": 0.0},
                             {"params": [model.weight], "weight_decay": 0.2}], lr=lr)
    model(torch.ones(1, 3)).sum().backward()
    opt.step()
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"epoch": epoch, "name": name, "state_dict": model.state_dict(),
                "optimizer": opt.state_dict()}, path)


WDS_ARGV = ["--train-data", "/shards/datacomp-{00000..00127}.tar", "--train-num-samples", "1000000",
            "--dataset-type", "webdataset", "--batch-size", "256", "--workers", "6", "--epochs", "4",
            "--warmup", "500", "--lr", "5e-4", "--model", "ViT-B-32", "--precision", "amp",
            "--dataset-resampled", "--save-most-recent"]


@pytest.mark.filterwarnings("ignore:This DataLoader will create")
def test_webdataset_distributed_rounding(tmp_path: Path) -> None:
    run = tmp_path / "wds_run"
    args = open_clip_args(WDS_ARGV, run, world_size=8)
    write_params_txt(run, args)
    # open_clip's own loader decides the batch count (shards are never opened).
    loader = get_wds_dataset(args, None, is_train=True, tokenizer=None).dataloader
    num_batches = loader.num_batches
    # by hand: ceil(1e6 / 2048) = 489 per process, rounded up to a multiple of 6 workers
    assert num_batches == 492 == math.ceil(math.ceil(1_000_000 / (256 * 8)) / 6) * 6
    total = num_batches * 4
    saved = simulate_open_clip_loop(lambda opt: cosine_lr(opt, 5e-4, 500, total), num_batches, 1, 4)
    for k in (1, 2, 4):
        write_checkpoint(run / "checkpoints" / f"epoch_{k}.pt", k, saved[k - 1])
    write_checkpoint(run / "checkpoints" / "epoch_latest.pt", 4, saved[3])

    traj = import_run(run)
    assert traj.total_steps == total == 1968
    assert [c.step for c in traj.checkpoints] == [492, 984, 1968]
    assert [c.path for c in traj.checkpoints] == [f"checkpoints/epoch_{k}.pt" for k in (1, 2, 4)]
    assert [c.lr for c in traj.checkpoints] == pytest.approx(
        [cosine_formula(t, 5e-4, 500, total) for t in (492, 984, 1967)], rel=1e-12)
    assert traj.num_samples == 1_000_000 and traj.batch_size == 2048
    assert traj.source["samples_per_epoch"] == loader.num_samples == 492 * 2048
    assert traj.optimizer["betas"] == [0.9, 0.98] and traj.optimizer["eps"] == 1e-6  # ViT defaults
    import open_clip

    assert traj.model == {"name": "ViT-B-32", "config": open_clip.get_model_config("ViT-B-32")}

    # Overrides change the rounding: 4 processes, 5 workers -> ceil(977 / 5) * 5 = 980.
    traj4 = import_run(run, world_size=4, workers=5, verify_lr=False)
    assert traj4.checkpoints[0].step == 980 and traj4.batch_size == 1024


def test_csv_distributed_batches_and_forced_model_config(tmp_path: Path) -> None:
    run = tmp_path / "csv_run"
    csv = tmp_path / "train.csv"
    csv.write_text("filepath\ttitle\n" + "".join(f"img{i}.jpg\tcaption {i}\n" for i in range(103)))
    argv = ["--train-data", str(csv), "--batch-size", "8", "--epochs", "2", "--warmup", "2",
            "--lr", "1e-3", "--model", "ViT-B-32", "--force-image-size", "64",
            "--force-quick-gelu", "--workers", "0"]
    args = open_clip_args(argv, run, world_size=4)
    args.force_image_size = args.force_image_size[0]  # main() turns a 1-list into an int
    write_params_txt(run, args)
    # 103 rows over 4 processes: ceil(103 / 4) = 26 per process -> 3 full batches of 8
    sampler = torch.utils.data.DistributedSampler(range(103), num_replicas=4, rank=0)
    assert len(torch.utils.data.DataLoader(range(103), batch_size=8, sampler=sampler, drop_last=True)) == 3
    write_checkpoint(run / "checkpoints" / "epoch_2.pt", 2, cosine_formula(5, 1e-3, 2, 6))

    traj = import_run(run)
    assert traj.num_samples == 103 and [c.step for c in traj.checkpoints] == [6]
    assert traj.source["dataset_type"] == "csv" and traj.source["batches_per_epoch"] == 3
    config = traj.model["config"]
    assert config["vision_cfg"]["image_size"] == 64 and config["quick_gelu"] is True

    # Single process: open_clip's own csv loader gives floor(103 / 8) = 12 batches.
    single = open_clip_args(argv, tmp_path / "single", world_size=1)
    assert get_csv_dataset(single, None, is_train=True).dataloader.num_batches == 12
    single.force_image_size = 64
    write_params_txt(tmp_path / "single", single)
    write_checkpoint(tmp_path / "single" / "checkpoints" / "epoch_1.pt", 1, cosine_formula(11, 1e-3, 2, 24))
    assert [c.step for c in import_run(tmp_path / "single").checkpoints] == [12]


# --------------------------------------------------------------------------- errors


def _minimal_run(run: Path) -> Path:
    write_params_txt(run, open_clip_args(["--dataset-type", "synthetic", "--train-num-samples", "32",
                                          "--batch-size", "8", "--epochs", "2", "--warmup", "1",
                                          "--lr", "1e-3"], run, world_size=1))
    return run


def test_missing_params_txt_exits_2(tmp_path: Path, capsys) -> None:
    (tmp_path / "checkpoints").mkdir()
    assert main(["import", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "params.txt" in err and len(err.strip().splitlines()) == 1


def test_no_checkpoints_exits_2(tmp_path: Path, capsys) -> None:
    run = _minimal_run(tmp_path / "run")
    assert main(["import", str(run)]) == 2
    assert "no open_clip checkpoints" in capsys.readouterr().err
    assert not (run / "trajectory.json").exists()


def test_epoch_name_mismatch_and_bad_values(tmp_path: Path) -> None:
    run = _minimal_run(tmp_path / "run")
    write_checkpoint(run / "checkpoints" / "epoch_2.pt", 1, 1e-3)
    with pytest.raises(UsageError, match="says epoch 2 but it stores epoch 1"):
        import_run(run)
    (run / "checkpoints" / "epoch_2.pt").unlink()
    write_checkpoint(run / "checkpoints" / "epoch_3.pt", 3, 1e-3)
    with pytest.raises(UsageError, match="beyond the run's 2 epochs"):
        import_run(run)
    (run / "checkpoints" / "epoch_3.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(UsageError, match="cannot read checkpoint"):
        import_run(run)
    params = run / "params.txt"
    params.write_text(params.read_text().replace("batch_size: 8", "batch_size: eight"))
    with pytest.raises(UsageError, match="batch_size = 'eight' is not an integer"):
        import_run(run)
    params.write_text(params.read_text().replace("batch_size: eight", "batch_size: 64"))
    with pytest.raises(UsageError, match="no optimizer step per epoch"):
        import_run(run)


def test_latest_checkpoint_kept_only_without_numbered_copy(tmp_path: Path) -> None:
    run = _minimal_run(tmp_path / "run")  # 4 steps per epoch, 2 epochs, warmup 1
    write_checkpoint(run / "checkpoints" / "epoch_1.pt", 1, cosine_formula(3, 1e-3, 1, 8))
    write_checkpoint(run / "checkpoints" / "epoch_latest.pt", 1, cosine_formula(3, 1e-3, 1, 8))
    assert [c.path for c in import_run(run).checkpoints] == ["checkpoints/epoch_1.pt"]
    # an interrupted run: the latest epoch has no epoch_K.pt of its own
    write_checkpoint(run / "checkpoints" / "epoch_latest.pt", 2, cosine_formula(7, 1e-3, 1, 8))
    traj = import_run(run)
    assert [(c.path, c.step) for c in traj.checkpoints] == [("checkpoints/epoch_1.pt", 4),
                                                            ("checkpoints/epoch_latest.pt", 8)]


def test_diffin_cli_dispatches_trajectory_import(tmp_path: Path) -> None:
    from jobs import cli

    run = _minimal_run(tmp_path / "run")
    write_checkpoint(run / "checkpoints" / "epoch_2.pt", 2, cosine_formula(7, 1e-3, 1, 8))
    assert cli.main(["trajectory", "import", str(run), "--out", str(tmp_path / "t")]) == 0
    assert [c.step for c in Trajectory.load(tmp_path / "t").checkpoints] == [8]
    assert cli.main(["trajectory", "import", str(tmp_path / "missing")]) == 2


def test_webdataset_size_from_sizes_json(tmp_path: Path) -> None:
    shards = tmp_path / "shards"
    shards.mkdir()
    (shards / "sizes.json").write_text(json.dumps({f"s-{i}.tar": 10 + i for i in range(4)}))
    run = tmp_path / "run"
    argv = ["--train-data", f"{shards}/s-{{0..3}}.tar", "--batch-size", "4", "--workers", "2",
            "--epochs", "1", "--warmup", "1", "--lr", "1e-3"]
    args = open_clip_args(argv, run, world_size=1)
    write_params_txt(run, args)
    num_batches = get_wds_dataset(args, None, is_train=True, tokenizer=None).dataloader.num_batches
    assert num_batches == 12  # 46 samples -> ceil(46 / 4) = 12, already a multiple of 2 workers
    write_checkpoint(run / "checkpoints" / "epoch_1.pt", 1, cosine_formula(11, 1e-3, 1, 12))
    traj = import_run(run)
    assert traj.num_samples == 46 and [c.step for c in traj.checkpoints] == [num_batches]
    (shards / "sizes.json").unlink()
    with pytest.raises(UsageError, match="--train-num-samples"):
        import_run(run)
    assert import_run(run, train_num_samples=46).checkpoints[0].step == 12
