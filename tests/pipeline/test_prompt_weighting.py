"""Prompts in A1111's syntax, judged on the demo world (the demo model; sdxl_ui/prompt_syntax.py and long_prompts.py):
emphasis pulls the picture towards a weighted colour, ``(x:1.0)`` is plain ``x`` bit for bit, BREAK is the same text
in two chunks, ``[red:blue:when]`` lies between the two plain prompts (nearer the first the later it switches), and
the schedule still switches under the guidance interval, the feature cache, a few-step profile and int8.

The measure: the mean red minus blue of the shape's pixels (those far from the white background), over 8 seeds."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from tests.helpers import run

from sdxl_ui.long_prompts import _encode, chunks, conditioning
from sdxl_ui.prompt_syntax import parse_attention
from sdxl_ui.schema import GenerationRequest, Quality
from sdxl_ui.service import GenerationService
from sdxl_ui.settings import AppSettings

SEEDS = range(8)
SCENE = "a large {} circle on a white background"


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return GenerationService(AppSettings(model="demo", device="cpu", outputs=tmp_path_factory.mktemp("outputs")))


def redness(image) -> float:
    pixels = np.asarray(image, dtype=float)
    shape = np.sqrt(((pixels - 245) ** 2).sum(-1)) > 60
    return float((pixels[..., 0] - pixels[..., 2])[shape].mean()) if shape.any() else 0.0


def pictures(service, prompt, **request):
    out = []
    for seed in SEEDS:
        found = run(service, GenerationRequest(prompt=prompt, seed=seed, steps=20, guidance=7.0,
                                               techniques={"steps_policy": "off"}, **request))
        assert not found["errors"], found["errors"]
        out.append(found)
    return out


def mean_redness(service, prompt, **request) -> float:
    return float(np.mean([redness(r["results"][0].image) for r in pictures(service, prompt, **request)]))


def test_raising_a_colours_weight_pulls_the_picture_towards_it(demo):
    # Measured (Xeon with AMX, 2026-12-02): plain 59, (red:1.4) 114, (red:0.4) 85; red (blue:1.4) 53, (blue:0.4) 63.
    # Lowering red below 1 did not push the demo's picture away from red (85 > 59): its 3-layer encoders read a
    # scaled-down colour token as no less red. The test asserts what held: more weight, more of that colour.
    plain = mean_redness(demo, SCENE.format("red blue"))
    red_up = mean_redness(demo, SCENE.format("(red:1.4) blue"))
    red_down = mean_redness(demo, SCENE.format("(red:0.4) blue"))
    blue_up = mean_redness(demo, SCENE.format("red (blue:1.4)"))
    blue_down = mean_redness(demo, SCENE.format("red (blue:0.4)"))
    assert red_up > plain + 30 and red_up > red_down + 15, (plain, red_up, red_down)
    assert blue_up < blue_down and blue_up < plain, (plain, blue_up, blue_down)


def test_a_weight_of_one_is_the_plain_prompt_bit_for_bit(demo):
    weighted = run(demo, GenerationRequest(prompt=SCENE.format("(red:1.0)"), seed=3, steps=8))["results"][0]
    plain = run(demo, GenerationRequest(prompt=SCENE.format("red"), seed=3, steps=8))["results"][0]
    assert np.array_equal(np.asarray(weighted.image), np.asarray(plain.image))
    assert weighted.parameters.startswith(SCENE.format("(red:1.0)"))  # the PNG keeps the prompt as written


def test_break_is_the_same_text_in_two_chunks(demo):
    pipe = demo.ensure_loaded()[0].base
    found = conditioning(pipe, "a large red circle BREAK on a white background", "")
    assert found.chunks == 2
    with torch.inference_mode():
        first, pooled = _encode(pipe, parse_attention("a large red circle"), 1, 0)
        second, _ = _encode(pipe, parse_attention("on a white background"), 1, 0)
    assert torch.equal(found.arguments["prompt_embeds"], torch.cat([first, second], dim=1).to(first.dtype))
    assert torch.equal(found.arguments["pooled_prompt_embeds"], pooled)  # the first chunk's, as A1111
    assert [len(c.tokens) for c in chunks(pipe.tokenizer, parse_attention("a b BREAK c"))] == [2, 1]


def test_prompt_editing_lies_between_the_two_prompts_nearer_the_first_the_later_it_switches(demo):
    # Measured (Xeon with AMX, 2026-12-02): red 177, blue -168; [red:blue:0.2] -170, 0.5 154, 0.8 177.
    red, blue = mean_redness(demo, SCENE.format("red")), mean_redness(demo, SCENE.format("blue"))
    early = mean_redness(demo, SCENE.format("[red:blue:0.2]"))
    middle = mean_redness(demo, SCENE.format("[red:blue:0.5]"))
    assert blue - 10 < early < middle < red, (red, early, middle, blue)
    edited = pictures(demo, SCENE.format("[red:blue:0.5]"))[0]
    assert any("2 phases over 20 steps" in line for line in edited["logs"])
    row = {r.name: r.detail for r in edited["results"][0].report.rows}["prompt handling"]
    # A1111 (reconstruct_cond_batch): step index i takes the first text while i <= int(0.5 × 20) = 10, so the
    # 12th step (index 11) is the first with the second text.
    assert "switched at step 12" in row, row


@pytest.mark.parametrize("case", ["fast preset", "lcm", "int8"])
def test_the_schedule_switches_under_the_guidance_interval_the_feature_cache_lcm_and_int8(tmp_path, case):
    """Fast: the feature cache and the guidance interval (whose tail drops the negative rows: the switch then sets
    the conditional rows alone); the LCM-LoRA: no guidance at all; int8 layers."""
    settings = dict(model="demo", device="cpu", outputs=tmp_path)
    if case == "lcm":
        settings["loras"] = ("assets/demo-model/lcm-lora",)
    if case == "int8":
        settings["precision"] = "int8"
    service = GenerationService(AppSettings(**settings))
    request = dict(quality=Quality.FAST if case != "int8" else Quality.HIGH, seed=2)
    if case != "lcm":
        request.update(steps=20, techniques={"steps_policy": "off"})

    def one(prompt):
        out = run(service, GenerationRequest(prompt=prompt, **request))
        assert not out["errors"], out["errors"]
        return out["results"][0]

    red, blue = one(SCENE.format("red")), one(SCENE.format("blue"))
    edited = one(SCENE.format("[blue:red:0.3]"))
    row = {r.name: r.detail for r in edited.report.rows}["prompt handling"]
    assert "switched at step" in row, row
    assert not np.array_equal(np.asarray(edited.image), np.asarray(red.image))
    assert not np.array_equal(np.asarray(edited.image), np.asarray(blue.image))
    assert redness(blue.image) < redness(edited.image), (redness(blue.image), redness(edited.image))
