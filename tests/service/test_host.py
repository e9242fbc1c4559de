"""The model host (``host.py``) and the run (``run.py``): the form's questions answered without loading anything
(what the Ray backend's host does), the loaded models read-only to others, and a run's plan frozen."""
from __future__ import annotations

import dataclasses

import pytest

from tests.helpers import run

from sdxl_ui.host import ModelHost
from sdxl_ui.run import Progress, RunPlan
from sdxl_ui.schema import PRESETS, GenerationRequest, Quality
from sdxl_ui.settings import AppSettings


def test_the_forms_questions_load_nothing(tmp_path):
    host = ModelHost(AppSettings(model="tiny", outputs=tmp_path, device="cpu"))
    assert host.native_size() == 256
    assert host.check_model().kind == "tiny"
    assert host.plan.device == "cpu"
    assert host.steps_note(50) == "50 → 35 on CPU (× 0.7)"
    preset = PRESETS[Quality.FAST]
    assert host.quality_defaults(Quality.FAST) == (preset.steps, preset.guidance)  # the tiny model: plain SDXL
    status = host.status()
    assert status["state"] == "not loaded" and status["source"] == "plan" and status["rows"]
    assert host.models is None and not host.loaded  # nothing of the above loaded a model


def test_the_loaded_models_are_read_only_to_others(tiny_service):
    host = tiny_service.host
    assert host.models is tiny_service.models is not None
    with pytest.raises(AttributeError):
        host.models = None  # only the host loads, swaps LoRAs or reconfigures


def test_a_runs_plan_is_frozen_and_its_progress_typed(tiny_service):
    out = run(tiny_service, GenerationRequest(prompt="a fox", steps=2, seed=3))
    (result,) = out["results"]
    assert result.steps_run == tiny_service.plan.steps_for(2)  # the steps policy's (× 0.7 on the CPU)
    plan = RunPlan(tiny_service.host.applied_plan, 256, 256, 2, 7.5, False)
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.steps = 3
    progress = Progress()
    assert (progress.done, progress.total, progress.images, progress.seed0) == (0, 0, 0, None)


def test_a_run_leaves_one_sdxl_ui_attribute_on_each_pipeline(tiny_service):
    """Technique state (run hooks, the tiny decoder, fused LoRAs) lives in the pipeline's one registry."""
    run(tiny_service, GenerationRequest(prompt="a fox", steps=2, seed=3, quality=Quality.FAST))
    for pipe in (tiny_service.models.base, tiny_service.models.refiner):
        if pipe is not None:
            ours = [name for name in vars(pipe) if "sdxl_ui" in name]
            assert ours == ["_sdxl_ui_registry"], ours
