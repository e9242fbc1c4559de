"""Pure planning: (hardware probe, settings, model, size, the request's switches) -> Plan, every decision with its
reason, made by the optimization units (``optimizations/registry.py``) in their declared order.

No torch, no I/O: tests feed recorded probes (tests/probes/*.json) instead of patching torch.
Facts behind the rules are in ../shared/seed/NOTES.md and ../shared/PERFORMANCE-ANCHORS.md.
"""
from __future__ import annotations

from .optimizations.base import Decide, PlanError  # noqa: F401 - PlanError: the planning layer's error
from .optimizations.fitting import plan_attention, sdpa_backends_for  # noqa: F401 - re-exported
from .optimizations.memory import VAE_TILE_PX, MemoryEstimate, estimate_memory  # noqa: F401 - re-exported
from .optimizations.placement import plan_device, plan_dtype  # noqa: F401 - re-exported
from .optimizations.registry import Plan, adjust, build_plan, decide, parse_switches
from .schema import HardwareProbe
from .settings import AppSettings


def make_plan(probe: HardwareProbe, settings: AppSettings, model_kind: str = "sdxl", width: int = 1024,
              height: int = 1024, high_quality: bool = True, techniques=None, profile=None, **switches) -> Plan:
    """Every unit's decision, in the registry's order (each reads only the ones before it). ``techniques`` (or
    keyword arguments, e.g. ``feature_cache="on"``) are the request's own per-request switches (Advanced);
    ``profile``: (family, why) detected from the model's files (``models.profile_evidence``; None: none)."""
    chosen = parse_switches({**(techniques or {}), **switches})
    return build_plan(decide(Decide(probe, settings, model_kind, width, height, high_quality, chosen, profile)))


def adjust_plan(loaded: Plan, request_plan: Plan) -> Plan:
    """The plan for one request: device, dtypes, int8, offload and threads stay as loaded (the weights are already
    placed); size- and quality-dependent choices (refiner use, VAE tiling, attention slicing, feature cache,
    guidance interval) come from the request's own plan. A refiner that was not loaded stays off."""
    return adjust(loaded, request_plan)


def plan_request(loaded: Plan, probe: HardwareProbe, settings: AppSettings, model_kind, width: int, height: int,
                 high_quality: bool, techniques=None, profile=None) -> Plan:
    """One request's plan in one call: the request (size, quality, its switches), the probe and the settings in,
    the loaded plan with what the request decides on top of it out (``adjust_plan``)."""
    return adjust_plan(loaded, make_plan(probe, settings, model_kind, width, height, high_quality, techniques,
                                         profile=profile))
