"""Helpers of the /sdapi tests (tests/test_a1111_*.py): app.py --api in a subprocess, and raw HTTP with or
without HTTP Basic."""
from __future__ import annotations

import base64
import json
import urllib.error
import urllib.request

from tests.helpers.app import App


class Server(App):
    """``python app.py ARGS`` on a free port, on the CPU (``App``), with the address of its /sdapi/v1."""

    def __init__(self, *args):
        super().__init__(*args)
        self.api = f"{self.url}sdapi/v1/"


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
