"""The seed document's Python API:

    from sdxl_ui import ImageService
    ok = await ImageService().generate_image(prompt="A beautiful landscape", output_path="/tmp/out.png",
                                             num_inference_steps=50, high_quality=True)

Returns True/False, logs the seed-style lines through `logging` (logger "sdxl_ui"), and runs the pipeline in a
worker thread so the event loop never blocks. Arguments are checked like every other front end's: a bad value
gives False and ``last_error`` naming the field and the value (``high_quality`` must be a bool; ``output_path``
a .png path, relative to the current folder like the CLI's ``--out``). ``ImageService(model="demo")`` or SDXL_UI_MODEL=demo selects the
offline demo model (simple shapes and colours); ``model="tiny"`` the random-weight test model. Any setting can be
given by name: ``ImageService(loras=["style.safetensors@0.8"], profile="auto")`` fuses LoRA adapters into the model
(docs/models.md: Few-step models and LoRAs).
"""
from __future__ import annotations

import asyncio
import logging
from pathlib import Path

from .commandline import read_picture
from .jobs import collect
from .schema import GenerationRequest, Quality, ResultEvent, ValidationError
from .service import check_output_path
from .settings import AppSettings

log = logging.getLogger("sdxl_ui")


class ImageService:
    def __init__(self, model: str | None = None, settings: AppSettings | None = None, backend=None,
                 **setting_overrides):
        """``backend``: any implementation of the generation seam (``sdxl_ui.backends.Backend``), e.g. a started
        ``RayBackend``; default: the in-process service with these settings."""
        from .service import GenerationService

        if backend is not None:
            self.service = backend
        else:
            if settings is None:
                settings = AppSettings.from_env(model=model, **setting_overrides)
            self.service = GenerationService(settings)
        self.last_result: ResultEvent | None = None
        self.last_error: str | None = None

    async def generate_image(self, prompt: str, output_path: str | Path, num_inference_steps: int | None = 50,
                             high_quality: bool = True, negative_prompt: str = "", guidance_scale: float | None = None,
                             seed: int | None = None, width: int | None = None, height: int | None = None,
                             init_image=None, strength: float = 0.75, mask=None, inpaint=None,
                             outpaint=(), outpaint_pixels: int = 128, hires=None) -> bool:
        """Generate one image to ``output_path``. True on success; False (and ``last_error``) otherwise.
        ``num_inference_steps=None`` (or ``guidance_scale=None``): the quality preset's, or a few-step model
        profile's own (docs/models.md: Few-step models and LoRAs). ``init_image`` (a PIL image or a file's path) with
        ``strength``: image to image; with ``mask`` (the same) inpainting, its options ``inpaint`` (a dict or
        ``edits.InpaintOptions``: blur, content, only_masked, padding, invert); ``outpaint`` (directions) and
        ``outpaint_pixels``: outpainting; ``hires`` (a dict or ``edits.HiresFix``: scale, upscaler, steps,
        strength, …): the hires fix of a text to image."""
        pictures = dict(mask=mask, inpaint=inpaint, outpaint=outpaint, outpaint_pixels=outpaint_pixels, hires=hires)
        return await asyncio.to_thread(self._generate, prompt, output_path, num_inference_steps, high_quality,
                                       negative_prompt, guidance_scale, seed, width, height, init_image, strength,
                                       pictures)

    def _generate(self, prompt, output_path, steps, high_quality, negative, guidance, seed, width, height,
                  init_image=None, strength=0.75, pictures=None) -> bool:
        self.last_result, self.last_error = None, None
        try:
            if not isinstance(high_quality, bool):  # "no" is truthy: only a real bool says which preset
                raise ValidationError("high_quality", high_quality, "must be True or False")
            if isinstance(init_image, (str, Path)):
                init_image = read_picture("init_image", str(init_image))
            request = GenerationRequest(prompt=prompt, negative_prompt="" if negative is None else negative,
                                        steps=steps, quality=Quality.HIGH if high_quality else Quality.FAST,
                                        guidance=guidance, seed=seed, width=width, height=height,
                                        init_image=init_image, strength=strength, **edit_fields(pictures or {}))
            # The seed's API always names its file; relative paths are relative to the current folder (as
            # open() and the CLI's --out). Checked here, before any work, like every other field.
            target = check_output_path(output_path)
        except ValidationError as exc:
            return self._fail(str(exc))
        # The service logs each line (🎨 …, Mode: …, ✓/– …, ✅ Image saved to …) to the "sdxl_ui" logger.
        # Read to the end of the stream, even after an error: generate() then has joined its worker, so a script
        # that exits right after this returns never exits while that thread is still running (as the CLI does).
        got = collect(self.service.generate(request, output_path=target))
        self.last_result = got.results[-1] if got.results else None
        if got.error is not None:
            return self._fail(got.error.message)
        if self.last_result is None or self.last_result.path is None:
            return self._fail(self.last_result.save_error if self.last_result else "no image was produced")
        return True

    def _fail(self, message: str) -> bool:
        self.last_error = message
        log.error("❌ %s", message)
        return False


def edit_fields(given: dict) -> dict:
    """The Python API's picture keywords as request fields: a mask by its path too, the options as dicts too."""
    from .edits import HiresFix, InpaintOptions

    fields = {k: v for k, v in given.items() if v is not None}
    if isinstance(fields.get("mask"), (str, Path)):
        fields["mask"] = read_picture("mask", str(fields["mask"]))
    for name, kind in (("inpaint", InpaintOptions), ("hires", HiresFix)):
        value = fields.get(name)
        if isinstance(value, dict):
            try:
                fields[name] = kind(**value)
            except TypeError as exc:
                raise ValidationError(name, sorted(value), f"unknown option ({exc})") from None
    return fields
