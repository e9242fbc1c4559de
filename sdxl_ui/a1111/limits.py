"""One limit on the size of a request body, for every route of the app (plain ASGI: no torch, no gradio).

A body over ``MAX_BODY`` bytes is answered 413 before any of it is read when its ``Content-Length`` says so, and
as soon as it passes the limit when it is streamed without one (chunked): counted as it comes, never read in full.
A base64 PNG of a 2048² picture with its text is a few MB; the gradio page's own calls are smaller still (the guard
and gradio's upload limit hold them to 1 MB).
"""
from __future__ import annotations

import json
import logging

log = logging.getLogger("sdxl_ui")

MAX_BODY = 16 << 20  # bytes (docs/security.md, what the API trusts)


class BodyTooLarge(Exception):
    """Raised by the counting ``receive`` when a streamed body passes the limit."""


class BodyLimitMiddleware:
    def __init__(self, app, limit: int = MAX_BODY):
        self.app = app
        self.limit = limit

    async def __call__(self, scope, receive, send):
        if scope.get("type") != "http":
            await self.app(scope, receive, send)
            return
        lengths = [v for k, v in scope.get("headers") or [] if k.lower() == b"content-length"]
        if len(lengths) > 1 or lengths and not lengths[0].strip().isdigit():
            await _refuse(send, 400, f"content-length: must be one whole number (got {len(lengths)} headers)",
                          scope)
            return
        if lengths and int(lengths[0]) > self.limit:
            await _refuse(send, 413, f"body: larger than {self.limit} bytes (got {int(lengths[0])})", scope)
            return
        seen, started = 0, False

        async def counting():
            nonlocal seen
            message = await receive()
            if message.get("type") == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise BodyTooLarge
            return message

        async def watching(message):
            nonlocal started
            if message.get("type") == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, counting, watching)
        except BodyTooLarge:
            if not started:
                await _refuse(send, 413, f"body: larger than {self.limit} bytes (got more, streamed)", scope)


async def _refuse(send, code: int, message: str, scope) -> None:
    log.warning("refused %s %s: %s", scope.get("method"), "".join(
        c if c.isprintable() else "?" for c in scope.get("path", "")[:120]), message)
    data = json.dumps({"detail": message}).encode()
    await send({"type": "http.response.start", "status": code,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": data})
