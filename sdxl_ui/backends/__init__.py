"""The generation seam: what the page, the CLI and the Python API need from whatever runs the pipeline.

Two implementations, and the front ends cannot tell them apart:

* ``GenerationService`` (``sdxl_ui.service``, re-exported here as ``LocalBackend``): in this process, one job at
  a time on this machine's device.
* ``RayBackend`` (``sdxl_ui.backends.ray_serve``, optional: ``requirements-serve.txt``): a Ray Serve deployment
  (``sdxl_ui.backends.ray_worker``) whose replicas each own one device and run a ``GenerationService``; jobs go
  through a deployment handle with a streaming response.

The contract they share (``CancelToken``, the ``Backend`` protocol, job admission) lives in ``sdxl_ui.jobs``
(layer 0), re-exported here.

Nothing here imports torch, gradio or ray.
"""
from __future__ import annotations

from ..jobs import Admission, Backend, CancelToken  # noqa: F401 - the seam's contract, defined in sdxl_ui.jobs


def __getattr__(name):  # lazy: importing the seam must not import torch (service) or ray
    if name in ("LocalBackend", "GenerationService"):
        from ..service import GenerationService

        return GenerationService
    if name == "RayBackend":
        from .ray_serve import RayBackend

        return RayBackend
    raise AttributeError(name)
