"""One contract over every optimization unit (in the spirit of diffusers' PipelineTesterMixin): each decides on
every recorded probe, declares what it decides, reads back what it planned, can be turned off again, and applying
it twice is applying it once."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
from tests.helpers import PROBES as PROBE_FOLDER

from sdxl_ui.optimizations.base import REQUIRED, Decide, PlanError
from sdxl_ui.optimizations.registry import APPLY_ORDER, DECIDE_ORDER, PLAN_FIELDS, ROW_ORDER, SWITCHES, UNITS, Plan
from sdxl_ui.policy import make_plan
from sdxl_ui.schema import HardwareProbe
from sdxl_ui.settings import AppSettings

PROBES = sorted(PROBE_FOLDER.glob("*.json"))


def _probe(path: Path) -> HardwareProbe:
    return HardwareProbe.from_dict(json.loads(path.read_text()))


def test_every_unit_has_a_place_and_every_plan_field_one_owner():
    assert set(DECIDE_ORDER) | set(APPLY_ORDER) | set(ROW_ORDER) == set(UNITS)
    declared = [name for unit in UNITS for name in unit.fields]
    assert sorted(declared) == sorted(PLAN_FIELDS) and len(set(declared)) == len(declared)
    assert set(Plan.__dataclass_fields__) == set(PLAN_FIELDS) | {"reasons", "warnings"}
    for unit in UNITS:
        assert unit.rows or unit.fields, f"{type(unit).__name__} neither decides nor reports anything"
        assert (unit.row_at is None) == (not unit.rows), type(unit).__name__
    assert {s.name for s in SWITCHES} <= set(PLAN_FIELDS)


@pytest.mark.parametrize("path", PROBES, ids=[p.stem for p in PROBES])
@pytest.mark.parametrize("high_quality", [True, False], ids=["high", "fast"])
@pytest.mark.parametrize("model_kind", ["sdxl", "tiny"])
def test_each_unit_decides_its_fields_and_reason_on_every_recorded_probe(path, high_quality, model_kind):
    probe = _probe(path)
    ctx = Decide(probe, AppSettings(model=model_kind), model_kind, 1024, 1024, high_quality)
    for unit in DECIDE_ORDER:
        before = set(ctx.values)
        try:
            unit.decide(ctx)
        except PlanError as exc:  # only the memory check refuses a default plan: SDXL on a machine too small
            assert type(unit).__name__ == "MemoryCheck" and model_kind == "sdxl", exc
            assert str(exc).startswith("memory:") and "GB" in str(exc)
            return
        decided = set(ctx.values) - before
        assert set(unit.fields) <= decided, f"{type(unit).__name__} left {set(unit.fields) - decided}"
        if unit.fields:
            assert ctx.reasons.get(unit.key), f"{type(unit).__name__} gave no reason under {unit.key!r}"
    plan = make_plan(probe, AppSettings(model=model_kind), model_kind, 1024, 1024, high_quality)
    rows = [row for unit in ROW_ORDER for row in unit.expected(plan, probe)]
    assert [r.name for r in rows] == [name for unit in ROW_ORDER for name in unit.rows]
    assert all(r.detail for r in rows)


def test_required_fields_have_no_default_and_optional_ones_do():
    for unit in UNITS:
        for name, default in unit.fields.items():
            field = Plan.__dataclass_fields__[name]
            assert (field.default is dataclasses.MISSING) == (default is REQUIRED), name


# ---------------------------------------------------------------- on live pipelines (the tiny model, on the CPU)

def _plans():
    """Plans that switch each technique on, and the plain plan that has them all off. int8 and compile are not
    among them: they change the weights or the module when applied, and turning them off means reloading the
    model (the service does so when the settings change)."""
    from sdxl_ui.device import probe_hardware

    probe = probe_hardware()
    base = dict(model="tiny", device="cpu", precision="fp32")

    def plan(high=True, **settings_and_switches):
        switches = {k: settings_and_switches.pop(k) for k in list(settings_and_switches)
                    if k in {s.name for s in SWITCHES}}
        return make_plan(probe, AppSettings(**base, **settings_and_switches), "tiny", 64, 64, high, **switches)

    plain = plan(feature_cache="off", guidance_interval="off")
    variants = {"fast preset": plan(high=False), "sliced attention": plan(attention="sliced",
                                                                           feature_cache="off"),
                "vae tiling": plan(vae_tiling="on"), "feature cache": plan(feature_cache="on"),
                "guidance interval": plan(guidance_interval="on", feature_cache="off"),
                "channels-last VAE": dataclasses.replace(plain, vae_channels_last=True)}
    return probe, plain, variants


@pytest.fixture(scope="module")
def plans():
    return _plans()


def _fresh(plan):
    from sdxl_ui.models import load_models, resolve_source
    from sdxl_ui.optimize import apply

    models = load_models(resolve_source("tiny"), None, plan.dtype, plan.vae_dtype, False)
    apply(plan, models)
    return models


def _latents(models):
    import torch

    from sdxl_ui.denoise import run_stages

    common = dict(prompt="a red circle", negative_prompt=None, num_inference_steps=4, guidance_scale=5.0,
                  generator=torch.Generator().manual_seed(0), output_type="latent")
    with torch.inference_mode():
        return run_stages(models, False, 64, 64, common)


def _rows(report):
    return [(r.name, r.status.value, r.detail) for r in report.rows]


def test_live_rows_equal_the_expected_rows_for_every_variant(plans):
    from sdxl_ui.optimize import expected_report, report

    probe, plain, variants = plans
    for label, plan in {"plain": plain, **variants}.items():
        models = _fresh(plan)
        live = {r.name: r.status.value for r in report(models, plan, probe).rows}
        expected = {r.name: r.status.value for r in expected_report(plan, probe).rows}
        assert live == expected, label


def test_turning_each_technique_off_restores_the_pipeline_bit_for_bit(plans):
    from sdxl_ui.optimize import apply, report

    probe, plain, variants = plans
    reference = _fresh(plain)
    want_rows, want = _rows(report(reference, plain, probe)), _latents(reference)
    for label, plan in variants.items():
        models = _fresh(plan)
        _latents(models)  # a run with the technique on
        apply(plain, models)
        assert _rows(report(models, plain, probe)) == want_rows, label
        assert (_latents(models) == want).all(), f"{label}: the output after turning it off differs"


def test_applying_twice_is_applying_once(plans):
    from sdxl_ui.optimize import apply, report

    probe, _, variants = plans
    for label, plan in variants.items():
        once, twice = _fresh(plan), _fresh(plan)
        apply(plan, twice)
        hooks_once = len(once.base.unet._forward_hooks) + len(once.base.unet._forward_pre_hooks)
        hooks_twice = len(twice.base.unet._forward_hooks) + len(twice.base.unet._forward_pre_hooks)
        assert hooks_once == hooks_twice, label
        assert _rows(report(once, plan, probe)) == _rows(report(twice, plan, probe)), label
        assert (_latents(once) == _latents(twice)).all(), label

