"""The hires fix (issue 30): text to image at the first size, upscaled (latent modes, Lanczos, Nearest), then
image to image at the target size (``hires_run.HiresFixRun``), judged on the demo world: the scene kept at the
target size and sharper than a bicubic upscale of the first pass; every built-in upscaler through the same path."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from tests.helpers import run

from sdxl_ui.demo import scenes as S
from sdxl_ui.edits import HiresFix
from sdxl_ui.schema import GenerationRequest, ValidationError
from sdxl_ui.service import GenerationService
from sdxl_ui.settings import AppSettings
from sdxl_ui.upscalers import LATENT_MODES, find

RED = "a large red circle in the center on a white background"
STEPS = dict(seed=1, steps=20, techniques={"steps_policy": "off"})


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return GenerationService(AppSettings(model="demo", device="cpu", outputs=tmp_path_factory.mktemp("outputs")))


def edge_energy(image) -> float:
    """The mean absolute difference of neighbouring grey levels: how sharp the edges are."""
    grey = np.asarray(image.convert("L"), dtype=float)
    return float(np.abs(np.diff(grey, axis=1)).mean() + np.abs(np.diff(grey, axis=0)).mean())


def hires(service, upscaler="Latent", strength=0.5, **fix):
    out = run(service, GenerationRequest(prompt=RED, hires=HiresFix(upscaler=upscaler, strength=strength, **fix),
                                         **STEPS))
    assert not out["errors"], out["errors"]
    return out


@pytest.mark.parametrize("upscaler", [*LATENT_MODES, "Lanczos", "Nearest", "None"])
def test_hires_fix_to_twice_the_size_keeps_the_scene_and_is_sharper_than_bicubic(demo, upscaler):
    # Measured (Xeon with AMX, 2026-12-02): bicubic ×2 of the 128² first pass: edge energy 1.875; the hires fix at
    # strength 0.5: 2.01–2.07 for every upscaler (Latent 2.04, Lanczos 2.05, Latent (nearest-exact) 2.01).
    first = run(demo, GenerationRequest(prompt=RED, **STEPS))["results"][0].image
    bicubic = first.resize((256, 256), Image.BICUBIC)
    out = hires(demo, upscaler)
    result = out["results"][0]
    assert result.image.size == (256, 256)
    reading = S.read_scene(result.image)
    assert (reading.color, reading.shape, reading.position, reading.background) == ("red", "circle", "center",
                                                                                    "white"), reading
    assert result.steps_run == 20 + 10  # the first pass, then strength 0.5 of 20 steps at 256²
    assert edge_energy(result.image) > 1.04 * edge_energy(bicubic)
    assert f"Hires upscaler: {find(upscaler, None).name}" in result.parameters
    assert "Size: 256x256" in result.parameters and "Denoising strength: 0.5" in result.parameters
    assert any(f"128×128 → 256×256 by {find(upscaler, None).name}" in line for line in out["logs"])


def test_the_second_pass_has_its_own_steps_size_and_prompt(demo):
    out = hires(demo, "Lanczos", strength=0.25, steps=8, resize_x=192, resize_y=160, prompt=RED)
    result = out["results"][0]
    assert result.image.size == (192, 160) and result.steps_run == 20 + 2
    assert "Hires resize: 192x160" in result.parameters and "Hires steps: 8" in result.parameters
    short = hires(demo, "Latent", strength=0.04, steps=4)["results"][0]  # under one step: raised until one runs
    assert short.steps_run == 21


def test_bad_hires_fields_are_refused_by_name():
    for fields, name in [(dict(scale=5), "hr_scale"), (dict(scale="x"), "hr_scale"), (dict(strength=0), "denoising_strength"),
                         (dict(resize_x=100), "hr_resize_x"), (dict(steps=-1), "hr_second_pass_steps"),
                         (dict(upscaler=""), "hr_upscaler")]:
        with pytest.raises(ValidationError) as caught:
            HiresFix(**fields)
        assert caught.value.field == name, (fields, caught.value)
    with pytest.raises(ValidationError, match="must be one of: Latent") as caught:
        find("ESRGAN_4x", None)
    assert caught.value.field == "hr_upscaler"
    with pytest.raises(ValidationError, match="send no init_image"):
        GenerationRequest(prompt="x", hires=HiresFix(), init_image=Image.new("RGB", (64, 64)))
    assert HiresFix(scale=1.5).target(128, 96) == (192, 144) and HiresFix(resize_x=256).target(128, 64) == (256, 128)


def test_the_users_upscaler_model_runs_in_the_hires_fix(tmp_path):
    """A tiny ESRGAN (random weights) in --upscaler-dir: the first pass decoded, run through it tile by tile,
    then the second pass at the target size; named in the PNG's parameters."""
    from tests.pipeline.test_sr_models import tiny_esrgan

    tiny_esrgan(tmp_path, "2x-tiny", 2)
    service = GenerationService(AppSettings(model="demo", device="cpu", outputs=tmp_path, upscaler_dir=tmp_path))
    out = hires(service, "2x-tiny", strength=0.5)
    result = out["results"][0]
    assert result.image.size == (256, 256) and result.steps_run == 30
    assert "Hires upscaler: 2x-tiny" in result.parameters
    assert any("128×128 → 256×256 by 2x-tiny" in line for line in out["logs"])
