"""The shipped few-step demo (issue 18, parts 3-5), judged by the scene reader: the LCM-LoRA distilled from the
demo model (assets/demo-model/lcm-lora) draws the prompt in 4 steps without guidance, through the ordinary --lora
path; taking it off gives the base model's weights bit for bit (its pictures within the kernels' rounding); and the tiny decoder distilled from the demo VAE
(assets/demo-model/tiny-decoder) draws the same scenes. Thresholds sit below what the shipped files measure (README
"Few-step models and LoRAs") with room for CPU-to-CPU differences."""
from __future__ import annotations

import numpy as np
import pytest
from tests.helpers import assert_other_picture, assert_same_picture, assert_same_weights, run, weights

from sdxl_ui.demo import evaluate as E
from sdxl_ui.demo import scenes as S
from sdxl_ui.schema import GenerationRequest
from sdxl_ui.settings import DEMO_MODEL_DIR

LCM_LORA = DEMO_MODEL_DIR / "lcm-lora"
TINY = DEMO_MODEL_DIR / "tiny-decoder"
SUBSET = E.prompt_set()[:12]


def _service(tmp_path_factory, **settings):
    from sdxl_ui.service import GenerationService
    from sdxl_ui.settings import AppSettings

    service = GenerationService(AppSettings(model="demo", outputs=tmp_path_factory.mktemp("few"), **settings))
    service.ensure_loaded()
    return service


@pytest.fixture(scope="module")
def lcm(tmp_path_factory):
    return _service(tmp_path_factory, loras=(str(LCM_LORA),))


def _all_right(result: E.Adherence) -> int:
    return sum(result.right[a] for a in ("color", "background", "shape", "position"))


def test_the_shipped_lcm_lora_is_small_detected_as_lcm_and_draws_the_prompt_in_4_steps(lcm):
    size = (LCM_LORA / "pytorch_lora_weights.safetensors").stat().st_size
    assert size <= 3_000_000
    assert lcm.plan.profile == "lcm" and "detected: LoRA" in lcm.plan.reasons["profile"]
    result = E.run_prompts(lcm, SUBSET, quality="high")  # LCM High quality: 4 steps, guidance 1, LCMScheduler
    assert result.total == 12 and all(s < 30 for s in result.seconds)
    assert _all_right(result) >= 40, result.to_dict()  # of 48 (12 prompts × colour, background, shape, position)


def test_the_acceptance_scene_in_4_steps(lcm):
    out = run(lcm, GenerationRequest.from_raw(prompt="a small white square at the top, red background", seed=3))
    assert not out["errors"], out["errors"]
    result = out["results"][0]
    assert result.steps_run == 4
    reading = S.read_scene(result.image)
    assert (reading.color, reading.shape, reading.background, reading.position) == ("white", "square", "red", "top")


def test_taking_the_lcm_lora_off_gives_the_base_weights_bit_for_bit_and_its_pictures(tmp_path_factory):
    from sdxl_ui.settings import AppSettings

    plain = _service(tmp_path_factory)
    request = GenerationRequest.from_raw(prompt="a large red circle on a blue background", seed=11, steps=4)
    before = np.asarray(run(plain, request)["results"][0].image)
    unet_before = weights(plain.models.base.unet)
    plain.set_loras((str(LCM_LORA),))
    with_lora = np.asarray(run(plain, request)["results"][0].image)
    plain.set_loras(())
    after = np.asarray(run(plain, request)["results"][0].image)
    assert_other_picture(before, with_lora)
    assert_same_weights(unet_before, plain.models.base.unet)  # the base's weights, bit for bit
    assert_same_picture(before, after)  # its picture, within the kernels' rounding (tests/helpers/common.py)
    assert AppSettings(loras=(f"{LCM_LORA}@0",)).loras[0].weight == 0.0


def test_the_shipped_tiny_decoder_is_small_and_draws_the_same_scenes(tmp_path_factory):
    import json

    config = json.loads((TINY / "config.json").read_text())
    assert config["_class_name"] == "AutoencoderTiny"
    assert sum(p.stat().st_size for p in TINY.glob("*.safetensors")) <= 1_000_000
    tiny = _service(tmp_path_factory, decoder="tiny")
    full = _service(tmp_path_factory)
    scenes = SUBSET[:8]
    with_tiny, with_full = [], []
    a = E.run_prompts(tiny, scenes, quality="fast", keep_images=with_tiny)
    b = E.run_prompts(full, scenes, quality="fast", keep_images=with_full)
    # The demo's 0.57 MB decoder loses some small shapes' corners (README: 8-19 points on 48 prompts at 2-8 steps)
    assert a.right["background"] >= 7 and _all_right(a) >= _all_right(b) - 8, (a.to_dict(), b.to_dict())
    differs = [not np.array_equal(np.asarray(x[1]), np.asarray(y[1])) for x, y in zip(with_tiny, with_full)]
    assert all(differs)  # the tiny decoder changes the picture (the report's row says so) …
    assert min(E.psnr(x[1], y[1]) for x, y in zip(with_tiny, with_full)) > 18  # … but not the scene
