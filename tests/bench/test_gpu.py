"""The GPU throughput benchmark, run end to end on the CPU at its tiny size (a smoke test: it must
work before any device time is spent; the numbers it measures here mean nothing)."""

from __future__ import annotations

import functools
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from jobs import bench as bench_job
from jobs import bench_gpu
from pipeline.bench import gpu
from pipeline.errors import UsageError
from pipeline.influence.forward import features_jvp

ROOT = Path(__file__).resolve().parents[2]
RUN_SH = ROOT / "benchmarks" / "gpu" / "run.sh"
# Keys whose value may be null in a complete report (the batch that did not fit: none on a CPU).
MAY_BE_NULL = {"first_not_fitting_batch"}


def _numbers(node, path: str = "") -> list[tuple[str, object]]:
    """Every leaf of a JSON value with its path."""
    if isinstance(node, dict):
        return [leaf for k, v in node.items() for leaf in _numbers(v, f"{path}.{k}")]
    if isinstance(node, list):
        return [leaf for i, v in enumerate(node) for leaf in _numbers(v, f"{path}[{i}]")]
    return [(path, node)]


def _eager_stand_in(monkeypatch: pytest.MonkeyPatch) -> None:
    """score.compile on the CPU compiles for about a minute: the compile section runs here with the
    eager JVP in its place (the compiled JVP itself is tested, slow, in tests/influence/test_forward.py)."""
    monkeypatch.setattr("pipeline.model.scorer.compiled_features_jvp",
                        lambda objective: functools.partial(features_jvp, objective))


def test_tiny_run_writes_every_section(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    _eager_stand_in(monkeypatch)
    monkeypatch.setenv("OUT", str(tmp_path / "out"))  # the device tool's output folder
    assert bench_gpu.main(["--tiny", "--compile", "--threads", "1"]) == 0
    printed = capsys.readouterr().out
    assert "[compile] ok" in printed and printed.rstrip().endswith(f"wrote {tmp_path / 'out' / gpu.JSON_NAME}")
    report = json.loads((tmp_path / "out" / gpu.JSON_NAME).read_text())

    meta = report["meta"]
    assert meta["complete"] and meta["sections_done"] == list(gpu.SECTIONS) and not meta["sections_failed"]
    assert meta["device"] == "cpu" and meta["device_name"] and meta["dtype"] == "float32" and meta["batch_size"] == 4
    assert meta["command"] == "diffin bench gpu --tiny --compile --threads 1"
    for name in gpu.SECTIONS:
        section = report[name]
        assert "error" not in section and "skipped" not in section, (name, section)
        leaves = _numbers(section, name)
        assert leaves, name
        for path, value in leaves:
            if value is None:
                assert path.rsplit(".", 1)[-1] in MAY_BE_NULL, path
            elif isinstance(value, (int, float)) and not isinstance(value, bool):
                assert math.isfinite(value) and value >= 0, path

    assert set(report["forward"]) >= {"float32", "tf32", "bfloat16"}
    assert set(report["forward"]["bfloat16"]["embedding_columns"]["rel_error_vs_float32"]) == {
        "neg_clip_loss", "norm_sim_2", "norm_sim_inf"}
    prepare = report["prepare"]
    assert len(prepare["u_s_per_ckpt"]) == len(prepare["u_g_w_s_per_ckpt"]) == 2 and prepare["unrolled_hvps"] == 4
    methods = report["methods"]
    assert set(methods["float32"]["s_per_sample_per_ckpt"]) == {"forward", *gpu.TIMED_METHODS}
    for dtype in ("tf32", "bfloat16"):
        for name in gpu.JVP_ONLY:
            entry = methods[dtype][name]
            assert isinstance(entry["within_tolerance"], bool) and entry["s_per_sample_per_ckpt"] > 0
    assert methods["tf32"]["tracin"]["component_rel_error_max"] == 0.0  # TF32 does not apply on a CPU
    task = report["score_task"]
    assert task["decode_only"]["pairs"] > 0
    for method in ("unrolled", "all"):
        assert task[method]["bottleneck"] in ("decode", "device") and task[method]["overlapped"]["pairs"] > 0
    memory = report["memory"]["unrolled"]
    assert memory["largest_fitting_batch"] >= 2 and memory["batches"][0]["peak_mib"] > 0
    compiled = report["compile"]
    assert compiled["component_rel_error_max"] < 1e-5 and compiled["speedup"] > 0


def test_a_failing_section_is_recorded_and_the_rest_skipped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(state, workdir):
        raise RuntimeError("no such model\nsecond line")

    monkeypatch.setattr(gpu, "section_setup", broken)
    assert bench_gpu.main(["--tiny", "--out", str(tmp_path)]) == 1
    report = json.loads((tmp_path / gpu.JSON_NAME).read_text())
    assert report["setup"]["error"] == "RuntimeError: no such model"
    assert report["meta"]["sections_failed"] == ["setup"] and not report["meta"]["complete"]
    assert all(report[name]["skipped"] for name in gpu.SECTIONS[1:])
    assert "not measured: setup (RuntimeError: no such model)" in gpu.summary_lines(report)[-1]


@pytest.mark.parametrize("argv, message", [
    (["--tiny"], "no output folder"),
    (["--tiny", "--out", "X", "--score-pairs", "6"], "score_pairs (6) must be at least two batches"),
    (["--tiny", "--out", "X", "--device", "cuda:0"], "torch sees no CUDA device"),
])
def test_bad_options_are_one_line_errors(argv, message, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                         capsys) -> None:
    monkeypatch.delenv("OUT", raising=False)
    monkeypatch.chdir(tmp_path)
    if "cuda" in " ".join(argv):
        monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    assert bench_gpu.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not (tmp_path / "X").exists()


def test_settings_are_checked() -> None:
    with pytest.raises(UsageError, match="memory method"):
        gpu.GpuBenchSettings(memory_methods=("fast",))
    with pytest.raises(UsageError, match="checkpoints=0"):
        gpu.tiny_settings(checkpoints=0)
    assert gpu.GpuBenchSettings().model == "ViT-B-32" and gpu.GpuBenchSettings().checkpoints == 5


def test_registered_as_diffin_bench_gpu(capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        bench_job.main(["gpu", "--help"])
    assert exit_info.value.code == 0 and "--budget-s" in capsys.readouterr().out


def test_run_sh_help_and_missing_output(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHON": sys.executable, "DIFFIN_WHEELS": str(tmp_path / "no-wheels")}
    env.pop("OUT", None)
    assert subprocess.run(["bash", "-n", str(RUN_SH)]).returncode == 0
    shown = subprocess.run(["bash", str(RUN_SH), "--help"], env=env, capture_output=True, text=True, timeout=120)
    assert shown.returncode == 0 and "--deadline-s" in shown.stdout
    missing = subprocess.run(["bash", str(RUN_SH), "--tiny"], env=env, capture_output=True, text=True, timeout=120)
    assert missing.returncode == 2 and "no output folder" in missing.stderr


def test_prepare_halves_its_batches_when_out_of_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    from types import SimpleNamespace

    import torch

    from pipeline.model.scorer import InfluenceSettings

    calls = []

    def prepare_all(state, influence) -> dict:
        calls.append((influence.settings.proxy_batch_size, influence.settings.batch_size))
        if len(calls) == 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return {"u_s_per_ckpt": [1.0]}

    monkeypatch.setattr(gpu, "_prepare_all", prepare_all)
    influence = SimpleNamespace(settings=InfluenceSettings(proxy_batch_size=128, batch_size=256))
    state = SimpleNamespace(influence=influence, device=torch.device("cpu"))
    result = gpu.section_prepare(state)
    assert calls == [(128, 256), (64, 128)] and influence.settings.proxy_batch_size == 128  # the original is kept
    assert result["out_of_memory"] == [{"proxy_batch_size": 128, "target_batch_size": 256,
                                        "error": "OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB"}]

    monkeypatch.setattr(gpu, "_prepare_all", lambda state, influence: 1 / 0)
    with pytest.raises(ZeroDivisionError):  # only running out of memory is retried
        gpu.section_prepare(state)
