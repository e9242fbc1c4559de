"""RayBackend: the same seam as the in-process service, served by Ray Serve replicas (one device each).

Layout (issue 14):

* ``Worker`` and ``Registry`` (``sdxl_ui.backends.ray_worker``) are the deployment: one replica per device, each
  running an ordinary ``GenerationService``, and the actor they report their state to.
* ``RayBackend`` (here) is what the page, the CLI and the API hold. It starts a local Ray instance
  (``--workers N``) or connects to a cluster (``--ray-address``), deploys the workers, sends each job through
  ``handle.options(stream=True)`` and turns Stop into ``DeploymentResponseGenerator.cancel()``, which raises
  ``CancelledError`` inside the replica's generator; the replica then sets the job's CancelToken and the run ends
  within one step. ``shutdown()`` stops what it started and nothing else.

Job admission is ``sdxl_ui.jobs``'s. Every event carries the job's id (``job_id``, made here and passed to the
replica) and the replica that ran it (``replica``): that is how this side knows the worker, never the log text.

Ray is imported only here, only when this backend is used (``requirements-serve.txt``); joining a cluster that
uses token authentication is ``sdxl_ui.backends.ray_auth``.
"""
from __future__ import annotations

import asyncio
import logging
import math
import os
import threading
import time
from pathlib import Path
from typing import Iterator

from ..jobs import SHUTTING_DOWN, Admission, CancelToken, Capabilities, new_job_id
from ..schema import (ErrorEvent, ErrorKind, Event, GenerationRequest, LogEvent, LogLevel, ProgressEvent, ResultEvent,
                      ServiceState)
from ..settings import AppSettings, DeviceChoice
from .ray_auth import connect
from .ray_worker import DEPLOYMENT, NAMESPACE, STALE_S, Registry, Worker

log = logging.getLogger("sdxl_ui")


def _absolute_settings(settings: AppSettings, threads: int) -> AppSettings:
    """Replicas run in other processes (other folders, other machines): paths are made absolute here, and each CPU
    replica gets threads for its own CPU share instead of all the machine's cores."""
    changes: dict = {"outputs": Path(settings.outputs).expanduser().absolute()}
    model = str(settings.model)
    if model.startswith(("/", "~", ".")) or Path(model).exists():
        changes["model"] = str(Path(model).expanduser().absolute())
    if threads and not settings.threads:
        changes["threads"] = threads
    return settings.with_(**changes)


def default_workers(probe=None) -> int:
    """One replica per GPU on this machine; one on a machine without a usable GPU."""
    if probe is None:
        from ..device import probe_hardware

        probe = probe_hardware()
    if probe.cuda.available and probe.cuda.kernel_ok is not False:
        try:
            import torch

            return max(1, torch.cuda.device_count())
        except Exception:  # noqa: BLE001
            return 1
    return 1


class RayBackend:
    """Jobs go to Ray Serve replicas; the page, the CLI and the API see the same seam as the local service."""

    # A pool to start (or join) before the first job, on workers that may be other machines (a path here is no
    # path there); no per-profile quality defaults or LoRA switching from the page (the replicas own their models).
    capabilities = Capabilities(quality_defaults=False, loras=False, start=True, local_files=False)

    def __init__(self, settings: AppSettings, workers: int | None = None, address: str | None = None,
                 cpus_per_worker: float = 1.0, use_gpus: bool | None = None, app_name: str = "sdxl_ui",
                 ray_init: dict | None = None, probe=None, attach: bool = False):
        """``attach=True``: use the workers an app already deployed on the cluster at ``address`` (the CLI sending
        a job to the team's workers); nothing is deployed, and ``shutdown`` only disconnects."""
        if workers is not None and workers < 1:
            from ..schema import ValidationError

            raise ValidationError("workers", workers, "must be 1 or more")
        if cpus_per_worker <= 0:
            from ..schema import ValidationError

            raise ValidationError("worker_cpus", cpus_per_worker, "must be more than 0")
        try:
            import ray  # noqa: F401
            from ray import serve  # noqa: F401
        except ImportError as exc:
            from ..schema import ValidationError

            raise ValidationError("workers", workers if address is None else address,
                                  f"needs Ray Serve, which is not installed ({exc}): "
                                  "pip install -r requirements-serve.txt") from None
        self.settings = settings
        self._workers = workers
        self._address = address
        self._cpus = cpus_per_worker
        self._use_gpus = use_gpus
        self._app = app_name
        self._ray_init = dict(ray_init or {})
        self._probe = probe
        self._attach = attach
        self._host = None  # for the form's cheap questions (native size, steps policy): no model load
        self._handle = None
        self._registry = None
        self._started_ray = False
        self._started_serve = False
        self._joined = False
        self._admission = Admission()  # the running jobs; none new after shutdown()
        self.concurrency = workers or 1

    # ------------------------------------------------------------ start / stop
    def start(self) -> "RayBackend":
        """Start (or join) Ray, start Serve if it is not running, deploy the workers; returns at once while the
        replicas load (the status panel follows them)."""
        import ray
        from ray import serve

        if ray.is_initialized():  # this process already joined or started Ray (e.g. a second app): use it as is
            pass
        elif self._address:
            connect(self._address, namespace=NAMESPACE, **self._ray_init)  # a refused token: one clear line
            self._joined = True
        else:
            # default: one replica per GPU of this machine; one on a machine without a usable GPU
            workers = self._workers or (default_workers(self._probe) if self._gpus_per_worker() else 1)
            self._workers = workers
            kwargs = {"include_dashboard": False, "namespace": NAMESPACE, "log_to_driver": False}
            kwargs.update(self._ray_init)
            kwargs.setdefault("num_cpus", max(os.cpu_count() or 1, math.ceil(workers * self._cpus)))
            ray.init(address="local", **kwargs)
            self._started_ray = True
        registry_name = f"{self._app}-registry"
        if self._attach:
            self._registry = ray.get_actor(registry_name, namespace=NAMESPACE)  # ValueError: no such app
            self._handle = serve.get_deployment_handle(DEPLOYMENT, app_name=self._app).options(stream=True)
            replicas = self.replicas()
            self._workers = self.concurrency = max(1, len(replicas))
            model = next((r["model"] for r in replicas if r.get("model")), None)
            if model:  # the workers' model is the one that runs: name it (PNG, JSON, note)
                self.settings = self.settings.with_(model=model)
                self._host = None
            return self
        if self._workers is None:  # an existing cluster: one replica per GPU in it, else one
            self._workers = int(ray.cluster_resources().get("GPU", 0)) or 1
        self.concurrency = self._workers
        self._started_serve = not _serve_running()
        serve.start(proxy_location="Disabled")
        self._registry = ray.remote(num_cpus=0)(Registry).options(name=registry_name, namespace=NAMESPACE,
                                                                   get_if_exists=True).remote()
        self._deploy(registry_name)
        log.info("Ray Serve: %d worker replica(s) starting (%s)", self._workers,
                 f"cluster {self._address}" if self._address else "local Ray on this machine")
        return self

    def _gpus_per_worker(self) -> float:
        if self._use_gpus is False or self.settings.device in (DeviceChoice.CPU, DeviceChoice.MPS):
            return 0
        if self._address:
            import ray

            return 1 if ray.cluster_resources().get("GPU", 0) >= 1 else 0
        return 1 if self._has_gpu() else 0

    def _has_gpu(self) -> bool:
        try:
            probe = self._probe
            if probe is None:
                from ..device import probe_hardware

                probe = self._probe = probe_hardware()
            return bool(probe.cuda.available and probe.cuda.kernel_ok is not False)
        except Exception:  # noqa: BLE001
            return False

    def _deploy(self, registry_name: str) -> None:
        from ray import serve

        gpus = self._gpus_per_worker()
        settings = self.settings
        if not gpus and settings.device is DeviceChoice.AUTO:
            settings = settings.with_(device="cpu")  # a replica without a GPU share must not find one
        settings = _absolute_settings(settings, threads=0 if gpus else max(1, int(self._cpus)))
        options = {"num_cpus": 0 if gpus else self._cpus, "num_gpus": gpus}
        deployment = serve.deployment(
            Worker, name=DEPLOYMENT, num_replicas=self._workers, max_ongoing_requests=1,
            ray_actor_options=options, health_check_period_s=2.0, graceful_shutdown_timeout_s=60.0,
            max_constructor_retry_count=3 * self._workers)
        serve.run_many([serve.RunTarget(deployment.bind(settings, registry_name), name=self._app,
                                        route_prefix=None)],
                       wait_for_applications_running=False)
        self._handle = serve.get_deployment_handle(DEPLOYMENT, app_name=self._app).options(stream=True)

    def shutdown(self, timeout: float = 120.0) -> bool:
        """No new jobs; the running ones stop at their next step; then remove what this app started: its Serve
        application and registry always, Serve itself and the Ray instance only if it started them."""
        import ray
        from ray import serve

        clean = self._admission.close(timeout)
        if not ray.is_initialized():
            return clean
        if self._attach:
            if self._joined:
                ray.shutdown()  # disconnect; the app that deployed the workers keeps them
            return clean
        try:
            # graceful: each replica's __del__ lets a job that is saving an image finish it
            serve.delete(self._app)
            if self._started_serve and not self._started_ray and not serve.status().applications:
                serve.shutdown()  # on a cluster: Serve only if this app started it and nothing else uses it
            if self._registry is not None:
                ray.kill(self._registry)
        except Exception:  # noqa: BLE001 - the cluster may already be gone
            log.warning("Ray Serve: could not remove the application cleanly", exc_info=True)
            clean = False
        if self._started_ray or (self._address and self._joined):
            ray.shutdown()  # a local instance we started stops; from a cluster we only disconnect
        return clean

    # ------------------------------------------------------------ the form's questions (no model load)
    @property
    def _local(self):
        if self._host is None:
            from ..host import ModelHost

            device_settings = self.settings if self._has_gpu() else self.settings.with_(device="cpu")
            self._host = ModelHost(device_settings, probe_fn=self._probe_or_probe)  # never loads
        return self._host

    def _probe_or_probe(self):
        if self._probe is None:
            from ..device import probe_hardware

            self._probe = probe_hardware()
        return self._probe

    def native_size(self) -> int:
        return self._local.native_size()

    def steps_note(self, requested: int) -> str:
        # The steps policy depends on the device: this machine's plan is the workers' plan only when they run
        # here. On a cluster each replica plans for its own hardware (its log says "50 → 35 on CPU" if so).
        return "" if self._address else self._local.steps_note(requested)

    def check_model(self):
        return self._local.check_model()

    @property
    def plan(self):
        """This machine's plan (the workers' plan with --workers). On a cluster the replicas plan for their own
        hardware, so a device this machine lacks is no error here."""
        if not self._address:
            return self._local.plan
        from ..policy import PlanError

        try:
            return self._local.plan
        except PlanError:
            return None

    @property
    def source(self):
        return self._local.source

    def preload_in_background(self):
        return None  # the replicas load their models themselves, in their constructors

    def reconfigure(self, settings: AppSettings) -> None:
        """Another model for every replica (the operator's 'continue with the demo model'): Serve replaces the
        replicas with ones built with the new settings."""
        self.settings = settings
        self._host = None
        self._deploy(f"{self._app}-registry")

    # ------------------------------------------------------------ status
    def replicas(self) -> list[dict]:
        import ray

        if self._registry is None:
            return []
        try:
            reports = ray.get(self._registry.snapshot.remote(), timeout=5)
        except Exception as exc:  # noqa: BLE001
            return [{"replica": "?", "state": "error", "message": f"registry unreachable: {exc}"}]
        for report in reports:
            if report.get("state") not in ("error", "stopped") and report.get("age_s", 0) > STALE_S:
                report["state"] = "gone"
                report["message"] = (f"no report for {report['age_s']:.0f} s: the replica died or its node is "
                                     "unreachable; Ray starts a replacement")
        return sorted(reports, key=lambda r: (r.get("node", ""), str(r.get("replica"))))

    def _app_status(self) -> tuple[str, str]:
        from ray import serve

        try:
            app = serve.status().applications.get(self._app)
        except Exception as exc:  # noqa: BLE001
            return "UNKNOWN", str(exc)
        if app is None:
            return "NOT_STARTED", ""
        return str(getattr(app.status, "value", app.status)), app.message or ""

    def status(self) -> dict:
        """The page's status panel: one line for the whole pool, then each replica with its own read-back report
        (replicas on different hardware can differ)."""
        replicas = self.replicas()
        ready = [r for r in replicas if r.get("state") in ("idle", "busy")]
        failed = [r for r in replicas if r.get("state") == "error"]
        app_state, app_message = self._app_status()
        first = ready[0] if ready else (replicas[0] if replicas else {})
        if ready:
            state = ServiceState.LOADED
        elif failed and app_state in ("DEPLOY_FAILED", "UNHEALTHY"):
            state = ServiceState.ERROR
        else:
            state = ServiceState.LOADING
        devices = sorted({f"{r.get('device', '?')}" for r in ready}) or ["?"]
        message = None
        if failed:
            message = (f"{len(failed)} replica(s) could not load the model and get no jobs: "
                       f"{failed[-1].get('message')}")
        elif not ready and app_state == "DEPLOY_FAILED":
            message = app_message
        return {
            "model": self.settings.model, "note": first.get("note"),
            "device": f"{len(ready)}/{self._workers} replicas ready ({', '.join(devices)})",
            "dtype": first.get("dtype", "?"), "state": state, "message": message, "rows": [],
            "source": first.get("source"), "replicas": replicas, "backend": "ray",
        }

    # ------------------------------------------------------------ jobs
    def generate(self, request: GenerationRequest, cancel: CancelToken | None = None,
                 output_path: str | Path | None = None, job_id: str | None = None) -> Iterator[Event]:
        cancel = cancel or CancelToken()
        job_id = job_id or new_job_id()
        finished = threading.Event()
        if not self._admission.admit(cancel, finished):
            yield ErrorEvent(SHUTTING_DOWN, ErrorKind.BUSY, job_id=job_id)
            return
        try:
            yield from self._generate(request, cancel, output_path, job_id)
        finally:
            finished.set()
            self._admission.done(cancel)

    def _wait_for_a_replica(self, cancel: CancelToken, job_id: str) -> Iterator[Event]:
        """Until a replica has loaded its model: say so every few seconds; an error if none can."""
        said = 0.0
        start = time.monotonic()
        while True:
            replicas = self.replicas()
            if any(r.get("state") in ("idle", "busy") for r in replicas):
                return
            app_state, app_message = self._app_status()
            failed = [r for r in replicas if r.get("state") == "error"]
            if app_state in ("DEPLOY_FAILED", "UNHEALTHY") and not any(
                    r.get("state") == "loading" for r in replicas):
                reason = failed[-1].get("message") if failed else app_message
                yield ErrorEvent(f"No worker could load the model: {reason}", ErrorKind.MODEL, job_id=job_id)
                return
            if cancel.cancelled:
                yield ErrorEvent("cancelled while waiting for a worker", ErrorKind.CANCELLED, job_id=job_id)
                return
            waited = time.monotonic() - start
            if waited - said >= 3.0 or said == 0.0:
                said = waited or 0.001
                yield LogEvent(f"Waiting for a worker to load the model ({waited:.0f} s)…", job_id=job_id)
            cancel.wait(1.0)

    def _generate(self, request, cancel, output_path, job_id: str) -> Iterator[Event]:
        for event in self._wait_for_a_replica(cancel, job_id):
            yield event
            if isinstance(event, ErrorEvent):
                return
        out = str(Path(output_path).expanduser().absolute()) if output_path is not None else None
        for attempt in (1, 2):
            seen = {"received": 0, "results": 0, "progress": None, "worker": ""}
            response = self._handle.generate.remote(request, out, job_id)
            watcher_done = threading.Event()
            threading.Thread(target=_cancel_on, args=(cancel, response, watcher_done), daemon=True).start()
            try:
                for event in response:
                    _note(event, seen)
                    yield event
                return
            except GeneratorExit:  # the consumer went away (closed tab): stop the job within one step
                response.cancel()
                raise
            except Exception as exc:  # noqa: BLE001 - sorted below: cancelled, or the worker failed
                if not (cancel.cancelled or _is_cancellation(exc)) and seen["received"] == 0 and attempt == 1:
                    # Nothing ran (the replica died before it took the job): another replica can take it.
                    log.warning("Ray Serve: job not started (%s: %s); sending it again", type(exc).__name__, exc)
                    yield LogEvent("⚠ The worker chosen for this job was lost before it started; trying another…",
                                   LogLevel.WARNING, job_id=job_id)
                    continue
                yield from _job_failed(exc, cancel, seen, job_id)
                return
            finally:
                watcher_done.set()


def _note(event, seen: dict) -> None:
    """What the client side keeps of a job's events: which replica runs it (the events' own ``replica`` field),
    how far it got; the replica's log lines go to this process's log too, prefixed with its id."""
    seen["received"] += 1
    seen["worker"] = getattr(event, "replica", "") or seen["worker"]
    match event:
        case LogEvent():
            log.log(logging.WARNING if event.level is LogLevel.WARNING else logging.INFO, "[%s] %s",
                    seen["worker"] or "?", event.message)
        case ProgressEvent():
            seen["progress"] = event
        case ResultEvent():
            seen["results"] += 1


def _job_failed(exc: Exception, cancel: CancelToken, seen: dict, job_id: str) -> Iterator[Event]:
    """The events that end a job whose stream broke: cancelled (Stop, a closed tab), or its worker stopped."""
    worker, last_progress, results = seen["worker"] or "?", seen["progress"], seen["results"]
    if cancel.cancelled or _is_cancellation(exc):
        done = f"{last_progress.step}/{last_progress.total}" if last_progress else "0/?"
        msg = f"cancelled at step {done}"
        log.info("[%s] ⏹ %s", worker, msg)
        yield LogEvent(f"⏹ {msg}", job_id=job_id, replica=seen["worker"])
        yield ErrorEvent(msg, ErrorKind.CANCELLED, job_id=job_id, replica=seen["worker"])
        return
    where = (f"at step {last_progress.step}/{last_progress.total}" if last_progress
             else "before its first step")
    kept = f"; the {results} image(s) already sent were saved" if results else ""
    msg = (f"The worker running this job ({worker}) stopped {where} ({type(exc).__name__}). "
           f"Nothing more was saved{kept}. Ray restarts the worker; try again.")
    log.error("Ray Serve: %s — %s", msg, str(exc).splitlines()[0][:300] if str(exc) else "")
    yield ErrorEvent(msg, ErrorKind.RUNTIME, job_id=job_id, replica=seen["worker"])


def _cancel_on(cancel: CancelToken, response, done: threading.Event) -> None:
    """Stop (the job's CancelToken) cancels the streaming response; Serve then cancels the replica's generator."""
    while not done.is_set():
        if cancel.wait(0.1):
            if not done.is_set():
                response.cancel()
            return


def _is_cancellation(exc: BaseException) -> bool:
    import concurrent.futures

    from ray.exceptions import TaskCancelledError
    from ray.serve.exceptions import RequestCancelledError

    return isinstance(exc, (TaskCancelledError, RequestCancelledError, asyncio.CancelledError,
                            concurrent.futures.CancelledError))


def _serve_running() -> bool:
    import ray

    try:
        ray.get_actor("SERVE_CONTROLLER_ACTOR", namespace="serve")
        return True
    except ValueError:
        return False


__all__ = ["RayBackend", "Worker", "Registry", "default_workers"]  # Worker, Registry: from ray_worker
