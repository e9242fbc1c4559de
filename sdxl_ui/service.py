"""GenerationService: a validated request in, a stream of typed events out.

The pipeline runs in a worker thread; events cross to the caller through a queue, so any front end (CLI, Python
API, Gradio) just iterates. One generation at a time per device (a lock); a CancelToken stops a run within one
step; a caller that stops iterating (closed browser tab) cancels its run too.
"""
from __future__ import annotations

import logging
import queue
import random
import threading
import time
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path
from typing import Callable, Iterator

from .adapters import LoraError, apply_loras, apply_request_loras, check_files, fused, profile_evidence
from .long_prompts import chunk_lines, chunked_arguments
from .denoise import (REFINER_SPLIT, decode_latents, final_decoder, latent_preview,  # noqa: F401
                      profile_scheduler, run_stages, scheduler_for)
from .jobs import SHUTTING_DOWN, Admission, CancelToken, new_job_id  # CancelToken: still importable from here
from .failures import is_gpu_failure, is_out_of_memory, memory_advice  # noqa: F401
from .metadata import ImageParameters
from .saving import check_output_path, write_png_atomic  # noqa: F401 - re-exported (CLI, API)
from .models import LoadedModels, ModelLoadError, ModelSource, attach_tiny_decoder, check_source, load_models, \
    resolve_source
from .optimizations.registry import Plan, parse_switches
from .policy import PlanError, adjust_plan, make_plan
from .profiles import profile_named
from .samplers import SCHEDULE_BY_KEY, plan_sampler, sampler_label
from .schema import (MAX_SEED, PRESETS, ErrorEvent, GenerationRequest, HardwareProbe, LogEvent,
                     OptimizationReport, ProgressEvent, Quality, ResultEvent, Schedule, Scheduler, Timings,
                     ValidationError)
from .settings import AppSettings, Toggle

log = logging.getLogger("sdxl_ui")

PREVIEW_EVERY = 5


class Cancelled(Exception):
    pass


class GenerationService:
    """Owns the loaded model (loaded once, reused) and runs one generation at a time."""

    concurrency = 1  # the seam (backends.Backend): one job at a time on this process's device

    def __init__(self, settings: AppSettings | None = None, probe: HardwareProbe | None = None,
                 probe_fn: Callable[[], HardwareProbe] | None = None, source: ModelSource | None = None,
                 loader: Callable[..., LoadedModels] | None = None):
        """``source`` and ``loader`` (same arguments as ``load_models``) replace the model from the settings, e.g.
        the selftest's full SDXL architecture with random weights."""
        self.settings = settings or AppSettings.from_env()
        self._probe, self._probe_fn, self._source = probe, probe_fn, source
        self._loader = loader or load_models
        self._models: LoadedModels | None = None
        self._plan: Plan | None = None
        self._applied: tuple[LoadedModels, Plan, bool] | None = None  # (models, plan, refiner used) of the last run
        self._load_lock = threading.Lock()
        self._device_lock = threading.RLock()  # re-entrant: the one-time CPU fallback re-runs inside the lock
        self.load_error: str | None = None
        self.loading = False
        self._fell_back = False
        self._admission = Admission()  # jobs started and not yet finished; none new after shutdown()

    # ------------------------------------------------------------ state
    @property
    def probe(self) -> HardwareProbe:
        if self._probe is None:
            from .device import probe_hardware

            self._probe = (self._probe_fn or probe_hardware)()
        return self._probe

    @property
    def source(self) -> ModelSource:
        return self._source or resolve_source(self.settings.model)

    @property
    def model_size(self):  # the memory estimate's parameter counts, read from the model's own files
        return self.source.size(self.settings.refiner_source)

    @property
    def loaded(self) -> bool:
        return self._models is not None

    @property
    def plan(self) -> Plan:
        """The load-time plan (native size, high quality)."""
        if self._plan is None:
            profile = self.profile_evidence
            size = self._size(profile_named(profile[0] if self.settings.profile == "auto" else self.settings.profile))
            self._plan = make_plan(self.probe, self.settings, self.model_size, size, size, True,
                                   profile=profile)
        return self._plan

    def _size(self, profile) -> int:
        """The native side: a folder's own configs say it; else (hub id, single file) the profile's (Turbo: 512)."""
        source = self.source
        if source.kind in ("folder", "tiny") or profile.native_size is None:
            return source.native_size
        return profile.native_size

    @property
    def profile_evidence(self) -> tuple[str, str]:
        """(profile, why) from the model's and the LoRAs' files (``--profile`` overrides it in the plan)."""
        return profile_evidence(self.source, self.settings.loras)

    def set_loras(self, loras) -> None:
        """Change the fused LoRAs of the loaded model (all or nothing: a LoraError leaves model and settings as
        they were). With int8 layers, a compiled UNet or sequential offload (weights held by accelerate's hooks)
        they cannot be swapped in place: the model is reloaded with the new set."""
        settings = self.settings.with_(loras=tuple(loras))
        with self._device_lock, self._load_lock:
            models = self._models
            plan = self.applied_plan or self._plan
            if models is not None and not (plan is not None and (plan.int8 or plan.compile
                                                                  or plan.offload == "sequential")):
                apply_loras(models.base, settings.loras, self.settings.local_files_only)
                self.settings, self._plan, self._applied = settings, None, None
                return
        self.reconfigure(settings)

    def native_size(self) -> int:
        try:
            return self.source.native_size
        except ModelLoadError:
            return 1024

    def check_model(self) -> ModelSource:
        """The model named by the settings, after its cheap checks (folder layout, checkpoint header): run before
        the memory preflight, so a wrong --model is reported as such. Raises ModelLoadError."""
        source = self.source
        check_source(source)
        check_files(self.settings.loras, self.settings.local_files_only)  # a missing or unreadable LoRA file
        return source

    def reconfigure(self, settings: AppSettings) -> None:
        """Switch model/settings (e.g. 'continue with the demo model'); the next run loads afresh.

        Takes the device lock first (the order every run takes them in): a running generation keeps its models and
        its plan until it ends, instead of finding them gone between two steps."""
        with self._device_lock, self._load_lock:
            self.settings = settings
            self._models = None
            self._plan = None
            self._applied = None
            self.load_error = None

    def ensure_loaded(self, emit: Callable[[object], None] | None = None) -> tuple[LoadedModels, float]:
        """Load once; returns (models, seconds spent loading in this call)."""
        emit = emit or _log_event
        if not self._load_lock.acquire(blocking=False):  # another thread (the app's preload) is loading
            emit(LogEvent("The model is still loading (started when the app launched)…"))
            waited = time.perf_counter()
            while not self._load_lock.acquire(timeout=3.0):
                emit(LogEvent(f"… still loading the model ({time.perf_counter() - waited:.0f} s)"))
        try:
            return self._load_locked(emit)
        finally:
            self._load_lock.release()

    def preload_in_background(self) -> threading.Thread:
        """Start loading now (app start, or after switching model); failures land in ``load_error``."""
        def target():
            try:
                self.ensure_loaded()
            except (ModelLoadError, PlanError) as exc:  # shown by the page's status panel
                log.warning("%s", exc)

        thread = threading.Thread(target=target, name="preload", daemon=True)
        thread.start()
        return thread

    def _load_locked(self, emit) -> tuple[LoadedModels, float]:
        """Load under the load lock (held by the caller); returns (models, seconds spent loading now)."""
        if self._models is not None:
            return self._models, 0.0
        self.loading = True
        ticker_stop = threading.Event()
        try:
            source = self.check_model()
            plan = self.plan
            emit(LogEvent(f"Loading model {source.label} ({plan.dtype} on {plan.device})…"))
            threading.Thread(target=_tick, args=(ticker_stop, emit), daemon=True).start()
            want_refiner = plan.refiner or self.settings.use_refiner is Toggle.ON
            models = self._loader(source, self.settings.refiner_source, plan.dtype, plan.vae_dtype,
                                  want_refiner, self.settings.local_files_only, self.settings.single_file_config)
            if self.settings.loras:  # all or nothing; a failure leaves no model loaded (the next run reloads)
                emit(LogEvent(f"Fusing LoRA {', '.join(map(str, self.settings.loras))}…"))
                apply_loras(models.base, self.settings.loras, self.settings.local_files_only)
            emit(LogEvent(attach_tiny_decoder(models, source, self.settings)))
        except (ModelLoadError, PlanError) as exc:
            self.load_error = str(exc)
            raise
        finally:
            ticker_stop.set()
            self.loading = False
        self._models = models
        self.load_error = None
        note = f" — {models.note}" if models.note else ""
        emit(LogEvent(f"Model loaded in {models.load_s:.1f} s{note}"))
        return models, models.load_s

    @property
    def applied_plan(self) -> Plan | None:
        """The plan the loaded pipeline was last put in by a run (None before the first run)."""
        applied = self._applied
        return applied[1] if applied is not None and applied[0] is self._models else None

    def current_report(self) -> OptimizationReport | None:
        models = self._models
        if models is None:
            return None
        from .optimize import report

        # The pipeline is in the state of the last request's plan (its size may have turned VAE tiling on): read it
        # back against that plan, so a row never says "active — not needed at 1024×1024".
        applied = self._applied
        if applied is not None and applied[0] is models:
            return report(models, applied[1], self.probe, use_refiner=applied[2])
        return report(models, self.plan, self.probe)

    def status(self) -> dict:
        """What the page's status panel shows: model, device, state, and the optimization report
        (read back from the pipeline once loaded; the planned one before)."""
        from .optimize import expected_report

        out: dict = {"model": self.settings.model, "note": None, "device": "?", "dtype": "?", "rows": []}
        try:
            source = self.check_model()
            out["note"] = source.note
            plan = self.plan
        except (ModelLoadError, PlanError) as exc:
            return {**out, "state": "error", "message": str(exc)}
        rep = self.current_report() or expected_report(plan, self.probe)
        state = "loaded" if self.loaded else "loading…" if self.loading else "error" if self.load_error else "not loaded"
        return {**out, "device": plan.device, "dtype": plan.dtype, "state": state, "message": self.load_error,
                "rows": rep.to_list(), "source": rep.source}

    def _fall_back_to_cpu(self, exc: Exception, emit) -> None:
        """The GPU passed its kernel test but failed on a real step: say so and continue on the CPU, once."""
        self._fell_back = True
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        emit(LogEvent(f"⚠ The GPU cannot run this model's kernels ({first}); falling back to CPU for this "
                      "session. `python -m sdxl_ui doctor` shows the GPU, its arch and torch's build.", "warning"))
        self.reconfigure(self.settings.with_(device="cpu"))

    def quality_defaults(self, quality: Quality) -> tuple[int, float]:
        """(steps, guidance) the page offers for a quality: the preset's, or the few-step profile's own."""
        preset = PRESETS[quality]
        try:
            profile = profile_named(self.plan.profile)
        except (ModelLoadError, PlanError):
            return preset.steps, preset.guidance
        return profile.defaults(quality is Quality.HIGH, preset.steps, preset.guidance)

    def steps_note(self, requested: int) -> str:
        """E.g. '50 → 35 on CPU' (the steps policy), or '' when steps run as requested."""
        try:
            plan = self.plan
        except (ModelLoadError, PlanError):
            return ""
        run = plan.steps_for(int(requested))
        return f"{int(requested)} → {run} on {plan.device.upper()} (× {plan.steps_factor:g})" if run != requested else ""

    # ------------------------------------------------------------ generation
    def generate(self, request: GenerationRequest, cancel: CancelToken | None = None,
                 output_path: str | Path | None = None, job_id: str | None = None) -> Iterator[object]:
        """Yield LogEvent / ProgressEvent / ResultEvent (one per image) / ErrorEvent, then stop. Every event
        carries the job's id: ``job_id`` (a Ray replica passes its caller's), else a new one per call."""
        cancel = cancel or CancelToken()
        job_id = job_id or new_job_id()
        events: queue.Queue = queue.Queue()
        done = object()

        def emit(event) -> None:
            if isinstance(event, LogEvent):
                log.log(logging.WARNING if event.level == "warning" else logging.INFO, event.message)
            events.put(replace(event, job_id=job_id))

        def worker():
            try:
                self._run(request, cancel, output_path, emit)
            finally:
                self._admission.done(cancel)
                events.put(done)

        thread = threading.Thread(target=worker, name="sdxl-generate", daemon=True)
        # started under the admission's lock: shutdown() only ever joins started threads
        if not self._admission.admit(cancel, thread, start=thread.start):
            yield ErrorEvent(SHUTTING_DOWN, "busy", job_id=job_id)
            return
        try:
            while True:
                event = events.get()
                if event is done:
                    # Wait for the worker's last instructions too: a process that exits while a thread still
                    # unwinds through torch can abort in torch's static destructors (SIGABRT instead of its
                    # exit code).
                    thread.join()
                    break
                yield event
        finally:
            # The consumer went away (closed tab, Ctrl-C, break): stop the run within one step.
            if thread.is_alive():
                cancel.cancel()

    def shutdown(self, timeout: float = 120.0) -> bool:
        """Stop taking jobs; stop the running ones at their next step (an image being decoded or saved is
        finished and saved first) and wait up to ``timeout`` s for them. True when nothing is left running."""
        return self._admission.close(timeout)

    def _run(self, request, cancel, output_path, emit, resume: dict | None = None) -> None:
        """One job under the device lock. ``resume``: the progress of a run that the GPU could not finish; the
        CPU retry goes on from its next image with the same seeds, never repeating the images already sent."""
        start = time.perf_counter()
        if resume is None:
            emit(LogEvent(f"🎨 Generating image for prompt: {request.prompt[:200]!r}"
                          f"{'…' if len(request.prompt) > 200 else ''}"))
        try:
            target = check_output_path(output_path) if output_path is not None else None
            parse_switches(request.techniques)  # names the unknown switch before the job waits for the device
        except ValidationError as exc:  # before waiting for the device: a typo should not cost a queue slot
            emit(ErrorEvent(str(exc), "validation"))
            return
        if not self._device_lock.acquire(blocking=False):
            emit(LogEvent("Waiting for the device: another generation is running…"))
            while not self._device_lock.acquire(timeout=0.2):
                if cancel.cancelled:
                    emit(ErrorEvent("cancelled while waiting for the device", "cancelled"))
                    return
        if cancel.cancelled and resume is None:  # e.g. shutdown() ran while this job was on its way to the lock
            self._device_lock.release()
            emit(ErrorEvent("cancelled before it started", "cancelled"))
            return
        # images: how many this request has finished (and sent); seed0: its first seed, kept for a CPU retry.
        progress = {"done": 0, "total": 0, "images": resume["images"] if resume else 0,
                    "seed0": resume["seed0"] if resume else None}
        device = "cpu"
        try:
            models, load_s = self.ensure_loaded(emit)
            device = self.plan.device
            try:
                self._generate_images(request, models, load_s, start, target, cancel, emit, progress)
            finally:
                _release_offload(models)  # model offload: nothing stays on the GPU, however the run ended
        except LoraError as exc:  # bad input (exit 2), named by file and reason; the model is unchanged
            emit(ErrorEvent(str(exc), "validation"))
        except Cancelled:
            msg = f"cancelled at step {progress['done']}/{progress['total']}"
            emit(LogEvent(f"⏹ {msg}"))
            emit(ErrorEvent(msg, "cancelled"))
        except ValidationError as exc:
            emit(ErrorEvent(str(exc), "validation"))
        except (ModelLoadError, PlanError) as exc:
            emit(ErrorEvent(str(exc), "model"))
        except Exception as exc:  # noqa: BLE001 - the user gets a message, the console the traceback
            if is_out_of_memory(exc):
                emit(ErrorEvent(f"Out of memory at step {progress['done']}/{progress['total']} on "
                                f"{device.upper()}: {memory_advice(device)}", "memory"))
            elif device != "cpu" and is_gpu_failure(exc) and not self._fell_back:
                self._fall_back_to_cpu(exc, emit)
                self._run(request, cancel, output_path, emit, resume=progress)  # once: _fell_back is now set
            else:
                log.exception("generation failed")
                emit(ErrorEvent(f"Generation failed: {type(exc).__name__}: {str(exc)[:300]}", "runtime"))
        finally:
            self._device_lock.release()

    def _generate_images(self, request, models, load_s, start, target, cancel, emit, progress) -> None:
        run = self._prepare_run(request, models, emit)
        if progress["seed0"] is None:
            progress["seed0"] = request.seed if request.seed is not None else random.randint(0, MAX_SEED)
        first = progress["images"]
        progress["total"] = run.steps * (request.images - first)
        on_step = _step_callbacks(progress, time.perf_counter(), cancel, emit)
        for index in range(first, request.images):
            self._generate_image(request, models, run, index, (load_s, start), target, cancel, emit, progress,
                                 on_step)
            progress["images"] = index + 1

    def _prepare_run(self, request, models, emit) -> "_RunPlan":
        """This request's plan, applied to the pipelines and said in the log; the sampler set from the model's own
        scheduler config."""
        from .optimize import apply, report

        profile = profile_named(self.plan.profile)
        size = self._size(profile)
        width, height = request.width or size, request.height or size
        high = request.quality is Quality.HIGH
        plan = adjust_plan(self.plan, make_plan(self.probe, self.settings, self.model_size,
                                                width, height, high, request.techniques,
                                                profile=self.profile_evidence))
        use_refiner = plan.refiner and models.refiner is not None
        apply_request_loras(models.base, self.settings, request, plan)  # its <lora:…> tags, for this job alone
        apply(plan, models)
        self._applied = (models, plan, use_refiner)  # the status panel reports against this, not the load plan
        rep = report(models, plan, self.probe, use_refiner=use_refiner)
        # A few-step profile's own steps and guidance, unless the request sets them.
        wanted = request.steps if request.steps is not None else profile.steps_for(high) or request.requested_steps
        steps = plan.steps_for(wanted)
        guidance = request.guidance if request.guidance is not None or profile.guidance is None \
            else profile.guidance
        guidance = request.guidance_scale if guidance is None else guidance
        mode = "HIGH QUALITY" if high else "FAST"
        # The seed's line as it was; a few-step family is named after it (its own steps and guidance).
        emit(LogEvent(f"Mode: {mode} (base steps={steps}, guidance={guidance:g})"
                      + (f" — {request.requested_steps} → {steps} on {plan.device.upper()}"
                         if steps != wanted else "")
                      + (f" — profile {plan.profile}" if profile.few_step else "")))
        emit(LogEvent("Refinement: " + (f"ENABLED (base to {REFINER_SPLIT}, refiner from {REFINER_SPLIT})"
                                        if use_refiner else _refiner_off(plan))))
        for line in rep.log_lines():
            emit(LogEvent(line))
        for warning in plan.warnings:
            emit(LogEvent(f"⚠ {warning}", "warning"))
        prompts = self._prompt_arguments(models.base, request, emit)

        # Always from the model's original config: a previous sampler's options (e.g. Karras sigmas) must not leak.
        # A few-step profile's own scheduler when the request leaves the sampler on auto.
        own = request.scheduler is Scheduler.AUTO and profile.scheduler is not None
        models.base.scheduler = profile_scheduler(profile, request.sampler, models.scheduler_config, own,
                                                  request.schedule)
        if models.refiner is not None:
            models.refiner.scheduler = scheduler_for(request.sampler, models.scheduler_config, request.schedule)
        label = profile.sampler_label if own else sampler_label(request.sampler, request.schedule)
        schedule = SCHEDULE_BY_KEY[request.schedule].label if not own and request.schedule is not \
            Schedule.AUTOMATIC else None  # A1111's "Schedule type" field, by its label
        for note in () if own else plan_sampler(request.sampler, request.schedule).notes:
            emit(LogEvent(f"sampler: {note}", "warning"))
        return _RunPlan(plan, width, height, steps, guidance, use_refiner, label, dict(profile.options) if own else {},
                        wanted, schedule, prompts)

    def _generate_image(self, request, models, run: "_RunPlan", index, times, target, cancel, emit, progress,
                        on_step) -> None:
        """One image of the request: denoise (base, then the refiner), decode, save, and its ResultEvent.
        ``times``: (seconds spent loading in this job, the job's start)."""
        import torch

        from .optimize import report

        load_s, start = times
        plan, use_refiner, steps = run.plan, run.use_refiner, run.steps
        seed = (progress["seed0"] + index) % (MAX_SEED + 1)
        t_image, done_before = time.perf_counter(), progress["done"]
        generator = torch.Generator("cpu").manual_seed(seed)
        text = dict(prompt=request.encoder_prompt, negative_prompt=request.negative_prompt or None)
        common = dict(**(run.prompts or text), num_inference_steps=steps, guidance_scale=run.guidance, generator=generator,
                      output_type="latent", **(run.options or {}))
        stages = 2 if use_refiner else 1
        emit(LogEvent(f"⏱️ Stage 1/{stages}: Base generation "
                      f"(image {index + 1}/{request.images}, seed {seed})…"))

        def stage_done(stage):
            if stage == 1 and use_refiner:
                emit(LogEvent(f"⏱️ Stage 2/2: Refiner from {REFINER_SPLIT}…"))

        with torch.inference_mode():
            latents = run_stages(
                models, use_refiner, run.width, run.height, common, on_stage_end=stage_done, refiner_text=text,
                on_step=lambda stage: on_step(f"Stage {stage}/{stages}" if use_refiner else ""))
            if cancel.cancelled:
                raise Cancelled()
            t_decode = time.perf_counter()
            image = decode_latents(models.base, latents)
        emit(LogEvent(f"{final_decoder(models.base) or 'VAE'} decode {time.perf_counter() - t_decode:.1f} s"))
        steps_run = progress["done"] - done_before
        rep = report(models, plan, self.probe, use_refiner=use_refiner)  # with this run's cache/guidance counts
        params = ImageParameters(
            prompt=request.prompt, negative_prompt=request.negative_prompt, steps=steps,
            sampler=run.sampler, schedule=run.schedule, cfg_scale=run.guidance, seed=seed, width=run.width,
            height=run.height, model=models.source.label, device=plan.device, dtype=plan.dtype, refiner=use_refiner,
            note=models.note, profile=plan.profile if plan.profile != "sdxl" else None, vae=final_decoder(models.base),
            tiling=bool(plan.tiling), clip_skip=request.clip_skip,
            loras=tuple((lora.name, lora.weight, lora.hash) for lora in fused(models.base)),
        )
        generate_s = time.perf_counter() - t_image
        path, save_error = self._save(image, params, target, index, emit)
        timings = Timings(load_s=round(load_s if index == 0 else 0.0, 3), generate_s=round(generate_s, 3),
                          total_s=round(time.perf_counter() - start, 3))
        emit(ResultEvent(
            image=image, path=str(path) if path else None, seed=seed, index=index,
            steps_requested=run.requested or request.requested_steps, steps_run=steps_run, refiner=use_refiner,
            timings=timings, report=rep, model=models.source.label, device=plan.device, dtype=plan.dtype,
            parameters=params.to_text(), save_error=save_error,
        ))

    def _prompt_arguments(self, pipe, request, emit) -> dict:
        """Text within the window; chunked embeddings beyond it (``long_prompts``), said in the log."""
        args, n = chunked_arguments(pipe, request.encoder_prompt, request.negative_prompt, request.clip_skip)
        for line, level in chunk_lines(pipe, request.encoder_prompt, request.negative_prompt, n):
            emit(LogEvent(line, level))
        return args

    def _save(self, image, params: ImageParameters, target: Path | None, index: int, emit):
        """Save the PNG; returns (path, None) or (None, error). A failed save never loses the image in memory."""
        extra = {"seed": params.seed, "model": params.model, "note": params.note}
        try:
            if target is not None:  # the caller's own file: replaced as given
                path = target if index == 0 else target.with_name(f"{target.stem}-{index}{target.suffix}")
                write_png_atomic(image, path, params, extra, overwrite=True)
            else:
                path = self._save_unique(image, params, extra)
        except OSError as exc:
            emit(LogEvent(f"⚠ Image NOT saved ({exc.strerror or exc}); it is shown but not on disk", "warning"))
            return None, f"not saved: {exc.strerror or exc}"
        emit(LogEvent(f"✅ Image saved to {path}"))
        return path, None

    def _save_unique(self, image, params: ImageParameters, extra) -> Path:
        folder = self.settings.outputs / datetime.now().strftime("%Y-%m-%d")
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


@dataclass(frozen=True)
class _RunPlan:
    """What one request runs with, after its plan: the same for each of its images."""

    plan: Plan
    width: int
    height: int
    steps: int
    guidance: float
    use_refiner: bool
    sampler: str = ""  # the A1111 name of the sampler that runs (PNG parameters)
    options: dict | None = None  # the profile's pipeline-call options (e.g. TCD's eta)
    requested: int = 0  # the steps asked for: the request's, else the profile's or the preset's
    schedule: str | None = None  # the schedule type's label when the request chose one (PNG parameters)
    prompts: dict | None = None  # the prompt arguments of the base's call: text, or chunked embeddings


def _step_callbacks(progress: dict, t_run: float, cancel: CancelToken, emit):
    """``on_step(stage_label)``: the pipeline's step-end callback for one stage. Counts the steps of the whole
    request in ``progress``, emits a ProgressEvent (ETA; a latent preview every few steps), and ends the pipeline's
    loop when the job is cancelled."""
    def on_step(stage_label: str):
        def callback(pipe, i, t, kwargs):
            progress["done"] += 1
            elapsed = time.perf_counter() - t_run
            rate = elapsed / progress["done"]
            remaining = progress["total"] - progress["done"]
            preview = None
            if progress["done"] % PREVIEW_EVERY == 0 or remaining == 0:
                preview = latent_preview(kwargs["latents"], pipe)
            emit(ProgressEvent(progress["done"], progress["total"], elapsed, rate * remaining, rate,
                               stage_label, preview))
            if cancel.cancelled:
                # End the loop the way diffusers expects: the pipeline skips its remaining steps and still runs
                # maybe_free_model_hooks() (weights back to the CPU under offload). Raising here skipped that.
                pipe._interrupt = True
            return kwargs
        return callback
    return on_step


def _release_offload(models) -> None:
    """Model offload: every model back on the CPU after a run. A failing GPU must not hide the run's own error."""
    from .optimize import release_offload

    try:
        release_offload(models)
    except Exception:  # noqa: BLE001 - logged; the run's outcome is reported by the caller
        log.warning("could not move the models back to the CPU after the run", exc_info=True)


def _log_event(event) -> None:
    if isinstance(event, LogEvent):
        log.info(event.message)


def _tick(stop: threading.Event, emit, every_s: float = 3.0) -> None:
    """Loading has no progress callback: say every few seconds that it is still going."""
    start = time.perf_counter()
    while not stop.wait(every_s):
        emit(LogEvent(f"… still loading the model ({time.perf_counter() - start:.0f} s)"))


def _refiner_off(plan: Plan) -> str:
    reason = plan.reasons.get("refiner", "")
    return reason if reason.startswith("DISABLED") else f"DISABLED ({reason})"
