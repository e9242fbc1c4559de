"""apply(plan, models) and report(models, ...): the report is read back from the live pipeline.

The plan says what we intended; only the pipeline's own state (attention processor classes, module dtypes and
devices, accelerate offload hooks, VAE tiling flags, the feature cache and guidance interval installed on it, int8
layers, scheduler class, torch thread count) says what is true. ``expected_report`` is the plan-only version that
``doctor`` prints before any weights are loaded. Both, and ``apply``, walk the one table of optimizations
(``optimizations/table.py``): every optimization is one unit there.
"""
from __future__ import annotations

import logging

from .optimizations.table import (APPLY_ORDER, ROW_ORDER, SHORT_DTYPE, Live, is_compiled, offload_kind,  # noqa: F401
                                  xformers_row)
from .schema import HardwareProbe, OptimizationReport, Plan

log = logging.getLogger(__name__)

_offload_kind = offload_kind  # older names, kept for callers and tests
_is_compiled = is_compiled
_xformers_row = xformers_row


def apply(plan: Plan, models) -> None:
    """Put the loaded pipelines into the state the plan asks for. Idempotent: safe to call per request."""
    for unit in APPLY_ORDER:
        unit.apply(plan, models)


def claim_offload(models, pipe) -> None:
    """Model offload with a refiner: before ``pipe`` runs, every model goes back to the CPU and ``pipe`` gets its
    own hook chain on every module it will run.

    Base and refiner share text_encoder_2 and the VAE. diffusers' ``enable_model_cpu_offload()`` begins with
    ``remove_all_hooks()`` over the pipeline's components, and ``maybe_free_model_hooks()`` re-applies it after
    every call, so whichever pipeline offloaded last owns the shared modules' hooks and the other runs them outside
    its chain: a hook from the other chain does not offload the model before it (text encoder 1 stayed on the GPU
    through the whole base denoising), and a pipeline that did not finish its call leaves its UNet on the GPU
    while the other one loads. Re-applying costs no transfer (everything is already on the CPU between calls).
    No-op without model offload."""
    if _offload_kind(pipe) != "model":
        return
    for other in (models.base, models.refiner):
        if other is not None and other is not pipe and _offload_kind(other) == "model":
            other.maybe_free_model_hooks()  # its models, its UNet included, back to the CPU
    # diffusers: "make sure the model is in the same state as before calling it": all on the CPU, its chain attached
    pipe.maybe_free_model_hooks()


def release_offload(models) -> None:
    """After a run however it ended (finished, stopped, failed): nothing left on the accelerator under model
    offload, and the base owns the shared modules' hooks again. No-op without model offload."""
    claim_offload(models, models.base)


def report(models, plan: Plan, probe: HardwareProbe, use_refiner: bool | None = None) -> OptimizationReport:
    """Rows built from the pipeline's state; ``plan`` only supplies the *reasons* for rows that are off."""
    live = Live(models, plan, probe, use_refiner)
    return OptimizationReport(rows=tuple(row for unit in ROW_ORDER for row in unit.live(live)), source="pipeline")


def expected_report(plan: Plan, probe: HardwareProbe) -> OptimizationReport:
    """What ``report`` should say once a model is loaded with this plan (for ``doctor``; no weights needed)."""
    return OptimizationReport(rows=tuple(row for unit in ROW_ORDER for row in unit.expected(plan, probe)),
                              source="plan")
