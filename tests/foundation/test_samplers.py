"""AUTOMATIC1111's samplers and schedule types (sdxl_ui/samplers.py): how each (sampler, schedule type) runs on
diffusers, where it is the nearest and says so, and A1111's computed schedules."""
from __future__ import annotations

import math

import pytest

from sdxl_ui.samplers import AYS_SDXL, SAMPLERS, SCHEDULES, plan_sampler, sampler_choice, schedule_sigmas
from sdxl_ui.schema import Schedule, Scheduler, ValidationError


def test_the_tables_are_a1111s_in_its_order():
    assert [s.name for s in SAMPLERS][:6] == ["DPM++ 2M", "DPM++ SDE", "DPM++ 2M SDE", "DPM++ 2M SDE Heun",
                                             "DPM++ 2S a", "DPM++ 3M SDE"]
    assert [s.label for s in SCHEDULES] == ["Automatic", "Uniform", "Karras", "Exponential", "Polyexponential",
                                            "SGM Uniform", "KL Optimal", "Align Your Steps", "Simple", "Normal",
                                            "DDIM", "Beta"]
    assert {s.key for s in SAMPLERS} | {Scheduler.AUTO, Scheduler.DPMPP_2M_KARRAS} == set(Scheduler)


@pytest.mark.parametrize("sampler, schedule, cls, options", [
    (Scheduler.DPMPP_2M, Schedule.AUTOMATIC, "DPMSolverMultistepScheduler",
     {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": True}),  # A1111's default: Karras
    (Scheduler.DPMPP_2M_KARRAS, Schedule.AUTOMATIC, "DPMSolverMultistepScheduler",
     {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": True}),
    (Scheduler.DPMPP_2M_SDE, Schedule.AUTOMATIC, "DPMSolverMultistepScheduler",
     {"algorithm_type": "sde-dpmsolver++", "solver_order": 2, "use_exponential_sigmas": True}),
    (Scheduler.EULER, Schedule.AUTOMATIC, "EulerDiscreteScheduler", {}),  # the model's own spacing
    (Scheduler.EULER, Schedule.SGM_UNIFORM, "EulerDiscreteScheduler", {"timestep_spacing": "trailing"}),
    (Scheduler.LMS, Schedule.KARRAS, "LMSDiscreteScheduler", {"use_karras_sigmas": True}),
    (Scheduler.HEUN, Schedule.BETA, "HeunDiscreteScheduler", {"use_beta_sigmas": True}),
    (Scheduler.DPM2_A, Schedule.EXPONENTIAL, "KDPM2AncestralDiscreteScheduler", {"use_exponential_sigmas": True}),
    (Scheduler.DDIM, Schedule.DDIM, "DDIMScheduler", {}),  # A1111's timestep samplers ignore the schedule type
    (Scheduler.PLMS, Schedule.NORMAL, "PNDMScheduler", {"skip_prk_steps": True}),
    (Scheduler.LCM, Schedule.SIMPLE, "LCMScheduler", {"timestep_spacing": "trailing"}),
])
def test_each_combination_runs_as_diffusers_table_says(sampler, schedule, cls, options):
    planned = plan_sampler(sampler, schedule)
    assert (planned.cls, planned.options) == (cls, options)


def test_the_nearest_is_named_and_exact_ones_say_nothing():
    assert plan_sampler(Scheduler.EULER, Schedule.KARRAS).notes == ()
    assert plan_sampler(Scheduler.DPMPP_SDE, Schedule.KARRAS).notes == ()  # torchsde: the real DPM++ SDE
    euler_a = plan_sampler(Scheduler.EULER_A, Schedule.KARRAS)  # Open WebUI's suggestion
    assert euler_a.options == {} and "no Karras sigmas" in euler_a.notes[0]
    assert "ignores the schedule type" in plan_sampler(Scheduler.DDIM, Schedule.NORMAL).notes[0]  # SillyTavern's
    restart = plan_sampler(Scheduler.RESTART)
    assert restart.cls == "HeunDiscreteScheduler" and "no Restart sampler" in restart.notes[0]
    kl = plan_sampler(Scheduler.HEUN, Schedule.KL_OPTIMAL)
    assert kl.custom is None and kl.options == {"use_karras_sigmas": True} and "KL Optimal" in kl.notes[0]
    assert plan_sampler(Scheduler.EULER, Schedule.ALIGN_YOUR_STEPS).custom is Schedule.ALIGN_YOUR_STEPS


def test_computed_schedules_are_a1111s_formulas():
    assert schedule_sigmas(Schedule.ALIGN_YOUR_STEPS, 11, 0.03, 14.6) == [*AYS_SDXL, 0.0]  # its own 11 as they are
    ays = schedule_sigmas(Schedule.ALIGN_YOUR_STEPS, 4, 0.03, 14.6)
    assert len(ays) == 5 and ays[0] == pytest.approx(14.615) and ays[-2] == pytest.approx(0.029) and ays[-1] == 0
    assert all(a > b for a, b in zip(ays, ays[1:]))
    kl = schedule_sigmas(Schedule.KL_OPTIMAL, 5, 0.03, 14.6)
    assert kl[0] == pytest.approx(14.6) and kl[-1] == pytest.approx(0.03) and len(kl) == 6
    assert kl[2] == pytest.approx(math.tan(0.4 * math.atan(0.03) + 0.6 * math.atan(14.6)))


def test_users_may_type_ours_or_a1111s_names():
    assert sampler_choice("DPM++ 2M Karras") == {"scheduler": Scheduler.DPMPP_2M, "schedule": Schedule.KARRAS}
    assert sampler_choice("euler_a", "SGM Uniform") == {"scheduler": Scheduler.EULER_A,
                                                         "schedule": Schedule.SGM_UNIFORM}
    assert sampler_choice(None) == {"scheduler": Scheduler.AUTO, "schedule": Schedule.AUTOMATIC}
    with pytest.raises(ValidationError, match="scheduler: unknown sampler"):
        sampler_choice("Euler b")
    with pytest.raises(ValidationError, match="schedule: unknown schedule type"):
        sampler_choice("Euler", "karas")
