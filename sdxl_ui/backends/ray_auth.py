"""Ray's token authentication, as a new user meets it (Ray 2.60, docs/serving.md).

``ray start --head`` turns token authentication on when it finds a token: ``~/.ray/auth_token`` (which any local
``ray.init()`` writes the first time, e.g. ``python app.py --workers 2``), the file named by
``RAY_AUTH_TOKEN_PATH``, or the ``RAY_AUTH_TOKEN`` variable. A process that then joins with an explicit address
(``--ray-address 127.0.0.1:6379``) sends no token unless ``RAY_AUTH_MODE=token`` is set in its environment (only
``auto`` turns it on by itself): Ray logs a screen of ``InvalidAuthToken`` warnings and raises "Failed to connect
to Ray cluster at …". ``connect`` says instead, in one line, what to set and where the token lives.

Ray is imported only inside ``connect``.
"""
from __future__ import annotations

import os
from pathlib import Path

MODE_VAR = "RAY_AUTH_MODE"
DEFAULT_TOKEN = "~/.ray/auth_token"  # ray._private.authentication.authentication_token_setup


class RayAuthError(ConnectionError):
    """The cluster wants a token this process did not send (or sent a different one)."""


def token_mode() -> bool:
    return os.environ.get(MODE_VAR, "").strip().lower() == "token"


def token_source() -> str | None:
    """Where Ray reads this machine's token from, in Ray's own order; None when there is none."""
    if os.environ.get("RAY_AUTH_TOKEN"):
        return "the RAY_AUTH_TOKEN variable"
    path = os.environ.get("RAY_AUTH_TOKEN_PATH")
    if path:
        return f"{path} (RAY_AUTH_TOKEN_PATH)"
    if Path(DEFAULT_TOKEN).expanduser().is_file():
        return DEFAULT_TOKEN
    return None


def refused_for_auth(exc: BaseException) -> bool:
    """Whether Ray's connection error (or what caused it) is the cluster refusing the token."""
    seen = 0
    while exc is not None and seen < 10:
        text = f"{type(exc).__name__}: {exc}"
        if "InvalidAuthToken" in text or "AuthenticationError" in text:
            return True
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return False


def auth_message(address: str) -> str:
    """One line: what to set, and where the token lives."""
    source = token_source()
    if not token_mode():
        where = f"this machine's token is in {source}" if source else (
            f"no token on this machine: copy the head node's {DEFAULT_TOKEN} to {DEFAULT_TOKEN} here "
            "(or point RAY_AUTH_TOKEN_PATH at it)")
        return (f"the Ray cluster at {address} uses token authentication (`ray start --head` turns it on when it "
                f"finds a token) and this app sent none: set {MODE_VAR}=token in this app's environment "
                f"(Ray then reads the token from {DEFAULT_TOKEN}, RAY_AUTH_TOKEN_PATH or RAY_AUTH_TOKEN; {where})")
    return (f"the Ray cluster at {address} refused this app's token ({source or 'none found'}): it must be the "
            f"head node's {DEFAULT_TOKEN} (copy it here, or point RAY_AUTH_TOKEN_PATH at a copy)")


def connect(address: str, **init_kwargs) -> None:
    """``ray.init(address=…)``; a refused token raises ``RayAuthError`` with ``auth_message``."""
    import ray

    try:
        ray.init(address=address, **init_kwargs)
    except ConnectionError as exc:
        if refused_for_auth(exc):
            raise RayAuthError(auth_message(address)) from exc
        raise
