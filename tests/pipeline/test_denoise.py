"""The sampler's scheduler (denoise.scheduler_for) from a model's own config, whatever sigma flags that config
already sets: a chosen schedule type replaces them (diffusers refuses two at once)."""
from __future__ import annotations

from diffusers import EulerDiscreteScheduler

from sdxl_ui.denoise import scheduler_for
from sdxl_ui.schema import Schedule, Scheduler


def test_a_chosen_schedule_replaces_the_models_own_sigma_flags():
    config = dict(EulerDiscreteScheduler(use_karras_sigmas=True).config)  # a community folder's scheduler config
    exponential = scheduler_for(Scheduler.DPMPP_2M_SDE, config)  # its default: exponential
    assert exponential.config.use_exponential_sigmas and not exponential.config.use_karras_sigmas
    uniform = scheduler_for(Scheduler.EULER, config, Schedule.UNIFORM)
    assert not uniform.config.use_karras_sigmas and uniform.config.timestep_spacing == "linspace"
    assert scheduler_for(Scheduler.EULER, config).config.use_karras_sigmas  # automatic: the model's own
