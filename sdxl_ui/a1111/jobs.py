"""One queue for the page and the API, and the API's jobs per caller. No torch, no gradio.

``DeviceQueue`` is the single first-come-first-served line in front of the backend: ``backend.concurrency`` jobs run
(one per device, or per Ray replica), at most ``max_waiting`` wait. ``QueuedBackend`` puts the page's jobs in that
line (build_ui gets it instead of the backend; it lets the page's gradio events through to the line, which then
orders page and API jobs together in arrival order). ``ApiJob`` is one txt2img call: it waits in the same line,
runs its ``n_iter`` requests through the same backend, and keeps the progress that ``GET /progress`` shows to its
caller only. ``CallerJobs`` finds a caller's jobs (per login, or per client address without one).
"""
from __future__ import annotations

import logging
import tempfile
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

from ..jobs import CancelToken, HourlyLimit, capabilities_of  # noqa: F401 - HourlyLimit re-exported
from ..schema import ErrorEvent, ErrorKind, LogEvent, LogLevel, ProgressEvent, ResultEvent

log = logging.getLogger("sdxl_ui")

RUN, CANCELLED = "run", "cancelled"


class DeviceQueue:
    """First come, first served; ``slots()`` jobs at once; ``max_waiting`` in line (then ``join`` says no)."""

    def __init__(self, slots, max_waiting: int):
        self.slots = slots  # a callable: the backend's concurrency can change (Ray replicas come up)
        self.max_waiting = max_waiting
        self.waiting: deque = deque()
        self.running = 0
        self.cond = threading.Condition()

    def join(self) -> object | None:
        """A ticket in line, or None when the line is full."""
        ticket = object()
        with self.cond:
            free = not self.waiting and self.running < self.slots()
            if len(self.waiting) >= self.max_waiting and not free:
                return None
            self.waiting.append(ticket)
            self.cond.notify_all()
        return ticket

    def poll(self, ticket, cancel, timeout: float = 0.25):
        """RUN (the ticket now holds a slot: call ``leave`` after), CANCELLED (it left the line), or the number of
        jobs ahead of it (waiting and running) after up to ``timeout`` seconds."""
        with self.cond:
            end = time.monotonic() + timeout
            while True:
                if cancel is not None and cancel.cancelled:
                    self._drop(ticket)
                    return CANCELLED
                if self.waiting and self.waiting[0] is ticket and self.running < self.slots():
                    self.waiting.popleft()
                    self.running += 1
                    self.cond.notify_all()
                    return RUN
                left = end - time.monotonic()
                if left <= 0:
                    return self.waiting.index(ticket) + self.running
                self.cond.wait(left)

    def _drop(self, ticket) -> None:
        if ticket in self.waiting:
            self.waiting.remove(ticket)
            self.cond.notify_all()

    def abandon(self, ticket) -> None:
        with self.cond:
            self._drop(ticket)

    def leave(self) -> None:
        with self.cond:
            self.running -= 1
            self.cond.notify_all()

    def length(self) -> int:
        with self.cond:
            return len(self.waiting)


class QueuedBackend:
    """The backend as the page sees it with --api: each page job first waits its turn in the shared line."""

    def __init__(self, backend, queue: DeviceQueue):
        self._backend = backend
        self._queue = queue

    def __getattr__(self, name):  # status, native_size, settings, shutdown, … go to the backend unchanged
        return getattr(self._backend, name)

    @property
    def concurrency(self) -> int:  # the page's gradio queue lets its jobs through to the shared line
        return self._backend.concurrency + self._queue.max_waiting

    def generate(self, request, cancel=None, output_path=None, **options):  # options: job_id, …, passed on
        cancel = cancel or CancelToken()
        ticket = self._queue.join()
        if ticket is None:
            yield ErrorEvent(f"queue full ({self._queue.max_waiting} jobs waiting); try again in a minute",
                             ErrorKind.BUSY)
            return
        admitted, last = False, None
        try:
            while not admitted:
                state = self._queue.poll(ticket, cancel)
                if state == CANCELLED:
                    yield ErrorEvent("cancelled while waiting in the queue", ErrorKind.CANCELLED)
                    return
                admitted = state == RUN
                if not admitted and state != last:
                    last = state
                    yield LogEvent(f"⏳ waiting in the queue: {state} job(s) ahead")
        finally:
            if not admitted:
                self._queue.abandon(ticket)
        try:
            yield from self._backend.generate(request, cancel=cancel, output_path=output_path, **options)
        finally:
            self._queue.leave()


@dataclass
class ApiJob:
    """One txt2img call of one caller. The thread that runs it is the only writer of its progress fields."""

    caller: str
    spec: object  # adapter.Txt2Img
    ticket: object = None
    scratch: bool = True  # save_images false → a scratch file (only where the backend writes on this machine)
    interrupt_token: CancelToken = field(default_factory=CancelToken)
    current: CancelToken | None = None
    state: str = "queued"  # queued → running → done
    ahead: int = 0
    job_no: int = 0
    step: int = 0
    total: int = 0
    eta_s: float | None = None
    preview: object = None
    textinfo: str = "Waiting in the queue"
    skipped: bool = False
    interrupted: bool = False
    results: list = field(default_factory=list)
    error: ErrorEvent | None = None
    done: threading.Event = field(default_factory=threading.Event)

    def interrupt(self) -> None:
        self.interrupted = True
        self.interrupt_token.cancel()
        if self.current is not None:
            self.current.cancel()

    def skip(self) -> None:
        if self.current is not None:
            self.skipped = True
            self.current.cancel()

    @property
    def progress(self) -> float:
        if self.state == "done":
            return 1.0
        n = max(1, self.spec.n_iter)
        return min(1.0, (self.job_no + (self.step / self.total if self.total else 0.0)) / n)

    def run(self, queue: DeviceQueue, backend) -> None:
        try:
            while self.state == "queued":
                state = queue.poll(self.ticket, self.interrupt_token)
                if state == CANCELLED:  # interrupted (or its client left) before it started: no images, no error
                    self.textinfo = "Interrupted while waiting in the queue"
                    return
                if state == RUN:
                    self.state = "running"
                else:
                    self.ahead = state
                    self.textinfo = f"Waiting in the queue: {state} job(s) ahead"
            try:
                self._iterations(backend)
            finally:
                queue.leave()
        except Exception as exc:  # noqa: BLE001 - the HTTP caller gets a 500, the log the traceback
            log.exception("api: txt2img job of %s failed", self.caller)
            self.error = ErrorEvent(f"internal error ({type(exc).__name__})", ErrorKind.RUNTIME)
        finally:
            self.state = "done"
            self.done.set()

    def _iterations(self, backend) -> None:
        with tempfile.TemporaryDirectory(prefix="sdxl-api-") as scratch:
            for k in range(self.spec.n_iter):
                if self.interrupted:
                    break
                self.job_no, self.step, self.total, self.skipped = k, 0, 0, False
                self.current = CancelToken()
                if self.interrupted:
                    self.current.cancel()
                # save_images false (AUTOMATIC1111's default): the PNGs go to a scratch folder, removed after.
                keep = self.spec.save_images or not self.scratch
                target = None if keep else str(Path(scratch) / f"{k}.png")
                if self._one(backend, self.spec.iteration(k), target):
                    break

    def _one(self, backend, request, target) -> bool:
        """Run one iteration; True when the job must stop (an error, or interrupt)."""
        self.textinfo = f"Batch {self.job_no + 1} of {self.spec.n_iter}"
        for event in backend.generate(request, cancel=self.current, output_path=target):
            match event:
                case ProgressEvent():
                    self.step, self.total = event.step, event.total
                    self.eta_s = event.eta_s
                    if event.preview is not None:
                        self.preview = event.preview
                case ResultEvent():
                    self.results.append(event)
                case ErrorEvent():
                    return self._ended_by(event)
                case LogEvent() if event.level is not LogLevel.INFO:
                    self.textinfo = event.message
        return False

    def _ended_by(self, event: ErrorEvent) -> bool:
        """The iteration's error: False for a skip (the next batch goes on), else True (the job stops)."""
        cancelled = event.kind is ErrorKind.CANCELLED
        if cancelled and self.skipped and not self.interrupted:
            return False  # skip: the next batch goes on
        if cancelled and not self.interrupted or event.kind is ErrorKind.BUSY and self.results:
            # The app is stopping (SIGTERM): the images finished so far are the answer, as after an
            # interrupt; without any, the caller is told so.
            self.textinfo = "The app is stopping"
            if not self.results:
                self.error = ErrorEvent(f"the app is stopping ({event.message}); try again later",
                                        ErrorKind.CANCELLED)
            return True
        if not cancelled:
            self.error = event
        return True


class CallerJobs:
    """The API's jobs by caller: progress, interrupt and skip act on the caller's own jobs only."""

    def __init__(self, queue: DeviceQueue, backend):
        self.queue = queue
        self.backend = backend
        # Ray workers may run on other machines (capabilities.local_files is False): a scratch path here is no path
        # there, so with --workers the images are saved in the workers' outputs folder whatever save_images says.
        self.scratch = capabilities_of(backend).local_files
        self.jobs: dict[str, list[ApiJob]] = {}
        self.lock = threading.Lock()

    def submit(self, caller: str, spec) -> ApiJob | None:
        """Queue a job and start its thread; None when the line is full."""
        ticket = self.queue.join()
        if ticket is None:
            return None
        job = ApiJob(caller, spec, ticket, self.scratch)
        with self.lock:
            self.jobs.setdefault(caller, []).append(job)
        threading.Thread(target=self._run, args=(job,), name=f"api-job-{caller}", daemon=True).start()
        return job

    def _run(self, job: ApiJob) -> None:
        try:
            job.run(self.queue, self.backend)
        finally:
            with self.lock:
                mine = self.jobs.get(job.caller, [])
                if job in mine:
                    mine.remove(job)
                if not mine:
                    self.jobs.pop(job.caller, None)

    def current(self, caller: str) -> ApiJob | None:
        """The caller's running job, else its first waiting one."""
        with self.lock:
            mine = [j for j in self.jobs.get(caller, []) if j.state != "done"]
        running = [j for j in mine if j.state == "running"]
        return (running or mine or [None])[0]

    def count(self, caller: str) -> int:
        with self.lock:
            return len(self.jobs.get(caller, []))

    def interrupt(self, caller: str) -> bool:
        job = self.current(caller)
        if job is not None:
            job.interrupt()
        return job is not None

    def skip(self, caller: str) -> bool:
        job = self.current(caller)
        if job is not None:
            job.skip()
        return job is not None
