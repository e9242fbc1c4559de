"""A profile runs with its own steps, guidance and scheduler (issue 18, part 1): recorded at the pipeline call (the
stand-in wraps ``hooks.call``, the one place every pipeline call goes through, and runs the real tiny or demo
pipeline), on the tiny model with --profile and on copies of the demo model whose shipped scheduler config says
LCM or Turbo."""
from __future__ import annotations

import json
import shutil

import pytest
from tests.helpers import ROOT, run

from sdxl_ui.metadata import parse_parameters
from sdxl_ui.optimizations import hooks
from sdxl_ui.schema import GenerationRequest
from sdxl_ui.service import GenerationService
from sdxl_ui.settings import AppSettings


@pytest.fixture
def calls(monkeypatch):
    """Every pipeline call: its scheduler (class, config) and arguments, then the real call."""
    recorded = []
    real = hooks.call

    def call(pipe, step_callback, **kwargs):
        config = pipe.scheduler.config
        recorded.append({"scheduler": type(pipe.scheduler).__name__, "spacing": config.get("timestep_spacing"),
                         "prediction": config.get("prediction_type"), **kwargs})
        return real(pipe, step_callback, **kwargs)

    monkeypatch.setattr(hooks, "call", call)
    return recorded


def service(tmp_path, model="tiny", **settings):
    return GenerationService(AppSettings(model=model, device="cpu", precision="fp32", outputs=tmp_path / "out",
                                         **settings))


def generate(svc, **request):
    out = run(svc, GenerationRequest(**{"prompt": "a large red circle on a blue background", "seed": 3, **request}))
    assert not out["errors"], out["errors"]
    return out


def test_a_forced_lightning_profile_runs_its_steps_guidance_and_trailing_euler_on_cpu(tmp_path, calls):
    svc = service(tmp_path, profile="lightning-4", refiner="none")
    for quality in ("high", "fast"):
        out = generate(svc, quality=quality, width=64, height=64)
        call = calls[-1]
        assert call["num_inference_steps"] == 4  # not × 0.7 on the CPU: the schedule the checkpoint was made for
        assert call["guidance_scale"] == 0.0
        assert call["scheduler"] == "EulerDiscreteScheduler" and call["spacing"] == "trailing"
        assert out["results"][0].steps_requested == 4 and out["results"][0].steps_run == 4
        params = parse_parameters(out["results"][0].parameters)
        assert params["Steps"] == "4" and params["Sampler"] == "Euler" and params["Profile"] == "lightning-4"
        assert params["CFG scale"] == "0.0"
    rows = {r.name: r for r in out["results"][0].report.rows}
    assert "lightning-4" in rows["model profile"].detail and "EulerDiscreteScheduler" in rows["model profile"].detail


def test_tcd_passes_its_eta_and_one_step_lightning_predicts_the_sample(tmp_path, calls):
    generate(service(tmp_path, profile="tcd", refiner="none"), quality="fast", width=64, height=64)
    assert calls[-1]["scheduler"] == "TCDScheduler" and calls[-1]["eta"] == 0.3
    assert calls[-1]["num_inference_steps"] == 4
    generate(service(tmp_path, profile="lightning-1", refiner="none"), width=64, height=64)
    assert calls[-1]["prediction"] == "sample" and calls[-1]["num_inference_steps"] == 1


def test_the_request_still_wins_over_the_profile(tmp_path, calls):
    svc = service(tmp_path, profile="turbo", refiner="none")
    generate(svc, quality="fast", steps=3, guidance=2.5, scheduler="ddim", width=64, height=64)
    call = calls[-1]
    assert call["num_inference_steps"] == 3 and call["guidance_scale"] == 2.5
    assert call["scheduler"] == "DDIMScheduler" and call["spacing"] == "trailing"  # the profile's config stays


@pytest.fixture(scope="module")
def demo_copies(tmp_path_factory):
    """Copies of the demo model whose shipped scheduler config is LCM's or SDXL Turbo's."""
    out = {}
    for name, changes in (("lcm", {"_class_name": "LCMScheduler"}),
                          ("turbo", {"_class_name": "EulerAncestralDiscreteScheduler", "timestep_spacing": "trailing"}),
                          ("lightning", {"_class_name": "EulerDiscreteScheduler", "timestep_spacing": "trailing",
                                         "prediction_type": "sample"})):
        folder = tmp_path_factory.mktemp("models") / f"shapes-{name[::-1]}"  # the folder's name says nothing
        shutil.copytree(ROOT / "assets" / "demo-model", folder)
        path = folder / "scheduler" / "scheduler_config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))
        out[name] = folder
    return out


def test_a_demo_copy_whose_scheduler_says_lcm_is_detected_and_runs_as_lcm(tmp_path, calls, demo_copies):
    svc = service(tmp_path, model=str(demo_copies["lcm"]), use_refiner="on")
    assert svc.plan.profile == "lcm" and "LCMScheduler" in svc.plan.reasons["profile"]
    out = generate(svc, quality="fast")
    call = calls[-1]
    assert call["scheduler"] == "LCMScheduler" and call["num_inference_steps"] == 2 and call["guidance_scale"] == 1.0
    assert call["width"] == 128 and len(calls) == 1  # the model's own size; no refiner pass for a few-step model
    assert not out["results"][0].refiner
    generate(svc, quality="high")
    assert calls[-1]["num_inference_steps"] == 4
    status_rows = {r["name"]: r for r in svc.status()["rows"]}
    assert status_rows["model profile"]["status"] == "active" and "detected" in status_rows["model profile"]["detail"]


def test_a_demo_copy_whose_scheduler_says_turbo_runs_one_step_without_guidance(tmp_path, calls, demo_copies):
    svc = service(tmp_path, model=str(demo_copies["turbo"]))
    assert svc.plan.profile == "turbo"
    out = generate(svc, quality="fast")
    assert calls[-1]["scheduler"] == "EulerAncestralDiscreteScheduler" and calls[-1]["num_inference_steps"] == 1
    assert calls[-1]["guidance_scale"] == 0.0
    assert parse_parameters(out["results"][0].parameters)["Sampler"] == "Euler a"
    forced = service(tmp_path, model=str(demo_copies["turbo"]), profile="sdxl")  # --profile sdxl: today's path
    generate(forced, quality="fast", steps=4)
    assert calls[-1]["scheduler"] == "DPMSolverMultistepScheduler" and calls[-1]["guidance_scale"] == 6.0


def test_a_demo_copy_whose_scheduler_says_one_step_lightning_runs_one_step_predicting_the_sample(tmp_path, calls,
                                                                                                   demo_copies):
    svc = service(tmp_path, model=str(demo_copies["lightning"]))
    assert svc.plan.profile == "lightning-1" and "prediction 'sample'" in svc.plan.reasons["profile"]
    for quality in ("high", "fast"):
        generate(svc, quality=quality)
        call = calls[-1]
        assert call["num_inference_steps"] == 1 and call["guidance_scale"] == 0.0
        assert call["scheduler"] == "EulerDiscreteScheduler" and call["prediction"] == "sample"
        assert call["spacing"] == "trailing"
