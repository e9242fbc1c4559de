"""What one job runs with beyond the server's settings, and what the page offers for it: Quality Few-step's path
on this model (the few-step LoRA beside a model folder, fused for that job with its family's schedule, or the
model's own few-step schedule) and the request's choice of decoder. Reads the files; loads nothing."""
from __future__ import annotations

from .adapters import few_step_lora
from .models import ModelLoadError
from .optimizations.registry import offers as unit_offers
from .policy import PlanError
from .profiles import PROFILES, profile_named
from .schema import Decoder, Quality, ValidationError
from .settings import AppSettings

NO_PATH = ("this model has no few-step path: it is not a few-step model and has no few-step LoRA beside it (a "
           "folder such as lcm-lora/ in the model folder); --lora SOURCE adds one (docs/models.md)")


def few_step(host) -> tuple[AppSettings, tuple[str, str], str] | None:
    """What Quality Few-step runs with on the host's model — (the job's settings, its profile evidence, what it
    adds) — or None when the model has none. A model already few-step (its files or --profile say so) runs as it
    is; a model folder with a few-step LoRA beside it (the demo's lcm-lora/) gets it fused for the job alone, with
    its family's schedule (``--profile`` does not hold for that job)."""
    plan = host.plan
    if profile_named(plan.profile).few_step:
        return host.settings, host.profile_evidence, f"the model's own {PROFILES[plan.profile].label} schedule"
    found = few_step_lora(host.source)
    if found is None:
        return None
    spec, family, name = found
    settings = host.settings.with_(loras=(*host.settings.loras, spec), profile="auto")
    label = PROFILES[family].label
    evidence = (family, f"Quality Few-step: the few-step LoRA {name}/ beside the model ({label}), for this job")
    return settings, evidence, f"the few-step LoRA {name}/ beside the model, fused for this job"


def offers(host) -> dict:
    """What the page offers beyond the presets: ``few_step``, its quality label ('Few-step (4 steps)') or None
    (also None where a per-job LoRA cannot be swapped in: int8, --compile, sequential offload); and what the units
    offer per job (``tiny_decoder``: whether a tiny decoder is there to pick for the final image)."""
    try:
        found, plan, source = few_step(host), host.plan, host.source
    except (ModelLoadError, PlanError):
        return {"few_step": None, "tiny_decoder": False}
    fixed = plan.int8 or plan.compile or plan.offload == "sequential"  # adapters.apply_request_loras refuses it
    few = found is not None and (found[0] is host.settings or not fixed)
    steps = host.quality_defaults(Quality.FEW_STEP)[0]
    return {"few_step": f"Few-step ({steps} steps)" if few else None, "tiny_decoder": False,
            **unit_offers(host.models, source, host.settings)}


def job_settings(host, request) -> tuple[AppSettings, tuple[str, str], str | None]:
    """(settings, profile evidence, what Few-step adds or None) one job runs with: the server's own; with Quality
    Few-step the model's few-step path (ValidationError naming quality when it has none); with a decoder chosen by
    the request, that decoder for the final image."""
    settings, evidence, added = host.settings, host.profile_evidence, None
    if request.quality is Quality.FEW_STEP:
        found = few_step(host)
        if found is None:
            raise ValidationError("quality", request.quality.value, NO_PATH)
        settings, evidence, added = found
    if request.decoder is not Decoder.AUTO:
        settings = settings.with_(decoder=request.decoder.value)
    return settings, evidence, added
