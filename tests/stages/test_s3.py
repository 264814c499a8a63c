"""Object storage end to end (issue #6): shards in an S3 bucket, every output written to a bucket.

The test starts a real S3-protocol server (moto's) on 127.0.0.1, uploads a tiny corpus,
runs ``diffin run`` on local Ray with ``--run-dir s3://…``, checks the outputs in the
bucket, then deletes one score object and checks that a rerun recomputes exactly that one.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from jobs import prune
from tests.conftest import make_tiny_corpus

pytestmark = pytest.mark.ray

BUCKET = "diffin-test"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3_server():
    """A moto S3 server on 127.0.0.1 (stopped at the end); yields the fsspec options for it."""
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("the moto S3 server did not start")
                time.sleep(0.2)
        yield {"endpoint_url": f"http://127.0.0.1:{port}", "key": "test-key", "secret": "test-secret"}
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.fixture(scope="module")
def bucket(s3_server, tmp_path_factory):
    """The bucket, holding a tiny corpus (4 shards of 12 pairs + sizes.json) under corpus/."""
    import s3fs

    fs = s3fs.S3FileSystem(**s3_server)
    fs.mkdir(BUCKET)
    corpus = make_tiny_corpus(tmp_path_factory.mktemp("s3corpus"), n=48, shard_size=12)
    for path in sorted(corpus.iterdir()):
        fs.put_file(str(path), f"{BUCKET}/corpus/{path.name}")
    return fs


def _config(tmp_path: Path, options: dict) -> Path:
    config = {
        "data": {"shards": f"s3://{BUCKET}/corpus/{{00000..00003}}.tar", "sizes": f"s3://{BUCKET}/corpus/sizes.json"},
        "trajectory": {"train": {"model": "tiny-clip-32", "steps": 4, "batch_size": 8, "warmup": 1,
                                 "checkpoints": 2, "seed": 0}},
        "target": {"holdout_fraction": 0.2, "max_pairs": 16, "bank_size": 7, "seed": 0},
        "score": {"batch_size": 8, "proxy_batch_size": 8, "unrolled": {"lanczos_steps": 4}},
        "select": {"column": "diffin_unrolled", "rule": "top_fraction", "fraction": 0.5},
        "reshard": {"shard_size": 10},
        "resources": {"actors": 2, "num_cpus": 0.5},
        "storage": {"s3": options},
    }
    path = tmp_path / "s3.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_run_reads_and_writes_a_bucket_and_resumes_there(bucket, s3_server, tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)  # anything written locally by mistake would land here
    run = f"s3://{BUCKET}/runs/r1"
    args = ["--config", str(_config(tmp_path, s3_server)), "--run-dir", run, "--no-progress"]
    assert prune.main(args) == 0, capsys.readouterr().err
    fs = bucket
    root = f"{BUCKET}/runs/r1"
    names = {p[len(root) + 1:] for p in fs.find(root)}
    assert {"config.json", "run_summary.json", "trajectory/trajectory.json", "prepared/bank.pt",
            "selection/kept.parquet", "selection/kept_uids.npy", "selection/manifest.parquet",
            "selection/summary.json", "shards/sizes.json"} <= names
    scores = sorted(n for n in names if n.startswith("scores/"))
    assert scores == [f"scores/{i:05d}.parquet" for i in range(4)]
    assert sorted(n for n in names if n.startswith("stats/")) == [f"stats/{i:05d}.json" for i in range(4)]
    assert not any(".tmp-" in n for n in names)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s3.yaml"]  # nothing local (no "s3:" directory)

    rows = sum(pq.read_metadata(f"{root}/{n}", filesystem=fs).num_rows for n in scores)
    assert rows == 48
    summary = json.loads(fs.cat_file(f"{root}/selection/summary.json"))
    assert summary["counts"]["in"] == 48 and summary["counts"]["kept"] == 24
    sizes = json.loads(fs.cat_file(f"{root}/shards/sizes.json"))
    assert sum(sizes.values()) == 24 and len(sizes) == 3

    # resume there: drop one score object; a rerun recomputes exactly that one
    before = {n: fs.info(f"{root}/{n}")["ETag"] for n in scores}
    mtimes = {n: fs.info(f"{root}/{n}")["LastModified"] for n in scores}
    fs.rm_file(f"{root}/scores/00002.parquet")
    # in process this time: the same bytes under either executor (and no second Ray start-up)
    assert prune.main([*args, "--executor", "local"]) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert "scored now: 1 shards, 12 pairs" in out
    for name in scores:
        info = fs.info(f"{root}/{name}")
        assert info["ETag"] == before[name]  # deterministic: the recomputed file has the same bytes
        if name != "scores/00002.parquet":
            assert info["LastModified"] == mtimes[name]
    assert json.loads(fs.cat_file(f"{root}/selection/summary.json"))["counts"] == summary["counts"]


def test_report_of_a_run_in_a_bucket(bucket, s3_server, tmp_path, capsys) -> None:
    """``diffin report s3://…`` reads the run (scores, selection, thumbnails from the bucket's
    shards) with the config's storage options and writes the page into the bucket."""
    from jobs import report

    config = _config(tmp_path, s3_server)
    run = f"s3://{BUCKET}/runs/r1"
    if not bucket.exists(f"{BUCKET}/runs/r1/selection/summary.json"):  # this test alone: make the run
        assert prune.main(["--config", str(config), "--run-dir", run, "--no-progress"]) == 0
    capsys.readouterr()
    assert report.main([run, "--config", str(config), "--examples", "4"]) == 0
    assert capsys.readouterr().out.strip() == f"{run}/report/index.html"
    page = bucket.cat_file(f"{BUCKET}/runs/r1/report/index.html").decode()
    assert page.count('src="data:image/jpeg;base64,') >= 8  # 4 kept + 4 pruned thumbnails from the bucket
