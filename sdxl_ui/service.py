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
from datetime import datetime
from pathlib import Path
from typing import Callable, Iterator

from .metadata import ImageParameters, save_png
from .models import LoadedModels, ModelLoadError, ModelSource, load_models, resolve_source
from .policy import PlanError, adjust_plan, make_plan
from .schema import (
    MAX_SEED,
    SAMPLER_LABELS,
    ErrorEvent,
    GenerationRequest,
    HardwareProbe,
    LogEvent,
    OptimizationReport,
    Plan,
    ProgressEvent,
    Quality,
    ResultEvent,
    Scheduler,
    Timings,
    ValidationError,
)
from .settings import AppSettings, Toggle

log = logging.getLogger("sdxl_ui")

REFINER_SPLIT = 0.8  # base denoises to 80 %, the refiner does the last 20 % (SDXL's "ensemble of experts")
PREVIEW_EVERY = 5
# SDXL latent -> RGB linear approximation (ComfyUI latent_formats.SDXL), for previews without a VAE decode.
LATENT_RGB = ((0.3651, 0.4232, 0.4341), (-0.2533, -0.0042, 0.1068), (0.1076, 0.1111, -0.0362),
              (-0.3165, -0.2492, -0.2188))
LATENT_RGB_BIAS = (0.1084, -0.0175, -0.0011)


class Cancelled(Exception):
    pass


class CancelToken:
    def __init__(self):
        self._event = threading.Event()

    def cancel(self) -> None:
        self._event.set()

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()


def check_output_path(path: str | Path, outputs: Path | None = None) -> Path:
    """An explicit output file, checked before minutes of work: a .png in an existing, writable folder.

    A relative path is a name inside the outputs folder and may not climb out of it ("../../x.png" is refused);
    an absolute path is honoured as given (the CLI makes the user's relative paths absolute first).
    """
    import tempfile

    raw = str(path)
    target = Path(raw).expanduser()
    if target.suffix.lower() != ".png":
        raise ValidationError("output_path", raw, "must end with .png (PNG keeps the parameters chunk)")
    if not target.is_absolute():
        root = (outputs or Path("outputs")).resolve()
        target = (root / target).resolve()
        if root != target.parent and root not in target.parents:
            raise ValidationError("output_path", raw, f"leaves the outputs folder {str(root)!r}")
        target.parent.mkdir(parents=True, exist_ok=True)
    if target.is_dir():
        raise ValidationError("output_path", raw, "is a folder; give a file name ending in .png")
    parent = target.parent
    if not parent.is_dir():
        raise ValidationError("output_path", raw, f"folder {str(parent)!r} does not exist")
    try:  # os.access says yes to root everywhere; only a real file creation tells
        with tempfile.TemporaryFile(dir=parent):
            pass
    except OSError as exc:
        raise ValidationError("output_path", raw, f"folder {str(parent)!r} is not writable ({exc.strerror})") from None
    return target


def _scheduler_for(sampler: Scheduler, config):
    from diffusers import (
        DDIMScheduler,
        DPMSolverMultistepScheduler,
        EulerAncestralDiscreteScheduler,
        EulerDiscreteScheduler,
        UniPCMultistepScheduler,
    )

    table = {
        Scheduler.EULER: (EulerDiscreteScheduler, {}),
        Scheduler.EULER_A: (EulerAncestralDiscreteScheduler, {}),
        Scheduler.DPMPP_2M: (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++", "solver_order": 2}),
        Scheduler.DPMPP_2M_KARRAS: (DPMSolverMultistepScheduler,
                                    {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": True}),
        Scheduler.DDIM: (DDIMScheduler, {}),
        Scheduler.UNIPC: (UniPCMultistepScheduler, {}),
    }
    cls, options = table[sampler]
    return cls.from_config(config, **options)


def latent_preview(latents):
    """(1, 4, h, w) latents -> small PIL image, by SDXL's linear latent->RGB map (no VAE decode)."""
    import torch
    from PIL import Image

    lat = latents[0].detach().float().cpu()
    factors = torch.tensor(LATENT_RGB)
    rgb = torch.einsum("chw,cr->hwr", lat, factors) + torch.tensor(LATENT_RGB_BIAS)
    rgb = ((rgb.clamp(-1, 1) + 1) * 127.5).to(torch.uint8).numpy()
    image = Image.fromarray(rgb, "RGB")
    scale = max(1, min(8, 512 // max(image.size)))
    return image.resize((image.width * scale, image.height * scale), Image.BILINEAR)


def decode_latents(pipe, latents):
    """VAE decode in the VAE's own dtype (fp32 beside an fp16 UNet), then to PIL."""
    vae = pipe.vae
    latents = latents.to(device=pipe._execution_device, dtype=vae.dtype)
    latents = latents / vae.config.scaling_factor
    image = vae.decode(latents, return_dict=False)[0]
    if hasattr(pipe, "maybe_free_model_hooks"):
        pipe.maybe_free_model_hooks()
    return pipe.image_processor.postprocess(image.float(), output_type="pil")[0]


def is_out_of_memory(exc: BaseException) -> bool:
    """CUDA raises torch.OutOfMemoryError; the CPU allocator raises MemoryError or a RuntimeError."""
    if isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError":
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


GPU_FAILURE_MARKERS = ("cuda error", "no kernel image", "cublas", "cudnn", "device-side assert", "mps backend")


def is_gpu_failure(exc: BaseException) -> bool:
    return isinstance(exc, RuntimeError) and any(m in str(exc).lower() for m in GPU_FAILURE_MARKERS)


def memory_advice(device: str) -> str:
    if device == "cuda":
        return ("try a smaller size, --offload model (or sequential), or --attention sliced; "
                "close other programs using the GPU")
    return "try a smaller size, close other programs, or use --precision bf16 to halve the weights"


class GenerationService:
    """Owns the loaded model (loaded once, reused) and runs one generation at a time."""

    def __init__(self, settings: AppSettings | None = None, probe: HardwareProbe | None = None,
                 probe_fn: Callable[[], HardwareProbe] | None = None):
        self.settings = settings or AppSettings.from_env()
        self._probe = probe
        self._probe_fn = probe_fn
        self._models: LoadedModels | None = None
        self._plan: Plan | None = None
        self._load_lock = threading.Lock()
        self._device_lock = threading.RLock()  # re-entrant: the one-time CPU fallback re-runs inside the lock
        self.load_error: str | None = None
        self.loading = False
        self._fell_back = False

    # ------------------------------------------------------------ state
    @property
    def probe(self) -> HardwareProbe:
        if self._probe is None:
            from .device import probe_hardware

            self._probe = (self._probe_fn or probe_hardware)()
        return self._probe

    @property
    def source(self) -> ModelSource:
        return resolve_source(self.settings.model)

    @property
    def loaded(self) -> bool:
        return self._models is not None

    @property
    def plan(self) -> Plan:
        """The load-time plan (native size, high quality)."""
        if self._plan is None:
            size = self.source.native_size
            self._plan = make_plan(self.probe, self.settings, self.source.model_kind, size, size, True)
        return self._plan

    def native_size(self) -> int:
        try:
            return self.source.native_size
        except ModelLoadError:
            return 1024

    def reconfigure(self, settings: AppSettings) -> None:
        """Switch model/settings (e.g. 'continue with the demo model'); the next run loads afresh."""
        with self._load_lock:
            self.settings = settings
            self._models = None
            self._plan = None
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
            source = self.source
            plan = self.plan
            emit(LogEvent(f"Loading model {source.label} ({plan.dtype} on {plan.device})…"))
            threading.Thread(target=_tick, args=(ticker_stop, emit), daemon=True).start()
            want_refiner = plan.refiner or self.settings.use_refiner is Toggle.ON
            models = load_models(source, self.settings.refiner_source, plan.dtype, plan.vae_dtype,
                                 want_refiner, self.settings.local_files_only, self.settings.single_file_config)
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

    def current_report(self) -> OptimizationReport | None:
        if self._models is None:
            return None
        from .optimize import report

        return report(self._models, self.plan, self.probe)

    def status(self) -> dict:
        """What the page's status panel shows: model, device, state, and the optimization report
        (read back from the pipeline once loaded; the planned one before)."""
        from .optimize import expected_report
        from .schema import DEMO_NOTE

        out: dict = {"model": self.settings.model, "note": None, "device": "?", "dtype": "?", "rows": []}
        try:
            source = self.source
            out["note"] = DEMO_NOTE if source.kind == "tiny" else None
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
        emit(LogEvent(f"⚠ The GPU failed on the first real step ({first}); falling back to CPU for this "
                      "session. `python -m sdxl_ui doctor` shows the GPU, its arch and torch's build.", "warning"))
        self.reconfigure(self.settings.with_(device="cpu"))

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
                 output_path: str | Path | None = None) -> Iterator[object]:
        """Yield LogEvent / ProgressEvent / ResultEvent (one per image) / ErrorEvent, then stop."""
        cancel = cancel or CancelToken()
        events: queue.Queue = queue.Queue()
        done = object()

        def emit(event) -> None:
            if isinstance(event, LogEvent):
                log.log(logging.WARNING if event.level == "warning" else logging.INFO, event.message)
            events.put(event)

        def worker():
            try:
                self._run(request, cancel, output_path, emit)
            finally:
                events.put(done)

        thread = threading.Thread(target=worker, name="sdxl-generate", daemon=True)
        thread.start()
        try:
            while True:
                event = events.get()
                if event is done:
                    break
                yield event
        finally:
            # The consumer went away (closed tab, Ctrl-C, break): stop the run within one step.
            if thread.is_alive():
                cancel.cancel()

    def _run(self, request, cancel, output_path, emit) -> None:
        start = time.perf_counter()
        emit(LogEvent(f"🎨 Generating image for prompt: {request.prompt[:200]!r}"
                      f"{'…' if len(request.prompt) > 200 else ''}"))
        try:
            target = check_output_path(output_path, self.settings.outputs) if output_path else None
        except ValidationError as exc:  # before waiting for the device: a typo should not cost a queue slot
            emit(ErrorEvent(str(exc), "validation"))
            return
        if not self._device_lock.acquire(blocking=False):
            emit(LogEvent("Waiting for the device: another generation is running…"))
            while not self._device_lock.acquire(timeout=0.2):
                if cancel.cancelled:
                    emit(ErrorEvent("cancelled while waiting for the device", "cancelled"))
                    return
        progress = {"done": 0, "total": 0}
        device = "cpu"
        try:
            models, load_s = self.ensure_loaded(emit)
            device = self.plan.device
            self._generate_images(request, models, load_s, start, target, cancel, emit, progress)
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
                self._run(request, cancel, output_path, emit)  # once: _fell_back is now set
            else:
                log.exception("generation failed")
                emit(ErrorEvent(f"Generation failed: {type(exc).__name__}: {str(exc)[:300]}", "runtime"))
        finally:
            self._device_lock.release()

    def _generate_images(self, request, models, load_s, start, target, cancel, emit, progress) -> None:
        import torch

        from .optimize import apply, report

        size = models.source.native_size
        width, height = request.width or size, request.height or size
        high = request.quality is Quality.HIGH
        plan = adjust_plan(self.plan, make_plan(self.probe, self.settings, models.source.model_kind,
                                                width, height, high))
        use_refiner = plan.refiner and models.refiner is not None
        apply(plan, models)
        rep = report(models, plan, self.probe, use_refiner=use_refiner)
        steps = plan.steps_for(request.requested_steps)
        guidance = request.guidance_scale
        mode = "HIGH QUALITY" if high else "FAST"
        emit(LogEvent(f"Mode: {mode} (base steps={steps}, guidance={guidance:g})"
                      + (f" — {request.requested_steps} → {steps} on {plan.device.upper()}"
                         if steps != request.requested_steps else "")))
        emit(LogEvent("Refinement: " + (f"ENABLED (base to {REFINER_SPLIT}, refiner from {REFINER_SPLIT})"
                                        if use_refiner else _refiner_off(plan))))
        for line in rep.log_lines():
            emit(LogEvent(line))
        self._warn_truncation(models.base, request, emit)

        sampler = request.sampler
        # Always from the model's original config: a previous sampler's options (e.g. Karras sigmas) must not leak.
        models.base.scheduler = _scheduler_for(sampler, models.scheduler_config)
        if models.refiner is not None:
            models.refiner.scheduler = _scheduler_for(sampler, models.scheduler_config)
        seed0 = request.seed if request.seed is not None else random.randint(0, MAX_SEED)
        progress["total"] = steps * request.images
        t_run = time.perf_counter()

        def on_step(stage_label: str):
            def callback(pipe, i, t, kwargs):
                progress["done"] += 1
                elapsed = time.perf_counter() - t_run
                rate = elapsed / progress["done"]
                remaining = progress["total"] - progress["done"]
                preview = None
                if progress["done"] % PREVIEW_EVERY == 0 or remaining == 0:
                    preview = latent_preview(kwargs["latents"])
                emit(ProgressEvent(progress["done"], progress["total"], elapsed, rate * remaining, rate,
                                   stage_label, preview))
                if cancel.cancelled:
                    raise Cancelled()
                return kwargs
            return callback

        def stage_done(stage):
            if stage == 1 and use_refiner:
                emit(LogEvent(f"⏱️ Stage 2/2: Refiner from {REFINER_SPLIT}…"))

        for index in range(request.images):
            seed = (seed0 + index) % (MAX_SEED + 1)
            t_image, done_before = time.perf_counter(), progress["done"]
            generator = torch.Generator("cpu").manual_seed(seed)
            common = dict(prompt=request.prompt, negative_prompt=request.negative_prompt or None,
                          num_inference_steps=steps, guidance_scale=guidance, generator=generator,
                          output_type="latent")
            stages = 2 if use_refiner else 1
            emit(LogEvent(f"⏱️ Stage 1/{stages}: Base generation "
                          f"(image {index + 1}/{request.images}, seed {seed})…"))
            with torch.inference_mode():
                latents = run_stages(
                    models, use_refiner, width, height, common, on_stage_end=stage_done,
                    on_step=lambda stage: on_step(f"Stage {stage}/{stages}" if use_refiner else ""))
                if cancel.cancelled:
                    raise Cancelled()
                t_decode = time.perf_counter()
                image = decode_latents(models.base, latents)
            emit(LogEvent(f"VAE decode {time.perf_counter() - t_decode:.1f} s"))
            steps_run = progress["done"] - done_before
            params = ImageParameters(
                prompt=request.prompt, negative_prompt=request.negative_prompt, steps=steps,
                sampler=SAMPLER_LABELS[sampler], cfg_scale=guidance, seed=seed, width=width, height=height,
                model=models.source.label, device=plan.device, dtype=plan.dtype, refiner=use_refiner,
                note=models.note,
            )
            generate_s = time.perf_counter() - t_image
            path, save_error = self._save(image, params, target, index, emit)
            timings = Timings(load_s=round(load_s if index == 0 else 0.0, 3), generate_s=round(generate_s, 3),
                              total_s=round(time.perf_counter() - start, 3))
            emit(ResultEvent(
                image=image, path=str(path) if path else None, seed=seed, index=index,
                steps_requested=request.requested_steps, steps_run=steps_run, refiner=use_refiner,
                timings=timings, report=rep, model=models.source.label, device=plan.device, dtype=plan.dtype,
                parameters=params.to_text(), save_error=save_error,
            ))

    def _warn_truncation(self, pipe, request, emit) -> None:
        tokenizer = pipe.tokenizer or pipe.tokenizer_2
        for field, text in (("prompt", request.prompt), ("negative_prompt", request.negative_prompt)):
            if not text:
                continue
            n = len(tokenizer(text, truncation=False).input_ids)
            limit = tokenizer.model_max_length
            if n > limit:
                emit(LogEvent(f"⚠ {field}: {n} tokens; CLIP reads {limit} (incl. start/end), "
                              f"{n - limit} tokens dropped", "warning"))

    def _save(self, image, params: ImageParameters, target: Path | None, index: int, emit):
        """Save the PNG; returns (path, None) or (None, error). A failed save never loses the image in memory."""
        extra = {"seed": params.seed, "model": params.model, "note": params.note}
        try:
            if target is not None:
                path = target if index == 0 else target.with_name(f"{target.stem}-{index}{target.suffix}")
                save_png(image, path, params, extra)
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
                with open(path, "xb") as f:
                    save_png(image, f, params, extra)
                return path
            except FileExistsError:
                continue


def run_stages(models, use_refiner: bool, width: int, height: int, common: dict, on_step=None,
               on_stage_end=None):
    """The denoising of one image, as latents: the base alone, or the base to REFINER_SPLIT and then the refiner
    from there (SDXL's "ensemble of experts"). The service and the benchmark both run exactly this.

    ``common``: the pipeline arguments both stages share (prompt, steps, guidance, generator, output_type);
    ``on_step(stage)`` returns the diffusers step callback for stage 1 or 2; ``on_stage_end(stage)`` is called
    after each stage (the bench uses it to time the stages)."""
    def callback(stage):
        return on_step(stage) if on_step else None

    latents = models.base(width=width, height=height, denoising_end=REFINER_SPLIT if use_refiner else None,
                          callback_on_step_end=callback(1), **common).images
    if on_stage_end:
        on_stage_end(1)
    if use_refiner:
        latents = models.refiner(image=latents, denoising_start=REFINER_SPLIT, callback_on_step_end=callback(2),
                                 **common).images
        if on_stage_end:
            on_stage_end(2)
    return latents


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
