"""Image to image and inpainting, kinds of run beside text to image (``run.Run``): the request's picture noised to
its strength and denoised with its prompt, everywhere or only where its mask (or its outpainting's new band) is
white. ``kind_of`` picks the kind a request asks for."""
from __future__ import annotations

import math
from dataclasses import replace

from .denoise import image_to_image, inpaint
from .edits import MaskedContent
from .masks import InpaintPictures, inpaint_pictures, outpaint_canvas, pasted_back
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

    def strength(self) -> float | None:
        return self.request.strength


class Inpaint(ImageToImage):
    """Inpainting (and outpainting): the picture redrawn where its mask is white, by diffusers'
    ``StableDiffusionXLInpaintPipeline`` over the base's own modules (``denoise.inpaint``), with A1111's options
    (``request.inpaint``: mask blur, masked content, whole picture or only the masked region with padding,
    invert); the result pasted back so that every pixel outside the blurred mask is exactly the input's.
    Outpainting extends the canvas first (``masks.outpaint_canvas``) and inpaints the new band, its masked
    content "fill" unless the request chose another."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.pictures: InpaintPictures | None = None

    def canvas(self):
        """(picture, mask, content): the request's own, or the outpainting's extended canvas and band."""
        request = self.request
        content = request.inpaint.content
        if request.outpaint:
            picture, mask = outpaint_canvas(request.init_image, request.outpaint, request.outpaint_pixels)
            if content is MaskedContent.ORIGINAL:  # the band has no picture of its own to keep
                content = MaskedContent.FILL
            return picture, mask, content
        return request.init_image, request.mask, content

    def size(self, native: int) -> tuple[int, int]:
        """The request's size, else the canvas's own (the region's for "only masked": drawn at the canvas's
        size unless the request sets one), each side down to a multiple of 8."""
        request = self.request
        width, height = self.canvas()[0].size
        return request.width or width // 8 * 8, request.height or height // 8 * 8

    def prepare(self) -> RunPlan:
        run = super().prepare()
        picture, mask, content = self.canvas()
        try:
            self.pictures = inpaint_pictures(picture, mask, self.request.inpaint, run.width, run.height,
                                             content is MaskedContent.FILL)
        except ValueError as exc:
            from .schema import ValidationError

            raise ValidationError("mask", "(empty)", str(exc)) from None
        self.content = content
        area = "only masked" + (f" (region {self.pictures.region})" if self.pictures.region else "") \
            if self.request.inpaint.only_masked else "whole picture"
        self.emit(LogEvent(f"Inpaint: {area}, masked content {content.value}, mask blur {self.request.inpaint.blur}"
                           + (f", outpaint {'+'.join(self.request.outpaint)} by {self.request.outpaint_pixels} px"
                              if self.request.outpaint else "")))
        return run

    def denoise(self, run: RunPlan, common: dict, text: dict, stage_done, on_step):
        pictures = self.pictures
        return inpaint(self.models, pictures.picture, pictures.mask, self.request.strength, common,
                       self.content.value, on_step(1))

    def finish(self, image):
        return pasted_back(image, self.pictures)

    def parameter_fields(self) -> tuple:
        options = self.request.inpaint
        fields = [("Mask blur", options.blur), ("Masked content", self.content.value)]
        if options.only_masked:
            fields += [("Inpaint area", "Only masked"), ("Masked area padding", options.padding)]
        if options.invert:
            fields.append(("Mask mode", "Inpaint not masked"))
        if self.request.outpaint:
            fields.append(("Outpaint", f"{'+'.join(self.request.outpaint)} {self.request.outpaint_pixels}px"))
        return tuple(fields)


def kind_of(request: GenerationRequest) -> type[Run]:
    """The kind of run a request asks for."""
    from .hires_run import HiresFixRun

    return {"img2img": ImageToImage, "inpaint": Inpaint, "hires": HiresFixRun}.get(request.kind, Run)
