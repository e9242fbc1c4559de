"""GenerationService: a validated request in, a stream of typed events out — the thin in-process backend.

It holds a ``ModelHost`` (the model, its plan and status, the locks) and admits jobs: each runs in a worker thread
as a ``Run`` (``run.py``: prepare, then per image denoise → decode → save → result); events cross to the caller
through a queue, so any front end (CLI, Python API, Gradio) just iterates. One generation at a time per device (the
host's device lock); a CancelToken stops a run within one step; a caller that stops iterating (closed browser tab)
cancels its run too; a GPU that fails on a real step falls back to the CPU, once.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Callable, Iterator

from .adapters import LoraError
from .denoise import decode_latents, run_stages  # noqa: F401 - re-exported (tests, bench)
from .failures import is_gpu_failure, is_out_of_memory, memory_advice
from .host import ModelHost
from .jobs import (LOCAL_SERVICE, SHUTTING_DOWN, Admission, CancelToken,  # noqa: F401 - CancelToken: importable here
                   new_job_id)
from .models import LoadedModels, ModelLoadError, ModelSource
from .optimizations.registry import Plan, parse_switches
from .policy import PlanError
from .image_run import kind_of
from .run import PREVIEW_EVERY, Cancelled, Progress, Run  # noqa: F401 - re-exported
from .saving import check_output_path, write_png_atomic  # noqa: F401 - re-exported (CLI, API)
from .schema import ErrorEvent, ErrorKind, GenerationRequest, HardwareProbe, LogEvent, LogLevel, OptimizationReport, \
    Quality, ValidationError
from .settings import AppSettings

log = logging.getLogger("sdxl_ui")


class GenerationService:
    """The in-process backend: one ``ModelHost``, one job at a time on its device."""

    concurrency = 1  # the seam (backends.Backend): one job at a time on this process's device
    capabilities = LOCAL_SERVICE  # quality_defaults, set_loras; nothing to start; saves on this machine

    def __init__(self, settings: AppSettings | None = None, probe: HardwareProbe | None = None,
                 probe_fn: Callable[[], HardwareProbe] | None = None, source: ModelSource | None = None,
                 loader: Callable[..., LoadedModels] | None = None, host: ModelHost | None = None):
        """``source`` and ``loader`` (same arguments as ``load_models``) replace the model from the settings, e.g.
        the selftest's full SDXL architecture with random weights; ``host``: an existing host instead."""
        self.host = host or ModelHost(settings, probe, probe_fn, source, loader)
        self._fell_back = False
        self._admission = Admission()  # jobs started and not yet finished; none new after shutdown()

    # ------------------------------------------------------------ the host's, for the front ends
    @property
    def settings(self) -> AppSettings:
        return self.host.settings

    @property
    def probe(self) -> HardwareProbe:
        return self.host.probe

    @property
    def source(self) -> ModelSource:
        return self.host.source

    @property
    def model_size(self):
        return self.host.model_size

    @property
    def models(self) -> LoadedModels | None:
        return self.host.models

    @property
    def loaded(self) -> bool:
        return self.host.loaded

    @property
    def loading(self) -> bool:
        return self.host.loading

    @property
    def load_error(self) -> str | None:
        return self.host.load_error

    @property
    def plan(self) -> Plan:
        return self.host.plan

    @property
    def applied_plan(self) -> Plan | None:
        return self.host.applied_plan

    @property
    def profile_evidence(self) -> tuple[str, str]:
        return self.host.profile_evidence

    def native_size(self) -> int:
        return self.host.native_size()

    def check_model(self) -> ModelSource:
        return self.host.check_model()

    def quality_defaults(self, quality: Quality) -> tuple[int, float]:
        return self.host.quality_defaults(quality)

    def steps_note(self, requested: int) -> str:
        return self.host.steps_note(requested)

    def offers(self) -> dict:
        from .few_step import offers

        return offers(self.host)

    def current_report(self) -> OptimizationReport | None:
        return self.host.current_report()

    def status(self) -> dict:
        return self.host.status()

    def set_loras(self, loras) -> None:
        self.host.set_loras(loras)

    def reconfigure(self, settings: AppSettings) -> None:
        self.host.reconfigure(settings)

    def ensure_loaded(self, emit: Callable[[object], None] | None = None) -> tuple[LoadedModels, float]:
        return self.host.ensure_loaded(emit)

    def preload_in_background(self) -> threading.Thread:
        return self.host.preload_in_background()

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
                log.log(logging.WARNING if event.level is LogLevel.WARNING else logging.INFO, event.message)
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
            yield ErrorEvent(SHUTTING_DOWN, ErrorKind.BUSY, job_id=job_id)
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

    def upscale(self, pictures: list, spec, cancel: CancelToken | None = None) -> list:
        """Pictures upscaled (``upscale_run``: A1111's extras) on this host's device, one job at a time with the
        generations; a ValidationError names the field before the job waits for the device."""
        from .upscale_run import check_upscale, upscale_pictures

        cancel = cancel or CancelToken()
        check_upscale(pictures, spec, self.settings.upscaler_dir)
        if not self._acquire_device(cancel, lambda event: None, None):
            raise Cancelled()
        try:
            return upscale_pictures(self.host, pictures, spec, cancel, log.info)
        finally:
            self.host.device_lock.release()

    def shutdown(self, timeout: float = 120.0) -> bool:
        """Stop taking jobs; stop the running ones at their next step (an image being decoded or saved is
        finished and saved first) and wait up to ``timeout`` s for them. True when nothing is left running."""
        return self._admission.close(timeout)

    def _run(self, request, cancel, output_path, emit, resume: Progress | None = None) -> None:
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
            emit(ErrorEvent(str(exc), ErrorKind.VALIDATION))
            return
        if not self._acquire_device(cancel, emit, resume):
            return
        progress = resume or Progress()
        device = "cpu"
        try:
            models, load_s = self.host.ensure_loaded(emit)
            device = self.host.plan.device
            try:
                kind_of(request)(self.host, request, models, emit, cancel, progress, target).images(load_s, start)
            finally:
                _release(models)  # the run hooks' release (model offload: nothing stays on the GPU)
        except LoraError as exc:  # bad input (exit 2), named by file and reason; the model is unchanged
            emit(ErrorEvent(str(exc), ErrorKind.VALIDATION))
        except Cancelled:
            msg = f"cancelled at step {progress.done}/{progress.total}"
            emit(LogEvent(f"⏹ {msg}"))
            emit(ErrorEvent(msg, ErrorKind.CANCELLED))
        except ValidationError as exc:
            emit(ErrorEvent(str(exc), ErrorKind.VALIDATION))
        except (ModelLoadError, PlanError) as exc:
            emit(ErrorEvent(str(exc), ErrorKind.MODEL))
        except Exception as exc:  # noqa: BLE001 - the user gets a message, the console the traceback
            if is_out_of_memory(exc):
                emit(ErrorEvent(f"Out of memory at step {progress.done}/{progress.total} on "
                                f"{device.upper()}: {memory_advice(device)}", ErrorKind.MEMORY))
            elif device != "cpu" and is_gpu_failure(exc) and not self._fell_back:
                self._fall_back_to_cpu(exc, emit)
                self._run(request, cancel, output_path, emit, resume=progress)  # once: _fell_back is now set
            else:
                log.exception("generation failed")
                emit(ErrorEvent(f"Generation failed: {type(exc).__name__}: {str(exc)[:300]}",
                                ErrorKind.RUNTIME))
        finally:
            self.host.device_lock.release()

    def _acquire_device(self, cancel: CancelToken, emit, resume) -> bool:
        """Wait for the device (one job at a time); False, with the job's ErrorEvent, when it was cancelled first."""
        lock = self.host.device_lock
        if not lock.acquire(blocking=False):
            emit(LogEvent("Waiting for the device: another generation is running…"))
            while not lock.acquire(timeout=0.2):
                if cancel.cancelled:
                    emit(ErrorEvent("cancelled while waiting for the device", ErrorKind.CANCELLED))
                    return False
        if cancel.cancelled and resume is None:  # e.g. shutdown() ran while this job was on its way to the lock
            lock.release()
            emit(ErrorEvent("cancelled before it started", ErrorKind.CANCELLED))
            return False
        return True

    def _fall_back_to_cpu(self, exc: Exception, emit) -> None:
        """The GPU passed its kernel test but failed on a real step: say so and continue on the CPU, once."""
        self._fell_back = True
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        emit(LogEvent(f"⚠ The GPU cannot run this model's kernels ({first}); falling back to CPU for this "
                      "session. `python -m sdxl_ui doctor` shows the GPU, its arch and torch's build.",
                      LogLevel.WARNING))
        self.host.reconfigure(self.host.settings.with_(device="cpu"))


def _release(models) -> None:
    """After a run, however it ended. A failing GPU must not hide the run's own error."""
    from .optimize import release

    try:
        release(models)
    except Exception:  # noqa: BLE001 - logged; the run's outcome is reported by the caller
        log.warning("could not move the models back to the CPU after the run", exc_info=True)
