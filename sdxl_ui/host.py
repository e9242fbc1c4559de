"""ModelHost: one model for one device — its settings, probe, source and load-time plan, the loaded pipelines, the
status the page shows, and the two locks every run takes.

What a run needs from the model, and what the form asks before any run (native size, steps note, quality defaults,
a model check, the plan) — without loading anything: the Ray backend holds one that never loads to answer the form.
The loaded models are read-only to others (``models``); only the host loads, swaps LoRAs or reconfigures.
"""
from __future__ import annotations

import logging
import threading
import time
from typing import Callable

from .adapters import apply_loras, check_files, profile_evidence
from .few_step import few_step
from .models import LoadedModels, ModelLoadError, ModelSource, check_source, load_models, resolve_source
from .optimizations.registry import Plan
from .policy import PlanError, make_plan
from .profiles import profile_named
from .schema import PRESETS, HardwareProbe, LogEvent, OptimizationReport, Quality, ServiceState
from .settings import AppSettings, Toggle

log = logging.getLogger("sdxl_ui")


class ModelHost:
    """Owns the loaded model (loaded once, reused) and its plan; a run borrows them under ``device_lock``."""

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
        self.load_lock = threading.Lock()
        self.device_lock = threading.RLock()  # re-entrant: the one-time CPU fallback re-runs inside the lock
        self.load_error: str | None = None
        self.loading = False

    # ------------------------------------------------------------ what the form asks (nothing loads)
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
    def models(self) -> LoadedModels | None:
        """The loaded pipelines (None before the first load); read-only to everything but the host."""
        return self._models

    @property
    def loaded(self) -> bool:
        return self._models is not None

    @property
    def plan(self) -> Plan:
        """The load-time plan (native size, high quality)."""
        if self._plan is None:
            profile = self.profile_evidence
            size = self.size(profile_named(profile[0] if self.settings.profile == "auto" else self.settings.profile))
            self._plan = make_plan(self.probe, self.settings, self.model_size, size, size, True, profile=profile)
        return self._plan

    def size(self, profile) -> int:
        """The native side: a folder's own configs say it; else (hub id, single file) the profile's (Turbo: 512)."""
        source = self.source
        if source.kind in ("folder", "tiny") or profile.native_size is None:
            return source.native_size
        return profile.native_size

    @property
    def profile_evidence(self) -> tuple[str, str]:
        """(profile, why) from the model's and the LoRAs' files (``--profile`` overrides it in the plan)."""
        return profile_evidence(self.source, self.settings.loras)

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

    def quality_defaults(self, quality: Quality) -> tuple[int, float]:
        """(steps, guidance) the page offers for a quality: the preset's, or the few-step profile's own (for
        Few-step: the family of the LoRA it adds)."""
        preset = PRESETS[quality]
        try:
            name = self.plan.profile
            if quality is Quality.FEW_STEP:
                found = few_step(self)
                name = found[1][0] if found else name
        except (ModelLoadError, PlanError):
            return preset.steps, preset.guidance
        return profile_named(name).defaults(quality.high, preset.steps, preset.guidance)

    def steps_note(self, requested: int) -> str:
        """E.g. '50 → 35 on CPU' (the steps policy), or '' when steps run as requested."""
        try:
            plan = self.plan
        except (ModelLoadError, PlanError):
            return ""
        run = plan.steps_for(int(requested))
        return f"{int(requested)} → {run} on {plan.device.upper()} (× {plan.steps_factor:g})" if run != requested else ""

    # ------------------------------------------------------------ what the last run left, and the status
    def applied(self, models: LoadedModels, plan: Plan, use_refiner: bool) -> None:
        """A run put the loaded pipelines in ``plan``'s state: the status panel reports against it from now on."""
        self._applied = (models, plan, use_refiner)

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
            return {**out, "state": ServiceState.ERROR, "message": str(exc)}
        rep = self.current_report() or expected_report(plan, self.probe)
        state = (ServiceState.LOADED if self.loaded else ServiceState.LOADING if self.loading
                 else ServiceState.ERROR if self.load_error else ServiceState.NOT_LOADED)
        return {**out, "device": plan.device, "dtype": plan.dtype, "state": state, "message": self.load_error,
                "rows": rep.to_list(), "source": rep.source}

    # ------------------------------------------------------------ load, swap, reconfigure
    def set_loras(self, loras) -> None:
        """Change the fused LoRAs of the loaded model (all or nothing: a LoraError leaves model and settings as
        they were). With int8 layers, a compiled UNet or sequential offload (weights held by accelerate's hooks)
        they cannot be swapped in place: the model is reloaded with the new set."""
        settings = self.settings.with_(loras=tuple(loras))
        with self.device_lock, self.load_lock:
            models = self._models
            plan = self.applied_plan or self._plan
            if models is not None and not (plan is not None and (plan.int8 or plan.compile
                                                                  or plan.offload == "sequential")):
                apply_loras(models.base, settings.loras, self.settings.local_files_only)
                self.settings, self._plan, self._applied = settings, None, None
                return
        self.reconfigure(settings)

    def reconfigure(self, settings: AppSettings) -> None:
        """Switch model/settings (e.g. 'continue with the demo model'); the next run loads afresh.

        Takes the device lock first (the order every run takes them in): a running generation keeps its models and
        its plan until it ends, instead of finding them gone between two steps."""
        with self.device_lock, self.load_lock:
            self.settings = settings
            self._models = None
            self._plan = None
            self._applied = None
            self.load_error = None

    def ensure_loaded(self, emit: Callable[[object], None] | None = None) -> tuple[LoadedModels, float]:
        """Load once; returns (models, seconds spent loading in this call)."""
        emit = emit or _log_event
        if not self.load_lock.acquire(blocking=False):  # another thread (the app's preload) is loading
            emit(LogEvent("The model is still loading (started when the app launched)…"))
            waited = time.perf_counter()
            while not self.load_lock.acquire(timeout=3.0):
                emit(LogEvent(f"… still loading the model ({time.perf_counter() - waited:.0f} s)"))
        try:
            return self._load_locked(emit)
        finally:
            self.load_lock.release()

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
        from .optimize import after_load

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
            for line in after_load(models, source, self.settings):  # what the units load beside the model
                emit(LogEvent(line))
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


def _log_event(event) -> None:
    if isinstance(event, LogEvent):
        log.info(event.message)


def _tick(stop: threading.Event, emit, every_s: float = 3.0) -> None:
    """Loading has no progress callback: say every few seconds that it is still going."""
    start = time.perf_counter()
    while not stop.wait(every_s):
        emit(LogEvent(f"… still loading the model ({time.perf_counter() - start:.0f} s)"))
