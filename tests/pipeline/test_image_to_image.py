"""Image to image (issue 30, part 1): a kind of run over the loaded base's own modules (``run.ImageToImage``,
``denoise.image_to_image``), judged on the demo world: a red circle redrawn as "a blue circle" at strength 0.6 reads
blue with its centre kept; strength 0.05 keeps the picture; every way in refuses a bad picture or strength by name."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from tests.helpers import run

from sdxl_ui.demo import scenes as S
from sdxl_ui.schema import GenerationRequest, ValidationError
from sdxl_ui.service import GenerationService
from sdxl_ui.settings import AppSettings

BLUE = "a large blue circle in the center on a white background"


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return GenerationService(AppSettings(model="demo", device="cpu", outputs=tmp_path_factory.mktemp("outputs")))


def red_circle() -> Image.Image:
    pixels, _ = S.render(S.Scene("red", "white", "circle", "center", "large"), jitter=False)
    return Image.fromarray(pixels)


def psnr(a, b) -> float:
    a, b = np.asarray(a, dtype=float), np.asarray(b.convert("RGB"), dtype=float)
    return float(10 * np.log10(255 ** 2 / max(((a - b) ** 2).mean(), 1e-12)))


def centre(image) -> np.ndarray:
    pixels = np.asarray(image.convert("RGB"), dtype=float)
    shape = np.sqrt(((pixels - 245) ** 2).sum(-1)) > 60
    ys, xs = np.nonzero(shape)
    return np.array([xs.mean(), ys.mean()])


def img2img(service, strength, **request):
    out = run(service, GenerationRequest(prompt=BLUE, init_image=red_circle(), strength=strength, seed=1, steps=20,
                                         techniques={"steps_policy": "off"}, **request))
    assert not out["errors"], out["errors"]
    return out


def test_a_red_circle_redrawn_blue_keeps_its_place(demo):
    # Measured (Xeon with AMX, 2026-12-02): strength 0.6 reads blue, 12 of 20 steps; 0.05: red, PSNR 19.0 dB against
    # the input (the recolour: 11.7 dB).
    out = img2img(demo, 0.6)
    result = out["results"][0]
    reading = S.read_scene(result.image)
    assert (reading.color, reading.shape, reading.background) == ("blue", "circle", "white"), reading
    assert np.abs(centre(result.image) - centre(red_circle())).max() <= 4
    assert result.steps_run == 12 and result.image.size == (128, 128)
    assert any("Image to image: strength 0.6 — 12 of 20 steps" in line for line in out["logs"])
    assert "Denoising strength: 0.6" in result.parameters
    rows = {r.name: r for r in result.report.rows}
    assert "guidance interval" in rows and "prompt handling" in rows  # the units apply to this kind of run too


def test_a_strength_near_zero_keeps_the_picture(demo):
    kept = img2img(demo, 0.05)["results"][0]
    redrawn = img2img(demo, 0.6)["results"][0]
    assert S.read_scene(kept.image).color == "red" and kept.steps_run == 1
    assert psnr(kept.image, red_circle()) > 17.0 > psnr(redrawn.image, red_circle()) + 3


def test_the_run_shares_the_bases_weights_and_hooks(demo, monkeypatch):
    import sdxl_ui.denoise as denoise
    from sdxl_ui.optimizations import hooks

    seen = {}
    real = hooks.call

    def spy(pipe, callback, **kwargs):
        seen["pipe"] = pipe
        return real(pipe, callback, **kwargs)

    monkeypatch.setattr(hooks, "call", spy)
    img2img(demo, 0.1)  # the base loaded; its modules' dtypes as the plan set them
    dtypes = {name: next(getattr(demo.models.base, name).parameters()).dtype for name in ("unet", "vae",
                                                                                        "text_encoder_2")}
    img2img(demo, 0.3)
    base, pipe = demo.models.base, seen["pipe"]
    # Building the pipeline casts nothing (diffusers' from_pipe casts the shared modules to fp32 in place).
    assert {name: next(getattr(base, name).parameters()).dtype for name in dtypes} == dtypes
    assert type(pipe).__name__ == "StableDiffusionXLImg2ImgPipeline" and pipe is not base
    assert pipe.unet is base.unet and pipe.vae is base.vae and pipe.text_encoder_2 is base.text_encoder_2
    assert hooks.registry(pipe) is hooks.registry(base)  # the same hooks and state, not a copy
    assert denoise.image_to_image  # the one place the pipeline is built
    assert str(dtypes["unet"]).removeprefix("torch.") == demo.host.plan.dtype


def test_the_picture_is_encoded_in_the_vaes_own_dtype_unless_that_is_fp16(demo, monkeypatch):
    """diffusers casts the VAE to fp32 for each encode when its config says force_upcast (fp16 overflows); a bf16
    or fp32 VAE encodes as it is, and the config is back afterwards. An fp16 VAE keeps the upcast."""
    import torch

    from sdxl_ui.denoise import encode_in_vae_dtype

    img2img(demo, 0.2)
    vae = demo.models.base.vae
    seen = []
    real = type(vae).encode

    def spy(self, *args, **kwargs):
        seen.append(next(self.parameters()).dtype)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(type(vae), "encode", spy)
    img2img(demo, 0.5)
    assert seen == [vae.dtype] and vae.dtype != torch.float16 and vae.config.force_upcast
    half = type(vae).from_config(vae.config).to(torch.float16)
    with encode_in_vae_dtype(half):
        assert half.config.force_upcast  # fp16: diffusers' upcast stays
    with encode_in_vae_dtype(vae):
        assert not vae.config.force_upcast
    assert vae.config.force_upcast


def test_a_strength_under_one_step_raises_the_steps_until_one_runs(demo):
    out = run(demo, GenerationRequest(prompt=BLUE, init_image=red_circle(), strength=0.1, seed=1, steps=4,
                                      techniques={"steps_policy": "off"}))
    assert not out["errors"] and out["results"][0].steps_run == 1
    assert any("strength 0.1 of 4 steps is under one step; 10 steps" in line for line in out["logs"])


@pytest.mark.parametrize("fields, problem", [
    (dict(strength=0), "strength: must be above 0"),
    (dict(strength=1.5), "strength: must be above 0"),
    (dict(strength="much"), "strength: must be a number"),
    (dict(init_image="picture.png"), "init_image: must be a picture"),
    (dict(init_image=Image.new("RGB", (32, 32))), "init_image: must be 64 to 2048 pixels a side"),
])
def test_bad_pictures_and_strengths_are_refused_by_name(fields, problem):
    with pytest.raises(ValidationError) as caught:
        GenerationRequest(prompt=BLUE, **{"init_image": red_circle(), **fields})
    assert str(caught.value).startswith(problem), str(caught.value)


def test_the_cli_reads_the_picture_and_refuses_a_bad_one(tmp_path, capsys):
    from sdxl_ui.cli import main

    source = tmp_path / "red.png"
    red_circle().save(source)
    out = tmp_path / "blue.png"
    code = main(["generate", "--model", "demo", "--device", "cpu", "--prompt", BLUE, "--init-image", str(source),
                 "--strength", "0.6", "--steps", "20", "--steps-policy", "off", "--seed", "1", "--out", str(out)])
    assert code == 0 and S.read_scene(Image.open(out)).color == "blue"
    (tmp_path / "not.png").write_text("hello")
    assert main(["generate", "--model", "demo", "--prompt", "x", "--init-image", str(tmp_path / "not.png")]) == 2
    assert "init_image" in capsys.readouterr().err
