"""Image to image, a kind of run beside text to image (``run.Run``): the request's picture noised to its strength and
denoised with its prompt. ``kind_of`` picks the kind a request asks for."""
from __future__ import annotations

import math
from dataclasses import replace

from .denoise import image_to_image
from .run import Run, RunPlan
from .schema import GenerationRequest, LogEvent, LogLevel


class ImageToImage(Run):
    """Image to image: the request's picture noised to ``strength`` and denoised with its prompt, by diffusers'
    ``StableDiffusionXLImg2ImgPipeline`` over the loaded base's own modules (``denoise.image_to_image``: no weights
    loaded twice, the same run hooks). About strength × steps steps run; when that is under one step, the steps
    are raised until one runs (FastSD CPU's rule), and the log says so. No refiner pass."""

    def size(self, native: int) -> tuple[int, int]:
        """The request's size, else the picture's own, each side down to a multiple of 8."""
        width, height = self.request.init_image.size
        return self.request.width or width // 8 * 8, self.request.height or height // 8 * 8

    def prepare(self) -> RunPlan:
        run = super().prepare()
        strength = self.request.strength
        steps = run.steps if int(run.steps * strength) >= 1 else math.ceil(1 / strength - 1e-9)
        if steps != run.steps:
            self.emit(LogEvent(f"Image to image: strength {strength:g} of {run.steps} steps is under one step; "
                               f"{steps} steps, so that one runs", LogLevel.WARNING))
        run = replace(run, steps=steps, use_refiner=False)
        self.emit(LogEvent(f"Image to image: strength {strength:g} — {self.steps_per_image(run)} of {steps} steps "
                           f"run from the picture ({run.width}×{run.height})"))
        return run

    def steps_per_image(self, run: RunPlan) -> int:
        return min(int(run.steps * self.request.strength), run.steps)

    def denoise(self, run: RunPlan, common: dict, text: dict, stage_done, on_step):
        from PIL import Image

        picture = self.request.init_image.convert("RGB")
        if picture.size != (run.width, run.height):
            picture = picture.resize((run.width, run.height), Image.LANCZOS)
        return image_to_image(self.models, picture, self.request.strength, common, on_step(1))


def kind_of(request: GenerationRequest) -> type[Run]:
    """The kind of run a request asks for."""
    return ImageToImage if request.kind == "img2img" else Run
