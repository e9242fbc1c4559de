"""What every optimization unit shares: the decision context, the live pipeline state, the row helpers, and the
``Unit`` contract itself. Pure (torch and diffusers are imported inside ``apply``/``live`` only)."""
from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any, Mapping

from ..schema import HardwareProbe, OptimizationRow, Status, Toggle
from ..settings import AppSettings
from .memory import MemoryEstimate, estimate_memory


class PlanError(ValueError):
    """The settings cannot be honoured on this hardware; the message says why and what to do."""


ATTENTION_KINDS = ("sdpa", "xformers", "sliced")
REQUIRED = object()  # a plan field without a default (``Unit.fields``)


class PlanBase:
    """What every plan has besides the units' fields (``registry.Plan`` is a frozen dataclass built from the
    units' ``fields`` on top of this): its reasons (keys = the units' keys), warnings, and the checks that keep a
    plan applicable as stated."""

    def __post_init__(self):
        # A plan that pairs two attention implementations (e.g. xformers and slicing) cannot be applied as stated:
        # apply() would honour one and the report would contradict itself. Refuse to build it.
        if self.attention not in ATTENTION_KINDS:
            raise ValueError(f"plan: attention {self.attention!r} is not one of {', '.join(ATTENTION_KINDS)}")
        if self.attention_slicing != (self.attention == "sliced"):
            raise ValueError(f"plan: attention {self.attention!r} with attention_slicing={self.attention_slicing} "
                             "is contradictory (slicing is the 'sliced' attention choice)")

    @property
    def reason(self) -> str:
        return self.reasons["device"]

    def steps_for(self, requested: int) -> int:
        return max(1, round(requested * self.steps_factor))

    def to_dict(self) -> dict:
        data = asdict(self)
        data["reasons"] = dict(self.reasons)
        data["reason"] = self.reason
        return data


SHORT_DTYPE = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}
PROCESSOR_LABELS = {
    "AttnProcessor2_0": "sdpa",
    "XFormersAttnProcessor": "xformers",
    "SlicedAttnProcessor": "sliced",
    "AttnProcessor": "classic",
}


def short(dtype) -> str:
    name = str(dtype).replace("torch.", "")
    return SHORT_DTYPE.get(name, name)


# ---------------------------------------------------------------- decision context

@dataclass
class Decide:
    """What a decision sees: the probe, the settings, the request's shape and quality and its per-request
    switches, and every decision made before it (``values``/``reasons``). ``warnings`` are shown before a run."""

    probe: HardwareProbe
    settings: AppSettings
    model_kind: str
    width: int
    height: int
    high_quality: bool
    switches: dict[str, Toggle] = field(default_factory=dict)  # the request's per-request switches, by name
    detected: tuple[str, str] | None = None  # (profile, why) from the model's files (models.profile_evidence)
    values: dict[str, Any] = field(default_factory=dict)
    reasons: dict[str, str] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    @property
    def device(self) -> str:
        return self.values["device"]

    @property
    def available(self) -> float:
        """Memory for the models on the chosen device: free VRAM on CUDA, available RAM otherwise (MPS shares it)."""
        if self.device == "cuda":
            return self.probe.cuda.vram_free_gb or self.probe.cuda.vram_total_gb or 0.0
        return self.probe.cpu.ram_available_gb

    @property
    def where(self) -> str:
        return (f"{self.available:.1f} GB VRAM free" if self.device == "cuda"
                else f"{self.available:.1f} GB RAM available")

    @property
    def px(self) -> str:
        return f"{self.width}×{self.height}"

    def switch(self, name: str) -> Toggle:
        return self.switches.get(name, Toggle.AUTO)

    def estimate(self, refiner: bool | None = None, tiled: bool | None = None) -> MemoryEstimate:
        v = self.values
        return estimate_memory(self.model_kind, v["dtype"], v["vae_dtype"], self.width, self.height, self.device,
                               v.get("refiner", False) if refiner is None else refiner,
                               v.get("vae_tiling", False) if tiled is None else tiled)


# ---------------------------------------------------------------- live state (for read-back rows)

class Live:
    """The loaded pipelines' own state, read once per report."""

    def __init__(self, models, plan, probe: HardwareProbe, use_refiner: bool | None):
        self.models, self.plan, self.probe = models, plan, probe
        self.base = models.base
        self.refiner_on = (models.refiner is not None if use_refiner is None
                           else bool(use_refiner) and models.refiner is not None)
        self.dtypes = module_dtypes(self.base)
        self.offload = offload_kind(self.base)
        devices = sorted({v.split("@")[1] for v in self.dtypes.values()})
        self.execution = str(self.base._execution_device) if self.offload else ", ".join(devices)
        self.device_type = self.execution.split(":")[0]
        self.processors = {name: Counter(type(p).__name__ for p in getattr(self.base, name).attn_processors.values())
                           for name in ("unet", "vae")}
        # The UNet is where the attention time goes: its processors decide the status; the listing shows all.
        self.kinds = {PROCESSOR_LABELS.get(name, name) for name in self.processors["unet"]}
        self.listing = "; ".join(f"{module} " + ", ".join(f"{n}×{cls}" for cls, n in sorted(counts.items()))
                                 for module, counts in self.processors.items() if counts)

    @property
    def pipes(self):
        return [p for p in (self.base, self.models.refiner if self.refiner_on else None) if p is not None]


def module_dtypes(pipe) -> dict[str, str]:
    out = {}
    for name in ("unet", "text_encoder", "text_encoder_2", "vae"):
        module = getattr(pipe, name, None)
        if module is not None:
            out[name] = f"{short(module.dtype)}@{module.device.type}"
    return out


def offload_kind(pipe) -> str | None:
    """'model' / 'sequential' from the accelerate hooks actually attached to the UNet, else None."""
    hook = getattr(pipe.unet, "_hf_hook", None)
    if hook is None:
        return None
    names = {type(hook).__name__} | {type(h).__name__ for h in getattr(hook, "hooks", ())}
    if "CpuOffload" in names:
        return "model"
    if "AlignDevicesHook" in names:
        return "sequential"
    return "unknown"


def is_compiled(module) -> bool:
    return type(module).__name__ == "OptimizedModule"  # what torch.compile returns for an nn.Module


def live_row(name: str, active: bool, planned: bool, reason: str, state: str = "") -> OptimizationRow:
    """A row whose status is read from the pipeline. The plan's reason is quoted as the reason only when the plan
    decided the same; otherwise the row says the live state departs from the plan (never "active — not needed")."""
    if active == planned:
        detail = f"{state} — {reason}" if state else reason
    else:
        detail = (f"{state + '; ' if state else ''}{'on' if active else 'off'} on the live pipeline, not as planned "
                  f"(plan: {reason})")
    return OptimizationRow(name, Status.ACTIVE if active else Status.OFF, detail)


def planned_row(name: str, active: bool, reason: str) -> OptimizationRow:
    return OptimizationRow(name, Status.ACTIVE if active else Status.OFF, reason)


def pipes(models) -> list:
    """The loaded pipelines a unit applies to: the base, and the refiner when one is loaded."""
    return [p for p in (models.base, models.refiner) if p is not None]


# ---------------------------------------------------------------- the unit

@dataclass(frozen=True)
class Switch:
    """A per-request on/off/auto switch that a unit offers (the page's Advanced, the CLI's flag, the request's
    ``techniques``). ``auto`` is the quality preset's choice."""

    name: str  # the request's key and the CLI flag (``--feature-cache``)
    label: str  # the page's label
    help: str  # the CLI's help


class Unit:
    """One optimization: everything about it in one class.

    * ``fields``: the plan fields it decides, with their defaults (the ``Plan`` class is built from these);
      ``key`` is its entry in ``plan.reasons``.
    * ``decide_at``, ``apply_at``, ``row_at``: its place in the three walks (decisions read only what was decided
      before them; offload is applied last; rows keep the report's order). ``None``: not part of that walk.
    * ``switch``: a per-request switch it offers, if any; ``per_request``: plan fields (and its reason) that a
      request's own plan replaces in the loaded plan (``adjust``).
    * ``decide`` (pure), ``apply`` (idempotent), ``expected`` (planned rows), ``live`` (rows read back);
      ``check_settings`` (the settings it refuses at start-up), ``loaded`` (what it loads beside a freshly loaded
      model, e.g. the tiny decoder)."""

    key = ""
    fields: Mapping[str, Any] = {}
    rows: tuple[str, ...] = ()
    decide_at: float | None = None
    apply_at: float | None = None
    row_at: float | None = None
    switch: Switch | None = None
    per_request: tuple[str, ...] = ()

    def decide(self, ctx: Decide) -> None:  # sets ctx.values[...] and ctx.reasons[...]
        pass

    def adjust(self, loaded, request) -> tuple[dict[str, Any], dict[str, str]]:
        """(field updates, reason updates) for one request's plan on top of the loaded plan: by default the
        ``per_request`` fields and this unit's reason come from the request's plan, the rest stays as loaded."""
        if not self.per_request:
            return {}, {}
        return ({f: getattr(request, f) for f in self.per_request},
                {self.key: request.reasons[self.key]} if self.key in request.reasons else {})

    def apply(self, plan, models) -> None:
        pass

    def check_settings(self, settings) -> None:
        """Raise ValidationError naming a setting of this unit that cannot work (before anything loads)."""

    def loaded(self, models, source, settings) -> str | None:
        """After the model loaded: load or attach what this unit needs beside it; returns a log line, or None.
        May raise ModelLoadError (``failures``) when the settings require something that cannot load."""
        return None

    def offers(self, models, source, settings) -> dict:
        """What this unit lets a request choose (``GenerationRequest`` fields the page shows only when offered):
        name -> bool, read from the loaded ``models`` (None when nothing is loaded: from the files)."""
        return {}

    def expected(self, plan, probe: HardwareProbe) -> list[OptimizationRow]:
        return []

    def live(self, live: Live) -> list[OptimizationRow]:
        return []

    def evidence(self, plan) -> dict[str, str]:
        """Row name -> text its live detail must contain after a run with ``plan`` (``selftest``: proof that the
        technique did its work, beyond its status)."""
        return {}
