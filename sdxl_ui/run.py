"""One request's run: its frozen plan, then per image denoise → decode → save → result, with typed progress.

``Run`` is a kind of run — text to image — over the host's loaded models: ``prepare`` makes the ``RunPlan`` (the
request's plan from the planning in one call, applied to the pipelines, its sampler, steps, guidance, sizes and
prompt arguments), ``images`` makes the request's images, each by ``image``. Other kinds of run are subclasses
beside it (``image_run.ImageToImage``; inpaint and hires fix next), not flags through the service.
"""
from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Callable

from .adapters import apply_request_loras, fused
from .denoise import REFINER_SPLIT, decode_latents, final_decoder, latent_preview, profile_scheduler, run_stages, \
    scheduler_for
from .jobs import CancelToken
from .long_prompts import Conditioning, chunk_lines, conditioning, refiner_text
from .few_step import job_settings
from .metadata import ImageParameters
from .models import LoadedModels
from .optimizations.registry import Plan
from .policy import plan_request
from .profiles import choose, profile_named
from .samplers import SCHEDULE_BY_KEY, plan_sampler, sampler_label
from .saving import write_png_atomic
from .schema import MAX_SEED, GenerationRequest, LogEvent, LogLevel, ProgressEvent, Quality, ResultEvent, Schedule, \
    Scheduler, Timings

PREVIEW_EVERY = 5


class Cancelled(Exception):
    pass


@dataclass
class Progress:
    """How far a request got: steps done of the total, images finished (and sent), the first image's seed. Kept by
    the service across the once-only CPU retry, which goes on from the next image with the same seeds."""

    done: int = 0
    total: int = 0
    images: int = 0
    seed0: int | None = None


@dataclass(frozen=True)
class RunPlan:
    """What one request runs with, after its plan: the same for each of its images."""

    plan: Plan
    width: int
    height: int
    steps: int
    guidance: float
    use_refiner: bool
    sampler: str = ""  # the A1111 name of the sampler that runs (PNG parameters)
    options: dict = field(default_factory=dict)  # the profile's pipeline-call options (e.g. TCD's eta)
    requested: int = 0  # the steps asked for: the request's, else the profile's or the preset's
    schedule: str | None = None  # the schedule type's label when the request chose one (PNG parameters)
    prompts: Conditioning | None = None  # the base call's prompt arguments (text, or chunked embeddings), schedule


class Run:
    """Text to image: one request over the host's loaded models, under the device lock the service holds."""

    def __init__(self, host, request: GenerationRequest, models: LoadedModels, emit: Callable[[object], None],
                 cancel: CancelToken, progress: Progress, target: Path | None = None):
        self.host, self.request, self.models, self.emit = host, request, models, emit
        self.cancel, self.progress, self.target = cancel, progress, target

    def prepare(self) -> RunPlan:
        """This request's plan, applied to the pipelines and said in the log; the sampler set from the model's own
        scheduler config."""
        from .optimize import apply, report

        host, request, models, emit = self.host, self.request, self.models, self.emit
        settings, evidence, few_step = job_settings(host, request)  # Few-step's LoRA, the request's decoder
        profile = profile_named(choose(settings.profile, evidence)[0])
        width, height = self.size(host.size(profile))
        high = request.quality.high
        plan = plan_request(host.plan, host.probe, settings, host.model_size, width, height, high,
                            request.techniques, evidence)
        use_refiner = plan.refiner and models.refiner is not None
        # Its <lora:…> tags and Few-step's LoRA, for this job alone; the server's own set otherwise.
        apply_request_loras(models.base, settings, request, plan, host.settings.loras)
        apply(plan, models)
        if few_step:
            emit(LogEvent(f"Few-step: {few_step} — profile {plan.profile}, the "
                          + ("tiny decoder" if plan.decoder == "tiny" else "full VAE") + " decodes the final image"))
        host.applied(models, plan, use_refiner)  # the status panel reports against this, not the load plan
        # A few-step profile's own steps and guidance, unless the request sets them.
        wanted = request.steps if request.steps is not None else profile.steps_for(high) or request.requested_steps
        steps = plan.steps_for(wanted)
        guidance = request.guidance if request.guidance is not None or profile.guidance is None \
            else profile.guidance
        guidance = request.guidance_scale if guidance is None else guidance
        mode = {Quality.HIGH: "HIGH QUALITY", Quality.FAST: "FAST", Quality.FEW_STEP: "FEW-STEP"}[request.quality]
        # The seed's line as it was; a few-step family is named after it (its own steps and guidance).
        emit(LogEvent(f"Mode: {mode} (base steps={steps}, guidance={guidance:g})"
                      + (f" — {request.requested_steps} → {steps} on {plan.device.upper()}"
                         if steps != wanted else "")
                      + (f" — profile {plan.profile}" if profile.few_step else "")))
        emit(LogEvent("Refinement: " + (f"ENABLED (base to {REFINER_SPLIT}, refiner from {REFINER_SPLIT})"
                                        if use_refiner else _refiner_off(plan))))
        # Before the report (it reads this scheduler); from the model's original config (a previous sampler's options,
        # e.g. Karras sigmas, must not leak); a few-step profile's own when the request leaves the sampler on auto.
        own = request.scheduler is Scheduler.AUTO and profile.scheduler is not None
        models.base.scheduler = profile_scheduler(profile, request.sampler, models.scheduler_config, own,
                                                  request.schedule)
        if models.refiner is not None:
            models.refiner.scheduler = scheduler_for(request.sampler, models.scheduler_config, request.schedule)
        prompts = self.prompt_arguments(steps)  # before the report: its prompt row reads this run's
        for line in report(models, plan, host.probe, use_refiner=use_refiner).log_lines():
            emit(LogEvent(line))
        for warning in plan.warnings:
            emit(LogEvent(f"⚠ {warning}", LogLevel.WARNING))

        label = profile.sampler_label if own else sampler_label(request.sampler, request.schedule)
        schedule = SCHEDULE_BY_KEY[request.schedule].label if not own and request.schedule is not \
            Schedule.AUTOMATIC else None  # A1111's "Schedule type" field, by its label
        for note in () if own else plan_sampler(request.sampler, request.schedule).notes:
            emit(LogEvent(f"sampler: {note}", LogLevel.WARNING))
        return RunPlan(plan, width, height, steps, guidance, use_refiner, label, dict(profile.options) if own else {},
                       wanted, schedule, prompts)

    def images(self, load_s: float, start: float) -> None:
        """Every image of the request not made yet (a CPU retry goes on from the next one), each sent as made."""
        run, progress, request = self.prepare(), self.progress, self.request
        if progress.seed0 is None:
            progress.seed0 = request.seed if request.seed is not None else random.randint(0, MAX_SEED)
        first = progress.images
        progress.total = self.steps_per_image(run) * (request.images - first)
        on_step = self.step_callbacks(time.perf_counter())
        for index in range(first, request.images):
            self.image(run, index, load_s if index == 0 else 0.0, start, on_step)
            progress.images = index + 1

    def image(self, run: RunPlan, index: int, load_s: float, start: float, on_step) -> None:
        """One image of the request: denoise (base, then the refiner), decode, save, and its ResultEvent."""
        import torch

        from .optimize import report

        request, models, emit, progress = self.request, self.models, self.emit, self.progress
        plan, use_refiner, steps = run.plan, run.use_refiner, run.steps
        seed = (progress.seed0 + index) % (MAX_SEED + 1)
        t_image, done_before = time.perf_counter(), progress.done
        generator = torch.Generator("cpu").manual_seed(seed)
        cond = run.prompts
        refiner_words = refiner_text(cond, int(steps * REFINER_SPLIT)) if cond is not None else request.encoder_prompt
        text = dict(prompt=refiner_words, negative_prompt=request.negative_prompt or None)
        common = dict(**(cond.arguments if cond is not None else text), num_inference_steps=steps,
                      guidance_scale=run.guidance, generator=generator, output_type="latent", **run.options)
        state = cond.remember(models.base) if cond is not None else None  # what the report reads back, per image
        schedule = (lambda then: cond.schedule(then, state.switched)) if cond is not None else (lambda then: then)
        stages = 2 if use_refiner else 1
        emit(LogEvent(f"⏱️ Stage 1/{stages}: Base generation (image {index + 1}/{request.images}, seed {seed})…"))

        def stage_done(stage):
            if stage == 1 and use_refiner:
                emit(LogEvent(f"⏱️ Stage 2/2: Refiner from {REFINER_SPLIT}…"))

        with torch.inference_mode():
            latents = self.denoise(run, common, text, stage_done,
                                   lambda stage: (schedule if stage == 1 else (lambda then: then))(
                                       on_step(f"Stage {stage}/{stages}" if use_refiner else "")))
            if self.cancel.cancelled:
                raise Cancelled()
            t_decode = time.perf_counter()
            image = self.finish(decode_latents(models.base, latents))
        emit(LogEvent(f"{final_decoder(models.base) or 'VAE'} decode {time.perf_counter() - t_decode:.1f} s"))
        rep = report(models, plan, self.host.probe, use_refiner=use_refiner)  # with this run's cache counts
        params = self.parameters(run, seed)
        generate_s = time.perf_counter() - t_image
        path, save_error = self.save(image, params, index)
        timings = Timings(load_s=round(load_s, 3), generate_s=round(generate_s, 3),
                          total_s=round(time.perf_counter() - start, 3))
        emit(ResultEvent(
            image=image, path=str(path) if path else None, seed=seed, index=index,
            steps_requested=run.requested or request.requested_steps, steps_run=progress.done - done_before,
            refiner=use_refiner, timings=timings, report=rep, model=models.source.label, device=plan.device,
            dtype=plan.dtype, parameters=params.to_text(), save_error=save_error,
        ))

    def size(self, native: int) -> tuple[int, int]:
        """(width, height): the request's, else the model's native side."""
        return self.request.width or native, self.request.height or native

    def steps_per_image(self, run: RunPlan) -> int:
        return run.steps

    def denoise(self, run: RunPlan, common: dict, text: dict, stage_done, on_step):
        """One image's latents: the base (then the refiner) from noise (``denoise.run_stages``)."""
        return run_stages(self.models, run.use_refiner, run.width, run.height, common, on_stage_end=stage_done,
                          refiner_text=text, on_step=on_step)

    def parameters(self, run: RunPlan, seed: int) -> ImageParameters:
        """The PNG's ``parameters``, as A1111 writes them."""
        request, models, plan = self.request, self.models, run.plan
        return ImageParameters(
            prompt=request.prompt, negative_prompt=request.negative_prompt, steps=run.steps,
            sampler=run.sampler, schedule=run.schedule, cfg_scale=run.guidance, seed=seed, width=run.width,
            height=run.height, model=models.source.label, device=plan.device, dtype=plan.dtype,
            refiner=run.use_refiner, note=models.note, profile=plan.profile if plan.profile != "sdxl" else None,
            vae=final_decoder(models.base), tiling=bool(plan.tiling), clip_skip=request.clip_skip,
            loras=tuple((lora.name, lora.weight, lora.hash) for lora in fused(models.base)),
            prompt_cut=run.prompts.cut_note if run.prompts is not None else None,
            denoising_strength=self.strength(), extra=self.parameter_fields(),
        )

    def strength(self) -> float | None:
        """A1111's "Denoising strength" of this kind of run (None: text to image has none)."""
        return None

    def parameter_fields(self) -> tuple:
        """A1111's own fields of this kind of run for the PNG's parameters (e.g. inpainting's "Mask blur")."""
        return ()

    def finish(self, image):
        """The decoded picture made final (inpainting pastes it back into the input)."""
        return image

    def prompt_arguments(self, steps: int) -> Conditioning:
        """Plain words within the window as text; else embeddings from chunks with A1111's emphasis, BREAKs and
        schedule (``long_prompts``), said in the log."""
        pipe, request = self.models.base, self.request
        found = conditioning(pipe, request.encoder_prompt, request.negative_prompt, request.clip_skip, steps)
        found.remember(pipe)
        for line, level in chunk_lines(pipe, found):
            self.emit(LogEvent(line, level))
        return found

    def step_callbacks(self, t_run: float):
        """``on_step(stage_label)``: the pipeline's step-end callback for one stage. Counts the steps of the whole
        request in ``progress``, emits a ProgressEvent (ETA; a latent preview every few steps), and ends the
        pipeline's loop when the job is cancelled."""
        progress, cancel, emit = self.progress, self.cancel, self.emit

        def on_step(stage_label: str):
            def callback(pipe, i, t, kwargs):
                progress.done += 1
                elapsed = time.perf_counter() - t_run
                rate = elapsed / progress.done
                remaining = progress.total - progress.done
                preview = None
                if progress.done % PREVIEW_EVERY == 0 or remaining == 0:
                    preview = latent_preview(kwargs["latents"], pipe)
                emit(ProgressEvent(progress.done, progress.total, elapsed, rate * remaining, rate, stage_label,
                                   preview))
                if cancel.cancelled:
                    # End the loop the way diffusers expects: the pipeline skips its remaining steps and still runs
                    # maybe_free_model_hooks() (weights back to the CPU under offload). Raising here skipped that.
                    pipe._interrupt = True
                return kwargs
            return callback
        return on_step

    def save(self, image, params: ImageParameters, index: int):
        """Save the PNG; returns (path, None) or (None, error). A failed save never loses the image in memory."""
        extra = {"seed": params.seed, "model": params.model, "note": params.note}
        target = self.target
        try:
            if target is not None:  # the caller's own file: replaced as given
                path = target if index == 0 else target.with_name(f"{target.stem}-{index}{target.suffix}")
                write_png_atomic(image, path, params, extra, overwrite=True)
            else:
                path = save_unique(image, params, extra, self.host.settings.outputs)
        except OSError as exc:
            self.emit(LogEvent(f"⚠ Image NOT saved ({exc.strerror or exc}); it is shown but not on disk",
                               LogLevel.WARNING))
            return None, f"not saved: {exc.strerror or exc}"
        self.emit(LogEvent(f"✅ Image saved to {path}"))
        return path, None


def save_unique(image, params: ImageParameters, extra: dict, outputs: Path) -> Path:
    """A new numbered PNG in today's folder of ``outputs``."""
    folder = outputs / datetime.now().strftime("%Y-%m-%d")
    folder.mkdir(parents=True, exist_ok=True)
    n = len(list(folder.glob("*.png")))
    while True:  # exclusive create: two runs never overwrite each other, even at the same moment
        n += 1
        path = folder / f"{n:05d}-{params.seed}.png"
        try:
            write_png_atomic(image, path, params, extra, overwrite=False)
            return path
        except FileExistsError:
            continue


def _refiner_off(plan: Plan) -> str:
    reason = plan.reasons.get("refiner", "")
    return reason if reason.startswith("DISABLED") else f"DISABLED ({reason})"
