"""Who is calling ``/sdapi/v1``: one dependency for the whole router (``caller_dependency``), FastAPI's ``HTTPBasic``
security scheme when the API has logins (so ``/openapi.json`` and ``/docs`` show it), the client's address when it
has none.

With logins: no credentials, or credentials that are not Basic, base64 or UTF-8 → 401 with ``WWW-Authenticate``
(not counted as a failed login); a wrong user or password → 401, counted by the login throttle both front ends share
(``sdxl_ui.logins``); an address the throttle has locked out → 429, even with the right password. Passwords are
compared in constant time. The dependency's value is the login name (or the address), the key of the caller's jobs.
"""
from __future__ import annotations

import asyncio
import base64
import logging
import time

from fastapi import Depends, HTTPException, Request
from fastapi.security import HTTPBasic, HTTPBasicCredentials

from ..logins import LoginThrottle, password_matches

log = logging.getLogger("sdxl_ui")

REALM = "sdxl_ui API"
CHALLENGE = {"WWW-Authenticate": f'Basic realm="{REALM}"'}


class Utf8Basic(HTTPBasic):
    """FastAPI's ``HTTPBasic`` reading the credentials as UTF-8 (RFC 7617's ``charset="UTF-8"``; FastAPI's own reads
    ASCII only) and strictly as base64. A header it cannot read gives None, as no header does: the caller decides
    what that means. A user without ``:`` has an empty password (then it is a wrong one)."""

    def __init__(self):
        super().__init__(scheme_name="HTTPBasic", realm=REALM, auto_error=False,
                         description="The API's logins: --api-auth USER:PASS, else the page's --auth logins")

    async def __call__(self, request: Request) -> HTTPBasicCredentials | None:  # type: ignore[override]
        header = request.headers.get("authorization")
        if not header or not header.lower().startswith("basic "):
            return None
        try:
            user, _, password = base64.b64decode(header[6:].strip(), validate=True).decode("utf-8").partition(":")
        except ValueError:  # not base64 (binascii.Error), not ASCII (a header read as Latin-1), not UTF-8 inside
            return None
        return HTTPBasicCredentials(username=user, password=password)


BASIC = Utf8Basic()


def client_of(request: Request) -> str:
    return request.client.host if request.client else "?"


def caller_dependency(config):
    """The router's one dependency: ``async (request, credentials) -> caller``. ``config``: ``ApiConfig`` (its
    ``logins`` and the shared ``throttle``, read when a request comes: app.py sets the throttle after this)."""
    if not config.logins:
        async def address(request: Request) -> str:
            return client_of(request)

        return address
    fallback = LoginThrottle()

    async def login(request: Request, credentials: HTTPBasicCredentials | None = Depends(BASIC)) -> str:
        if credentials is None:
            raise HTTPException(401, "Not authenticated: this API needs HTTP Basic credentials", headers=CHALLENGE)
        return await check(config.throttle or fallback, config.logins, client_of(request), credentials.username,
                           credentials.password)

    return login


async def check(throttle: LoginThrottle, logins: dict, client: str, user: str, password: str) -> str:
    """``user`` if the password is right and the throttle lets the attempt through; else HTTPException 401 or 429."""
    now = time.monotonic()
    if throttle.locked(client, now):
        raise HTTPException(429, "Too many failed logins from this address; try again later")
    if throttle.clean(client, now) and password_matches(logins, user, password):
        return user  # the common case: no throttle bookkeeping, so parallel calls of one client stay parallel
    refused, delay = throttle.begin(client, now, user)
    if refused:
        log.warning("api: login refused from %s: %s", client, refused)
        raise HTTPException(429, refused)
    ok = False
    try:
        await asyncio.sleep(delay)
        ok = password_matches(logins, user, password)
    finally:
        count, _ = throttle.end(client, ok, time.monotonic(), user)
    if not ok:
        log.warning("api: login failed for user %r from %s (%d failed)", user[:64], client, count)
        raise HTTPException(401, "Incorrect credentials", headers=CHALLENGE)
    return user
