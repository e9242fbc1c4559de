"""Every AUTOMATIC1111 sampler × schedule type makes a picture on the tiny model through ``denoise.scheduler_for``
(the service's own path), with the scheduler class and the sigma schedule recorded at the pipeline call; and the
request's sampler and schedule type reach the pipeline and the PNG through the service."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from tests.helpers import run

from sdxl_ui.denoise import scheduler_for
from sdxl_ui.metadata import parse_parameters
from sdxl_ui.samplers import SAMPLERS, SCHEDULES, plan_sampler, schedule_sigmas
from sdxl_ui.schema import GenerationRequest, Schedule, Scheduler
from sdxl_ui.service import GenerationService
from sdxl_ui.settings import AppSettings

STEPS = 3


@pytest.fixture(scope="module")
def base():
    from sdxl_ui.models import build_tiny

    pipe = build_tiny(with_refiner=False)[0]
    pipe.original_config = dict(pipe.scheduler.config)  # every sampler from the model's own config (as the service)
    return pipe


def record(pipe):
    """The scheduler class and its sigmas at the first step of the pipeline call."""
    seen = {}

    def callback(p, i, t, kwargs):
        if i == 0:
            seen["cls"] = type(p.scheduler).__name__
            seen["sigmas"] = [float(s) for s in getattr(p.scheduler, "sigmas", torch.tensor([]))]
            seen["timesteps"] = [float(s) for s in p.scheduler.timesteps]
        return kwargs
    return seen, callback


@pytest.mark.parametrize("sampler", SAMPLERS, ids=[s.key.value for s in SAMPLERS])
def test_every_schedule_type_makes_a_picture(base, sampler):
    config = base.original_config
    schedules = {}
    for kind in SCHEDULES:
        base.scheduler = scheduler_for(sampler.key, config, kind.key)
        seen, callback = record(base)
        image = base(prompt="a red circle", num_inference_steps=STEPS, width=64, height=64, guidance_scale=5.0,
                     generator=torch.Generator().manual_seed(0), callback_on_step_end=callback).images[0]
        pixels = np.asarray(image)
        assert image.size == (64, 64) and pixels.std() > 0, (sampler.name, kind.label)
        planned = plan_sampler(sampler.key, kind.key)
        assert seen["cls"] == planned.cls, (sampler.name, kind.label)
        if planned.options.get("use_karras_sigmas"):
            assert base.scheduler.config.use_karras_sigmas
        if planned.custom is not None:  # A1111's computed sigmas, as they are
            sigmas = base.scheduler.alphas_cumprod
            sigmas = ((1 - sigmas) / sigmas) ** 0.5
            expected = schedule_sigmas(planned.custom, STEPS, float(sigmas[0]), float(sigmas[-1]))
            assert np.allclose(seen["sigmas"], expected, rtol=1e-4), (sampler.name, kind.label)
        schedules[kind.key] = seen["sigmas"] or seen["timesteps"]
    if sampler.schedules and sampler.sigma_flags:  # the schedule type changes the schedule where it applies
        assert schedules[Schedule.KARRAS] != schedules[Schedule.UNIFORM], sampler.name
        assert schedules[Schedule.EXPONENTIAL] != schedules[Schedule.KARRAS], sampler.name
    if not sampler.schedules:  # A1111's timestep samplers ignore it: one schedule for all
        assert all(s == schedules[Schedule.AUTOMATIC] for s in schedules.values()), sampler.name


def test_the_requests_sampler_and_schedule_reach_the_pipeline_and_the_png(tmp_path):
    svc = GenerationService(AppSettings(model="tiny", device="cpu", precision="fp32", refiner="none",
                                        outputs=tmp_path))
    out = run(svc, GenerationRequest(prompt="x", steps=4, width=64, height=64, seed=1, scheduler=Scheduler.EULER,
                                     schedule=Schedule.ALIGN_YOUR_STEPS, techniques={"steps_policy": "off"}))
    assert not out["errors"], out["errors"]
    scheduler = svc.models.base.scheduler
    assert type(scheduler).__name__ == "EulerDiscreteScheduler" and scheduler.computed_schedule == "align_your_steps"
    assert float(scheduler.sigmas[0]) == pytest.approx(14.615, rel=1e-4)
    params = parse_parameters(out["results"][0].parameters)
    assert (params["Sampler"], params["Schedule type"], params["Steps"]) == ("Euler", "Align Your Steps", "4")
    nearest = run(svc, GenerationRequest(prompt="x", steps=2, width=64, height=64, scheduler=Scheduler.EULER_A,
                                         schedule=Schedule.KARRAS))
    assert any("no Karras sigmas" in line for line in nearest["logs"])  # the nearest, said in the log
