"""The hires fix, a kind of run (A1111's ``enable_hr``): text to image at the request's size, the picture upscaled
(in the latents, or decoded and upscaled in pixels by a built-in or the user's own model: ``upscalers``), then
image to image at the target size at the hires strength, over the same loaded modules."""
from __future__ import annotations

import math
from dataclasses import replace

from .denoise import decode_latents, image_to_image, run_stages
from .long_prompts import conditioning
from .run import Cancelled, Run, RunPlan
from .schema import LogEvent, LogLevel


class HiresFixRun(Run):
    """Text to image, then a second pass at the hires size (``request.hires``: scale or resize, upscaler, steps,
    strength, prompts). The second pass runs about strength × its steps steps, at least one (as image to image
    does); its steps are the first pass's unless ``hires.steps`` is set. No refiner pass."""

    def prepare(self) -> RunPlan:
        from .upscalers import find

        run = replace(super().prepare(), use_refiner=False)
        hires = self.request.hires
        self.upscaler = find(hires.upscaler, self.host.settings.upscaler_dir)
        self.hires_size = hires.target(run.width, run.height)
        steps = hires.steps or run.steps
        if int(steps * hires.strength) < 1:
            raised = math.ceil(1 / hires.strength - 1e-9)
            self.emit(LogEvent(f"Hires fix: strength {hires.strength:g} of {steps} steps is under one step; "
                               f"{raised} steps, so that one runs", LogLevel.WARNING))
            steps = raised
        self.second_steps = steps
        self.second_prompts = None
        if hires.prompt or hires.negative_prompt:  # A1111's hr_prompt / hr_negative_prompt: the second pass's own
            self.second_prompts = conditioning(self.models.base, hires.prompt or self.request.encoder_prompt,
                                               hires.negative_prompt or self.request.negative_prompt,
                                               self.request.clip_skip, steps)
        width, height = self.hires_size
        self.emit(LogEvent(f"Hires fix: {run.width}×{run.height} → {width}×{height} by {self.upscaler.name}, then "
                           f"{self.second_run(run)} of {steps} steps at strength {hires.strength:g}"))
        return run

    def second_run(self, run: RunPlan) -> int:
        return min(int(self.second_steps * self.request.hires.strength), self.second_steps)

    def steps_per_image(self, run: RunPlan) -> int:
        return run.steps + self.second_run(run)

    def denoise(self, run: RunPlan, common: dict, text: dict, stage_done, on_step):
        from .upscalers import upscale_latents, upscale_picture

        models = self.models
        latents = run_stages(models, False, run.width, run.height, common, on_step=on_step)
        if self.cancel.cancelled or getattr(models.base, "interrupt", False):
            return latents
        width, height = self.hires_size
        if self.upscaler.kind == "latent":
            start = upscale_latents(latents, self.upscaler.name, (width // 8, height // 8))
        else:
            picture = decode_latents(models.base, latents)
            start = upscale_picture(picture, self.upscaler, (width, height), self.host.plan.device,
                                    on_tile=self.stop_if_cancelled)
        self.emit(LogEvent(f"⏱️ Hires pass: {width}×{height} from the {self.upscaler.name} upscale…"))
        second = {**common, "num_inference_steps": self.second_steps}
        if self.second_prompts is not None:
            second = {k: v for k, v in second.items() if k not in ("prompt", "negative_prompt", "prompt_embeds",
                                                                   "pooled_prompt_embeds", "negative_prompt_embeds",
                                                                   "negative_pooled_prompt_embeds")}
            second.update(self.second_prompts.arguments)
        return image_to_image(models, start, self.request.hires.strength, second, on_step(2))

    def stop_if_cancelled(self, done: int, total: int) -> None:
        """Between an upscaler model's tiles: a cancelled run stops there."""
        if self.cancel.cancelled:
            raise Cancelled()

    def strength(self) -> float | None:
        return self.request.hires.strength

    def parameters(self, run: RunPlan, seed: int):
        width, height = self.hires_size
        return replace(super().parameters(run, seed), width=width, height=height)

    def parameter_fields(self) -> tuple:
        hires = self.request.hires
        fields = [("Hires upscale", f"{hires.scale:g}")] if not (hires.resize_x or hires.resize_y) else \
            [("Hires resize", "{}x{}".format(*self.hires_size))]
        fields += [("Hires steps", self.second_steps), ("Hires upscaler", self.upscaler.name)]
        if hires.prompt:
            fields.append(("Hires prompt", hires.prompt))
        if hires.negative_prompt:
            fields.append(("Hires negative prompt", hires.negative_prompt))
        return tuple(fields)
