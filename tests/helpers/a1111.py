"""Helpers of the /sdapi tests (tests/test_a1111_*.py): app.py --api in a subprocess, and raw HTTP with or
without HTTP Basic."""
from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

from tests.helpers.app import free_port
from tests.helpers.common import ROOT


class Server:
    """``python app.py ARGS`` on a free port, on the CPU; its output is kept in ``lines``."""

    def __init__(self, *args):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/"
        self.api = f"{self.url}sdapi/v1/"
        self.lines: list[str] = []
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen([sys.executable, "app.py", "--port", str(self.port), "--device", "cpu", *args],
                                     cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    def wait_for(self, text: str, timeout: float = 300) -> None:
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
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def http(url: str, data=None, login: tuple[str, str] | None = None, method: str | None = None,
         timeout: float = 120) -> tuple[int, dict, object]:
    """(status, headers, parsed JSON body or text) of a GET (data None) or POST (a dict as JSON, or raw bytes)."""
    headers = {}
    body = None
    if isinstance(data, bytes):
        body, headers["Content-Type"] = data, "application/json"
    elif data is not None:
        body, headers["Content-Type"] = json.dumps(data).encode(), "application/json"
    if login:
        headers["Authorization"] = "Basic " + base64.b64encode(f"{login[0]}:{login[1]}".encode()).decode()
    request = urllib.request.Request(url, data=body, headers=headers, method=method)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            status, head, raw = response.status, {k.lower(): v for k, v in response.headers.items()}, response.read()
    except urllib.error.HTTPError as exc:
        status, head, raw = exc.code, {k.lower(): v for k, v in exc.headers.items()}, exc.read()
    text = raw.decode("utf-8", "replace")
    try:
        return status, head, json.loads(text)
    except ValueError:
        return status, head, text
