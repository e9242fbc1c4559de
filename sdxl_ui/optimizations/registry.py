"""The registry of optimization units: the one list, the three walks in the order the units declare, the
``Plan`` class built from their fields, their per-request switches, and the per-request adjustment.

Adding a technique is writing its mechanism, its unit (listed in its family module's ``UNITS``) and its tests:
its plan fields, its place in the decisions, the application and the report, its per-request switch (the page's
Advanced, the CLI's flag, the request's ``techniques``) and what selftest checks after a run all come from the
unit itself."""
from __future__ import annotations

from dataclasses import field, make_dataclass, replace
from typing import Any, Mapping

from ..schema import Toggle, ValidationError, parse_choice
from . import fitting, less_work, picture, placement, profile, speed
from .base import REQUIRED, Decide, PlanBase, Switch, Unit

# Each family module lists its units; the walks below order them by what each unit declares.
UNITS: tuple[Unit, ...] = (*profile.UNITS, *placement.UNITS, *fitting.UNITS, *speed.UNITS, *less_work.UNITS,
                           *picture.UNITS)


def _walk(attribute: str) -> tuple[Unit, ...]:
    placed = [u for u in UNITS if getattr(u, attribute) is not None]
    return tuple(sorted(placed, key=lambda u: getattr(u, attribute)))


# Decisions: each reads only those before it. Application: threads first; int8 and the feature cache before
# compile (they change the modules it would trace); offload last (after it, no .to()). Rows: the report's order.
DECIDE_ORDER = _walk("decide_at")
APPLY_ORDER = _walk("apply_at")
ROW_ORDER = _walk("row_at")
SWITCHES: tuple[Switch, ...] = tuple(u.switch for u in DECIDE_ORDER if u.switch is not None)


def _plan_fields() -> list[tuple[str, Any, Any]]:
    fields, seen = [], set()
    for unit in DECIDE_ORDER:
        for name, default in unit.fields.items():
            if name in seen:
                raise TypeError(f"plan field {name!r} is declared by two units")
            seen.add(name)
            fields.append((name, Any) if default is REQUIRED else (name, Any, field(default=default)))
    required = [f for f in fields if len(f) == 2]
    return [*required, ("reasons", Mapping[str, str]), *[f for f in fields if len(f) == 3],
            ("warnings", tuple, field(default=()))]


# Every decision the units made, each with its reason (keys of ``reasons`` = the units' keys). A frozen dataclass
# like any other (pickles by this module's name, ``dataclasses.replace`` works).
Plan = make_dataclass("Plan", _plan_fields(), bases=(PlanBase,), frozen=True)
Plan.__module__ = __name__  # so that a plan pickles by this module's name (``module=`` needs Python 3.12)
PLAN_FIELDS = tuple(name for unit in DECIDE_ORDER for name in unit.fields)


def parse_switches(switches: Mapping[str, Any] | None) -> dict[str, Toggle]:
    """The request's per-request switches as toggles; an unknown name or value is bad input naming it."""
    known = {s.name for s in SWITCHES}
    out = {}
    for name, value in (switches or {}).items():
        if name not in known:
            raise ValidationError(f"techniques.{name}", value, f"is not a per-request switch (known: "
                                                               f"{', '.join(sorted(known))})")
        out[name] = parse_choice(Toggle, name, value if value is not None else Toggle.AUTO)
    return out


def decide(ctx: Decide) -> Decide:
    for unit in DECIDE_ORDER:
        unit.decide(ctx)
    return ctx


def build_plan(ctx: Decide) -> "Plan":
    return Plan(**{name: ctx.values[name] for name in PLAN_FIELDS}, reasons=dict(ctx.reasons),
                warnings=tuple(ctx.warnings))


def adjust(loaded: "Plan", request: "Plan") -> "Plan":
    """The plan for one request: each unit says what of the request's own plan replaces the loaded plan (the
    placement — device, dtypes, int8, offload, threads — stays as loaded: the weights are already placed)."""
    updates, reasons = {}, dict(loaded.reasons)
    for unit in DECIDE_ORDER:
        fields, why = unit.adjust(loaded, request)
        updates.update(fields)
        reasons.update(why)
    return replace(loaded, **updates, reasons=reasons)


def check_settings(settings) -> None:
    """Each unit refuses the settings of its own that cannot work (ValidationError naming the setting)."""
    for unit in DECIDE_ORDER:
        unit.check_settings(settings)


def after_load(models, source, settings) -> list[str]:
    """After a model load, each unit loads or attaches what it needs beside the model (the tiny decoder); the log
    lines they return. A unit may raise ModelLoadError."""
    lines = (unit.loaded(models, source, settings) for unit in DECIDE_ORDER)
    return [line for line in lines if line]


def offers(models, source, settings) -> dict:
    """What the units offer a request to choose beyond the presets (e.g. ``tiny_decoder``: a tiny decoder for the
    final image), merged; read from the loaded models, or from the files when nothing is loaded."""
    found: dict = {}
    for unit in DECIDE_ORDER:
        found.update(unit.offers(models, source, settings))
    return found
