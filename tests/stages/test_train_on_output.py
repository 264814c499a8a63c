"""A pruned run's output shards feed open_clip's own trainer: one epoch is exactly the kept pairs.

The README's command ("Train on the pruned set") runs as written, with tiny sizes: the micro
model, batch 4. The training process records the uid of every sample open_clip's WebDataset
pipeline lets through (tests/openclip_runner.py).
"""

from __future__ import annotations

import json
import re
import shlex
from argparse import Namespace
from pathlib import Path

import pyarrow.parquet as pq
import pytest

import pipeline  # noqa: F401  (torchvision shim before open_clip)
from open_clip_train import data as open_clip_data
from open_clip_train.data import get_wds_dataset
from open_clip_train.params import parse_args

from pipeline.data.shards import SIZES_FILE, expand_shards
from pipeline.model.openclip_wds import fix_open_clip_wds_reader
from pipeline.stages.select import KEPT_FILE
from tests.openclip_runner import MICRO, start_train, write_micro_config
from tests.readme import readme_block
from tests.stages.conftest import PRUNED_KEPT

SECTION = "## Train on the pruned set"
TINY = {"--model": MICRO, "--batch-size": "4", "--warmup": "1"}  # 12 kept pairs = 3 batches
PASSES = open_clip_data.filter_no_caption_or_no_image  # open_clip's own sample filter


def kept_uids(run_dir: Path) -> list[str]:
    return sorted(pq.read_table(run_dir / "selection" / KEPT_FILE, columns=["uid"]).column("uid").to_pylist())


def kept_count(run_dir: Path) -> int:
    """``--train-num-samples`` as the README says: the sum of the output's sizes.json."""
    return sum(json.loads((run_dir / "shards" / SIZES_FILE).read_text()).values())


def readme_command() -> list[str]:
    """The README's training command, as argv."""
    return shlex.split(readme_block(SECTION, "bash").replace("\\\n", " "))


def with_values(argv: list[str], values: dict[str, str]) -> list[str]:
    """``argv`` with the values of the given (present) flags replaced."""
    out = list(argv)
    for flag, value in values.items():
        out[out.index(flag) + 1] = value
    return out


def test_readme_command_shape(pruned_run: Path) -> None:
    argv = readme_command()
    assert argv[:3] == ["python", "-m", "jobs.openclip_train"]
    args = dict(zip(argv[3::2], argv[4::2]))
    assert args["--dataset-type"] == "webdataset" and "--dataset-resampled" not in argv
    assert args["--workers"] == "1" and args["--epochs"] == "1"
    # the demo's numbers: a batch size that divides the kept count
    assert int(args["--train-num-samples"]) % int(args["--batch-size"]) == 0
    # the brace pattern names exactly the shards sizes.json lists (the fixture also writes 3)
    pattern = args["--train-data"].replace("runs/demo", str(pruned_run))
    sizes = json.loads((pruned_run / "shards" / SIZES_FILE).read_text())
    assert [Path(u).name for u in expand_shards(pattern)] == sorted(sizes)


def test_open_clip_trains_one_epoch_on_exactly_the_kept_pairs(pruned_run: Path, tmp_path: Path) -> None:
    count = kept_count(pruned_run)
    uids = kept_uids(pruned_run)
    assert count == len(uids) == PRUNED_KEPT
    argv = with_values(readme_command()[3:], {
        **TINY, "--train-num-samples": str(count), "--logs": str(tmp_path), "--name": "pruned"})
    argv = [a.replace("runs/demo", str(pruned_run)) for a in argv]
    seen = tmp_path / "seen.txt"
    proc = start_train(write_micro_config(tmp_path), argv, "jobs.openclip_train", seen)
    output, _ = proc.communicate(timeout=300)
    log = (tmp_path / "pruned" / "out.log")
    print(log.read_text() if log.exists() else output[-5000:])
    assert proc.returncode == 0, output[-3000:]
    # open_clip's own count of the epoch's samples ...
    done = re.findall(r"Train Epoch: 0 \[\s*(\d+)/(\d+) \(100%\)\]", log.read_text())
    assert done == [(str(count), str(count))]
    # ... and the samples its pipeline actually yielded: each kept pair once, nothing else
    assert sorted(seen.read_text().split()) == uids
    assert (tmp_path / "pruned" / "checkpoints" / "epoch_1.pt").is_file()


def _loader_args(pruned_run: Path, batch_size: int, workers: int) -> Namespace:
    pattern = f"{pruned_run}/shards/{{00000..00002}}.tar"
    args = parse_args(["--train-data", pattern, "--dataset-type", "webdataset", "--train-num-samples",
                       str(kept_count(pruned_run)), "--batch-size", str(batch_size),
                       "--workers", str(workers)])
    args.world_size, args.rank = 1, 0
    return args


def _epoch(args: Namespace, monkeypatch: pytest.MonkeyPatch) -> tuple[list[str], int]:
    """One epoch of open_clip's training loader (in-process, no model): the uids its sample
    filter let through (in order; the shuffle buffer reads ahead) and the samples it yielded."""
    seen: list[str] = []

    def record(sample: dict) -> bool:
        ok = PASSES(sample)
        if ok:
            seen.append(json.loads(sample["json"])["uid"])
        return ok

    monkeypatch.setattr(open_clip_data, "filter_no_caption_or_no_image", record)
    info = get_wds_dataset(args, lambda image: 0, is_train=True, tokenizer=lambda texts: [0])
    yielded = sum(len(images) for images, _ in info.dataloader)
    assert yielded == info.dataloader.num_samples
    return seen, yielded


def test_open_clip_loader_yields_the_kept_pairs_once(pruned_run: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """open_clip's loader (fixed reader) on the output shards: with a batch size dividing the
    kept count, one epoch yields each kept pair once; otherwise it rounds up and repeats."""
    # undone after the test: monkeypatch restores the reader it is told to set (to itself)
    reader = open_clip_data.tarfile_to_samples_nothrow
    monkeypatch.setattr(open_clip_data, "tarfile_to_samples_nothrow", reader)
    assert fix_open_clip_wds_reader() is True
    assert fix_open_clip_wds_reader() is False  # applied once
    uids = kept_uids(pruned_run)
    seen, yielded = _epoch(_loader_args(pruned_run, 4, 0), monkeypatch)
    assert sorted(seen) == uids and yielded == len(uids)
    seen, yielded = _epoch(_loader_args(pruned_run, 5, 0), monkeypatch)
    assert yielded == 15  # ceil(12 / 5) = 3 batches: the kept pairs, then 3 from a second pass
    assert sorted(seen[:len(uids)]) == uids


def test_unfixed_open_clip_reader_fails_at_the_first_shard_end(pruned_run: Path) -> None:
    """Why jobs.openclip_train exists: open_clip_train 3.3.0 with webdataset 1.0.2. When this
    fails, open_clip reads webdataset's end-of-shard marker itself and the fix can go."""
    args = _loader_args(pruned_run, 4, 0)
    info = get_wds_dataset(args, lambda image: 0, is_train=True, tokenizer=lambda texts: [0])
    with pytest.raises(KeyError, match="fname"):
        next(iter(info.dataloader))
