"""Every stage has the one shape (docs/ARCHITECTURE.md, "One stage shape"): a stage dataclass
with ``resources`` as a field, ``setup()`` and ``process(task)``, and a driver-side function
that takes the run context first."""

from __future__ import annotations

import dataclasses
import inspect

import pytest

from pipeline.runtime.executor import Resources
from pipeline.stages.context import RunContext
from pipeline.stages.pipeline import STAGES
from pipeline.stages.prepare import PrepareStage, run_prepare
from pipeline.stages.select.bounded.tasks import ReducerStage
from pipeline.stages.reshard import ReshardStage, run_reshard
from pipeline.stages.score import ScoreStage, run_score
from pipeline.stages.select import run_select
from pipeline.stages.trajectory import TrainStage, ensure_trajectory

SHAPES = {  # stage name -> (stage class, driver)
    "trajectory": (TrainStage, ensure_trajectory),
    "prepare": (PrepareStage, run_prepare),
    "score": (ScoreStage, run_score),
    "select": (ReducerStage, run_select),
    "reshard": (ReshardStage, run_reshard),
}


def test_every_pipeline_stage_is_listed() -> None:
    assert tuple(SHAPES) == STAGES


@pytest.mark.parametrize("name", STAGES)
def test_stage_object_shape(name: str) -> None:
    cls, _ = SHAPES[name]
    assert dataclasses.is_dataclass(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    assert "resources" in fields and fields["resources"].type in (Resources, "Resources")
    assert list(inspect.signature(cls.setup).parameters) == ["self"]
    assert list(inspect.signature(cls.process).parameters) == ["self", "task"]


@pytest.mark.parametrize("name", STAGES)
def test_driver_takes_the_run_context_first(name: str) -> None:
    _, driver = SHAPES[name]
    first = next(iter(inspect.signature(driver).parameters.values()))
    assert first.name == "ctx" and first.annotation in (RunContext, "RunContext")
