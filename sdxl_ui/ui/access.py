"""Who may do what on the page, and login throttling. No torch, no gradio imports (plain ASGI and dataclasses).

- Anyone who can open the page may generate (within --queue-size and --max-jobs-per-user) and sees only the
  images of their own browser session.
- Actions that change what every user gets (today: "continue with the demo model" when the model failed to
  load) are for the *operator* only: with a login (--auth, or --share's generated one) the operator is the login
  named by --operator (default: the first --auth user); without a login, whoever connects from this machine
  (a loopback address). Every event handler of the page is reachable over HTTP, because the browser calls them
  that way, so each such handler checks this itself; hiding it from the API page (api_visibility) is not a check.
- Failed logins are slowed down and then refused per client address (LoginThrottle), and logged.
"""
from __future__ import annotations

import asyncio
import json
import logging
import math
import threading
import time
from dataclasses import dataclass, field
from urllib.parse import parse_qs

log = logging.getLogger("sdxl_ui")

LOOPBACK = frozenset({"127.0.0.1", "::1", "localhost"})


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


@dataclass
class LoginThrottle:
    """Failed logins per client address: the first ``free`` cost nothing, then each further attempt waits
    ``base_delay_s`` × 2^k (at most ``max_delay_s``) before it is checked; after ``lock_after`` failures within
    ``window_s`` the address is refused for ``window_s``, even with the right password. One attempt at a time per
    address, so parallel requests cannot bypass the delay. A success clears the count."""

    free: int = 3
    lock_after: int = 10
    window_s: float = 900.0
    base_delay_s: float = 1.0
    max_delay_s: float = 8.0
    failures: dict = field(default_factory=dict)  # address -> [monotonic times of recent failures]
    locked_until: dict = field(default_factory=dict)  # address -> monotonic time
    in_flight: set = field(default_factory=set)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def begin(self, client: str, now: float) -> tuple[str | None, float]:
        """(refusal message or None, seconds to wait before checking the password)."""
        with self.lock:
            until = self.locked_until.get(client, 0.0)
            if until > now:
                minutes = max(1, math.ceil((until - now) / 60))
                return (f"Too many failed logins from this address; try again in {minutes} min", 0.0)
            if client in self.in_flight:
                return "One login attempt at a time, please", 0.0
            self.in_flight.add(client)
            recent = [t for t in self.failures.get(client, []) if now - t < self.window_s]
            self.failures[client] = recent
            extra = len(recent) - self.free
            delay = 0.0 if extra < 0 else min(self.base_delay_s * 2 ** extra, self.max_delay_s)
            return None, delay

    def end(self, client: str, ok: bool, now: float) -> tuple[int, bool]:
        """Record the outcome; returns (recent failures, whether the address is now locked out)."""
        with self.lock:
            self.in_flight.discard(client)
            if ok:
                self.failures.pop(client, None)
                return 0, False
            recent = [t for t in self.failures.get(client, []) if now - t < self.window_s] + [now]
            self.failures[client] = recent
            locked = len(recent) >= self.lock_after
            if locked:
                self.locked_until[client] = now + self.window_s
                self.failures[client] = []
            return len(recent), locked


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
        refused, delay = self.throttle.begin(client, time.monotonic())
        if refused:
            log.warning("login refused from %s: %s", client, refused)
            await _send_json(send, 429, {"detail": refused})
            return
        body = bytearray()

        async def receive_and_keep():
            message = await receive()
            if message.get("type") == "http.request" and len(body) < 4096:
                body.extend(message.get("body", b"")[:4096])
            return message

        status = {"code": 500}

        async def send_and_watch(message):
            if message.get("type") == "http.response.start":
                status["code"] = message.get("status", 500)
            await send(message)

        try:
            if delay:
                await asyncio.sleep(delay)
            await self.app(scope, receive_and_keep, send_and_watch)
        finally:
            ok = status["code"] < 400
            count, locked = self.throttle.end(client, ok, time.monotonic())
            if not ok:
                user = parse_qs(body.decode("utf-8", "replace")).get("username", ["?"])[0][:64]
                log.warning("login failed for user %r from %s (%d failed in %.0f min)", user, client, count,
                            self.throttle.window_s / 60)
                if locked:
                    log.warning("login: %d failed attempts from %s; refusing its logins for %.0f min",
                                self.throttle.lock_after, client, self.throttle.window_s / 60)


async def _send_json(send, code: int, payload: dict) -> None:
    data = json.dumps(payload).encode("utf-8")
    await send({"type": "http.response.start", "status": code,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]})
    await send({"type": "http.response.body", "body": data})
