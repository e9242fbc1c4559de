"""Who may do what on the page, and login throttling. No torch, no gradio imports (plain ASGI and dataclasses).

- Anyone who can open the page may generate (within --queue-size and --max-jobs-per-user) and sees only the
  images of their own browser session.
- Actions that change what every user gets (today: "continue with the demo model" when the model failed to
  load) are for the *operator* only: with a login (--auth, or --share's generated one) the operator is the login
  named by --operator (default: the first --auth user); without a login, whoever connects from this machine
  (a loopback address). Every event handler of the page is reachable over HTTP, because the browser calls them
  that way, so each such handler checks this itself; hiding it from the API page (api_visibility) is not a check.
- Failed logins are slowed down and then refused per client address, and slowed down per account
  (LoginThrottle), and logged. The client address is the TCP peer unless --forwarded-allow-ips names the proxy.
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
    """Failed logins, counted per client address and per account (the user name tried).

    The address is the TCP peer; a proxy's X-Forwarded-For counts only from the addresses given to
    --forwarded-allow-ips (app.py), so a client cannot choose the address it is counted under.

    Per address: the first ``free`` failures cost nothing, then each further attempt waits ``base_delay_s`` × 2^k
    (at most ``max_delay_s``) before it is checked; after ``lock_after`` failures within ``window_s`` the address
    is refused for ``window_s``, even with the right password. One attempt at a time per address.

    Per account: after ``account_free`` failures within ``window_s`` (from any addresses), each attempt on that
    account from an address that has not logged into it before waits the same way (at most
    ``account_max_delay_s``), and at most ``account_parallel`` such attempts run at once, so spreading guesses
    over many addresses does not make them faster. An account is never locked: its right password still passes
    (after the wait), and from an address it logged in from before, without waiting. A success clears that
    address's count and makes it known to the account."""

    free: int = 3
    lock_after: int = 10
    window_s: float = 900.0
    base_delay_s: float = 1.0
    max_delay_s: float = 8.0
    account_free: int = 5
    account_max_delay_s: float = 8.0
    account_parallel: int = 2
    failures: dict = field(default_factory=dict)  # address -> [monotonic times of recent failures]
    locked_until: dict = field(default_factory=dict)  # address -> monotonic time
    in_flight: set = field(default_factory=set)
    account_failures: dict = field(default_factory=dict)  # user -> [monotonic times of recent failures]
    account_in_flight: dict = field(default_factory=dict)  # user -> slowed attempts running now
    known: dict = field(default_factory=dict)  # user -> addresses that logged in as that user
    slowed: dict = field(default_factory=dict)  # address -> user of its running attempt, when slowed per account
    lock: threading.Lock = field(default_factory=threading.Lock)

    def _delay(self, count: int, free: int, most: float) -> float:
        extra = count - free
        return 0.0 if extra < 0 else min(self.base_delay_s * 2 ** min(extra, 30), most)

    def begin(self, client: str, now: float, user: str = "") -> tuple[str | None, float]:
        """(refusal message or None, seconds to wait before checking the password). A call that returns no
        refusal must be followed by ``end``."""
        with self.lock:
            until = self.locked_until.get(client, 0.0)
            if until > now:
                minutes = max(1, math.ceil((until - now) / 60))
                return (f"Too many failed logins from this address; try again in {minutes} min", 0.0)
            if client in self.in_flight:
                return "One login attempt at a time, please", 0.0
            recent = [t for t in self.failures.get(client, []) if now - t < self.window_s]
            self.failures[client] = recent
            delay = self._delay(len(recent), self.free, self.max_delay_s)
            account = [t for t in self.account_failures.get(user, []) if now - t < self.window_s]
            self.account_failures[user] = account
            slowed = client not in self.known.get(user, ()) and len(account) >= self.account_free
            if slowed:
                if self.account_in_flight.get(user, 0) >= self.account_parallel:
                    return "Too many login attempts for this account at once; try again in a few seconds", 0.0
                self.account_in_flight[user] = self.account_in_flight.get(user, 0) + 1
                self.slowed[client] = user
                delay = max(delay, self._delay(len(account), self.account_free, self.account_max_delay_s))
            self.in_flight.add(client)
            return None, delay

    def end(self, client: str, ok: bool, now: float, user: str = "") -> tuple[int, bool]:
        """Record the outcome; returns (recent failures of the address, whether the address is now locked out)."""
        with self.lock:
            self.in_flight.discard(client)
            slowed_user = self.slowed.pop(client, None)
            if slowed_user is not None:
                self.account_in_flight[slowed_user] -= 1
                if self.account_in_flight[slowed_user] <= 0:
                    del self.account_in_flight[slowed_user]
            if ok:
                self.failures.pop(client, None)
                known = self.known.setdefault(user, set())
                if len(known) < 64:
                    known.add(client)
                return 0, False
            self.account_failures.setdefault(user, []).append(now)
            if len(self.account_failures) > 10_000:  # names tried once, long ago: forgotten
                self.account_failures = {u: times for u, times in self.account_failures.items()
                                         if times and now - times[-1] < self.window_s}
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
