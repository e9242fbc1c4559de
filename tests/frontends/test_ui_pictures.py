"""The page's pictures without a browser (issue 30): the Image to image tab's form → GenerationRequest (no strokes:
image to image; strokes: inpainting with the painted area white; outpainting), the text to image tab's hires fix,
"Send to image to image", bad input as one ❌ line, and one run of the tab's Generate on the demo model."""
from __future__ import annotations

import gradio as gr
import pytest
from PIL import Image, ImageDraw

from sdxl_ui.edits import HiresFix, MaskedContent
from sdxl_ui.schema import GenerationRequest, ValidationError
from sdxl_ui.service import GenerationService
from sdxl_ui.settings import AppSettings
from sdxl_ui.ui import build_ui
from sdxl_ui.ui.pictures import ONLY_MASKED, TAB_PICTURES, WHOLE, hires_fix, picture_fields, send_to_pictures, \
    upscaler_names

FORM = dict(strength=0.75, mask_blur=4, content="original", area=WHOLE, padding=32, invert=False, outpaint=[],
            outpaint_pixels=128)


def start_picture(size=(96, 80)):
    return Image.new("RGBA", size, (200, 40, 40, 255))


def editor(picture, strokes=()):
    """An EditorValue as gr.ImageEditor(type="pil") gives it: one layer, transparent but for the strokes."""
    layer = Image.new("RGBA", picture.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(layer)
    for box in strokes:
        draw.rectangle(box, fill=(255, 48, 48, 255))
    return {"background": picture, "layers": [layer], "composite": picture}


def request(value, **form):
    return GenerationRequest(prompt="a red circle", **picture_fields(value, **{**FORM, **form}))


def test_no_strokes_is_image_to_image_from_the_background():
    req = request(editor(start_picture()), strength=0.4)
    assert req.kind == "img2img" and req.mask is None and req.strength == 0.4
    assert req.init_image.mode == "RGB" and req.init_image.size == (96, 80)
    assert request({"background": start_picture(), "layers": [], "composite": None}).kind == "img2img"


def test_strokes_are_an_inpainting_mask_white_where_painted():
    req = request(editor(start_picture(), strokes=[(10, 10, 29, 19)]), mask_blur=8, content="fill",
                  area=ONLY_MASKED, padding=16, invert=True)
    assert req.kind == "inpaint" and req.mask.size == (96, 80) and req.mask.mode == "L"
    assert req.mask.getpixel((15, 15)) == 255 and req.mask.getpixel((60, 60)) == 0
    assert req.mask.getbbox() == (10, 10, 30, 20)
    assert (req.inpaint.blur, req.inpaint.content, req.inpaint.only_masked, req.inpaint.padding,
            req.inpaint.invert) == (8, MaskedContent.FILL, True, 16, True)


def test_outpaint_directions_and_a_mask_with_them_refused():
    req = request(editor(start_picture()), outpaint=["left", "down"], outpaint_pixels=64)
    assert req.kind == "inpaint" and req.outpaint == ("left", "down") and req.outpaint_pixels == 64
    assert req.mask is None
    with pytest.raises(ValidationError, match="outpaint: extends the picture and makes its own mask"):
        request(editor(start_picture(), strokes=[(0, 0, 9, 9)]), outpaint=["right"])


def test_no_picture_is_a_validation_error_naming_init_image():
    for value in (None, {"background": None, "layers": [], "composite": None}):
        with pytest.raises(ValidationError, match="init_image: upload a start picture"):
            request(value)


def test_hires_fix_from_the_form():
    assert hires_fix(False, 2, "Latent", 0, 0.7) is None
    assert hires_fix(True, 1.5, "lanczos", 10, 0.4) == HiresFix(scale=1.5, upscaler="Lanczos", steps=10, strength=0.4)
    with pytest.raises(ValidationError, match="hr_upscaler"):
        hires_fix(True, 2, "ESRGAN_4x", 0, 0.7)
    with pytest.raises(ValidationError, match="hr_scale"):
        hires_fix(True, 5, "Latent", 0, 0.7)
    assert upscaler_names(None)[:2] == ["Latent", "Latent (antialiased)"] and "Lanczos" in upscaler_names(None)


def test_the_hires_dropdown_offers_the_users_upscaler_models(tmp_path):
    from tests.pipeline.test_sr_models import tiny_esrgan

    tiny_esrgan(tmp_path, "4x-tiny", 4)
    assert upscaler_names(tmp_path)[-1] == "4x-tiny" and upscaler_names(None)[-1] == "Nearest"
    assert hires_fix(True, 2, "4X-TINY", 0, 0.5, tmp_path).upscaler == "4x-tiny"


def test_send_to_image_to_image_puts_the_last_result_in_the_editor_and_selects_the_tab():
    value, tabs = send_to_pictures(["/cache/a.png", "/cache/b.png"])
    assert value == {"background": "/cache/b.png", "layers": [], "composite": "/cache/b.png"}
    assert tabs.selected == TAB_PICTURES
    with pytest.warns(UserWarning, match="No picture yet"):
        assert send_to_pictures([]) == (gr.update(), gr.update())


# ---------------------------------------------------------------- the page's handlers on the demo model

@pytest.fixture(scope="module")
def page(tmp_path_factory):
    service = GenerationService(AppSettings(model="demo", device="cpu", outputs=tmp_path_factory.mktemp("out")))
    demo = build_ui(service)
    fns = {getattr(f.fn, "__name__", ""): f for f in demo.fns.values()}
    return demo, fns


def run_handler(fn, **args):
    """The log's HTML and the output image of a Generate handler's updates."""
    log, image = "", None
    for update in fn(**args):
        for component, value in update.items():
            if isinstance(value, str) and "sdxl-log" in value:
                log = value
            if getattr(component, "elem_id", None) == "output" and value is not None:
                image = value
    return log, image


PICTURE_ARGS = dict(prompt_text="a red circle", negative_text="", quality_label="High quality", n_steps=4, cfg=7,
                    seed_value=3, n_images=1, sched="auto", schedule="automatic", session_history=[], request=None)


def test_the_tab_generates_a_picture_of_the_start_pictures_size_on_the_demo_model(page):
    demo, fns = page
    assert fns["generate_picture"].api_visibility == "private" and fns["send_to_pictures"].fn is send_to_pictures
    log, image = run_handler(fns["generate_picture"].fn, editor_value=editor(start_picture((144, 112))),
                             **{**FORM, "strength": 0.5}, **PICTURE_ARGS)
    assert "❌" not in log, log
    assert image is not None and Image.open(image).size == (144, 112)
    # As the browser sends it (preprocess=False: the payload of files in gradio's cache), painted: inpainting.
    component = next(b for b in demo.blocks.values() if getattr(b, "elem_id", None) == "picture-editor")
    payload = component.postprocess(editor(start_picture((144, 112)), strokes=[(40, 30, 99, 79)])).model_dump()
    log, image = run_handler(fns["generate_picture"].fn, editor_value=payload, **FORM, **PICTURE_ARGS)
    assert "❌" not in log and "Inpaint: " in log, log
    assert Image.open(image).size == (144, 112)


def test_bad_input_on_the_tab_is_one_line_in_the_log(page):
    _demo, fns = page
    painted = editor(start_picture(), strokes=[(0, 0, 9, 9)])
    everything = editor(start_picture(), strokes=[(0, 0, 95, 79)])
    cases = [(None, {}, "init_image: upload a start picture"),
             (everything, {"invert": True}, "mask: marks nothing to redraw"),  # inverted: an empty mask
             (editor(start_picture()), {"outpaint": ["up"], "outpaint_pixels": 12},
              "outpaint_pixels: must be a multiple of 8"),
             (painted, {"outpaint": ["up"]}, "outpaint: extends the picture"),
             (painted, {"strength": 0}, "strength: must be above 0")]
    for value, form, expected in cases:
        log, image = run_handler(fns["generate_picture"].fn, editor_value=value, **{**FORM, **form}, **PICTURE_ARGS)
        assert f"❌ {expected}" in log and "Traceback" not in log and image is None, log


def test_text_to_image_with_the_hires_fix_on_the_demo_model(page):
    _demo, fns = page
    args = dict(prompt_text="a red circle", negative_text="", quality_label="High quality", n_steps=4, cfg=7,
                seed_value=3, n_images=1, size_label="Native (128×128)", w=None, h=None, sched="auto",
                session_history=[], request=None)
    log, image = run_handler(fns["generate"].fn, hires_on=True, hires_scale=1.5, hires_upscaler="Lanczos",
                             hires_steps=2, hires_strength=0.5, **args)
    assert "❌" not in log, log
    assert Image.open(image).size == (192, 192)
    log, image = run_handler(fns["generate"].fn, hires_on=True, hires_upscaler="nope", **args)
    assert "❌ hr_upscaler: must be one of" in log and image is None
