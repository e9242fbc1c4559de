"""Inpainting and outpainting (issue 30): a kind of run over the loaded base's own modules (``image_run.Inpaint``,
``denoise.inpaint``), judged on the demo world: the asked shape drawn inside the mask, every pixel outside the
blurred mask exactly the input's (paste-back), A1111's options (masked content, only masked, invert), and an
outpainted band that keeps the picture and fills with its background; bad masks refused by name."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageDraw
from tests.helpers import run

from sdxl_ui.demo import scenes as S
from sdxl_ui.edits import InpaintOptions
from sdxl_ui.masks import outpaint_canvas, prepared_mask
from sdxl_ui.schema import GenerationRequest, ValidationError
from sdxl_ui.service import GenerationService
from sdxl_ui.settings import AppSettings

RED = "a large red circle in the center on a white background"
BLUE = "a large blue circle in the center on a white background"


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return GenerationService(AppSettings(model="demo", device="cpu", outputs=tmp_path_factory.mktemp("outputs")))


def red_circle() -> Image.Image:
    pixels, _ = S.render(S.Scene("red", "white", "circle", "center", "large"), jitter=False)
    return Image.fromarray(pixels)


def square_mask(box=(24, 24, 104, 104), size=(128, 128)) -> Image.Image:
    mask = Image.new("L", size, 0)
    ImageDraw.Draw(mask).rectangle(box, fill=255)
    return mask


def inpaint(service, picture, prompt, strength=1.0, **request):
    out = run(service, GenerationRequest(prompt=prompt, init_image=picture, strength=strength, seed=1, steps=20,
                                         techniques={"steps_policy": "off"}, **request))
    assert not out["errors"], out["errors"]
    return out


def kept(result, picture, mask, options=InpaintOptions()) -> tuple[bool, int]:
    """(every pixel outside the blurred mask is exactly the input's, how many such pixels)."""
    outside = np.asarray(prepared_mask(mask, options.blur, options.invert)) == 0
    a, b = np.asarray(result.convert("RGB")), np.asarray(picture.convert("RGB"))
    return bool((a[outside] == b[outside]).all()), int(outside.sum())


def test_a_circle_drawn_in_the_mask_and_nothing_changed_outside_it(demo):
    # Measured (Xeon with AMX, 2026-12-02): a blank picture, the centre square masked, "fill": reads a red circle;
    # the 6303 pixels outside the blurred mask are the input's, bit for bit.
    blank, mask = Image.new("RGB", (128, 128), "white"), square_mask()
    out = inpaint(demo, blank, RED, mask=mask, inpaint=InpaintOptions(content="fill"))
    result = out["results"][0]
    reading = S.read_scene(result.image)
    assert (reading.color, reading.shape, reading.background) == ("red", "circle", "white"), reading
    same, count = kept(result.image, blank, mask)
    assert same and count > 6000
    assert any("Inpaint: whole picture, masked content fill, mask blur 4" in line for line in out["logs"])
    assert "Mask blur: 4, Masked content: fill" in result.parameters and "Denoising strength: 1" in result.parameters
    assert "guidance interval" in {r.name for r in result.report.rows}  # the units apply to this kind too


@pytest.mark.parametrize("content", ["original", "latent noise", "latent nothing"])
def test_each_masked_content_redraws_the_circle_blue_and_keeps_the_rest(demo, content):
    picture, mask = red_circle(), square_mask()
    out = inpaint(demo, picture, BLUE, strength=0.75 if content == "original" else 1.0, mask=mask,
                  inpaint=InpaintOptions(content=content))
    result = out["results"][0]
    assert S.read_scene(result.image).color == "blue"
    assert kept(result.image, picture, mask)[0]
    assert f"Masked content: {content}" in result.parameters


def test_only_masked_draws_the_region_at_full_size_and_pastes_it_back(demo):
    # The top-left corner (33 px square, padding 8 → the region (0, 0, 55, 55)) drawn at 128² and pasted back:
    # blue inside the mask where the input was white, the red circle and everything else untouched.
    picture, mask = red_circle(), square_mask((4, 4, 36, 36))
    options = InpaintOptions(only_masked=True, padding=8, content="fill")
    out = inpaint(demo, picture, BLUE, mask=mask, inpaint=options)
    result = out["results"][0]
    assert result.image.size == (128, 128)
    same, count = kept(result.image, picture, mask, options)
    assert same and count > 14000
    inside = np.asarray(result.image, dtype=float)[np.asarray(mask) == 255]
    assert inside[:, 2].mean() > inside[:, 0].mean() + 60  # blue where the input was white (245, 245, 245)
    assert S.read_scene(result.image).color == "red"  # the circle outside the mask is still there
    assert any("only masked (region (0, 0, 55, 55))" in line for line in out["logs"])
    assert "Inpaint area: Only masked, Masked area padding: 8" in result.parameters


def test_an_inverted_mask_redraws_all_but_the_mask(demo):
    picture, mask = red_circle(), square_mask((4, 4, 36, 36))
    options = InpaintOptions(invert=True)
    result = inpaint(demo, picture, BLUE, strength=0.75, mask=mask, inpaint=options)["results"][0]
    assert S.read_scene(result.image).color == "blue"
    same, count = kept(result.image, picture, mask, options)
    assert same and count > 100  # the corner itself (less its blurred edge)


@pytest.mark.parametrize("directions,pixels,size", [(("right",), 64, (192, 128)), (("left", "up"), 32, (160, 160))])
def test_outpaint_keeps_the_picture_and_fills_the_band_with_its_background(demo, directions, pixels, size):
    # Measured: at strength 0.75 the new band's mean is (247, 250, 243) with no red pixel (at 1.0 the demo draws a
    # second circle into a 64 px band: 1943 red pixels).
    picture = red_circle()
    out = inpaint(demo, picture, RED, strength=0.75, outpaint=directions, outpaint_pixels=pixels)
    result = out["results"][0]
    canvas, band = outpaint_canvas(picture, directions, pixels)
    assert result.image.size == size == canvas.size
    same, count = kept(result.image, canvas, band)
    assert same and count > 12000
    pixels_rgb = np.asarray(result.image, dtype=int)
    new = np.asarray(band) == 255
    assert pixels_rgb[new].mean() > 230
    assert S.read_scene(result.image).color == "red"
    assert any(f"outpaint {'+'.join(directions)} by {pixels} px" in line for line in out["logs"])


def test_bad_masks_are_refused_by_name():
    picture = red_circle()
    cases = [
        (dict(mask=square_mask(size=(64, 64))), "mask", "must be the size of init_image"),
        (dict(mask=Image.new("L", (128, 128), 0)), "mask", "marks nothing to redraw"),
        (dict(mask=Image.new("L", (128, 128), 255), inpaint=InpaintOptions(invert=True)), "mask", "inverted"),
        (dict(mask="mask.png"), "mask", "must be a picture"),
        (dict(outpaint=("sideways",)), "outpaint", "must be among left, right, up, down"),
        (dict(outpaint=("left",), outpaint_pixels=12), "outpaint_pixels", "multiple of 8"),
        (dict(outpaint=("left", "right"), outpaint_pixels=1000), "outpaint_pixels", "at most 2048"),
        (dict(outpaint=("left",), mask=square_mask()), "outpaint", "send no mask"),
    ]
    for fields, name, problem in cases:
        with pytest.raises(ValidationError) as caught:
            GenerationRequest(prompt="x", init_image=picture, **fields)
        assert caught.value.field == name and problem in str(caught.value), (fields, caught.value)
    with pytest.raises(ValidationError, match="needs init_image") as caught:
        GenerationRequest(prompt="x", mask=square_mask())
    assert caught.value.field == "mask"
