"""AUTOMATIC1111's samplers and schedule types, and how each runs on diffusers' schedulers. Pure data and rules:
no torch, no diffusers import (``denoise.scheduler_for`` builds the scheduler from what ``plan_sampler`` says).

Sources: A1111 v1.10.1 ``modules/sd_samplers_kdiffusion.py``, ``sd_samplers_timesteps.py``, ``sd_samplers_lcm.py``
and ``sd_schedulers.py`` (names, aliases, options, each sampler's default schedule; the timestep samplers DDIM,
PLMS and UniPC, and DPM fast / adaptive, ignore the schedule type there), and diffusers' own table
(``docs/source/en/api/schedulers/overview.md``: "DPM++ 2M Karras" → DPMSolverMultistepScheduler with
``use_karras_sigmas``, "sgm_uniform" → ``timestep_spacing="trailing"``, …). Where diffusers cannot run a
combination exactly, the nearest one runs and ``SamplerPlan.notes`` says what and why (the API's ``info``, the log).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from .schema import Schedule, Scheduler, ValidationError

DPM_2M = {"algorithm_type": "dpmsolver++", "solver_order": 2}
SDE_2M = {"algorithm_type": "sde-dpmsolver++", "solver_order": 2}


@dataclass(frozen=True)
class Sampler:
    key: Scheduler
    name: str  # A1111's name (GET /samplers, the PNG's "Sampler")
    aliases: tuple[str, ...]
    options: dict  # A1111's /samplers options, as it lists them (strings)
    cls: str  # the diffusers scheduler class
    kwargs: dict = field(default_factory=dict)
    default_schedule: Schedule | None = None  # what "automatic" means for it (A1111's options["scheduler"])
    schedules: bool = True  # honours a schedule type (A1111's timestep samplers and DPM fast/adaptive do not)
    sigma_flags: bool = True  # the diffusers class takes use_karras_sigmas / use_exponential_sigmas / use_beta_sigmas
    spacing: bool = True  # the diffusers class takes timestep_spacing
    custom_sigmas: bool = False  # its set_timesteps takes sigmas= (KL Optimal, Align Your Steps run exactly)
    nearest: str = ""  # not A1111's algorithm: what runs instead and why


K, E = Schedule.KARRAS, Schedule.EXPONENTIAL
SAMPLERS: tuple[Sampler, ...] = (
    Sampler(Scheduler.DPMPP_2M, "DPM++ 2M", ("k_dpmpp_2m",), {"scheduler": "karras"},
            "DPMSolverMultistepScheduler", DPM_2M, K),
    Sampler(Scheduler.DPMPP_SDE, "DPM++ SDE", ("k_dpmpp_sde",),
            {"scheduler": "karras", "second_order": "True", "brownian_noise": "True"}, "DPMSolverSDEScheduler", {}, K),
    Sampler(Scheduler.DPMPP_2M_SDE, "DPM++ 2M SDE", ("k_dpmpp_2m_sde",),
            {"scheduler": "exponential", "brownian_noise": "True"}, "DPMSolverMultistepScheduler", SDE_2M, E),
    Sampler(Scheduler.DPMPP_2M_SDE_HEUN, "DPM++ 2M SDE Heun", ("k_dpmpp_2m_sde_heun",),
            {"scheduler": "exponential", "brownian_noise": "True", "solver_type": "heun"},
            "DPMSolverMultistepScheduler", {**SDE_2M, "solver_type": "heun"}, E),
    Sampler(Scheduler.DPMPP_2S_A, "DPM++ 2S a", ("k_dpmpp_2s_a",),
            {"scheduler": "karras", "uses_ensd": "True", "second_order": "True"}, "DPMSolverSinglestepScheduler",
            DPM_2M, K, spacing=False,
            nearest="diffusers has no ancestral DPM++ 2S: its single-step DPM++ of order 2 runs, without the ancestral "
                    "noise (diffusers' table: 'very similar')"),
    Sampler(Scheduler.DPMPP_3M_SDE, "DPM++ 3M SDE", ("k_dpmpp_3m_sde",),
            {"scheduler": "exponential", "discard_next_to_last_sigma": "True", "brownian_noise": "True"},
            "DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++", "solver_order": 3}, E),
    Sampler(Scheduler.EULER_A, "Euler a", ("k_euler_a", "k_euler_ancestral"), {"uses_ensd": "True"},
            "EulerAncestralDiscreteScheduler", sigma_flags=False),
    Sampler(Scheduler.EULER, "Euler", ("k_euler",), {}, "EulerDiscreteScheduler", custom_sigmas=True),
    Sampler(Scheduler.LMS, "LMS", ("k_lms",), {}, "LMSDiscreteScheduler"),
    Sampler(Scheduler.HEUN, "Heun", ("k_heun",), {"second_order": "True"}, "HeunDiscreteScheduler"),
    Sampler(Scheduler.DPM2, "DPM2", ("k_dpm_2",),
            {"scheduler": "karras", "discard_next_to_last_sigma": "True", "second_order": "True"},
            "KDPM2DiscreteScheduler", {}, K),
    Sampler(Scheduler.DPM2_A, "DPM2 a", ("k_dpm_2_a",),
            {"scheduler": "karras", "discard_next_to_last_sigma": "True", "uses_ensd": "True",
             "second_order": "True"}, "KDPM2AncestralDiscreteScheduler", {}, K),
    Sampler(Scheduler.DPM_FAST, "DPM fast", ("k_dpm_fast",), {"uses_ensd": "True"}, "DPMSolverMultistepScheduler",
            DPM_2M, schedules=False,
            nearest="diffusers has no DPM-Solver-fast: DPM++ 2M runs on the model's own spacing"),
    Sampler(Scheduler.DPM_ADAPTIVE, "DPM adaptive", ("k_dpm_ad",), {"uses_ensd": "True"},
            "DPMSolverMultistepScheduler", DPM_2M, schedules=False,
            nearest="diffusers has no adaptive-step DPM-Solver: DPM++ 2M runs the requested steps"),
    Sampler(Scheduler.RESTART, "Restart", ("restart",), {"scheduler": "karras", "second_order": "True"},
            "HeunDiscreteScheduler", {}, K,
            nearest="diffusers has no Restart sampler: Heun (its inner solver) runs, without the restarts"),
    Sampler(Scheduler.DDIM, "DDIM", ("ddim",), {}, "DDIMScheduler", schedules=False),
    Sampler(Scheduler.DDIM_CFGPP, "DDIM CFG++", ("ddim_cfgpp",), {}, "DDIMScheduler", schedules=False,
            nearest="diffusers has no CFG++ guidance: plain DDIM runs"),
    Sampler(Scheduler.PLMS, "PLMS", ("plms",), {}, "PNDMScheduler", {"skip_prk_steps": True}, schedules=False),
    Sampler(Scheduler.UNIPC, "UniPC", ("unipc",), {}, "UniPCMultistepScheduler", schedules=False),
    Sampler(Scheduler.LCM, "LCM", ("k_lcm",), {}, "LCMScheduler", sigma_flags=False),
    Sampler(Scheduler.DDPM, "DDPM", ("ddpm",), {}, "DDPMScheduler", sigma_flags=False),  # Forge's and SD.Next's
)
BY_KEY = {s.key: s for s in SAMPLERS}
SAMPLER_LABELS = {**{s.key: s.name for s in SAMPLERS}, Scheduler.DPMPP_2M_KARRAS: "DPM++ 2M Karras"}


def sampler_label(key: Scheduler, schedule: Schedule) -> str:
    """The PNG's "Sampler": A1111's name; the legacy "DPM++ 2M Karras" only where no other schedule type is set."""
    return "DPM++ 2M" if key is Scheduler.DPMPP_2M_KARRAS and schedule is not Schedule.AUTOMATIC else \
        SAMPLER_LABELS[key]


@dataclass(frozen=True)
class ScheduleType:
    key: Schedule
    label: str
    aliases: tuple[str, ...] | None = None
    default_rho: float = -1.0
    need_inner_model: bool = False
    flags: dict = field(default_factory=dict)  # diffusers config flags that give it
    custom: bool = False  # computed sigmas (``schedule_sigmas``), for a sampler whose set_timesteps takes them


SCHEDULES: tuple[ScheduleType, ...] = (
    ScheduleType(Schedule.AUTOMATIC, "Automatic"),
    ScheduleType(Schedule.UNIFORM, "Uniform", need_inner_model=True, flags={"timestep_spacing": "linspace"}),
    ScheduleType(Schedule.KARRAS, "Karras", default_rho=7.0, flags={"use_karras_sigmas": True}),
    ScheduleType(Schedule.EXPONENTIAL, "Exponential", flags={"use_exponential_sigmas": True}),
    # Polyexponential at A1111's default rho 1.0 is the exponential schedule (log-linear sigmas).
    ScheduleType(Schedule.POLYEXPONENTIAL, "Polyexponential", default_rho=1.0, flags={"use_exponential_sigmas": True}),
    ScheduleType(Schedule.SGM_UNIFORM, "SGM Uniform", ("SGMUniform",), need_inner_model=True,
                 flags={"timestep_spacing": "trailing"}),
    ScheduleType(Schedule.KL_OPTIMAL, "KL Optimal", custom=True),
    ScheduleType(Schedule.ALIGN_YOUR_STEPS, "Align Your Steps", custom=True),
    ScheduleType(Schedule.SIMPLE, "Simple", need_inner_model=True, flags={"timestep_spacing": "trailing"}),
    ScheduleType(Schedule.NORMAL, "Normal", need_inner_model=True, flags={"timestep_spacing": "linspace"}),
    ScheduleType(Schedule.DDIM, "DDIM", need_inner_model=True, flags={"timestep_spacing": "leading", "steps_offset": 1}),
    ScheduleType(Schedule.BETA, "Beta", need_inner_model=True, flags={"use_beta_sigmas": True}),
)
SCHEDULE_BY_KEY = {s.key: s for s in SCHEDULES}
SIGMA_FLAGS = ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas")


@dataclass(frozen=True)
class SamplerPlan:
    """How one (sampler, schedule type) runs: the diffusers class, its config overrides, the computed sigmas'
    schedule (or None), the schedule type in effect, and what is not exactly A1111's."""

    sampler: Sampler
    schedule: Schedule  # as asked (``automatic`` stays automatic: the infotext says what the user chose)
    cls: str
    options: dict
    custom: Schedule | None = None
    notes: tuple[str, ...] = ()


def plan_sampler(key: Scheduler, schedule: Schedule = Schedule.AUTOMATIC) -> SamplerPlan:
    """The scheduler for a sampler and schedule type. The legacy ``dpmpp_2m_karras`` is DPM++ 2M + Karras."""
    if key is Scheduler.DPMPP_2M_KARRAS:
        key, schedule = Scheduler.DPMPP_2M, Schedule.KARRAS if schedule is Schedule.AUTOMATIC else schedule
    sampler = BY_KEY[key]
    notes = [f"{sampler.name}: {sampler.nearest}"] if sampler.nearest else []
    effective = schedule
    if schedule is Schedule.AUTOMATIC:
        effective = sampler.default_schedule or Schedule.AUTOMATIC
    elif not sampler.schedules:
        notes.append(f"{sampler.name} ignores the schedule type, as in AUTOMATIC1111 (its own timesteps)")
        effective = Schedule.AUTOMATIC
    kind = SCHEDULE_BY_KEY[effective]
    options, custom = dict(sampler.kwargs), None
    if kind.custom and sampler.custom_sigmas:
        custom = effective
    elif kind.custom:  # KL Optimal / Align Your Steps on a sampler whose set_timesteps takes no sigmas
        nearest = SCHEDULE_BY_KEY[Schedule.KARRAS] if sampler.sigma_flags else SCHEDULE_BY_KEY[Schedule.AUTOMATIC]
        notes.append(f"{kind.label} needs computed sigmas, which diffusers' {sampler.cls} does not take: "
                     f"{nearest.label} runs instead")
        options.update(nearest.flags)
    elif any(k in SIGMA_FLAGS for k in kind.flags) and not sampler.sigma_flags:
        notes.append(f"diffusers' {sampler.cls} has no {kind.label} sigmas: its own spacing runs instead")
    elif "timestep_spacing" in kind.flags and not sampler.spacing:
        notes.append(f"diffusers' {sampler.cls} has no timestep spacing option: {kind.label} runs as its own")
    else:
        options.update(kind.flags)
    return SamplerPlan(sampler, schedule, sampler.cls, options, custom, tuple(notes))


# ---------------------------------------------------------------- computed sigma schedules (A1111's formulas)

# A1111 sd_schedulers.py: NVIDIA's Align Your Steps sigmas for SDXL (10 steps), log-linearly interpolated to n.
AYS_SDXL = (14.615, 6.315, 3.771, 2.181, 1.342, 0.862, 0.555, 0.380, 0.234, 0.113, 0.029)


def _loglinear(values: tuple[float, ...], n: int) -> list[float]:
    """A1111's loglinear_interp: ``values`` (descending) resampled to ``n`` points, linear in log σ."""
    logs = [math.log(v) for v in reversed(values)]
    out = []
    for i in range(n):
        x = i / (n - 1) * (len(logs) - 1) if n > 1 else 0.0
        lo = min(int(x), len(logs) - 2)
        out.append(math.exp(logs[lo] + (logs[lo + 1] - logs[lo]) * (x - lo)))
    return out[::-1]


def schedule_sigmas(kind: Schedule, n: int, sigma_min: float, sigma_max: float) -> list[float]:
    """The n + 1 sigmas of a computed schedule, as A1111 computes them (the last is the end of the last step)."""
    if kind is Schedule.KL_OPTIMAL:
        a_min, a_max = math.atan(sigma_min), math.atan(sigma_max)
        return [math.tan(i / n * a_min + (1 - i / n) * a_max) for i in range(n + 1)]
    if kind is Schedule.ALIGN_YOUR_STEPS:
        sigmas = list(AYS_SDXL) if n == len(AYS_SDXL) else _loglinear(AYS_SDXL, n)
        return sigmas[:n] + [0.0]
    raise ValueError(f"{kind.value} is not a computed schedule")


# ---------------------------------------------------------------- A1111's names

def _norm(text: str) -> str:
    return " ".join(str(text).strip().lower().replace("_", " ").split())


_SCHEDULE_NAMES = {_norm(n): s.key for s in SCHEDULES for n in (s.key.value, s.label, *(s.aliases or ()))}
_SAMPLER_NAMES = {_norm(n): s.key for s in SAMPLERS for n in (s.name, *s.aliases)}
_SAMPLER_NAMES[_norm("k_dpmpp_2m_ka")] = Scheduler.DPMPP_2M_KARRAS


def parse_schedule(value, field_name: str = "scheduler") -> Schedule:
    """A schedule type by A1111's name, label or alias, any case (empty: automatic)."""
    if value is None or isinstance(value, str) and not value.strip():
        return Schedule.AUTOMATIC
    if not isinstance(value, str):
        raise ValidationError(field_name, value, "must be text")
    found = _SCHEDULE_NAMES.get(_norm(value))
    if found is None:
        raise ValidationError(field_name, value, "unknown schedule type; known: "
                                                 + ", ".join(s.label for s in SCHEDULES))
    return found


def parse_sampler(name, schedule=None, field_name: str = "sampler_name") -> tuple[Scheduler, Schedule]:
    """A1111's sampler name (any case, its aliases, a legacy "X Karras" / "X Exponential" suffix naming the schedule
    type, as its ``get_sampler_and_scheduler`` splits it) and schedule type → ours. An unknown name is refused by
    name (A1111 would silently run DPM++ 2M)."""
    chosen = parse_schedule(schedule, "scheduler")
    if not isinstance(name, str):
        raise ValidationError(field_name, name, "must be text")
    text = _norm(name)
    if text in _SAMPLER_NAMES:
        key = _SAMPLER_NAMES[text]
        if key is Scheduler.DPMPP_2M_KARRAS:
            return Scheduler.DPMPP_2M, Schedule.KARRAS if chosen is Schedule.AUTOMATIC else chosen
        return key, chosen
    for suffix, kind in sorted(_SCHEDULE_NAMES.items(), key=lambda kv: -len(kv[0])):
        head = text[: -len(suffix)].strip() if text.endswith(" " + suffix) else None
        if head and head in _SAMPLER_NAMES and kind is not Schedule.AUTOMATIC:
            return _SAMPLER_NAMES[head], kind if chosen is Schedule.AUTOMATIC else chosen
    raise ValidationError(field_name, name, "unknown sampler; known: " + ", ".join(s.name for s in SAMPLERS))


def sampler_choice(sampler, schedule=None) -> dict:
    """A sampler and schedule type as a user types them (the CLI, the Python API): ours (``euler_a``, ``karras``)
    or AUTOMATIC1111's names (``Euler a``, ``DPM++ 2M Karras``, ``SGM Uniform``). The request's fields."""
    text = "auto" if sampler is None or isinstance(sampler, str) and not sampler.strip() else sampler
    ours = {s.value for s in Scheduler}
    if isinstance(text, Scheduler) or str(text).strip().lower() in ours:
        key, kind = Scheduler(str(getattr(text, "value", text)).strip().lower()), parse_schedule(schedule, "schedule")
    else:
        key, kind = parse_sampler(text, parse_schedule(schedule, "schedule").value, "scheduler")
    return {"scheduler": key, "schedule": kind}
