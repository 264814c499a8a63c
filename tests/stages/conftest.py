"""Fixtures shared by the stage tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import make_tiny_corpus


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Path:
    """20 shards of 8 pairs (read-only)."""
    return make_tiny_corpus(tmp_path_factory.mktemp("corpus20"), n=160, shard_size=8)


@pytest.fixture(scope="session")
def ray_runs(corpus: Path, tmp_path_factory) -> tuple[Path, dict, Path]:
    """The same config run twice on one real local Ray with two scoring actors (20 shards; top
    30 % by diffin_unrolled; reshard into shards of 16): (first run dir, its summary, second run
    dir). The end-to-end tests read the first, the determinism tests compare both (read-only)."""
    from pipeline.config import parse_config
    from pipeline.runtime.executor import RayExecutor
    from pipeline.stages.pipeline import run_pipeline
    from tests.stages.test_pipeline import pipeline_config

    config = pipeline_config(corpus)
    config["select"] = {"column": "diffin_unrolled", "rule": "top_fraction", "fraction": 0.3}
    config["reshard"] = {"shard_size": 16}
    config = parse_config(config)
    root = tmp_path_factory.mktemp("ray_runs")
    executor = RayExecutor(num_cpus=2, num_gpus=0)
    try:
        summary = run_pipeline(config, root / "first", executor, progress=False)
        run_pipeline(config, root / "second", executor, progress=False)
    finally:
        executor.shutdown()
    return root / "first", summary, root / "second"


PRUNED_KEPT = 12  # pairs kept by the pruned_run fixture (top_k), in output shards of 5: 5 + 5 + 2


@pytest.fixture(scope="session")
def pruned_run(tiny_corpus: Path, tmp_path_factory) -> Path:
    """A finished ``diffin run`` (local executor) over tiny_corpus: 48 pairs scored, the top 12
    by tracin kept and resharded into shards/{00000..00002}.tar (read-only)."""
    import yaml

    from jobs import prune
    from tests.conftest import write_config

    base = tmp_path_factory.mktemp("pruned")
    config = write_config(base / "run.yaml", tiny_corpus, steps=4, warmup=1, checkpoints=2)
    settings = yaml.safe_load(config.read_text())
    settings.update(target={"holdout_fraction": 0.25, "max_pairs": 64, "bank_size": 5, "seed": 0},
                    score={"method": "tracin", "batch_size": 16, "proxy_batch_size": 8},
                    select={"column": "tracin", "rule": "top_k", "k": PRUNED_KEPT},
                    reshard={"shard_size": 5})
    config.write_text(yaml.safe_dump(settings))
    run_dir = base / "run"
    argv = ["--config", str(config), "--run-dir", str(run_dir), "--executor", "local", "--no-progress"]
    if prune.main(argv) != 0:
        pytest.fail("the pruned_run fixture's diffin run failed")
    return run_dir
