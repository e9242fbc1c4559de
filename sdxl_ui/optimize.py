"""apply(plan, models) and report(models, ...): the report is read back from the live pipeline.

The plan says what we intended; only the pipeline's own state (attention processor classes, module dtypes and
devices, accelerate offload hooks, VAE tiling flags, the run hooks installed on it, int8 layers, scheduler class,
torch thread count) says what is true. ``expected_report`` is the plan-only version that ``doctor`` prints before
any weights are loaded. All three walk the registry of optimization units (``optimizations/registry.py``).
"""
from __future__ import annotations

from .optimizations.base import Live, is_compiled, offload_kind  # noqa: F401 - re-exported
from .optimizations.fitting import xformers_row  # noqa: F401 - re-exported
from .optimizations.registry import APPLY_ORDER, ROW_ORDER, Plan, after_load  # noqa: F401 - re-exported
from .schema import HardwareProbe, OptimizationReport


def release(models) -> None:
    """The run ended, however it ended: each run hook's ``release`` (model offload: every model back on the CPU)."""
    from .optimizations import hooks

    hooks.release(models.base)


def apply(plan: Plan, models) -> None:
    """Put the loaded pipelines into the state the plan asks for. Idempotent: safe to call per request."""
    for unit in APPLY_ORDER:
        unit.apply(plan, models)


def report(models, plan: Plan, probe: HardwareProbe, use_refiner: bool | None = None) -> OptimizationReport:
    """Rows built from the pipeline's state; ``plan`` only supplies the *reasons* for rows that are off."""
    live = Live(models, plan, probe, use_refiner)
    return OptimizationReport(rows=tuple(row for unit in ROW_ORDER for row in unit.live(live)), source="pipeline")


def expected_report(plan: Plan, probe: HardwareProbe) -> OptimizationReport:
    """What ``report`` should say once a model is loaded with this plan (for ``doctor``; no weights needed)."""
    return OptimizationReport(rows=tuple(row for unit in ROW_ORDER for row in unit.expected(plan, probe)),
                              source="plan")
