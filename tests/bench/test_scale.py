"""Scale benchmark machinery (the measured numbers live in docs/SCALE.md, not in tests)."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from jobs import bench_scale
from pipeline.bench import sampler, scale
from pipeline.errors import UsageError
from pipeline.stages.keep_rule import round_half_up


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    bench_scale.add_arguments(parser)
    return parser.parse_args(list(argv))


def test_proc_memory_of_self_and_of_a_gone_process() -> None:
    mem = sampler.proc_memory()
    assert mem is not None and 0 < mem["VmRSS"] <= mem["VmHWM"]
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    assert sampler.proc_memory(child.pid) is None


def test_process_cpu_seconds_grow_with_work() -> None:
    before = sampler.process_cpu_seconds()
    deadline = time.process_time() + 0.3
    while time.process_time() < deadline:
        pass
    assert sampler.process_cpu_seconds() >= before + 0.2


def test_reset_peak_lowers_the_high_water_mark() -> None:
    block = bytearray(64 * sampler.MB)  # touch 64 MB, then free it
    block[::4096] = b"x" * len(block[::4096])
    peak = sampler.proc_memory()["VmHWM"]
    del block
    assert sampler.reset_peak()
    after = sampler.proc_memory()
    assert after["VmHWM"] < peak and after["VmHWM"] >= after["VmRSS"]


def test_sampler_records_checkpoint_and_end_peaks_of_actor_processes(tmp_path: Path) -> None:
    """A child that grows its memory after a 'checkpoint' shows a higher peak at the end."""
    code = ("import sys, time\n"
            "a = bytearray(20 * 2**20); a[::4096] = b'x' * len(a[::4096])\n"
            "sys.stdin.readline()\n"
            "b = bytearray(60 * 2**20); b[::4096] = b'x' * len(b[::4096])\n"
            "sys.stdin.readline()\n")
    child = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, text=True)
    pairs = {"n": 0}
    rss = sampler.RssSampler(lambda: pairs["n"], checkpoint_pairs=[100], interval=0.05,
                             find_actors=lambda: [child.pid], timeline_every=3600,
                             progress_path=tmp_path / "progress.json")
    try:
        rss.start()
        time.sleep(1.0)
        pairs["n"] = 100
        time.sleep(0.5)
        child.stdin.write("\n")
        child.stdin.flush()
        time.sleep(1.0)
        pairs["n"] = 200
        time.sleep(0.3)
    finally:
        rss.stop()
        child.stdin.write("\n")
        child.stdin.close()
        child.wait()
    ckpt, end = rss.at_checkpoints[100], rss.snapshot()
    assert ckpt["pairs"] == 100 and end["pairs"] == 200
    assert set(end["actors"]) == {str(child.pid)}
    assert end["actor_hwm_max_mb"] - ckpt["actor_hwm_max_mb"] > 40
    assert ckpt["driver"]["hwm_mb"] > 0
    assert [p["pairs"] for p in rss.timeline] == [0, 100, 200]  # first sample, then changes
    assert rss.actor_started[child.pid] is not None
    progress = json.loads((tmp_path / "progress.json").read_text())  # what a stopped run leaves
    assert progress["at_checkpoints"]["100"] == ckpt and progress["now"]["pairs"] == 200


def test_corpus_and_reducer_rows_are_reused_when_parameters_match(tmp_path: Path) -> None:
    first = scale.ensure_corpus(tmp_path / "c", 30, 32, 10, seed=0)
    assert first["build_s"] is not None and first["pairs"] == 30
    assert json.loads(Path(first["sizes"]).read_text()) == {"00000.tar": 10, "00001.tar": 10, "00002.tar": 10}
    assert scale.ensure_corpus(tmp_path / "c", 30, 32, 10, seed=0)["build_s"] is None
    assert scale.ensure_corpus(tmp_path / "c", 30, 32, 15, seed=0)["build_s"] is not None  # rebuilt

    rows = tmp_path / "r"
    assert scale.write_reducer_rows(rows, 2500, 3, seed=0) is not None
    files = sorted((rows / "scores").glob("*.parquet"))
    counts = [pq.read_metadata(f).num_rows for f in files]
    assert len(counts) == 3 and sum(counts) == 2500 and set(counts) <= {833, 834}
    status = pq.read_table(files[0], columns=["status"]).column("status").to_pylist()
    assert set(status) <= {"ok", "decode_error"} and status.count("ok") > 800
    assert scale.write_reducer_rows(rows, 2500, 3, seed=0) is None


def test_bad_options_are_usage_errors() -> None:
    with pytest.raises(UsageError, match="--pairs"):
        bench_scale.plan(_args("--pairs", "0"))
    with pytest.raises(UsageError, match="--reducer-files"):
        bench_scale.plan(_args("--reducer-rows", "5", "--reducer-files", "6"))
    with pytest.raises(UsageError, match="needs --reducer-strategy bounded"):
        bench_scale.plan(_args("--reducer-executor", "ray"))
    keys = [scale.reducer_key(bench_scale.plan(_args("--reducer-rows", "9", "--reducer-files", "3", *extra)))
            for extra in ([], ["--reducer-strategy", "bounded"],
                          ["--reducer-strategy", "bounded", "--reducer-executor", "ray"])]
    assert keys == ["9_rows", "9_rows_bounded", "9_rows_bounded_ray"]  # in-memory entries keep their key
    with pytest.raises(UsageError, match="--parts"):
        bench_scale.parts("pipeline,bogus")
    assert bench_scale.parts("reducer, pipeline") == ["reducer", "pipeline"]
    with pytest.raises(UsageError, match="--checkpoint-pairs"):
        bench_scale.plan(_args("--checkpoint-pairs", "0,10"))
    plan = bench_scale.plan(_args("--quick", "--pairs", "50", "--checkpoint-pairs", "20,40"))
    assert plan.pairs == 50 and plan.shard_size == scale.QUICK.shard_size
    assert plan.checkpoint_pairs == (20, 40)
    assert plan == scale.plan_for(quick=True, pairs=50, checkpoint_pairs=(20, 40))
    assert scale.plan_for() == scale.ScalePlan() and scale.plan_for(quick=True) == scale.QUICK
    with pytest.raises(UsageError, match="--actors"):
        scale.plan_for(actors=0)
    assert bench_scale.command(_args("--quick", "--pairs", "50", "--checkpoint-pairs", "20,40", "--parts", "reducer")) == (
        "diffin bench scale --quick --pairs 50 --checkpoint-pairs 20,40 --parts reducer")


def test_quick_run_through_the_cli(tmp_path: Path) -> None:
    """A small end-to-end run: real pipeline on local Ray and the reducer in a subprocess."""
    out = tmp_path / "scale.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "RAY_AUTH_MODE": "disabled"}
    proc = subprocess.run(
        [sys.executable, "-m", "jobs.bench", "scale", "--quick", "--pairs", "200", "--shard-size", "50",
         "--checkpoint-pairs", "50,100", "--bank-size", "7", "--reducer-rows", "4000", "--reducer-files", "4",
         "--work-dir", str(tmp_path / "work"), "--out", str(out), "--no-progress"],
        capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(out.read_text())
    run = data["pipeline"]["unrolled_200"]
    assert run["pairs_scored"] == 200 and run["failed"] == {}
    assert set(run["stage_seconds"]) == {"prepare", "score", "select", "reshard"}
    assert run["reshard"]["pairs"] == run["selection"]["kept"]
    assert run["score_pairs_per_s"] > 0
    assert run["selection"]["kept"] == run["expected_kept"] == round_half_up(0.3, 200)
    checkpoints = run["rss_at_checkpoints"]
    assert set(checkpoints) == {"50", "100"}
    for snap in (*checkpoints.values(), run["rss_at_end"]):
        assert snap["driver"]["hwm_mb"] > 0 and snap["actor_hwm_max_mb"] > 0
    assert len(run["rss_at_end"]["actors"]) == 2  # both actors found (at a checkpoint maybe not yet)
    assert checkpoints["50"]["pairs"] >= 50 and checkpoints["100"]["pairs"] >= 100
    assert run["rss_at_end"]["pairs"] == 200 and run["sampler_errors"] == []
    assert run["rss_at_end"]["actor_cpu_s"] > 0 and run["rss_at_end"]["pairs_per_actor_cpu_s"] > 0
    assert all(r >= 1.0 for r in run["actor_hwm_end_over_checkpoint"].values())  # peaks never fall
    assert all(run["actors_started_after_prepare"].values())
    assert run["extrapolated_1m"]["extrapolated"] is True
    reducer = data["reducer"]["4000_rows"]
    assert reducer["counts"]["in"] == 4000 and reducer["files"] == 4
    assert reducer["counts"]["kept"] == reducer["expected_kept"] > 0
    assert reducer["peak_hwm_mb"] >= reducer["baseline_hwm_mb"] > 0
    assert data["_meta"]["machine"]["cores"] == os.cpu_count()
    assert "pipeline unrolled_200" in proc.stdout and "reducer 4000_rows" in proc.stdout
