"""Model profiles: one record per model family (SDXL and its few-step distillations), and the rules that detect the
family from what a model's own files say. Plain data, no torch, no I/O (``models.profile_evidence`` reads the files).

Every default is the family's own model card or the diffusers guide for it; the source is named beside each record.
A family that is not recognised runs as ``sdxl`` (today's behaviour) and the reason says so; ``--profile NAME``
overrides the detection.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

AUTO = "auto"


@dataclass(frozen=True)
class Profile:
    """One family's defaults. ``steps``: (High quality, Fast); ``guidance``: None = the quality preset's (SDXL);
    ``scheduler``: a diffusers scheduler class name (None = the request's sampler, as for SDXL) with its config
    ``overrides`` (applied to whatever sampler runs) and its pipeline-call ``options`` (e.g. TCD's eta)."""

    name: str
    label: str
    steps: tuple[int, int] | None  # None: the quality preset's steps (SDXL)
    guidance: float | None
    scheduler: str | None
    sampler_label: str | None  # the A1111 sampler name of ``scheduler`` (PNG parameters)
    native_size: int | None  # None: the model's own (from its config)
    refiner: bool
    feature_cache: bool
    source: str
    overrides: Mapping[str, Any] = field(default_factory=dict)
    options: Mapping[str, Any] = field(default_factory=dict)

    @property
    def few_step(self) -> bool:
        return self.steps is not None

    @property
    def guidance_free(self) -> bool:
        """diffusers runs the negative branch only when guidance_scale > 1: 0 and 1 have none to cut."""
        return self.guidance is not None and self.guidance <= 1.0

    def steps_for(self, high_quality: bool) -> int | None:
        return None if self.steps is None else self.steps[0 if high_quality else 1]

    def defaults(self, high_quality: bool, steps: int, guidance: float) -> tuple[int, float]:
        """(steps, guidance) a quality preset offers with this profile: the family's own, else the preset's."""
        return (self.steps_for(high_quality) or steps, guidance if self.guidance is None else self.guidance)

    def summary(self) -> str:
        if not self.few_step:
            return f"{self.label}: the quality presets' steps, guidance and samplers"
        high, fast = self.steps
        steps = f"{high} steps" if high == fast else f"{high} (High quality) / {fast} (Fast) steps"
        opts = "".join(f", {k}={v}" for k, v in {**self.overrides, **self.options}.items())
        return f"{self.label}: {steps}, guidance {self.guidance:g}, {self.scheduler}{opts}"


SDXL_CARD = "https://huggingface.co/stabilityai/stable-diffusion-xl-base-1.0"
TURBO_CARD = ("https://huggingface.co/docs/diffusers/using-diffusers/sdxl_turbo (guidance_scale=0.0, 1 step, "
              "2-4 improve it, 512x512; timestep_spacing='trailing'); stabilityai/sdxl-turbo ships "
              "EulerAncestralDiscreteScheduler")
LIGHTNING_CARD = ("https://huggingface.co/ByteDance/SDXL-Lightning (EulerDiscreteScheduler, timestep_spacing="
                  "'trailing', guidance_scale=0, the checkpoint's own step count; 1-step: prediction_type='sample')")
LCM_CARD = ("https://huggingface.co/latent-consistency/lcm-lora-sdxl (LCMScheduler, 2-8 steps, guidance disabled "
            "or 1.0-2.0); https://huggingface.co/docs/diffusers/using-diffusers/inference_with_lcm")
HYPER_CARD = ("https://huggingface.co/ByteDance/Hyper-SD (N-step LoRA: DDIMScheduler timestep_spacing='trailing', "
              "guidance_scale=0; 1-step LoRA: TCDScheduler, eta=1.0)")
TCD_CARD = ("https://huggingface.co/docs/diffusers/using-diffusers/inference_with_tcd_lora and "
            "https://huggingface.co/h1t/TCD-SDXL-LoRA (TCDScheduler, 4 steps, guidance_scale=0, eta=0.3)")


def _lightning(n: int) -> Profile:
    overrides = {"timestep_spacing": "trailing", **({"prediction_type": "sample"} if n == 1 else {})}
    return Profile(f"lightning-{n}", f"SDXL-Lightning {n}-step", (n, n), 0.0, "EulerDiscreteScheduler", "Euler",
                   None, False, False, LIGHTNING_CARD, overrides)


def _hyper(n: int) -> Profile:
    if n == 1:
        return Profile("hyper-1", "Hyper-SDXL 1-step", (1, 1), 0.0, "TCDScheduler", "TCD", None, False, False,
                       HYPER_CARD, {}, {"eta": 1.0})
    return Profile(f"hyper-{n}", f"Hyper-SDXL {n}-step", (n, n), 0.0, "DDIMScheduler", "DDIM", None, False, False,
                   HYPER_CARD, {"timestep_spacing": "trailing"})


PROFILES: dict[str, Profile] = {p.name: p for p in (
    # Today's behaviour: the quality presets (50 steps guidance 8 Euler / 20 steps guidance 6 DPM++ 2M Karras).
    Profile("sdxl", "SDXL", None, None, None, None, None, True, True, SDXL_CARD),
    # Turbo: 4 steps for High quality (the card: "2, 3 or 4 steps improve the image"), 1 for Fast (its design).
    Profile("turbo", "SDXL Turbo", (4, 1), 0.0, "EulerAncestralDiscreteScheduler", "Euler a", 512, False, False,
            TURBO_CARD, {"timestep_spacing": "trailing"}),
    *(_lightning(n) for n in (1, 2, 4, 8)),
    # LCM: 4 steps (the card's example) for High quality, 2 (the bottom of the card's 2-8) for Fast; guidance 1.0
    # (the card's range starts there; diffusers then runs no negative branch).
    Profile("lcm", "LCM (LCM-LoRA / LCM-SDXL)", (4, 2), 1.0, "LCMScheduler", "LCM", None, False, False, LCM_CARD),
    *(_hyper(n) for n in (1, 2, 4, 8)),
    # TCD: 4 steps (the card's) for Fast, 8 for High quality (TCD's steps "can be freely adjusted"); eta 0.3.
    Profile("tcd", "TCD (TCD-SDXL-LoRA)", (8, 4), 0.0, "TCDScheduler", "TCD", None, False, False, TCD_CARD,
            {}, {"eta": 0.3}),
)}
NAMES = tuple(PROFILES)

# File names and hub ids of the families (their cards' checkpoint names), searched in a model's and a LoRA's names.
NAME_RULES: tuple[tuple[re.Pattern, Any], ...] = (
    (re.compile(r"sdxl[_-]lightning[_-](\d)step", re.I), lambda m: f"lightning-{m.group(1)}"),
    (re.compile(r"hyper-sdxl-(\d)steps?-(?!cfg)", re.I), lambda m: f"hyper-{m.group(1)}"),
    (re.compile(r"lcm[_-](lora[_-])?sdxl|lcm[_-]lora|latent-consistency/lcm", re.I), lambda m: "lcm"),
    (re.compile(r"tcd[_-]sdxl|\btcd\b", re.I), lambda m: "tcd"),
    (re.compile(r"sdxl[_-]turbo|sd_xl_turbo", re.I), lambda m: "turbo"),
)


def profile_named(name: str) -> Profile:
    return PROFILES[name]


def from_name(text: str) -> str | None:
    """The family a file name or hub id names (its card's checkpoint names), or None."""
    for pattern, family in NAME_RULES:
        found = pattern.search(text or "")
        if found:
            name = family(found)
            if name in PROFILES:
                return name
    return None


def from_scheduler_config(config: Mapping[str, Any] | None) -> tuple[str, str] | None:
    """(family, why) from a checkpoint's own scheduler config, or None when it says nothing family-specific."""
    if not config:
        return None
    cls = config.get("_class_name", "")
    spacing, prediction = config.get("timestep_spacing"), config.get("prediction_type")
    if cls == "LCMScheduler":
        return "lcm", "its scheduler config is an LCMScheduler"
    if cls == "TCDScheduler":
        return "tcd", "its scheduler config is a TCDScheduler"
    if cls == "EulerAncestralDiscreteScheduler" and spacing == "trailing":
        return "turbo", "its scheduler config is SDXL Turbo's (EulerAncestralDiscreteScheduler, trailing timesteps)"
    if cls == "EulerDiscreteScheduler" and spacing == "trailing" and prediction == "sample":
        return "lightning-1", "its scheduler config is 1-step Lightning's (Euler, trailing, prediction 'sample')"
    return None


def detect(model: str, scheduler_config: Mapping[str, Any] | None = None,
           loras: Iterable[tuple[str, Iterable[str]]] = ()) -> tuple[str, str]:
    """(family, reason) from what the files say, most specific first: a LoRA's name or metadata (a few-step LoRA
    changes the schedule of whatever base it is put on), the model's hub id or file name, its scheduler config.
    ``loras``: (name, metadata strings) per LoRA."""
    for name, texts in loras:
        for text in (name, *texts):
            family = from_name(text)
            if family:
                where = "name" if text == name else "metadata"
                return family, f"detected: LoRA {name!r} ({where} names {PROFILES[family].label})"
    family = from_name(model)
    if family:
        return family, f"detected: the model {model!r} is named as {PROFILES[family].label}"
    found = from_scheduler_config(scheduler_config)
    if found:
        return found[0], f"detected: {found[1]}"
    return "sdxl", "no few-step family recognised in the model's files: SDXL defaults"


def choose(setting: str, detected: tuple[str, str]) -> tuple[str, str]:
    """The profile in force: ``--profile NAME`` wins over the detection, ``auto`` takes it."""
    if setting and setting != AUTO:
        return setting, f"set by --profile {setting} (detection said: {detected[0]})"
    return detected
