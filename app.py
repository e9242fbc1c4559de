"""sdxl_ui web app: `python app.py` then open the printed localhost address.

Flags → settings → service (probe, plan, model) → page → queue().launch(). Nothing runs at import.

Exit codes: 0 after a clean stop (Ctrl-C or SIGTERM: no new jobs, the running one stops at its next step, an
image being saved is finished); 2 bad flags, one line naming the flag and the value (including a --model that
does not exist or is not an SDXL model, and a --device/--attention this machine cannot honour); 1 any other
failure to start.
"""
from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import re
import secrets
import signal
import sys
import threading

log = logging.getLogger("sdxl_ui")

# The page has no upload field; gradio's upload route still exists, so it gets a small limit.
MAX_UPLOAD = "1mb"
STOP_TIMEOUT_S = 120.0  # how long a stop waits for the running job's current step and save


class _Parser(argparse.ArgumentParser):
    """argparse that reports a bad flag as one line, ``error: --FLAG: problem (got VALUE)``, and exits 2."""

    def error(self, message):
        found = re.match(r"argument ([^:]+): (.*)", message, re.S)
        if not found:  # e.g. an unknown flag
            print(f"error: {message}", file=sys.stderr)
            sys.exit(2)
        flag, problem = found.group(1).split("/")[-1], found.group(2)
        for pattern, wording in ((r"invalid int value: (.*)", "must be a whole number (got {})"),
                                 (r"invalid float value: (.*)", "must be a number (got {})"),
                                 (r"invalid choice: (.*) \(choose from (.*)\)", "must be one of {1} (got {0})"),
                                 (r"expected one argument", "needs a value (got nothing)")):
            matched = re.fullmatch(pattern, problem, re.S)
            if matched:
                problem = wording.format(*matched.groups())
                break
        print(f"error: {flag}: {problem}", file=sys.stderr)
        sys.exit(2)


def _whole(low: int, high: int | None = None):
    def parse(text: str) -> int:
        try:
            value = int(text.strip())
        except ValueError:
            value = None
        if value is None or value < low or (high is not None and value > high):
            bounds = f"from {low} to {high}" if high is not None else f"of at least {low}"
            raise argparse.ArgumentTypeError(f"must be a whole number {bounds} (got {text!r})")
        return value
    return parse


def _host(text: str) -> str:
    if not text.strip() or any(c.isspace() for c in text):
        raise argparse.ArgumentTypeError(f"must be an address or host name (got {text!r})")
    return text


def check_forwarded(value: str, name: str = "--forwarded-allow-ips") -> str:
    """A comma-separated list of proxy addresses or networks (or '*', any peer) whose X-Forwarded-For is believed."""
    items = [item.strip() for item in value.split(",")]
    for item in items:
        if item == "*" and len(items) == 1:
            continue
        try:
            ipaddress.ip_network(item, strict=False)
        except ValueError:
            raise BadFlag(f"{name}: must be proxy addresses or networks separated by commas, or * "
                          f"(got {value!r})") from None
    return ",".join(items)


def parse_args(argv=None):
    from sdxl_ui.a1111 import add_api_args
    from sdxl_ui.cli import add_settings_args

    parser = _Parser(description="sdxl_ui: Stable Diffusion XL in the browser")
    add_settings_args(parser)
    parser.add_argument("--host", type=_host, default="127.0.0.1",
                        help="bind address (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=_whole(1, 65535), default=None,
                        help="port (default 7860, or the next free one)")
    parser.add_argument("--forwarded-allow-ips", default=None, metavar="ADDRESSES",
                        help="the reverse proxies (addresses or networks, comma-separated) whose X-Forwarded-For "
                             "names the client; default none: the client is the connecting address (docs/security.md). "
                             "Env SDXL_UI_FORWARDED_ALLOW_IPS")
    parser.add_argument("--share", action="store_true", help="also make a temporary public link (needs auth)")
    parser.add_argument("--auth", action="append", default=None, metavar="USER:PASS",
                        help="a login for the page; repeat for several users (or env SDXL_UI_AUTH, one login)")
    parser.add_argument("--operator", default=None,
                        help="the login that may switch the model for everyone (default: the first --auth user; "
                             "without a login: whoever connects from this machine). Env SDXL_UI_OPERATOR")
    parser.add_argument("--queue-size", type=_whole(1, 10_000), default=16, help="waiting jobs before 'queue full'")
    parser.add_argument("--max-jobs-per-user", type=_whole(0), default=0, help="jobs per user per hour; 0 = unlimited")
    serving = parser.add_argument_group("serving a team (Ray Serve, requirements-serve.txt; docs/serving.md)")
    # --workers and --worker-cpus values are checked by the Ray backend (ray_serve.py), which names them.
    serving.add_argument("--workers", type=int, default=None, metavar="N",
                         help="start a local Ray instance with N worker replicas, one job each at a time "
                              "(0 = one per GPU, or one on a machine without a GPU)")
    serving.add_argument("--ray-address", default=None, metavar="ADDRESS",
                         help="use an existing Ray cluster (`ray start --head` …), e.g. 10.0.0.5:6379 or auto")
    serving.add_argument("--worker-cpus", type=float, default=1.0, metavar="CPUS",
                         help="CPU share of each worker replica that runs on the CPU (default 1)")
    add_api_args(parser)  # --api, --api-auth (AUTOMATIC1111's flags)
    return parser.parse_args(argv)


class BadFlag(ValueError):
    """A flag value app.py refuses (exit 2); the message names the flag and the value."""


def resolve_auth(args) -> tuple[list[tuple[str, str]] | None, bool]:
    """(credentials, generated). Sharing never runs without auth: credentials are generated when absent."""
    name = "--auth" if args.auth else "SDXL_UI_AUTH"
    raw = args.auth or ([os.environ["SDXL_UI_AUTH"]] if os.environ.get("SDXL_UI_AUTH") else [])
    creds = []
    for value in raw:
        user, sep, password = value.partition(":")
        if not sep or not user or not password:  # the value holds a password: not repeated
            raise BadFlag(f"{name}: expected USER:PASS (got a value without ':' or with an empty part)")
        if user in dict(creds):
            raise BadFlag(f"{name}: user {user!r} is given twice (got {user!r})")
        creds.append((user, password))
    if creds:
        return creds, False
    if args.share:
        return [("sdxl", secrets.token_urlsafe(12))], True
    return None, False


def resolve_operator(args, creds) -> str | None:
    """The operator's login name; None without a login (then the operator is whoever connects from this machine)."""
    name = "--operator" if args.operator else "SDXL_UI_OPERATOR"
    operator = args.operator or os.environ.get("SDXL_UI_OPERATOR") or None
    if creds is None:
        if operator:
            raise BadFlag(f"{name}: names a login, but the page has none (add --auth USER:PASS) (got {operator!r})")
        return None
    users = [user for user, _ in creds]
    if operator is None:
        return users[0]
    if operator not in users:
        raise BadFlag(f"{name}: is not one of the --auth users ({', '.join(map(repr, users))}) (got {operator!r})")
    return operator


def resolve_forwarded(args) -> str:
    """The proxies whose X-Forwarded-For is believed ('' = none: the client is the connecting address)."""
    if args.forwarded_allow_ips is not None:
        return check_forwarded(args.forwarded_allow_ips)
    value = os.environ.get("SDXL_UI_FORWARDED_ALLOW_IPS", "")
    return check_forwarded(value, "SDXL_UI_FORWARDED_ALLOW_IPS") if value else ""


def _settings(args):
    """AppSettings from flags and SDXL_UI_* variables; a bad value names the flag, or the variable it came from."""
    from sdxl_ui.cli import settings_from_args
    from sdxl_ui.schema import ValidationError

    try:
        return settings_from_args(args)
    except ValidationError as exc:
        field = exc.field.lower().removeprefix("sdxl_ui_")
        env = f"SDXL_UI_{field.upper()}"
        name = f"--{field.replace('_', '-')}" if getattr(args, field, None) is not None or env not in os.environ \
            else env
        raise BadFlag(f"{name}: {exc.problem} (got {exc.value!r})"[:300]) from None


def _configure(args):
    """(settings, auth, generated, operator, forwarded, api settings or None); raises BadFlag before anything
    starts."""
    from sdxl_ui.a1111 import api_config
    from sdxl_ui.schema import ValidationError

    settings = _settings(args)
    auth, generated = resolve_auth(args)
    operator = resolve_operator(args, auth)
    try:
        api_settings = api_config(args, auth, operator) if args.api else None
    except ValidationError as exc:
        raise BadFlag(str(exc)) from None
    return settings, auth, generated, operator, resolve_forwarded(args), api_settings


def _make_service(settings, args):
    """The generation service, checked: (service, None) or (None, exit code) after one error line."""
    from sdxl_ui.cli import EXIT_BAD_INPUT, plan_error_code
    from sdxl_ui.jobs import capabilities_of
    from sdxl_ui.models import ModelLoadError
    from sdxl_ui.policy import PlanError
    from sdxl_ui.schema import ValidationError
    from sdxl_ui.service import GenerationService

    if args.workers is not None or args.ray_address:
        from sdxl_ui.backends.ray_serve import RayBackend

        try:  # the same seam as GenerationService: the page cannot tell them apart
            service = RayBackend(settings, workers=args.workers or None, address=args.ray_address,
                                 cpus_per_worker=args.worker_cpus)
        except ValidationError as exc:
            log.error("error: %s", exc)
            return None, EXIT_BAD_INPUT
    else:
        service = GenerationService(settings)
    try:
        # A --model that does not exist or is not SDXL: said now, not in the page. (A hub id passes: whether it
        # can be downloaded shows in the page's status panel, which then offers the demo model.)
        service.check_model()
        service.plan  # noqa: B018 - a --device/--attention this machine cannot honour
    except ModelLoadError as exc:
        log.error("error: %s", exc)
        return None, EXIT_BAD_INPUT
    except PlanError as exc:
        if plan_error_code(exc) == EXIT_BAD_INPUT:
            log.error("error: %s", exc)
            return None, EXIT_BAD_INPUT
        # Too little memory: the page says so in its status panel (and offers the demo model).
    if capabilities_of(service).start:  # the Ray backend: start or join Ray, deploy the workers (they load meanwhile)
        try:
            service.start()
        except Exception as exc:  # noqa: BLE001 - e.g. no cluster at --ray-address
            log.error("error: Ray Serve could not start: %s: %s", type(exc).__name__, exc)
            return None, 1
    return service, None


def _launch(demo, args, auth, forwarded: str, api=None) -> bool:
    """Serve the page. False (after one error line) when the port cannot be had."""
    from starlette.middleware import Middleware

    from sdxl_ui.a1111.limits import BodyLimitMiddleware
    from sdxl_ui.logins import LoginThrottle
    from sdxl_ui.ui.access import LoginThrottleMiddleware
    from sdxl_ui.ui.guard import SessionGuardMiddleware
    from sdxl_ui.ui.render import CSS

    # uvicorn believes X-Forwarded-For from FORWARDED_ALLOW_IPS (default: this machine). Only the proxies named
    # by --forwarded-allow-ips may name the client; otherwise the client is the connecting address.
    os.environ["FORWARDED_ALLOW_IPS"] = forwarded
    # Every route: no body over MAX_BODY is read; then gradio's own routes behind the session guard.
    middleware = [Middleware(BodyLimitMiddleware), Middleware(SessionGuardMiddleware, login=auth is not None)]
    throttle = LoginThrottle()  # one count of failed logins for the page and the API
    if auth:
        middleware.append(Middleware(LoginThrottleMiddleware, throttle=throttle))
    app_kwargs = {"middleware": middleware}
    # FastAPI's own schema of every route: never with a login (gradio's needs the page's login); with --api the API
    # serves its own /openapi.json and /docs, behind its login (sdxl_ui/a1111/openapi.py).
    if auth or api:
        app_kwargs["openapi_url"] = None
    if api:  # --api: AUTOMATIC1111's /sdapi/v1 on this port (sdxl_ui/a1111)
        api.config.throttle = throttle
        app_kwargs["routes"] = api.routes()
    # The generated images are never served from the outputs folder (allowed_paths stays empty): the page serves
    # each session its own copies under unguessable names (ui/app.py).
    try:
        demo.launch(server_name=args.host, server_port=args.port, share=args.share, auth=auth,
                    css=CSS, prevent_thread_lock=True, show_error=False, footer_links=["gradio"],
                    max_file_size=MAX_UPLOAD, app_kwargs=app_kwargs)
    except OSError as exc:  # the port is taken, or the address is not this machine's
        log.error("error: --port: cannot listen on %s:%s: %s (got %s)", args.host, args.port or "7860",
                  str(exc).split(". ")[0], args.port)
        return False
    return True


def _announce_share(demo, config, auth) -> None:
    if demo.share_url:
        config.share_message = f"Share link: {demo.share_url} (login required)"
        log.warning("* Share link: %s — user: %s", demo.share_url, auth[0][0])
    else:
        config.share_message = ("Share link could not be created (no internet connection to the share "
                                "service?). Serving locally only at " + demo.local_url)
        log.warning("* %s", config.share_message)


def _serve_until_stopped(service, demo) -> int:
    stop = threading.Event()

    def on_signal(signum, _frame):
        if stop.is_set():
            raise KeyboardInterrupt  # a second signal: stop now
        log.warning("%s received: no new jobs; the running job stops at its next step (an image being saved "
                    "is finished first)", signal.Signals(signum).name)
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)
    try:
        while not stop.wait(0.5):
            pass
        finished = service.shutdown(STOP_TIMEOUT_S)
    except KeyboardInterrupt:
        finished = False
    demo.close()
    log.warning("Stopped%s.", "" if finished else " (the running job had not finished)")
    return 0


def main(argv=None) -> int:
    from sdxl_ui.cli import EXIT_BAD_INPUT, setup_logging

    setup_logging(logging.INFO)
    args = parse_args(argv)
    try:
        settings, auth, generated, operator, forwarded, api_settings = _configure(args)
    except BadFlag as exc:
        log.error("error: %s", exc)
        return EXIT_BAD_INPUT

    from sdxl_ui.a1111 import A1111Api
    from sdxl_ui.ui import UIConfig, build_ui
    from sdxl_ui.ui.access import Access

    service, code = _make_service(settings, args)
    if service is None:
        return code
    # --api: the page's jobs and the API's wait in one line, in arrival order, under one per-user job limit
    # (sdxl_ui/a1111).
    api = A1111Api(service, api_settings) if api_settings else None
    config = UIConfig(queue_size=args.queue_size, max_jobs_per_user=args.max_jobs_per_user,
                      access=Access(login=auth is not None, operator=operator), limit=api.limit if api else None)
    if args.share:
        config.share_message = "Creating a share link…"
    demo = build_ui(api.page_backend if api else service, config)
    # Load the model in the background: the page opens at once and its status panel follows the load.
    service.preload_in_background()
    outputs = settings.outputs.resolve()
    outputs.mkdir(parents=True, exist_ok=True)
    if generated:  # one log record: one line, never interleaved with another thread's output
        log.warning("* Share login — user: %s  password: %s", auth[0][0], auth[0][1])
    if auth:
        log.info("* Operator (may switch the model for everyone): %s", operator)
    if forwarded:
        log.info("* Client addresses: X-Forwarded-For from %s is believed", forwarded)
    if not _launch(demo, args, auth, forwarded, api):
        service.shutdown(0)
        return 1
    if args.share:
        _announce_share(demo, config, auth)
    return _serve_until_stopped(service, demo)


if __name__ == "__main__":
    sys.exit(main())
