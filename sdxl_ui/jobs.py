"""The job contract every backend shares: the cancel token, the ``Backend`` protocol and its ``Capabilities``, job
admission, and ``collect`` (a job's events gathered by type).

Layer 0 (docs/architecture.md): plain Python, no torch, gradio or ray. The in-process service
(``sdxl_ui.service``) and the Ray backend (``sdxl_ui.backends.ray_serve``) both take their jobs through one
``Admission``: no new job once shutdown has begun, and shutdown cancels and waits for the ones running.
"""
from __future__ import annotations

import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, Protocol, runtime_checkable

from .schema import ErrorEvent, Event, GenerationRequest, LogEvent, ProgressEvent, ResultEvent

SHUTTING_DOWN = "the app is shutting down and takes no new jobs"  # the ErrorEvent (kind "busy") a late job gets


class CancelToken:
    """Set by Stop (or a closed tab, or a signal); a running job stops within one step."""

    def __init__(self):
        self._event = threading.Event()

    def cancel(self) -> None:
        self._event.set()

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()

    def wait(self, timeout: float | None = None) -> bool:
        return self._event.wait(timeout)


def new_job_id() -> str:
    """A short id for one generate call, carried by each of its events (``job_id``)."""
    return uuid.uuid4().hex[:12]


class Admission:
    """Which jobs are running, and whether new ones are let in: written once, for every backend.

    ``admit(token, job, start)`` registers a job under its cancel token unless shutdown has begun (then False);
    ``job`` is what ends with it: a ``threading.Thread`` (ended when it has exited) or a ``threading.Event`` (ended
    when set). ``start`` runs under the same lock, so ``close`` only ever waits on a job that really started.
    ``done(token)`` forgets a finished job. ``close(timeout)`` lets nothing new in, cancels every running job,
    waits for them up to ``timeout`` s in all, and says whether they all ended."""

    def __init__(self):
        self._lock = threading.Lock()
        self._closing = False
        self._active: dict[CancelToken, threading.Thread | threading.Event] = {}

    @property
    def closing(self) -> bool:
        return self._closing

    def admit(self, token: CancelToken, job: threading.Thread | threading.Event,
              start: Callable[[], object] | None = None) -> bool:
        with self._lock:
            if self._closing:
                return False
            self._active[token] = job
            if start is not None:
                start()
            return True

    def done(self, token: CancelToken) -> None:
        with self._lock:
            self._active.pop(token, None)

    def running(self) -> int:
        with self._lock:
            return len(self._active)

    def close(self, timeout: float) -> bool:
        """No new jobs; cancel the running ones (each stops at its next step; an image being decoded or saved
        is finished first) and wait for them. True when nothing is left running."""
        deadline = time.monotonic() + timeout
        with self._lock:
            self._closing = True
            running = dict(self._active)
        for token in running:
            token.cancel()
        for job in running.values():
            _wait(job, max(0.0, deadline - time.monotonic()))
        return all(_ended(job) for job in running.values())


def _wait(job, timeout: float) -> None:
    if isinstance(job, threading.Thread):
        job.join(timeout)
    else:
        job.wait(timeout)


def _ended(job) -> bool:
    return not job.is_alive() if isinstance(job, threading.Thread) else job.is_set()


@dataclass(frozen=True)
class Capabilities:
    """What a front end may ask of a backend beyond the ``Backend`` protocol: declared by each backend as its
    ``capabilities`` attribute, read instead of probing the object for methods."""

    quality_defaults: bool = False  # quality_defaults(quality) -> (steps, guidance): the model profile's own
    loras: bool = False  # set_loras(specs): switch the fused LoRAs at run time (the page's LoRA panel)
    start: bool = False  # start(): a persistent pool of workers to start (or join) before the first job
    local_files: bool = True  # an output_path given to generate is a path on this machine (False: remote workers)
    upscale: bool = False  # upscale(pictures, Upscale): pictures upscaled without the model (A1111's extras)
    offers: bool = False  # offers(): the model's Few-step quality and tiny decoder, for the page to offer


# The in-process GenerationService: profile defaults and LoRA switching, nothing to start, saves on this machine,
# upscales, offers the model's few-step path.
LOCAL_SERVICE = Capabilities(quality_defaults=True, loras=True, start=False, local_files=True, upscale=True,
                             offers=True)


def capabilities_of(backend) -> Capabilities:
    """``backend.capabilities``: every backend declares them (the local service ``LOCAL_SERVICE``)."""
    return backend.capabilities


@runtime_checkable
class Backend(Protocol):
    """Submit a request and receive its events; cancel it; read the status.

    Events (``sdxl_ui.schema``): ``LogEvent``, ``ProgressEvent`` (step, total, ETA, preview), one ``ResultEvent`` per
    image, or one ``ErrorEvent`` that ends the stream. All are frozen dataclasses that pickle (the Ray backend
    sends them between processes and machines); each carries the ``job_id`` of its generate call and, from a Ray
    worker, the ``replica`` that ran it.
    """

    settings: object  # AppSettings: the model and device flags the jobs run with
    concurrency: int  # how many jobs run at once (the page's queue lets this many through)
    capabilities: Capabilities  # what else the front ends may ask (quality defaults, LoRAs, start, …)

    def generate(self, request: GenerationRequest, cancel: CancelToken | None = None,
                 output_path: str | Path | None = None, job_id: str | None = None) -> Iterator[Event]:
        """Yield the job's events, then stop. ``cancel.cancel()`` stops it within one step; so does closing the
        iterator (a closed browser tab). ``job_id``: the id the events carry (a new one when not given)."""

    def status(self) -> dict:
        """The status panel's data: model, note, device, dtype, state (a ``schema.ServiceState``), message, rows
        (the optimization report), and for several workers ``replicas``: one such dict per replica, with node and
        pid."""

    def shutdown(self, timeout: float = 120.0) -> bool:
        """No new jobs; running ones stop at their next step. True when nothing is left running."""

    # What the page's form asks before a job (cheap, no model load).
    def native_size(self) -> int: ...

    def steps_note(self, requested: int) -> str: ...

    def check_model(self): ...

    def reconfigure(self, settings) -> None: ...

    def preload_in_background(self): ...


@dataclass
class Collected:
    """A job's events by type, in the order they came; ``error`` is the one that ended the stream."""

    results: list[ResultEvent] = field(default_factory=list)
    errors: list[ErrorEvent] = field(default_factory=list)
    logs: list[LogEvent] = field(default_factory=list)
    progress: ProgressEvent | None = None  # the last one (earlier ones, with their previews, are not kept)

    @property
    def error(self) -> ErrorEvent | None:
        return self.errors[-1] if self.errors else None

    @property
    def last_step(self) -> int:
        return self.progress.step if self.progress is not None else 0

    def add(self, event: Event) -> None:
        match event:
            case ResultEvent():
                self.results.append(event)
            case ErrorEvent():
                self.errors.append(event)
            case LogEvent():
                self.logs.append(event)
            case ProgressEvent():
                self.progress = event


def collect(events: Iterable[Event], each: Callable[[Event], None] | None = None) -> Collected:
    """Read a job's events to the end of the stream (after an error too: the job has then finished) into a
    ``Collected``; ``each(event)`` is called on every event as it comes (a progress line, say)."""
    out = Collected()
    for event in events:
        out.add(event)
        if each is not None:
            each(event)
    return out


__all__ = ["LOCAL_SERVICE", "Admission", "Backend", "CancelToken", "Capabilities", "Collected", "HourlyLimit",
           "SHUTTING_DOWN", "capabilities_of", "collect", "new_job_id"]


@dataclass
class HourlyLimit:
    """--max-jobs-per-user: jobs started per user (login name, else client address) in a sliding hour, counted
    once for the page and the API (one instance is shared)."""

    per_hour: int
    started: dict = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def check(self, caller: str, now: float) -> str | None:
        if self.per_hour <= 0:
            return None
        with self.lock:
            recent = [t for t in self.started.get(caller, []) if now - t < 3600]
            if len(recent) >= self.per_hour:
                self.started[caller] = recent
                wait_min = max(1, int((3600 - (now - recent[0])) / 60))
                return (f"max_jobs_per_user: {self.per_hour} jobs per hour reached for this user; "
                        f"try again in about {wait_min} min")
            self.started[caller] = recent + [now]
        return None
