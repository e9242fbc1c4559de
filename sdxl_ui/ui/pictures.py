"""The page's pictures: the "Image to image" tab (a start picture in ``gr.ImageEditor``, the painted layers its
inpainting mask, A1111's inpainting options, outpainting), the text to image tab's "Hires fix" accordion, and "Send
to image to image". Layout and plain functions from form values to request fields; the Generate path (events to
page updates) is app.py's, shared by both tabs. No torch: the upscalers' names are read lazily from
``sdxl_ui.upscalers`` (a listing, no model loaded).

The editor's value is gradio's ``EditorValue``: ``background`` (the start picture), ``layers`` (what the brush
painted, RGBA: a stroke is where a layer's alpha is above 0) and ``composite``; PIL images (``type="pil"``).
"""
from __future__ import annotations

from dataclasses import replace

import gradio as gr

from ..edits import MAX_MASK_BLUR, MAX_OUTPAINT, MAX_PADDING, OUTPAINT_DIRECTIONS, HiresFix, InpaintOptions, \
    MaskedContent
from ..failures import ValidationError

TAB_TEXT, TAB_PICTURES = "txt2img", "img2img"  # the tabs' ids (gr.Tabs(selected=…))
WHOLE, ONLY_MASKED = "Whole picture", "Only masked"
CONTENT_CHOICES = [MaskedContent.FILL.value, MaskedContent.ORIGINAL.value, MaskedContent.LATENT_NOISE.value,
                   MaskedContent.LATENT_NOTHING.value]  # A1111's order (inpainting_fill 0–3)
MAX_HIRES_STEPS = 150


def upscaler_names(upscaler_dir) -> list[str]:
    """The hires fix's upscalers by A1111's names: the latent modes, then the pixel ones (``upscalers.py``)."""
    from .. import upscalers  # lazily: the page needs only the names

    return list(upscalers.LATENT_MODES) + [u.name for u in upscalers.available(upscaler_dir)]


def hires_panel(upscaler_dir) -> dict:
    """The text to image tab's "Hires fix" accordion (A1111's enable_hr): a second pass at a larger size."""
    names = upscaler_names(upscaler_dir)
    with gr.Accordion("Hires fix", open=False, elem_id="hires"):
        hires_on = gr.Checkbox(False, label="Hires fix: upscale, then redraw at the larger size",
                               elem_id="hires-enable")
        with gr.Row():
            hires_scale = gr.Slider(1, 4, value=2, step=0.05, label="Upscale by", elem_id="hires-scale")
            hires_upscaler = gr.Dropdown(names, value=names[0], label="Upscaler", elem_id="hires-upscaler")
        with gr.Row():
            hires_steps = gr.Slider(0, MAX_HIRES_STEPS, value=0, step=1, elem_id="hires-steps",
                                    label="Hires steps (0: the same as the first pass)")
            hires_strength = gr.Slider(0.05, 1, value=0.7, step=0.01, label="Denoising strength",
                                       elem_id="hires-strength")
    return dict(hires_on=hires_on, hires_scale=hires_scale, hires_upscaler=hires_upscaler, hires_steps=hires_steps,
                hires_strength=hires_strength)


def hires_fix(enabled, scale, upscaler, steps, strength, upscaler_dir=None) -> HiresFix | None:
    """The form's hires fix: None when not enabled, else a checked ``HiresFix`` (the upscaler by its name)."""
    if enabled is not True:
        return None
    fix = HiresFix(scale=scale, upscaler=upscaler, steps=steps, strength=strength)
    from .. import upscalers  # an unknown name is refused here, before the queue

    return replace(fix, upscaler=upscalers.find(fix.upscaler, upscaler_dir).name)


def pictures_tab() -> dict:
    """The "Image to image" tab's components (inside its gr.Tab)."""
    editor = gr.ImageEditor(
        label="Start picture (paint over it to inpaint: the painted area is redrawn)", type="pil",
        image_mode="RGBA", sources=("upload", "clipboard"), transforms=(), elem_id="picture-editor", height=420,
        format="png")  # lossless: a stroke is where a layer's alpha is above 0
    strength = gr.Slider(0.05, 1, value=0.75, step=0.01, label="Denoising strength (how much is redrawn)",
                         elem_id="strength")
    gr.Markdown("Size: the picture's own (each side down to a multiple of 8). No strokes: image to image; "
                "strokes: inpainting; an outpaint direction: outpainting (without strokes).")
    with gr.Accordion("Inpainting", open=False, elem_id="inpainting"):
        with gr.Row():
            mask_blur = gr.Slider(0, MAX_MASK_BLUR, value=4, step=1, label="Mask blur", elem_id="mask-blur")
            padding = gr.Slider(0, MAX_PADDING, value=32, step=4, label="Only masked padding, pixels",
                                elem_id="padding")
        content = gr.Radio(CONTENT_CHOICES, value=MaskedContent.ORIGINAL.value, label="Masked content",
                           elem_id="masked-content")
        with gr.Row():
            area = gr.Radio([WHOLE, ONLY_MASKED], value=WHOLE, label="Inpaint area", elem_id="inpaint-area")
            invert = gr.Checkbox(False, label="Invert mask (redraw what is not painted)", elem_id="invert-mask")
    with gr.Accordion("Outpainting", open=False, elem_id="outpainting"):
        with gr.Row():
            outpaint = gr.CheckboxGroup(list(OUTPAINT_DIRECTIONS), value=[], label="Extend the picture",
                                        elem_id="outpaint")
            outpaint_pixels = gr.Slider(8, MAX_OUTPAINT, value=128, step=8, label="Pixels to extend by",
                                        elem_id="outpaint-pixels")
    generate_picture_btn = gr.Button("Generate", variant="primary", elem_id="generate-picture")
    return dict(editor=editor, strength=strength, mask_blur=mask_blur, padding=padding, content=content,
                area=area, invert=invert, outpaint=outpaint, outpaint_pixels=outpaint_pixels,
                generate_picture_btn=generate_picture_btn)


def editor_pictures(value) -> tuple:
    """(start picture RGB, mask or None) from the editor's value: the mask white where any layer is painted
    (its alpha above 0), None when nothing is painted. No picture: a ValidationError naming init_image."""
    background = value.get("background") if isinstance(value, dict) else None
    if not callable(getattr(background, "convert", None)):
        raise ValidationError("init_image", "(no picture)", "upload a start picture in the editor (Image to image)")
    picture = background.convert("RGB")
    mask = None
    for layer in value.get("layers") or []:
        if not callable(getattr(layer, "convert", None)):
            continue
        alpha = layer.convert("RGBA").getchannel("A").point(lambda a: 255 if a else 0)
        if alpha.size != picture.size:  # a layer is the canvas's size; the canvas is the picture's
            alpha = alpha.resize(picture.size)
        if alpha.getextrema()[1]:
            mask = alpha if mask is None else _lighter(mask, alpha)
    return picture, mask


def _lighter(a, b):
    from PIL import ImageChops  # PIL only (gradio's own dependency)

    return ImageChops.lighter(a, b)


def read_editor(editor, value):
    """The editor's value as the handler gets it: an ``EditorValue`` of PIL images (a test, a Python caller) as
    it is; the browser's payload (the handlers take raw values, ``preprocess=False``) read by the component's own
    ``preprocess`` (its files already checked to be in gradio's upload cache)."""
    if not isinstance(value, dict) or not any(isinstance(value.get(k), dict) for k in ("background", "composite")):
        return value
    try:
        return editor.preprocess(editor.data_model.model_validate(value))
    except Exception:  # noqa: BLE001 - an unreadable upload is bad input, not a failure of the page
        raise ValidationError("init_image", "(unreadable)", "could not be read as a picture (PNG, JPEG or WebP)") \
            from None


def picture_fields(value, strength, mask_blur, content, area, padding, invert, outpaint, outpaint_pixels) -> dict:
    """The request's picture fields from the tab's form: ``init_image``, ``strength`` and, when painted, ``mask``
    with ``inpaint``; outpainting's directions and pixels (a mask with them is refused by the request)."""
    picture, mask = editor_pictures(value)
    if area not in (WHOLE, ONLY_MASKED):
        raise ValidationError("inpaint_area", area, f"must be {WHOLE} or {ONLY_MASKED}")
    fields = dict(init_image=picture, strength=strength, outpaint=tuple(outpaint or ()),
                  outpaint_pixels=outpaint_pixels if outpaint_pixels is not None else 128)
    options = InpaintOptions(blur=mask_blur, content=content, only_masked=area == ONLY_MASKED, padding=padding,
                             invert=invert is True)
    if mask is not None:
        fields.update(mask=mask, inpaint=options)
    return fields


def send_to_pictures(session_history):
    """"Send to image to image": the session's last result as the editor's start picture (no strokes), and the
    Image to image tab selected. Nothing yet: both unchanged."""
    paths = list(session_history or [])
    if not paths:
        gr.Warning("No picture yet: generate one first.")
        return gr.update(), gr.update()
    last = paths[-1]
    return {"background": last, "layers": [], "composite": last}, gr.Tabs(selected=TAB_PICTURES)


def wire_send(page) -> None:
    page.send_btn.click(send_to_pictures, page.history, [page.editor, page.tabs], queue=False,
                        api_visibility="private", preprocess=False)
