import math

import pytest

from sdxl_ui.schema import Decoder, GenerationRequest, HardwareProbe, Quality, Scheduler, ValidationError


def test_defaults_follow_the_quality_presets():
    high = GenerationRequest(prompt="a fox")
    assert (high.requested_steps, high.guidance_scale, high.sampler) == (50, 8.0, Scheduler.EULER)
    fast = GenerationRequest(prompt="a fox", quality="fast")
    assert fast.quality is Quality.FAST and fast.sampler is Scheduler.DPMPP_2M_KARRAS
    assert fast.requested_steps < high.requested_steps


def test_from_raw_coerces_form_and_cli_strings():
    req = GenerationRequest.from_raw(prompt="x", steps="20", guidance="7.5", seed="42", width="512",
                                     height=" 768 ", images="2", negative_prompt="", scheduler="DDIM")
    assert (req.steps, req.guidance, req.seed, req.width, req.height, req.images) == (20, 7.5, 42, 512, 768, 2)
    assert req.scheduler is Scheduler.DDIM
    blank = GenerationRequest.from_raw(prompt="x", steps="", seed=None, guidance=" ")
    assert blank.steps is None and blank.seed is None and blank.guidance is None


def test_few_step_is_a_quality_spelt_either_way_and_the_decoder_a_closed_choice():
    for spelling in ("few_step", "few-step", " Few-Step "):
        request = GenerationRequest.from_raw(prompt="x", quality=spelling)
        assert request.quality is Quality.FEW_STEP and request.quality.high  # exact: no Fast shortcuts
        assert (request.requested_steps, request.guidance_scale, request.sampler) == (4, 1.0, Scheduler.LCM)
    assert not Quality.FAST.high and Quality.HIGH.high
    assert GenerationRequest(prompt="x").decoder is Decoder.AUTO
    assert GenerationRequest.from_raw(prompt="x", decoder="Tiny").decoder is Decoder.TINY


BAD = [
    ("prompt", ""), ("prompt", "   \n"), ("prompt", None), ("prompt", "x" * 10_001),
    ("width", 100), ("width", 0), ("width", -512), ("width", 1_000_000), ("width", "wide"), ("height", 1025),
    ("height", 7.5), ("steps", 0), ("steps", -1), ("steps", 10**6), ("steps", "many"), ("steps", True),
    ("guidance", -1), ("guidance", math.nan), ("guidance", math.inf), ("guidance", "nan"), ("guidance", 31),
    ("seed", -5), ("seed", 2**32), ("seed", "lucky"), ("images", 0), ("images", 5), ("quality", "ultra"),
    ("scheduler", "heun++"), ("quality", "few steps"), ("decoder", "taesd"), ("decoder", "-"),
]


@pytest.mark.parametrize("field,value", BAD)
def test_each_bad_value_names_its_field_and_value(field, value):
    kwargs = {"prompt": "a fox", field: value}
    with pytest.raises(ValidationError) as info:
        GenerationRequest.from_raw(**kwargs)
    assert info.value.field == field
    assert str(info.value).startswith(f"{field}:")
    assert f"(got {repr(value)[:10]}" in str(info.value)


def test_unknown_field_is_named():
    with pytest.raises(ValidationError, match="colour"):
        GenerationRequest.from_raw(prompt="x", colour="red")


def test_request_is_frozen():
    req = GenerationRequest(prompt="x")
    from dataclasses import FrozenInstanceError

    with pytest.raises(FrozenInstanceError):
        req.prompt = "y"


def test_probe_json_round_trip():
    from tests.helpers import load_probe

    probe = load_probe("rtx5090_torch_without_sm120")
    again = HardwareProbe.from_dict(probe.to_dict())
    assert again == probe
    assert again.cuda.sm == "sm_120" and again.cuda.capability == (12, 0)


def test_a_plan_cannot_pair_two_attention_choices():
    """Issue 13: a plan with xformers and slicing could be built; apply() honoured one, the report contradicted
    itself. Attention is one choice; attention_slicing only restates it."""
    import dataclasses

    from tests.helpers import load_probe

    from sdxl_ui.policy import make_plan
    from sdxl_ui.settings import AppSettings

    plan = make_plan(load_probe("rtx4090_24gb"), AppSettings(attention="xformers"))
    with pytest.raises(ValueError, match="contradictory"):
        dataclasses.replace(plan, attention_slicing=True)
    with pytest.raises(ValueError, match="not one of"):
        dataclasses.replace(plan, attention="classic")
    assert dataclasses.replace(plan, attention="sliced", attention_slicing=True).attention_slicing
