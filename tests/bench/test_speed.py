"""Speed benchmark machinery (the measured numbers live in docs/SPEED.md, not in tests)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from jobs import bench as bench_job
from pipeline.bench import speed


def test_measure_model_schema() -> None:
    """Machinery only: the measured numbers (and the speed targets) live in docs/SPEED.md."""
    result = speed.measure_model("tiny-clip-32", torch.device("cpu"), batch_size=8, repeats=1,
                                 bank_size=7, target_size=16, reference_samples=1, seed=0, proxy_batch=8,
                                 lanczos_steps=3)
    per_sample = result["s_per_sample_per_ckpt"]
    assert set(per_sample) == {"forward", "embedding_columns", "unrolled", "tracin", "diffin_fd", "diffin_exact",
                               "reference"}
    assert result["prepare_unrolled_s_per_ckpt"] > 0 and result["settings"]["lanczos_steps"] == 3
    assert all(v > 0 for v in per_sample.values())
    assert result["ratio_to_forward"]["forward"] == 1.0
    assert result["settings"]["proxy_batch"] == 8 and result["settings"]["parameters"] > 0


def test_settings_for() -> None:
    assert speed.settings_for(quick=True).models == ("tiny-clip-32",)
    assert speed.settings_for().models == tuple(speed.MODEL_PLANS)
    assert speed.settings_for(quick=True, models=["ViT-B-32"], threads=2).models == ("ViT-B-32",)


def test_quick_run_writes_schema(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.setitem(speed.MODEL_PLANS, "tiny-clip-32", (
        {"batch_size": 8, "repeats": 1, "target_size": 16, "proxy_batch": 8, "reference_samples": 0, "lanczos_steps": 2},
        {"batch_size": 8, "repeats": 1, "target_size": 16, "proxy_batch": 8, "reference_samples": 0, "lanczos_steps": 2}))
    out = tmp_path / "speed.json"
    assert bench_job.main(["speed", "--quick", "--out", str(out)]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].startswith("tiny-clip-32: forward 1.00x  embedding_columns ") and printed[-1] == f"wrote {out}"
    data = json.loads(out.read_text())
    assert set(data["tiny-clip-32"]) == {"forward", "embedding_columns", "unrolled", "tracin", "diffin_fd",
                                         "diffin_exact"}
    assert data["_meta"]["command"] == "diffin bench speed --quick"
    data["_details"]["other-model"] = {"s_per_sample_per_ckpt": {"forward": 1.0}}
    out.write_text(json.dumps(data))
    assert bench_job.main(["speed", "--quick", "--models", "tiny-clip-32", "--out", str(out)]) == 0
    merged = json.loads(out.read_text())
    assert set(merged["_details"]) == {"tiny-clip-32", "other-model"}  # --models updates, keeps the others
    assert merged["_meta"]["command"] == "diffin bench speed --quick --models tiny-clip-32"
