"""Logins shared by both front ends (the page's gradio login and the /sdapi HTTP Basic): the failed-login throttle,
the constant-time password check, and which client addresses are this machine. Layer 0: plain dataclasses and the
standard library (no gradio, no FastAPI, no torch).

``LoginThrottle`` counts failed logins per client address and per account. A front end asks it in three ways:
``locked`` (refused outright, even the right password), ``clean`` (no failures beyond the free ones: a right password
may pass without any bookkeeping, so parallel calls of one client stay parallel), and ``begin``/``end`` around a
checked attempt (the wait before the check, and the outcome after it).
"""
from __future__ import annotations

import math
import secrets
import threading
from dataclasses import dataclass, field

LOOPBACK = frozenset({"127.0.0.1", "::1", "localhost"})  # client addresses that are this machine


def password_matches(logins: dict, user: str | None, password: str | None) -> bool:
    """``user`` is a login of ``logins`` (user -> password) and ``password`` is its password, compared in constant
    time (as UTF-8 bytes)."""
    expected = logins.get(user) if user is not None else None
    return expected is not None and secrets.compare_digest(expected.encode(), (password or "").encode())


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

    def recent_failures(self, client: str, now: float) -> int:
        """The address's failed logins within ``window_s`` before ``now``."""
        with self.lock:
            return sum(1 for t in self.failures.get(client, ()) if now - t < self.window_s)

    def locked(self, client: str, now: float) -> bool:
        """The address is refused now (``lock_after`` failures within ``window_s``), even with the right password."""
        with self.lock:
            return self.locked_until.get(client, 0.0) > now

    def clean(self, client: str, now: float) -> bool:
        """Fewer than ``free`` recent failures from the address: a right password passes at once, without ``begin``
        and ``end`` (a wrong one must still go through them, to be counted)."""
        return self.recent_failures(client, now) < self.free

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
