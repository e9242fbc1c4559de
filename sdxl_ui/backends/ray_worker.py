"""The Ray Serve deployment of issue 14: ``Worker`` (one replica: one device, one ``GenerationService``) and
``Registry`` (the small actor the replicas report to).

* ``Worker`` is the deployment's body. Each replica owns one device (``num_gpus=1``, or a CPU share) and runs an
  ordinary ``GenerationService`` on it: load, plan, read-back report, generate, cancel. Its ``generate`` is an
  async generator: the page's events (log lines, per-step progress with ETA and previews, results) are yielded as
  they come, as the same typed dataclasses, pickled by Ray, each stamped with this replica's id (``replica``) and
  the job's id (``job_id``). ``max_ongoing_requests=1``: one job per replica.
* ``Registry`` is a small actor the replicas report to every ``HEARTBEAT_S`` (node, pid, device, model, state and
  the optimization report read back from their own pipeline), so the status panel can list each replica: a
  deployment handle routes to *some* replica and cannot ask a chosen one.

The client side (``RayBackend``: start, deploy, send jobs, status) is ``sdxl_ui.backends.ray_serve``. Ray is
imported only inside the replica's process, when this deployment runs (``requirements-serve.txt``).
"""
from __future__ import annotations

import asyncio
import logging
import os
import socket
import threading
import time
from dataclasses import replace

from ..jobs import CancelToken
from ..schema import ErrorEvent, ErrorKind, GenerationRequest, LogEvent
from ..settings import AppSettings

log = logging.getLogger("sdxl_ui")

NAMESPACE = "sdxl_ui"
DEPLOYMENT = "SDXLWorker"
HEARTBEAT_S = 1.0  # how often a replica reports its state to the registry
STALE_S = 6.0  # a replica silent this long is gone (killed, or its node lost); Ray starts a replacement
FAILED_SHOWN_S = 600.0  # a replica that could not load its model stays in the status panel this long


class Registry:
    """Per-replica reports, keyed by replica id; times are the registry's own clock (nodes' clocks differ)."""

    def __init__(self):
        self._reports: dict[str, dict] = {}
        self._seen: dict[str, float] = {}

    def update(self, replica: str, report: dict) -> None:
        self._reports[replica] = report
        self._seen[replica] = time.monotonic()

    def snapshot(self) -> list[dict]:
        now = time.monotonic()
        out = []
        for replica, report in list(self._reports.items()):
            age = now - self._seen[replica]
            if report.get("state") == "error":
                if age > FAILED_SHOWN_S:
                    del self._reports[replica], self._seen[replica]
                    continue
            elif report.get("state") == "stopped" or age > STALE_S * 10:
                del self._reports[replica], self._seen[replica]
                continue
            out.append({**report, "age_s": round(age, 1)})
        return out


class Worker:
    """One replica: one device, one ``GenerationService``, one job at a time.

    The model loads in the constructor, so a replica takes jobs only once it is loaded; one that cannot load
    reports why to the registry and raises, so Ray never routes a job to it (and retries it a few times)."""

    def __init__(self, settings: AppSettings, registry_name: str):
        import ray
        from ray import serve

        from ..service import GenerationService

        self._registry = ray.get_actor(registry_name, namespace=NAMESPACE)
        context = serve.get_replica_context()
        self._replica = context.replica_id.unique_id
        self._node = f"{socket.gethostname()} ({ray.util.get_node_ip_address()})"
        self._pid = os.getpid()
        self._service = GenerationService(settings)
        self._state = "loading"
        self._jobs = 0
        self._stop = threading.Event()
        self._report_now()
        threading.Thread(target=self._heartbeat, name="sdxl-heartbeat", daemon=True).start()
        try:
            self._service.check_model()
            self._service.ensure_loaded()
        except Exception as exc:  # noqa: BLE001 - reported to the status panel, then the replica fails to start
            self._state = "error"
            self._error = f"replica on {self._node}: {str(exc).strip() or type(exc).__name__}"
            self._stop.set()
            try:  # delivered before the replica fails: a report sent fire-and-forget dies with the process
                ray.get(self._registry.update.remote(self._replica, self._report()), timeout=10)
            except Exception:  # noqa: BLE001
                log.warning("could not report the load failure to the registry", exc_info=True)
            log.error("replica %s on %s could not load its model: %s", self._replica, self._node, exc)
            raise
        self._state = "idle"
        self._report_now()
        log.info("replica %s on %s ready (pid %d)", self._replica, self._node, self._pid)

    # -- status
    def _report(self) -> dict:
        try:
            status = self._service.status()
        except Exception as exc:  # noqa: BLE001 - a status read must never kill the heartbeat
            status = {"state": "error", "message": f"status failed: {exc}"}
        state = self._state
        return {**status, "replica": self._replica, "node": self._node, "pid": self._pid,
                "state": state, "jobs": self._jobs,
                "message": getattr(self, "_error", None) if state == "error" else status.get("message")}

    def _report_now(self) -> None:
        """The full report (the optimization rows read back from the pipeline): at start, after the load, after
        each job. Between those the heartbeat resends it with the current state only (cheap: no pipeline read)."""
        self._last = self._report()
        self._send(self._last)

    def _send(self, report: dict) -> None:
        try:
            self._registry.update.remote(self._replica, report)
        except Exception:  # noqa: BLE001 - the registry went away (app shutting down)
            log.debug("registry update failed", exc_info=True)

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            self._send({**self._last, "state": self._state, "jobs": self._jobs})

    # -- jobs
    async def generate(self, request: GenerationRequest, output_path: str | None = None, job_id: str = ""):
        """The job's events, as the in-process service yields them, after one line naming this replica; each
        carries ``job_id`` (the caller's id for the job) and ``replica`` (this replica's id)."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        done = object()
        token = CancelToken()

        def pump():
            try:
                for event in self._service.generate(request, cancel=token, output_path=output_path, job_id=job_id):
                    loop.call_soon_threadsafe(events.put_nowait, event)
            except BaseException as exc:  # noqa: BLE001 - becomes the job's error event
                log.exception("replica %s: job failed", self._replica)
                loop.call_soon_threadsafe(events.put_nowait, ErrorEvent(
                    f"Generation failed on worker {self._replica}: {type(exc).__name__}: {str(exc)[:300]}",
                    ErrorKind.RUNTIME, job_id=job_id))
            finally:
                loop.call_soon_threadsafe(events.put_nowait, done)

        self._state = "busy"
        self._jobs += 1
        self._send({**self._last, "state": self._state, "jobs": self._jobs})
        thread = threading.Thread(target=pump, name="sdxl-replica-job", daemon=True)
        thread.start()
        try:
            # For the people reading the log; code reads the ``replica`` field of the events.
            yield LogEvent(f"🖥 Worker {self._replica} on {self._node}, pid {self._pid}, "
                           f"{self._device_label()}", job_id=job_id, replica=self._replica)
            while True:
                event = await events.get()
                if event is done:
                    break
                yield replace(event, replica=self._replica)
        finally:
            # Normal end, or the caller cancelled the streaming response (Stop, closed tab): Serve raises
            # CancelledError at the await above. The run then stops within one step.
            token.cancel()
            # The state is idle once this job's thread has let go of the device (a cancelled run finishes its
            # current step first), read by the next heartbeat.
            threading.Thread(target=self._idle_after, args=(thread,), daemon=True).start()

    def _idle_after(self, thread: threading.Thread) -> None:
        thread.join()
        if self._state == "busy":
            self._state = "idle"
        self._report_now()

    def _device_label(self) -> str:
        try:
            plan = self._service.plan
            return f"{plan.device.upper()} {plan.dtype}"
        except Exception:  # noqa: BLE001
            return "device ?"

    def pid(self) -> int:
        return self._pid

    def __del__(self):
        # Serve calls this on graceful shutdown: let a running job finish its step and any image being saved.
        stop = getattr(self, "_stop", None)
        if stop is None or getattr(self, "_state", None) == "error":  # a failed load stays reported
            return
        stop.set()
        self._service.shutdown(30.0)
        self._state = "stopped"
        self._report_now()


__all__ = ["DEPLOYMENT", "NAMESPACE", "Registry", "Worker"]
