"""Quality Few-step (sdxl_ui/few_step.py, run.prepare): on the demo model the few-step LoRA beside it
(assets/demo-model/lcm-lora) is fused for that job alone and runs its family's schedule (LCM, 4 steps, guidance 1),
the picture judged by the scene reader; the next High quality job runs the base weights bit for bit with the SDXL
schedule; a model without a few-step path, a tiny decoder where none is loaded and weights that cannot be swapped in
place (int8) are refused by field name."""
from __future__ import annotations

import pytest
from tests.helpers import assert_other_picture, assert_same_weights, run, weights

from sdxl_ui.demo import scenes as S
from sdxl_ui.optimizations import hooks
from sdxl_ui.schema import GenerationRequest, Status
from sdxl_ui.service import GenerationService
from sdxl_ui.settings import AppSettings

SCENE = S.Scene("red", "blue", "circle", "center", "large")
PROMPT = S.prompt_for(SCENE, ("size", "color", "shape", "background"))


@pytest.fixture
def calls(monkeypatch):
    """Every pipeline call: its scheduler class and arguments, then the real call."""
    recorded = []
    real = hooks.call

    def call(pipe, step_callback, **kwargs):
        recorded.append({"scheduler": type(pipe.scheduler).__name__, **kwargs})
        return real(pipe, step_callback, **kwargs)

    monkeypatch.setattr(hooks, "call", call)
    return recorded


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    service = GenerationService(AppSettings(model="demo", outputs=tmp_path_factory.mktemp("few-step")))
    service.ensure_loaded()
    return service


def rows(result) -> dict:
    """The result's report rows by name: (active, detail)."""
    return {row.name: (row.status is Status.ACTIVE, row.detail) for row in result.report.rows}


def test_the_demo_offers_few_step_and_its_tiny_decoder_and_the_tiny_model_neither(tmp_path):
    assert GenerationService(AppSettings(model="demo", outputs=tmp_path)).offers() == {
        "few_step": "Few-step (4 steps)", "tiny_decoder": True}  # read from the files: nothing loaded
    assert GenerationService(AppSettings(model="tiny", outputs=tmp_path)).offers() == {
        "few_step": None, "tiny_decoder": False}


def test_few_step_fuses_the_lcm_lora_for_its_job_and_high_quality_then_runs_the_base_weights(demo, calls):
    unet = demo.host.models.base.unet
    before = weights(unet)
    out = run(demo, GenerationRequest(prompt=PROMPT, seed=1, quality="few-step"))
    assert not out["errors"], out["errors"]
    result = out["results"][0]
    assert result.steps_run == 4 and calls[-1]["num_inference_steps"] == 4
    assert calls[-1]["scheduler"] == "LCMScheduler" and calls[-1]["guidance_scale"] == 1.0
    reading = S.read_scene(result.image)
    assert reading.matches(SCENE, ("color", "shape", "background")) == {
        "color": True, "shape": True, "background": True}, reading
    found = rows(result)
    assert found["model profile"][0] and "lcm" in found["model profile"][1]
    assert found["LoRA adapters"][0] and "lcm-lora" in found["LoRA adapters"][1]
    assert "LCMScheduler" in found["model profile"][1]
    log = "\n".join(out["logs"])
    assert "Few-step: the few-step LoRA lcm-lora/ beside the model" in log and "Mode: FEW-STEP" in log
    assert "the full VAE decodes the final image" in log

    out = run(demo, GenerationRequest(prompt=PROMPT, seed=1, quality="high", steps=6))
    assert not out["errors"], out["errors"]
    assert_same_weights(before, unet)  # the LoRA taken off bit for bit
    assert calls[-1]["scheduler"] != "LCMScheduler" and calls[-1]["num_inference_steps"] < 6  # × 0.7 on the CPU
    found = rows(out["results"][0])
    assert not found["LoRA adapters"][0] and "lcm" not in found["model profile"][1]
    assert "LCMScheduler" not in found["model profile"][1]  # the report reads this job's scheduler
    assert not any(line.startswith("Few-step") for line in out["logs"])


def test_few_step_with_the_tiny_decoder_decodes_with_it_for_that_job(demo):
    full = run(demo, GenerationRequest(prompt=PROMPT, seed=1, quality="few_step"))
    out = run(demo, GenerationRequest(prompt=PROMPT, seed=1, quality="few_step", decoder="tiny"))
    assert not out["errors"], out["errors"]
    assert rows(out["results"][0])["tiny decoder"][0] and not rows(full["results"][0])["tiny decoder"][0]
    assert "the tiny decoder decodes the final image" in "\n".join(out["logs"])
    assert_other_picture(full["results"][0].image, out["results"][0].image)  # the same latents, another decoder
    reading = S.read_scene(out["results"][0].image)  # its softer edges can read a circle as a square: not judged
    assert (reading.color, reading.background) == ("red", "blue"), reading
    out = run(demo, GenerationRequest(prompt=PROMPT, seed=1, quality="fast", steps=4))
    assert not out["errors"] and not rows(out["results"][0])["tiny decoder"][0]  # the server's full VAE


def test_a_model_without_a_few_step_path_and_a_missing_tiny_decoder_are_refused_by_field(tmp_path):
    tiny = GenerationService(AppSettings(model="tiny", device="cpu", precision="fp32", outputs=tmp_path))
    out = run(tiny, GenerationRequest(prompt="a cat", width=64, height=64, quality="few-step"))
    assert not out["results"] and len(out["errors"]) == 1
    message = out["errors"][0].message
    assert "quality" in message and "few_step" in message and "no few-step path" in message
    out = run(tiny, GenerationRequest(prompt="a cat", width=64, height=64, steps=2, decoder="tiny"))
    assert not out["results"] and len(out["errors"]) == 1
    message = out["errors"][0].message
    assert "decoder" in message and "no tiny decoder is loaded" in message
    out = run(tiny, GenerationRequest(prompt="a cat", width=64, height=64, steps=2))  # the service still works
    assert not out["errors"] and out["results"]


def test_weights_that_cannot_be_swapped_in_place_refuse_few_steps_lora_by_the_quality_field(tmp_path):
    int8 = GenerationService(AppSettings(model="demo", precision="int8", outputs=tmp_path))
    assert int8.offers()["few_step"] is None  # the page does not offer it
    out = run(int8, GenerationRequest(prompt=PROMPT, seed=1, quality="few-step"))
    assert not out["results"] and len(out["errors"]) == 1
    message = out["errors"][0].message
    assert "quality" in message and "int8" in message, message
