"""app.py in a subprocess, and what the tests that drive it share."""
from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import threading
import time

from tests.helpers.common import ROOT

# The page's Generate arguments other than prompt, seed and steps (gradio_client keyword names).
ARGS = dict(negative_text="", quality_label="High quality", cfg=8.0, n_images=1, size_label="Native (256×256)",
            w=256, h=256, sched="auto")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class App:
    """app.py in a subprocess, on the CPU unless ``--device`` is given (these tests check the CPU steps policy, on a
    GPU host too). ``prelude``: Python run in the child before app.main (e.g. to slow down a save)."""

    def __init__(self, *args, env=None, prelude: str | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/"
        self.lines: list[str] = []
        full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", **(env or {})}
        device = [] if "--device" in args else ["--device", "cpu"]
        program = ["app.py"] if prelude is None else \
            ["-c", prelude + "\nimport sys, app\nsys.exit(app.main(sys.argv[1:]))"]
        self.proc = subprocess.Popen([sys.executable, *program, "--port", str(self.port), *device, *args],
                                     cwd=ROOT, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True)
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    def wait_for(self, text: str, timeout: float = 300) -> None:  # generous: CI hosts can be busy
        end = time.time() + timeout
        while time.time() < end:
            if text in self.output:
                return
            if self.proc.poll() is not None:
                raise AssertionError(f"app exited early:\n{self.output}")
            time.sleep(0.2)
        raise AssertionError(f"{text!r} not printed within {timeout} s:\n{self.output}")

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


@contextlib.contextmanager
def launched(outputs, *args, app=App, **kwargs):
    """app.py serving with its model loaded, writing into ``outputs`` (``app.outputs``); stopped afterwards.
    ``app``: the App class to run it with (e.g. the /sdapi tests' ``Server``)."""
    running = app("--outputs", str(outputs), *args, **kwargs)
    running.outputs = outputs
    try:
        running.wait_for("Model loaded")  # preloaded in the background after launch
        yield running
    finally:
        running.stop()
