"""A truncated input shard whose surviving pairs are kept, through `diffin run` in process
(issue #23; the same on Ray: tests/jobs/test_img2dataset.py), and a source that changed
between score and reshard."""

from __future__ import annotations

import json
import shutil
import tarfile
from pathlib import Path

import yaml

from jobs import prune
from tests.img2dataset import truncate_after
from tests.jobs.test_img2dataset import FAST


def _keys(tar_path: Path) -> list[str]:
    with tarfile.open(tar_path) as tar:
        return list(dict.fromkeys(m.name.split(".", 1)[0] for m in tar.getmembers()))


def _outputs(run_dir: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((run_dir / "shards").iterdir())}


def test_truncated_shard_kept_pairs_are_resharded_and_a_changed_source_is_one_line(
        tiny_corpus: Path, tmp_path: Path, capsys) -> None:
    corpus = tmp_path / "corpus"
    shutil.copytree(tiny_corpus, corpus)  # 3 shards of 16, sizes.json
    damaged = corpus / "00001.tar"
    truncate_after(damaged, 5)  # pair00016..pair00020 survive, the cut is inside pair00021
    config = tmp_path / "run.yaml"
    settings = {"data": {"shards": str(corpus / "*.tar"), "sizes": str(corpus / "sizes.json"),
                         "max_failed_fraction": 0.5}, **FAST}
    config.write_text(yaml.safe_dump(settings))
    run_dir = tmp_path / "run"
    args = ["--config", str(config), "--run-dir", str(run_dir), "--executor", "local", "--no-progress"]
    assert prune.main(args) == 0, capsys.readouterr().err
    assert f"damaged input shard {damaged} (truncated)" in capsys.readouterr().out
    summary = json.loads((run_dir / "run_summary.json").read_text())
    assert summary["reshard"]["damaged_sources"] == [
        {"shard": str(damaged), "status": "truncated", "error": summary["reshard"]["damaged_sources"][0]["error"],
         "kept": 5}]
    out_keys = [k for p in sorted((run_dir / "shards").glob("*.tar")) for k in _keys(p)]
    assert [f"pair{i:05d}" for i in range(16, 21)] == [k for k in out_keys if "00016" <= k[4:] <= "00031"]
    assert len(out_keys) == 37 == summary["reshard"]["pairs"]
    first = _outputs(run_dir)
    assert prune.main(args) == 0  # a rerun is a no-op
    assert _outputs(run_dir) == first

    # The source changes after scoring (now cut after 2 pairs): reshard cannot copy 3 kept pairs.
    shutil.rmtree(run_dir / "shards")
    cut = damaged.read_bytes()
    truncate_after(damaged, 2)
    capsys.readouterr()
    assert prune.main(args) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"input shard {damaged}: 3 of 5 kept pairs not found" in err[0], err
    left = sorted(p.name for p in (run_dir / "shards").iterdir())
    assert left == ["00000.tar", "00001.tar", "reshard_plan.json"]  # 00002.tar holds 00001's pairs: not written
    damaged.write_bytes(cut)  # fixed: the rerun completes, byte-identical
    assert prune.main(args) == 0, capsys.readouterr().err
    assert _outputs(run_dir) == first
