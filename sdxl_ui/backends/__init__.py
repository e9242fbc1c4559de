"""The generation seam: what the page, the CLI and the Python API need from whatever runs the pipeline.

Two implementations, and the front ends cannot tell them apart:

* ``GenerationService`` (``sdxl_ui.service``, re-exported here as ``LocalBackend``): in this process, one job at
  a time on this machine's device.
* ``RayBackend`` (``sdxl_ui.backends.ray_serve``, optional: ``requirements-serve.txt``): a Ray Serve deployment
  whose replicas each own one device and run a ``GenerationService``; jobs go through a deployment handle with
  a streaming response.

Nothing here imports torch, gradio or ray.
"""
from __future__ import annotations

import threading
from pathlib import Path
from typing import Iterator, Protocol, runtime_checkable

from ..schema import GenerationRequest


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


@runtime_checkable
class Backend(Protocol):
    """Submit a request and receive its events; cancel it; read the status.

    Events (``sdxl_ui.schema``): ``LogEvent``, ``ProgressEvent`` (step, total, ETA, preview), one ``ResultEvent`` per
    image, or one ``ErrorEvent`` that ends the stream. All are frozen dataclasses that pickle (the Ray backend
    sends them between processes and machines).
    """

    settings: object  # AppSettings: the model and device flags the jobs run with
    concurrency: int  # how many jobs run at once (the page's queue lets this many through)

    def generate(self, request: GenerationRequest, cancel: CancelToken | None = None,
                 output_path: str | Path | None = None) -> Iterator[object]:
        """Yield the job's events, then stop. ``cancel.cancel()`` stops it within one step; so does closing the
        iterator (a closed browser tab)."""

    def status(self) -> dict:
        """The status panel's data: model, note, device, dtype, state, message, rows (the optimization report),
        and for several workers ``replicas``: one such dict per replica, with node and pid."""

    def shutdown(self, timeout: float = 120.0) -> bool:
        """No new jobs; running ones stop at their next step. True when nothing is left running."""

    # What the page's form asks before a job (cheap, no model load).
    def native_size(self) -> int: ...

    def steps_note(self, requested: int) -> str: ...

    def check_model(self): ...

    def reconfigure(self, settings) -> None: ...

    def preload_in_background(self): ...


def __getattr__(name):  # lazy: importing the seam must not import torch (service) or ray
    if name in ("LocalBackend", "GenerationService"):
        from ..service import GenerationService

        return GenerationService
    if name == "RayBackend":
        from .ray_serve import RayBackend

        return RayBackend
    raise AttributeError(name)
