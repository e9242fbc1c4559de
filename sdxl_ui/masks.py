"""The pictures of an inpainting run, as AUTOMATIC1111 makes them: the mask inverted and blurred, the masked area
filled from its surroundings ("fill"), the region drawn for "only masked", the canvas of an outpainting, and the
paste-back that leaves every pixel outside the mask exactly the input's. PIL and numpy alone."""
from __future__ import annotations

from dataclasses import dataclass

from .edits import grey_levels

FILL_RADII = (256, 64, 16, 4, 2, 0)  # A1111's masking.fill: ever smaller blurs of the kept pixels, coarse to fine
OUTPAINT_OVERLAP = 8  # the band's mask reaches this far into the picture, so the seam itself is redrawn


@dataclass(frozen=True)
class InpaintPictures:
    """What an inpainting run draws and how it goes back: ``picture`` and ``mask`` at the processing size (the
    whole canvas, or the masked region for "only masked"), the ``canvas`` and its blurred ``full_mask`` the result
    is pasted back into, and the ``region`` (x1, y1, x2, y2) of the canvas that was drawn (None: all of it)."""

    picture: object
    mask: object
    canvas: object
    full_mask: object
    region: tuple[int, int, int, int] | None


def prepared_mask(mask, blur: int, invert: bool):
    """The mask as A1111 uses it: grey levels (white = redraw), inverted when asked, then blurred by ``blur``
    pixels (a Gaussian of that radius)."""
    from PIL import ImageFilter, ImageOps

    grey = grey_levels(mask)
    if invert:
        grey = ImageOps.invert(grey)
    return grey.filter(ImageFilter.GaussianBlur(blur)) if blur > 0 else grey


def filled(picture, mask):
    """The picture with its masked area (mask > 0) filled with the colours around it: the kept pixels blurred at
    ever smaller radii (normalised by the blurred weights), each pass laid over the last by its weight (as
    A1111's ``masking.fill`` lays its blurs), the kept pixels unchanged."""
    import numpy as np
    from PIL import Image, ImageFilter

    rgb = np.asarray(picture.convert("RGB"), dtype=np.float64)
    keep = (np.asarray(mask.convert("L")) == 0).astype(np.float64)
    if not keep.any():
        return picture.convert("RGB")
    out = np.broadcast_to(rgb[keep > 0].mean(axis=0), rgb.shape).copy()
    for radius in FILL_RADII:
        if not radius:
            continue
        blur = ImageFilter.GaussianBlur(radius)
        weights = np.asarray(Image.fromarray((keep * 255).astype(np.uint8)).filter(blur), dtype=np.float64) / 255
        colours = np.stack([np.asarray(Image.fromarray((rgb[..., c] * keep).astype(np.uint8)).filter(blur),
                                       dtype=np.float64) for c in range(3)], axis=-1) / 255
        mean = colours / np.maximum(weights, 1e-6)[..., None] * 255
        alpha = np.clip(weights, 0, 1)[..., None]
        out = out * (1 - alpha) + np.clip(mean, 0, 255) * alpha  # each finer pass laid over the coarser ones
    out = np.where(keep[..., None] > 0, rgb, out)
    return Image.fromarray(np.clip(out, 0, 255).round().astype(np.uint8), "RGB")


def outpaint_canvas(picture, directions: tuple[str, ...], pixels: int):
    """The picture on a canvas extended by ``pixels`` in each direction, the new band its edge colours stretched
    out, and the mask of the band (white), reaching OUTPAINT_OVERLAP pixels into the picture."""
    import numpy as np
    from PIL import Image

    rgb = np.asarray(picture.convert("RGB"))
    pad = {d: pixels if d in directions else 0 for d in ("left", "right", "up", "down")}
    canvas = np.pad(rgb, ((pad["up"], pad["down"]), (pad["left"], pad["right"]), (0, 0)), mode="edge")
    mask = np.full(canvas.shape[:2], 255, dtype=np.uint8)
    h, w = rgb.shape[:2]
    inner = {d: OUTPAINT_OVERLAP if pad[d] else 0 for d in pad}
    mask[pad["up"] + inner["up"]:pad["up"] + h - inner["down"], pad["left"] + inner["left"]:pad["left"] + w
         - inner["right"]] = 0
    return Image.fromarray(canvas, "RGB"), Image.fromarray(mask, "L")


def inpaint_pictures(picture, mask, options, width: int, height: int, content_fill: bool) -> InpaintPictures:
    """The pictures one inpainting run draws at ``width`` × ``height``: the mask prepared (``options``: blur,
    invert); for "only masked" the region around the mask with ``options.padding`` pixels, grown to the drawn
    size's proportions (diffusers' ``VaeImageProcessor.get_crop_region``); the masked area filled when
    ``content_fill``."""
    from diffusers.image_processor import VaeImageProcessor
    from PIL import Image

    canvas = picture.convert("RGB")
    full_mask = prepared_mask(mask, options.blur, options.invert)
    if full_mask.getbbox() is None:
        raise ValueError("the mask is empty: nothing to redraw (paint the area to change white)")
    source = filled(canvas, full_mask) if content_fill else canvas
    region = None
    if options.only_masked:
        region = VaeImageProcessor.get_crop_region(full_mask, width, height, pad=options.padding)
        drawn, drawn_mask = source.crop(region), full_mask.crop(region)
    else:
        drawn, drawn_mask = source, full_mask
    if drawn.size != (width, height):
        drawn = drawn.resize((width, height), Image.LANCZOS)
        drawn_mask = drawn_mask.resize((width, height), Image.LANCZOS)
    return InpaintPictures(drawn, drawn_mask, canvas, full_mask, region)


def pasted_back(result, pictures: InpaintPictures):
    """The drawn result laid into the canvas (resized into its region for "only masked"), then the canvas laid
    over it where the blurred mask keeps it: every pixel where the mask is 0 is exactly the input's."""
    from PIL import Image

    canvas = pictures.canvas
    if pictures.region is not None:
        x1, y1, x2, y2 = pictures.region
        drawn = canvas.copy()
        drawn.paste(result.convert("RGB").resize((x2 - x1, y2 - y1), Image.LANCZOS), (x1, y1))
    else:
        drawn = result.convert("RGB")
        if drawn.size != canvas.size:
            drawn = drawn.resize(canvas.size, Image.LANCZOS)
    return Image.composite(drawn, canvas, pictures.full_mask)
