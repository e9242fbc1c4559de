"""AUTOMATIC1111's ``img2img`` body: txt2img's fields, the start picture and its strength, and inpainting's mask
and options (``mask_blur``, ``inpainting_fill``, ``inpaint_full_res`` + ``inpaint_full_res_padding``,
``inpainting_mask_invert``), each refused by its A1111 name when bad."""
from __future__ import annotations

import dataclasses
from typing import Any

from ..edits import InpaintOptions
from ..schema import ValidationError
from .adapter import Txt2Img, asked, flag, decode_picture, parse_txt2img

IMG2IMG_FIELDS = ("init_images", "denoising_strength", "resize_mode", "mask", "mask_blur", "mask_blur_x",
                  "mask_blur_y", "inpainting_fill", "inpaint_full_res", "inpaint_full_res_padding",
                  "inpainting_mask_invert", "image_cfg_scale", "include_init_images", "initial_noise_multiplier",
                  "latent_mask", "mask_round")
READ = ("init_images", "denoising_strength", "mask", "mask_blur", "inpainting_fill", "inpaint_full_res",
        "inpaint_full_res_padding", "inpainting_mask_invert")
# A1111's own defaults (StableDiffusionProcessingImg2Img): inpainting_fill 0 (fill), padding 0 here as there.
DEFAULTS = {"mask_blur": 4, "inpainting_fill": 0, "inpaint_full_res": False, "inpaint_full_res_padding": 0,
            "inpainting_mask_invert": 0}
# Fields read but honoured only at these values; others are reported as ignored, with the reason.
RESIZE_MODES = {0: "just resize"}


def inpaint_options(body: dict) -> InpaintOptions:
    """Inpainting's options from the body, with A1111's API defaults; ``inpaint_full_res`` may be 0/1 (A1111's UI
    sends the index of "Whole picture" / "Only masked") or true/false, as may ``inpainting_mask_invert``."""
    def given(name):
        value = body.get(name)
        return DEFAULTS[name] if value is None else value

    def choice(name):
        value = given(name)
        if value in (0, 1) and not isinstance(value, float):
            return bool(value)
        return flag(name, value, False)

    return InpaintOptions(blur=given("mask_blur"), content=given("inpainting_fill"),
                          only_masked=choice("inpaint_full_res"), padding=given("inpaint_full_res_padding"),
                          invert=choice("inpainting_mask_invert"))


def parse_img2img(body: Any, native: int, model: str, switches=(), steps_policy: bool = False,
                  styles: dict | None = None) -> Txt2Img:
    """An AUTOMATIC1111 img2img body: txt2img's fields, the first of ``init_images`` and ``denoising_strength``;
    without width and height the picture's own size; with ``mask`` (base64, the picture's size) inpainting."""
    if not isinstance(body, dict):
        raise ValidationError("body", type(body).__name__, "must be a JSON object")
    images = body.get("init_images")
    if not isinstance(images, list) or not images:
        raise ValidationError("init_images", images, "must be a list with one base64 picture")
    picture = decode_picture("init_images[0]", images[0])
    mask = decode_picture("mask", body["mask"]) if body.get("mask") else None
    options = inpaint_options(body) if mask is not None else InpaintOptions()
    strength = body.get("denoising_strength", 0.75)
    rest = {k: v for k, v in body.items() if k not in IMG2IMG_FIELDS}
    for side, value in zip(("width", "height"), picture.size):
        rest.setdefault(side, value)  # A1111 sends its own; a client that does not gets the picture's size
    job = parse_txt2img(rest, native, model, switches, steps_policy, styles)
    try:
        request = dataclasses.replace(job.request, init_image=picture, mask=mask, inpaint=options,
                                      strength=0.75 if strength is None else strength)
    except ValidationError as exc:
        raise ValidationError("denoising_strength" if exc.field == "strength" else exc.field, exc.value,
                              exc.problem) from None
    echo = {**job.echo, "denoising_strength": request.strength}
    if mask is not None:
        echo.update(mask_blur=options.blur, inpainting_fill=list(type(options.content)).index(options.content),
                    inpaint_full_res=options.only_masked, inpaint_full_res_padding=options.padding,
                    inpainting_mask_invert=int(options.invert))
    reasons = dict(job.reasons)
    if body.get("resize_mode") not in (None, *RESIZE_MODES):
        reasons["resize_mode"] = "only resize mode 0 (just resize) is done here"
    names = {k for k in body if k in IMG2IMG_FIELDS and k not in READ and k != "resize_mode" and asked(body, k)}
    return dataclasses.replace(job, request=request, echo=echo, reasons=reasons,
                               ignored=tuple(sorted(set(job.ignored) | names | set(reasons))))
