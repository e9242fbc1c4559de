"""An upscale-only job (A1111's extras, the CLI's ``upscale``): pictures in, pictures out, by a built-in upscaler or
the user's own model (``upscalers``), on the host's device and under its device lock, without loading the SDXL
model. Not a ``Run``: there is no prompt, no plan to apply and no denoising."""
from __future__ import annotations

import time
from typing import Callable

from .edits import MAX_SIDE, Upscale
from .failures import ValidationError
from .host import ModelHost
from .jobs import CancelToken
from .run import Cancelled
from .upscalers import find, upscale_picture

MAX_INPUT_SIDE = 2 * MAX_SIDE  # a picture to upscale may be larger than one this app generates


def check_upscale(pictures: list, spec: Upscale, folder, field: str = "image") -> None:
    """The pictures and the upscalers, before the job waits for the device: each a picture within
    ``MAX_INPUT_SIDE`` a side whose upscaled size is within the limit; both upscalers existing."""
    find(spec.upscaler, folder, "upscaler_1")
    if spec.visibility_2 > 0:
        find(spec.upscaler_2, folder, "upscaler_2")
    if not pictures:
        raise ValidationError(field, "[]", "must hold at least one picture")
    for index, picture in enumerate(pictures):
        name = field if len(pictures) == 1 else f"{field}[{index}]"
        if not callable(getattr(picture, "convert", None)):
            raise ValidationError(name, type(picture).__name__, "must be a picture (PNG, JPEG or WebP)")
        width, height = picture.size
        if max(width, height) > MAX_INPUT_SIDE or min(width, height) < 1:
            raise ValidationError(name, f"{width}×{height}", f"must be at most {MAX_INPUT_SIDE} pixels a side")
        spec.sizes(width, height)


def device_of(host: ModelHost) -> str:
    """The plan's device; the CPU when no plan can be made for the SDXL model (say, too little memory for it):
    an upscale does not need that model."""
    from .policy import PlanError

    try:
        return host.plan.device
    except (PlanError, OSError, ValueError):
        return "cpu"


def upscale_pictures(host: ModelHost, pictures: list, spec: Upscale, cancel: CancelToken | None = None,
                     log: Callable[[str], None] | None = None) -> list:
    """Each picture upscaled as ``spec`` says (``check_upscale`` first, by the caller; under the device lock). The second upscaler,
    when visible, is blended over the first at its visibility; ``crop`` cuts the centre to the asked size. The
    ``None`` upscaler first leaves the picture as it is (A1111's extras do the same)."""
    from PIL import Image

    folder = host.settings.upscaler_dir
    first = find(spec.upscaler, folder, "upscaler_1")
    second = find(spec.upscaler_2, folder, "upscaler_2") if spec.visibility_2 > 0 else None
    device = device_of(host)
    cancel = cancel or CancelToken()

    def on_tile(done: int, total: int) -> None:
        if cancel.cancelled:
            raise Cancelled()

    results = []
    for picture in pictures:
        start = time.perf_counter()
        picture = picture.convert("RGB")
        upscaled, final = spec.sizes(*picture.size)
        if first.kind == "none":
            results.append(picture)
            continue
        result = upscale_picture(picture, first, upscaled, device, on_tile)
        if second is not None:
            other = upscale_picture(picture, second, upscaled, device, on_tile)
            result = Image.blend(result, other, spec.visibility_2)
        if final != upscaled:
            left, top = (upscaled[0] - final[0]) // 2, (upscaled[1] - final[1]) // 2
            result = result.crop((left, top, left + final[0], top + final[1]))
        if log is not None:
            log(f"Upscaled {picture.width}×{picture.height} → {result.width}×{result.height} by {first.name}"
                + (f" and {second.name} at {spec.visibility_2:g}" if second else "")
                + f" on {device.upper()} in {time.perf_counter() - start:.1f} s")
        results.append(result)
    return results
