"""What the model is: its family (``profiles.py``: steps, guidance, scheduler and what applies to it) and the LoRA
adapters fused into it. Decided first: the refiner, the steps policy, the feature cache and the guidance interval
read the family."""
from __future__ import annotations

from ..profiles import choose, profile_named
from ..schema import OptimizationRow, Status
from .base import Unit


def family(ctx):
    """The profile decided for this plan (the units after ``ModelProfile`` read it)."""
    return profile_named(ctx.values.get("profile", "sdxl"))


class ModelProfile(Unit):
    """The model family: its steps for High quality and Fast, guidance, scheduler (and its config), native size,
    and whether the refiner, the feature cache and the guidance interval apply. Detected from the model's and the
    LoRAs' files (``models.profile_evidence``), overridden by ``--profile``."""

    key, rows = "profile", ("model profile",)
    fields = {"profile": "sdxl"}
    decide_at, row_at = 5, 5
    per_request = ("profile",)  # Quality Few-step: the few-step LoRA's family for its job (few_step.job_settings)

    def decide(self, ctx):
        detected = ctx.detected or ("sdxl", "nothing read from the model's files: SDXL defaults")
        name, why = choose(ctx.settings.profile, detected)
        ctx.values["profile"] = name
        ctx.reasons["profile"] = f"{profile_named(name).summary()} — {why}"

    def expected(self, plan, probe):
        return [self._row(plan, "")]

    def live(self, live):
        return [self._row(live.plan, f"; scheduler on the pipeline: {type(live.base.scheduler).__name__}")]

    @staticmethod
    def _row(plan, tail):
        few = profile_named(plan.profile).few_step
        return OptimizationRow("model profile", Status.ACTIVE if few else Status.OFF,
                               f"{plan.profile}: {plan.reasons['profile']}{tail}")


class LoraAdapters(Unit):
    """The LoRAs named by ``--lora`` (loaded, weighted and fused by ``adapters.py`` when the model loads)."""

    key, rows = "loras", ("LoRA adapters",)
    fields = {"loras": ()}
    decide_at, row_at = 6, 6
    per_request = ("loras",)  # the job's set: the server's own, Few-step's LoRA (adapters.apply_request_loras)

    def decide(self, ctx):
        loras = tuple(str(spec) for spec in ctx.settings.loras)
        ctx.values["loras"] = loras
        ctx.reasons["loras"] = ("fused into the base model's weights (diffusers load_lora_weights, set_adapters, "
                                "fuse_lora): the server's own when the model loads, a job's own for that job; the "
                                "refiner runs without them" if loras
                                else "none (--lora SOURCE[@WEIGHT] adds one)")

    def expected(self, plan, probe):
        detail = ", ".join(plan.loras) if plan.loras else ""
        return [OptimizationRow("LoRA adapters", Status.ACTIVE if plan.loras else Status.OFF,
                                f"{detail + ' — ' if detail else ''}{plan.reasons['loras']}")]

    def live(self, live):
        from . import hooks

        fused = hooks.state(live.base, "loras", ())  # set by adapters.apply_loras: what is in the weights
        if not fused:
            return [OptimizationRow("LoRA adapters", Status.OFF, live.plan.reasons["loras"])]
        listing = ", ".join(f"{lora.name} × {lora.weight:g} (hash {lora.hash})" for lora in fused)
        return [OptimizationRow("LoRA adapters", Status.ACTIVE, f"fused: {listing} — {live.plan.reasons['loras']}")]


UNITS = (ModelProfile(), LoraAdapters())
