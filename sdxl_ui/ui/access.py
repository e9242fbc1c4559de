"""Who may do what on the page, and the throttle on its login form. No torch, no gradio imports (plain ASGI and dataclasses).

- Anyone who can open the page may generate (within --queue-size and --max-jobs-per-user) and sees only the
  images of their own browser session.
- Actions that change what every user gets (today: "continue with the demo model" when the model failed to
  load) are for the *operator* only: with a login (--auth, or --share's generated one) the operator is the login
  named by --operator (default: the first --auth user); without a login, whoever connects from this machine
  (a loopback address). Every event handler of the page is reachable over HTTP, because the browser calls them
  that way, so each such handler checks this itself; hiding it from the API page (api_visibility) is not a check.
- Failed logins are slowed down and then refused per client address, and slowed down per account, and logged:
  the page's POST /login goes through ``LoginThrottleMiddleware``, which asks the throttle both front ends share
  (``sdxl_ui.logins.LoginThrottle``). The client address is the TCP peer unless --forwarded-allow-ips names the proxy.
"""
from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass
from urllib.parse import parse_qs

from ..logins import LOOPBACK, LoginThrottle

log = logging.getLogger("sdxl_ui")


def client_host(request) -> str:
    """The peer address of a gradio Request (or '?' when there is none)."""
    client = getattr(request, "client", None) if request is not None else None
    host = getattr(client, "host", None) if client is not None else None
    return str(host) if host else "?"


@dataclass(frozen=True)
class Access:
    """``login``: the page asks for a login (--auth / --share). ``operator``: the login name of the operator."""

    login: bool = False
    operator: str | None = None

    def is_operator(self, request) -> bool:
        if request is None:
            return False
        if self.login:
            return self.operator is not None and getattr(request, "username", None) == self.operator
        # Without a login the share tunnel is impossible (--share always has one), so a loopback peer is a
        # person on this machine.
        return client_host(request) in LOOPBACK

    def describe(self, request) -> str:
        user = getattr(request, "username", None) if request is not None else None
        return f"{user!r} at {client_host(request)}" if user else client_host(request)


class LoginThrottleMiddleware:
    """ASGI middleware in front of gradio's POST /login (gradio's own login route has no throttling)."""

    def __init__(self, app, throttle: LoginThrottle):
        self.app = app
        self.throttle = throttle

    async def __call__(self, scope, receive, send):
        if scope.get("type") != "http" or scope.get("method") != "POST" or \
                not scope.get("path", "").rstrip("/").endswith("/login"):
            await self.app(scope, receive, send)
            return
        client = (scope.get("client") or ("?",))[0]
        body = await _read_body(receive, 8192)
        user = "?" if body is None else parse_qs(body.decode("utf-8", "replace")).get("username", ["?"])[0][:64]
        refused, delay = ("login: the form is larger than 8 KB", 0.0) if body is None else \
            self.throttle.begin(client, time.monotonic(), user)
        if refused:
            log.warning("login refused from %s: %s (user %r)", client, refused, user)
            await _send_json(send, 429 if body is not None else 413, {"detail": refused})
            return
        status = {"code": 500}

        async def replay():
            return {"type": "http.request", "body": body, "more_body": False}

        async def send_and_watch(message):
            if message.get("type") == "http.response.start":
                status["code"] = message.get("status", 500)
            await send(message)

        try:
            if delay:
                await asyncio.sleep(delay)
            await self.app(scope, replay, send_and_watch)
        finally:
            ok = status["code"] < 400
            count, locked = self.throttle.end(client, ok, time.monotonic(), user)
            if not ok:
                log.warning("login failed for user %r from %s (%d failed in %.0f min)", user, client, count,
                            self.throttle.window_s / 60)
                if locked:
                    log.warning("login: %d failed attempts from %s; refusing its logins for %.0f min",
                                self.throttle.lock_after, client, self.throttle.window_s / 60)


async def _read_body(receive, limit: int) -> bytes | None:
    """The whole request body, or None when it is larger than ``limit``."""
    body, more = bytearray(), True
    while more:
        message = await receive()
        if message.get("type") != "http.request":
            break
        body.extend(message.get("body", b""))
        if len(body) > limit:
            return None
        more = message.get("more_body", False)
    return bytes(body)


async def _send_json(send, code: int, payload: dict) -> None:
    data = json.dumps(payload).encode("utf-8")
    await send({"type": "http.response.start", "status": code,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]})
    await send({"type": "http.response.body", "body": data})
