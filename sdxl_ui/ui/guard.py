"""A guard in front of gradio's own API routes (plain ASGI: no torch, no gradio import; gradio's app object is read
from the ASGI scope, as Starlette puts it there).

gradio's session hash is made by the browser from Math.random: it identifies a session but is no secret. gradio
itself lets anyone who names a session's hash listen to its heartbeat (closing it cancels that session's job),
read its queue messages, and /cancel any event id. So, for every caller:

- with a login (--auth / --share), every ``/gradio_api/`` route needs it, except the few the login page itself
  calls (OPEN_WITHOUT_LOGIN);
- a session hash belongs to whoever used it first: the login name, else this browser's ``sdxl-client`` cookie (a
  random 192-bit value this guard sets on its first answer), else the client address. Its heartbeat, queue join
  and queue messages are refused (403) to anyone else;
- /cancel acts only on an event of the caller's own session and of the handler it names (gradio otherwise closes
  the named event's generator without stopping its task, and the queue then restarts the job from step 0);
- the media stream routes (no component of this page streams) are not served;
- a wrongly shaped call (an fn_index or api_name that does not exist, a data list of the wrong length, a body
  that is not a JSON object) is answered 422 with one log line, instead of a 500 and a traceback;
- what the guard reads, it reads as the framework does (the last of a query's values, starlette's cookie parser,
  gradio's choice between its two login cookies), and a request that could be read two ways is refused (400): a
  query parameter or a JSON key given twice, two Cookie, Authorization or Content-Type headers.
"""
from __future__ import annotations

import json
import logging
import secrets
import threading
from collections import OrderedDict
from urllib.parse import parse_qsl

from starlette.requests import cookie_parser

log = logging.getLogger("sdxl_ui")

API = "/gradio_api/"
# What the login page calls before anyone is logged in (none of them acts on a session).
OPEN_WITHOUT_LOGIN = frozenset({"login_check", "user", "token", "app_id", "startup-events", "theme.css"})
CALL_ROUTES = ("queue/join", "run/", "api/", "call/")  # POST routes that start a handler
CLIENT_COOKIE = "sdxl-client"
MAX_BODY = 1 << 20  # a call's JSON body (prompts are at most a few thousand characters; uploads go elsewhere)
MAX_SESSIONS = 100_000  # session owners remembered (the oldest are forgotten first)
SINGLE_HEADERS = (b"cookie", b"authorization", b"content-type")  # read by the guard or by the framework: once only


class Refusal(Exception):
    """An answer instead of gradio's: an HTTP status and a one-line message (at most 200 printable characters)."""

    def __init__(self, code: int, message: str):
        super().__init__(_printable(message, 200))
        self.code = code


def _printable(text: str, limit: int) -> str:
    """One log line's worth of ``text``: control characters (a %0A in a path, say) shown as '?'."""
    return "".join(c if c.isprintable() else "?" for c in text[:limit])


def _headers(scope) -> dict:
    return {k.decode("latin1").lower(): v.decode("latin1") for k, v in scope.get("headers") or []}


def _cookie(scope, name: str) -> str | None:
    """A cookie's value as starlette reads it (``request.cookies``: its parser, the first Cookie header)."""
    raw = _headers(scope).get("cookie")
    return (cookie_parser(raw).get(name) or None) if raw else None


def login_user(scope) -> str | None:
    """The gradio login of this request, read as gradio's ``get_current_user`` reads it (the secure access-token
    cookie, else the unsecure one), or None."""
    app = scope.get("app")
    tokens, cookie_id = getattr(app, "tokens", None), getattr(app, "cookie_id", None)
    if not isinstance(tokens, dict) or cookie_id is None:
        return None
    token = _cookie(scope, f"access-token-{cookie_id}") or _cookie(scope, f"access-token-unsecure-{cookie_id}")
    return tokens.get(token) if token else None


def read_two_ways(scope) -> str | None:
    """What in this request the guard and the framework could read differently (``field: problem (got value)``),
    or None: a header that must come once, a query parameter given twice."""
    names = [k.lower() for k, _ in scope.get("headers") or []]
    for header in SINGLE_HEADERS:
        if names.count(header) > 1:
            return f"{header.decode()}: the header is given {names.count(header)} times (got a request with each)"
    seen: dict[str, int] = {}
    for key, _ in parse_qsl(scope.get("query_string", b"").decode("latin1"), keep_blank_values=True):
        seen[key] = seen.get(key, 0) + 1
        if seen[key] > 1:
            return f"{_printable(key, 40)}: is given {seen[key]} times (got a query that repeats it)"
    return None


def _query(scope, name: str) -> str:
    """A query parameter as starlette reads it (its last value; ``read_two_ways`` refused a repeated one)."""
    values = [v for k, v in parse_qsl(scope.get("query_string", b"").decode("latin1"), keep_blank_values=True)
              if k == name]
    return values[-1] if values else ""


def _blocks(scope):
    get_blocks = getattr(scope.get("app"), "get_blocks", None)
    return get_blocks() if callable(get_blocks) else None


def check_call(blocks, body, api_name: str | None) -> str | None:
    """What is wrong with the shape of a call (``field: problem (got value)``), or None."""
    if not isinstance(body, dict):
        return f"body: must be a JSON object (got {type(body).__name__})"
    fns = getattr(blocks, "fns", None)
    if not isinstance(fns, dict):
        return None
    index = body.get("fn_index")
    if index is None:
        if api_name is None:
            return "fn_index: is missing (got None)"
        fn = next((f for f in fns.values() if getattr(f, "api_name", None) == api_name), None)
        if fn is None:
            return f"api_name: no such endpoint (got {api_name!r})"
    else:
        if isinstance(index, bool) or not isinstance(index, int):
            return f"fn_index: must be a whole number (got {index!r})"
        fn = fns.get(index)
        if fn is None:
            return f"fn_index: no such event handler (got {index!r})"
    data = body.get("data")
    if not isinstance(data, list):
        return f"data: must be a list (got {type(data).__name__})"
    wanted = len(getattr(fn, "inputs", None) or [])
    if len(data) != wanted:
        name = getattr(fn, "api_name", None) or f"fn_index {index}"
        return f"data: {name} takes {wanted} values (got {len(data)})"
    return None


class SessionGuardMiddleware:
    """See the module's docstring. ``login``: the page has a login (then every API route needs it)."""

    def __init__(self, app, login: bool = False):
        self.app = app
        self.login = login
        self.owners: OrderedDict = OrderedDict()  # session hash -> owner key
        self.lock = threading.Lock()

    async def __call__(self, scope, receive, send):
        if scope.get("type") != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        problem = read_two_ways(scope)
        if problem:
            log.warning("refused %s %s: %s", scope.get("method"), _printable(path, 120), problem)
            await _send_json(send, 400, {"detail": _printable(problem, 200)})
            return
        cookie = _cookie(scope, CLIENT_COOKIE)
        if cookie is None:
            send = _setting_cookie(send, scope)
        if not path.startswith(API):  # the page, its assets, /login, /config: gradio's own checks
            await self.app(scope, receive, send)
            return
        route = path[len(API):]
        user = login_user(scope) if self.login else None
        host = (scope.get("client") or ("?",))[0]
        key = f"user:{user}" if user else (f"client:{cookie}" if cookie else f"address:{host}")
        try:
            if self.login and user is None and route.rstrip("/") not in OPEN_WITHOUT_LOGIN:
                raise Refusal(401, "Not authenticated")
            receive = await self._check(scope, receive, route, key)
        except Refusal as refusal:
            log.warning("refused %s %s from %s: %s", scope.get("method"), _printable(path, 120), user or host,
                        refusal)
            await _send_json(send, refusal.code, {"detail": str(refusal)})
            return
        await self.app(scope, receive, send)

    async def _check(self, scope, receive, route: str, key: str):
        """Raises Refusal, or returns the receive callable to go on with (the body read here is replayed)."""
        method = scope.get("method")
        if route.startswith("stream/"):
            raise Refusal(404, "stream: this page has no streaming components (got a stream request)")
        if route.startswith("heartbeat/") and method == "GET":
            self._claim(route[len("heartbeat/"):].strip("/"), key)
        elif route.rstrip("/") == "queue/data" and method == "GET":
            session = _query(scope, "session_hash")
            self._claim(session, key)
            _expect_messages(scope, session)
        elif route.startswith("call/") and method == "GET":
            _expect_messages(scope, None, route.strip("/").split("/")[-1])
        elif method == "POST" and (route.startswith(CALL_ROUTES) or route.rstrip("/") == "cancel"):
            body, receive = await _read_json(receive)
            if route.rstrip("/") == "cancel":
                self._check_cancel(scope, body, key)
            else:
                # queue/join names its handler by fn_index; run/NAME, api/NAME, call/NAME, call/v2/NAME by name
                api_name = None if route.startswith("queue/") else route.strip("/").split("/")[-1]
                problem = check_call(_blocks(scope), body, api_name)
                if problem:
                    raise Refusal(422, problem)
                if body.get("session_hash") is not None:
                    self._claim(str(body["session_hash"]), key)
        return receive

    def _claim(self, session: str, key: str) -> None:
        """Binds an unused session hash to ``key``; refuses a session hash that belongs to someone else."""
        if not session:
            return
        with self.lock:
            owner = self.owners.get(session)
            if owner is None:
                self.owners[session] = key
                while len(self.owners) > MAX_SESSIONS:
                    self.owners.popitem(last=False)
            elif owner != key:
                raise Refusal(403, f"session_hash: belongs to another client (got {session[:40]!r})")

    def _check_cancel(self, scope, body, key: str) -> None:
        if not isinstance(body, dict):
            raise Refusal(422, f"body: must be a JSON object (got {type(body).__name__})")
        session, event_id = str(body.get("session_hash") or ""), str(body.get("event_id") or "")
        if not session or not event_id:
            raise Refusal(422, f"cancel: needs session_hash and event_id (got {sorted(body)!r})")
        self._claim(session, key)
        queue = getattr(_blocks(scope), "_queue", None)
        events = getattr(queue, "event_ids_to_events", None)
        if not isinstance(events, dict):
            raise Refusal(403, "cancel: cannot tell whose job this is (got an unknown queue)")
        event = events.get(event_id)
        if event is None:
            app = scope.get("app")
            if event_id in (getattr(app, "iterators", None) or {}):
                raise Refusal(403, f"event_id: not a job of this session (got {event_id[:40]!r})")
            return  # finished or unknown: gradio's cancel has nothing to act on
        fn_id = getattr(getattr(event, "fn", None), "_id", None)
        if event.session_hash != session or body.get("fn_index") != fn_id:
            raise Refusal(403, f"event_id: not a job of this session and handler (got {event_id[:40]!r})")


def _expect_messages(scope, session: str | None, event_id: str | None = None) -> None:
    """gradio answers a message stream for a session without pending messages (or an unknown event) with a 404
    raised after the stream started: a traceback in the log. Said here, before the stream starts, instead."""
    queue = getattr(_blocks(scope), "_queue", None)
    pending = getattr(queue, "pending_messages_per_session", None)
    if not isinstance(pending, dict):
        return
    if event_id is not None:
        event = (getattr(queue, "event_ids_to_events", None) or {}).get(event_id)
        session = event.session_hash if event is not None else next(
            (s for s, ids in (getattr(queue, "pending_event_ids_session", None) or {}).items() if event_id in ids),
            event_id)
        if session not in pending:
            raise Refusal(404, f"event_id: no such job, or its results were already read (got {event_id[:40]!r})")
    elif session not in pending:
        raise Refusal(404, f"session_hash: has no job in the queue (got {session[:40]!r})")


async def _read_json(receive):
    """(parsed JSON body or None, a receive that replays the body)."""
    chunks, size, more = [], 0, True
    while more:
        message = await receive()
        if message.get("type") != "http.request":
            raise Refusal(400, "body: the client went away")
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > MAX_BODY:
            raise Refusal(413, f"body: larger than {MAX_BODY} bytes (got more)")
        chunks.append(chunk)
        more = message.get("more_body", False)
    raw = b"".join(chunks)
    replayed = False

    async def replay():
        nonlocal replayed
        if not replayed:
            replayed = True
            return {"type": "http.request", "body": raw, "more_body": False}
        return await receive()

    repeated: list[str] = []

    def pairs(items):
        out = dict(items)
        if len(out) < len(items) and not repeated:
            seen: set = set()
            first = next(k for k, _ in items if k in seen or seen.add(k))
            repeated.extend(k for k, _ in items if k == first)
        return out

    try:
        body = json.loads(raw, object_pairs_hook=pairs) if raw else None
    except RecursionError:
        raise Refusal(422, f"body: is nested too deeply (got {raw[:40]!r})") from None
    except ValueError:
        raise Refusal(422, f"body: is not JSON (got {raw[:40]!r})") from None
    if repeated:  # json (and so gradio) takes the last of them: refused rather than guessed
        raise Refusal(400, f"{_printable(repeated[0], 40)}: is given {len(repeated)} times "
                           "(got a JSON object that repeats it)")
    return body, replay


def _setting_cookie(send, scope):
    """Wraps ``send`` to give this browser its random client cookie with the response."""
    secure = "; Secure" if scope.get("scheme") == "https" else ""
    value = secrets.token_urlsafe(24)
    header = f"{CLIENT_COOKIE}={value}; Path=/; HttpOnly; SameSite=Lax{secure}".encode("latin1")

    async def wrapped(message):
        if message.get("type") == "http.response.start":
            message = {**message, "headers": [*message.get("headers", []), (b"set-cookie", header)]}
        await send(message)

    return wrapped


async def _send_json(send, code: int, payload: dict) -> None:
    data = json.dumps(payload).encode("utf-8")
    await send({"type": "http.response.start", "status": code,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]})
    await send({"type": "http.response.body", "body": data})
