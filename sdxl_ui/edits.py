"""What a request asks of a picture beside its words: inpainting's options (A1111's mask blur, masked content,
inpaint area, invert), outpainting's directions, and the hires fix's second pass. Plain data, checked on
construction (``ValidationError``, the field and the value named); no torch, no PIL (a picture is anything with
``size`` and ``convert``)."""
from __future__ import annotations

import enum
from dataclasses import dataclass

from .failures import ValidationError

MIN_SIDE, MAX_SIDE = 64, 2048  # the same bounds as a request's width and height (schema.py)
MAX_MASK_BLUR = 64
MAX_PADDING = 256
OUTPAINT_DIRECTIONS = ("left", "right", "up", "down")
MAX_OUTPAINT = 1024
MAX_HIRES_SCALE = 4.0


class MaskedContent(enum.StrEnum):
    """What the masked area starts from (A1111's "Masked content", ``inpainting_fill`` 0–3 in its order)."""

    FILL = "fill"  # the masked area filled with the colours around it, then noised
    ORIGINAL = "original"  # the picture as it is, noised
    LATENT_NOISE = "latent noise"  # fresh noise in the latents
    LATENT_NOTHING = "latent nothing"  # zeros in the latents

    @classmethod
    def from_a1111(cls, value) -> "MaskedContent":
        """A1111's ``inpainting_fill`` (0–3), or one of the names."""
        order = list(cls)
        if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < len(order):
            return order[value]
        try:
            return cls(str(value).strip().lower())
        except ValueError:
            raise ValidationError("inpainting_fill", value, "must be 0 (fill), 1 (original), 2 (latent noise) or 3 "
                                                      "(latent nothing)") from None


@dataclass(frozen=True)
class InpaintOptions:
    """A1111's inpainting options. ``only_masked``: A1111's "Inpaint area: Only masked" (the masked region and
    ``padding`` pixels around it are drawn at the request's size, then pasted back); else the whole picture."""

    blur: int = 4
    content: MaskedContent = MaskedContent.ORIGINAL
    only_masked: bool = False
    padding: int = 32
    invert: bool = False

    def __post_init__(self):
        object.__setattr__(self, "blur", _int_in("mask_blur", self.blur, 0, MAX_MASK_BLUR))
        object.__setattr__(self, "padding", _int_in("inpaint_full_res_padding", self.padding, 0, MAX_PADDING))
        content = self.content
        object.__setattr__(self, "content", content if isinstance(content, MaskedContent)
                           else MaskedContent.from_a1111(content))
        for name in ("only_masked", "invert"):
            if not isinstance(getattr(self, name), bool):
                raise ValidationError(name, getattr(self, name), "must be true or false")


@dataclass(frozen=True)
class HiresFix:
    """A1111's hires fix (``enable_hr``): text to image at the request's size, upscaled by ``scale`` (or to
    ``resize_x`` × ``resize_y`` when given) with ``upscaler``, then image to image at that size at ``strength``
    with ``steps`` (0: the first pass's) and its own prompts when given."""

    scale: float = 2.0
    resize_x: int = 0
    resize_y: int = 0
    upscaler: str = "Latent"
    steps: int = 0
    strength: float = 0.7
    prompt: str = ""
    negative_prompt: str = ""

    def __post_init__(self):
        object.__setattr__(self, "scale", _float_in("hr_scale", self.scale, 1.0, MAX_HIRES_SCALE))
        for name in ("resize_x", "resize_y"):
            side = _int_in(f"hr_{name}", getattr(self, name), 0, MAX_SIDE)
            if side and (side < MIN_SIDE or side % 8):
                raise ValidationError(f"hr_{name}", side, f"must be 0 (by hr_scale) or a multiple of 8 from {MIN_SIDE}")
            object.__setattr__(self, name, side)
        object.__setattr__(self, "steps", _int_in("hr_second_pass_steps", self.steps, 0, 150))
        try:
            strength = float(self.strength)
        except (TypeError, ValueError):
            raise ValidationError("denoising_strength", self.strength, "must be a number") from None
        if not 0.0 < strength <= 1.0:
            raise ValidationError("denoising_strength", self.strength,
                                  "must be above 0 and at most 1 (the share of the upscaled picture redrawn)")
        object.__setattr__(self, "strength", strength)
        if not isinstance(self.upscaler, str) or not self.upscaler.strip():
            raise ValidationError("hr_upscaler", self.upscaler, "must be an upscaler's name (GET /sdapi/v1/upscalers)")
        for name in ("prompt", "negative_prompt"):
            if not isinstance(getattr(self, name), str):
                raise ValidationError(f"hr_{name}", getattr(self, name), "must be text")

    def target(self, width: int, height: int) -> tuple[int, int]:
        """The second pass's size for a first pass of ``width`` × ``height``, each side a multiple of 8 (A1111:
        both resize sides given → them; one → the other kept in proportion; none → ``scale`` times)."""
        x, y = self.resize_x, self.resize_y
        if x and y:
            return x, y
        if x:
            return x, _multiple_of_8(height * x / width)
        if y:
            return _multiple_of_8(width * y / height), y
        return _multiple_of_8(width * self.scale), _multiple_of_8(height * self.scale)


MAX_UPSCALE = 8.0
MAX_UPSCALED_SIDE = 8192


@dataclass(frozen=True)
class Upscale:
    """An upscale-only run (A1111's extras: ``upscaling_resize`` or ``upscaling_resize_w`` × ``_h`` with
    ``upscaling_crop``, ``upscaler_1``, ``upscaler_2`` blended in at ``extras_upscaler_2_visibility``). The
    upscalers' names are checked against what exists where it runs (``upscalers.find``)."""

    upscaler: str = "Lanczos"
    scale: float = 2.0
    width: int = 0  # both given: to that size (the picture scaled to cover it, then cropped to it with crop)
    height: int = 0
    crop: bool = True
    upscaler_2: str = "None"
    visibility_2: float = 0.0

    def __post_init__(self):
        object.__setattr__(self, "scale", _float_in("upscaling_resize", self.scale, 1.0, MAX_UPSCALE))
        for name in ("width", "height"):
            side = _int_in(f"upscaling_resize_{name[0]}", getattr(self, name), 0, MAX_UPSCALED_SIDE)
            if 0 < side < MIN_SIDE:
                raise ValidationError(f"upscaling_resize_{name[0]}", side, f"must be 0 or at least {MIN_SIDE}")
            object.__setattr__(self, name, side)
        if bool(self.width) != bool(self.height):
            raise ValidationError("upscaling_resize_w" if not self.width else "upscaling_resize_h", 0,
                                  "must be given with the other side (or both 0: by upscaling_resize)")
        object.__setattr__(self, "visibility_2", _float_in("extras_upscaler_2_visibility", self.visibility_2, 0.0, 1.0))
        for name, field_name in (("upscaler", "upscaler_1"), ("upscaler_2", "upscaler_2")):
            if not isinstance(getattr(self, name), str) or not getattr(self, name).strip():
                raise ValidationError(field_name, getattr(self, name), "must be an upscaler's name "
                                                                        "(GET /sdapi/v1/upscalers)")
        if not isinstance(self.crop, bool):
            raise ValidationError("upscaling_crop", self.crop, "must be true or false")

    def infotext(self) -> str:
        """What the upscale did, in A1111's postprocessing fields (its extras' ``html_info``, the PNG's
        ``postprocessing`` chunk)."""
        size = f"upscale by: {self.scale:g}" if not self.width else \
            f"upscale to: {self.width}x{self.height}, Postprocess crop to fit: {self.crop}"
        text = f"Postprocess {size}, Postprocess upscaler: {self.upscaler}"
        if self.visibility_2 > 0:
            text += f", Postprocess upscaler 2: {self.upscaler_2}, Postprocess upscaler 2 visibility: " \
                    f"{self.visibility_2:g}"
        return text

    def sizes(self, width: int, height: int) -> tuple[tuple[int, int], tuple[int, int]]:
        """For a picture of ``width`` × ``height``: the size it is upscaled to, and the size it is cropped to
        (the same unless resizing to a size of other proportions with ``crop``). Refused over 8192 a side."""
        if self.width:
            by = max(self.width / width, self.height / height)
        else:
            by = self.scale
        upscaled = (max(1, round(width * by)), max(1, round(height * by)))
        final = (self.width, self.height) if self.width and self.crop else upscaled
        if max(upscaled) > MAX_UPSCALED_SIDE:
            raise ValidationError("upscaling_resize", f"{by:g}", f"makes a {upscaled[0]}×{upscaled[1]} picture from "
                                  f"{width}×{height}; at most {MAX_UPSCALED_SIDE} a side")
        return upscaled, final


def _multiple_of_8(value: float) -> int:
    return max(MIN_SIDE, int(round(value / 8)) * 8)


def _float_in(field_name: str, value, low: float, high: float) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValidationError(field_name, value, "must be a number") from None
    if not low <= number <= high:
        raise ValidationError(field_name, value, f"must be between {low:g} and {high:g}")
    return number


def _int_in(field_name: str, value, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ValidationError(field_name, value, "must be a whole number")
    try:
        number = int(value) if not isinstance(value, float) or value.is_integer() else None
    except ValueError:
        number = None
    if number is None:
        raise ValidationError(field_name, value, "must be a whole number")
    if not low <= number <= high:
        raise ValidationError(field_name, value, f"must be between {low} and {high}")
    return number


def grey_levels(mask):
    """A mask as grey levels (white = redraw): an RGBA mask (the page's editor layer) is its alpha where it has
    one, else its grey levels."""
    if mask.mode == "RGBA":
        alpha = mask.getchannel("A")
        if alpha.getextrema() != (255, 255):
            return alpha
    return mask.convert("L")


def _is_picture(value) -> bool:
    return callable(getattr(value, "convert", None)) and isinstance(getattr(value, "size", None), tuple)


def check_pictures(init_image, mask, outpaint: tuple, outpaint_pixels: int, hires,
                   invert: bool = False) -> tuple[tuple, int]:
    """A request's pictures and edits checked together: ``init_image`` a picture of 64 to 2048 pixels a side, a
    mask of the same size, outpainting's directions (with a start picture, the canvas within 2048) and the hires
    fix only without a start picture. Returns the outpaint directions and pixels, cleaned."""
    if init_image is not None:
        if not _is_picture(init_image):
            raise ValidationError("init_image", type(init_image).__name__, "must be a picture (PNG, JPEG or WebP)")
        size = init_image.size
        if min(size) < MIN_SIDE or max(size) > MAX_SIDE:
            raise ValidationError("init_image", f"{size[0]}×{size[1]}",
                                  f"must be {MIN_SIDE} to {MAX_SIDE} pixels a side")
    if mask is not None:
        if init_image is None:
            raise ValidationError("mask", "(a picture)", "needs init_image: the picture to inpaint")
        if not _is_picture(mask):
            raise ValidationError("mask", type(mask).__name__, "must be a picture (white = redraw, black = keep)")
        if tuple(mask.size) != tuple(init_image.size):
            raise ValidationError("mask", f"{mask.size[0]}×{mask.size[1]}", f"must be the size of init_image "
                                                                       f"({init_image.size[0]}×{init_image.size[1]})")
        low, high = grey_levels(mask).getextrema()
        if (high if not invert else 255 - low) == 0:
            raise ValidationError("mask", "(empty)", "marks nothing to redraw: paint the area to change white"
                                  + (" (inverted: the area to keep)" if invert else ""))
    if isinstance(outpaint, str):
        outpaint = tuple(d for d in outpaint.replace(",", " ").split() if d)
    directions = tuple(dict.fromkeys(str(d).strip().lower() for d in outpaint or ()))
    for direction in directions:
        if direction not in OUTPAINT_DIRECTIONS:
            raise ValidationError("outpaint", direction, f"must be among {', '.join(OUTPAINT_DIRECTIONS)}")
    pixels = _int_in("outpaint_pixels", outpaint_pixels, 8, MAX_OUTPAINT)
    if pixels % 8:
        raise ValidationError("outpaint_pixels", pixels, "must be a multiple of 8")
    if directions:
        if init_image is None:
            raise ValidationError("outpaint", ",".join(directions), "needs init_image: the picture to extend")
        if mask is not None:
            raise ValidationError("outpaint", ",".join(directions), "extends the picture and makes its own mask; send "
                                                              "no mask with it")
        width = init_image.size[0] + pixels * sum(d in directions for d in ("left", "right"))
        height = init_image.size[1] + pixels * sum(d in directions for d in ("up", "down"))
        if max(width, height) > MAX_SIDE:
            raise ValidationError("outpaint_pixels", pixels,
                                  f"makes a {width}×{height} canvas; at most {MAX_SIDE} a side")
    if hires is not None:
        if not isinstance(hires, HiresFix):
            raise ValidationError("hires", hires, "must be a HiresFix")
        if init_image is not None:
            raise ValidationError("hires", "(hires fix)",
                                  "is a second pass of text to image; send no init_image with it")
    return directions, pixels
