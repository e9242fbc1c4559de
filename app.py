"""sdxl_ui web app: `python app.py` then open the printed localhost address.

Flags → settings → service (probe, plan, model) → page → queue().launch(). Nothing runs at import.

Exit codes: 0 after a clean stop (Ctrl-C or SIGTERM: no new jobs, the running one stops at its next step, an
image being saved is finished); 2 bad flags, one line naming the flag and the value (including a --model that
does not exist or is not an SDXL model, and a --device/--attention this machine cannot honour); 1 any other
failure to start.
"""
from __future__ import annotations

import argparse
import logging
import os
import secrets
import signal
import sys
import threading

log = logging.getLogger("sdxl_ui")

# The page has no upload field; gradio's upload route still exists, so it gets a small limit.
MAX_UPLOAD = "1mb"
STOP_TIMEOUT_S = 120.0  # how long a stop waits for the running job's current step and save


def parse_args(argv=None):
    from sdxl_ui.a1111 import add_api_args
    from sdxl_ui.cli import add_settings_args

    parser = argparse.ArgumentParser(description="sdxl_ui: Stable Diffusion XL in the browser")
    add_settings_args(parser)
    parser.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=None, help="port (default 7860, or the next free one)")
    parser.add_argument("--share", action="store_true", help="also make a temporary public link (needs auth)")
    parser.add_argument("--auth", action="append", default=None, metavar="USER:PASS",
                        help="a login for the page; repeat for several users (or env SDXL_UI_AUTH, one login)")
    parser.add_argument("--operator", default=None,
                        help="the login that may switch the model for everyone (default: the first --auth user; "
                             "without a login: whoever connects from this machine). Env SDXL_UI_OPERATOR")
    parser.add_argument("--queue-size", type=int, default=16, help="waiting jobs before 'queue full'")
    parser.add_argument("--max-jobs-per-user", type=int, default=0, help="0 = unlimited")
    serving = parser.add_argument_group("serving a team (Ray Serve, requirements-serve.txt; README: Serving a team)")
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
    raw = args.auth or ([os.environ["SDXL_UI_AUTH"]] if os.environ.get("SDXL_UI_AUTH") else [])
    creds = []
    for value in raw:
        user, sep, password = value.partition(":")
        if not sep or not user or not password:
            raise BadFlag("auth: expected USER:PASS (got a value without ':' or with an empty part)")
        if user in dict(creds):
            raise BadFlag(f"auth: user {user!r} is given twice")
        creds.append((user, password))
    if creds:
        return creds, False
    if args.share:
        return [("sdxl", secrets.token_urlsafe(12))], True
    return None, False


def resolve_operator(args, creds) -> str | None:
    """The operator's login name; None without a login (then the operator is whoever connects from this machine)."""
    operator = args.operator or os.environ.get("SDXL_UI_OPERATOR") or None
    if creds is None:
        if operator:
            raise BadFlag(f"operator: {operator!r} names a login, but the page has none (add --auth USER:PASS)")
        return None
    users = [user for user, _ in creds]
    if operator is None:
        return users[0]
    if operator not in users:
        raise BadFlag(f"operator: {operator!r} is not one of the --auth users ({', '.join(map(repr, users))})")
    return operator


def main(argv=None) -> int:
    from sdxl_ui.a1111 import A1111Api, api_config
    from sdxl_ui.cli import EXIT_BAD_INPUT, plan_error_code, settings_from_args, setup_logging
    from sdxl_ui.schema import ValidationError

    setup_logging(logging.INFO)
    args = parse_args(argv)
    try:
        settings = settings_from_args(args)
        auth, generated = resolve_auth(args)
        operator = resolve_operator(args, auth)
        api_settings = api_config(args, auth, operator) if args.api else None
    except (ValidationError, BadFlag) as exc:
        log.error("error: %s", exc)
        return EXIT_BAD_INPUT

    from sdxl_ui.models import ModelLoadError
    from sdxl_ui.policy import PlanError
    from sdxl_ui.service import GenerationService
    from sdxl_ui.ui import UIConfig, build_ui
    from sdxl_ui.ui.access import Access, LoginThrottle, LoginThrottleMiddleware
    from sdxl_ui.ui.render import CSS

    if args.workers is not None or args.ray_address:
        from sdxl_ui.backends.ray_serve import RayBackend

        try:  # the same seam as GenerationService: the page cannot tell them apart
            service = RayBackend(settings, workers=args.workers or None, address=args.ray_address,
                                 cpus_per_worker=args.worker_cpus)
        except ValidationError as exc:
            log.error("error: %s", exc)
            return EXIT_BAD_INPUT
    else:
        service = GenerationService(settings)
    try:
        # A --model that does not exist or is not SDXL: said now, not in the page. (A hub id passes: whether it
        # can be downloaded shows in the page's status panel, which then offers the demo model.)
        service.check_model()
        service.plan  # noqa: B018 - a --device/--attention this machine cannot honour
    except ModelLoadError as exc:
        log.error("error: %s", exc)
        return EXIT_BAD_INPUT
    except PlanError as exc:
        if plan_error_code(exc) == EXIT_BAD_INPUT:
            log.error("error: %s", exc)
            return EXIT_BAD_INPUT
        # Too little memory: the page says so in its status panel (and offers the demo model).

    if hasattr(service, "start"):  # the Ray backend: start or join Ray, deploy the workers (they load meanwhile)
        try:
            service.start()
        except Exception as exc:  # noqa: BLE001 - e.g. no cluster at --ray-address
            log.error("error: Ray Serve could not start: %s: %s", type(exc).__name__, exc)
            return 1
    config = UIConfig(queue_size=args.queue_size, max_jobs_per_user=args.max_jobs_per_user,
                      access=Access(login=auth is not None, operator=operator))
    if args.share:
        config.share_message = "Creating a share link…"
    # --api: AUTOMATIC1111's /sdapi/v1 on this port; the page's jobs and the API's wait in one line (sdxl_ui/a1111).
    api = A1111Api(service, api_settings) if args.api else None
    demo = build_ui(api.page_backend if api else service, config)
    # Load the model in the background: the page opens at once and its status panel follows the load.
    service.preload_in_background()
    outputs = settings.outputs.resolve()
    outputs.mkdir(parents=True, exist_ok=True)
    if generated:  # one log record: one line, never interleaved with another thread's output
        log.warning("* Share login — user: %s  password: %s", auth[0][0], auth[0][1])
    if auth:
        log.info("* Operator (may switch the model for everyone): %s", operator)

    stop = threading.Event()

    def on_signal(signum, _frame):
        if stop.is_set():
            raise KeyboardInterrupt  # a second signal: stop now
        log.warning("%s received: no new jobs; the running job stops at its next step (an image being saved "
                    "is finished first)", signal.Signals(signum).name)
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)
    # The generated images are never served from the outputs folder (allowed_paths stays empty): the page serves
    # each session its own copies under unguessable names (ui/app.py).
    app_kwargs = {}
    throttle = LoginThrottle()  # one count of failed logins for the page and the API
    if auth:
        from starlette.middleware import Middleware

        app_kwargs["middleware"] = [Middleware(LoginThrottleMiddleware, throttle=throttle)]
    if api:
        api.config.throttle = throttle
        app_kwargs["routes"] = api.routes()
    demo.launch(server_name=args.host, server_port=args.port, share=args.share, auth=auth,
                css=CSS, prevent_thread_lock=True, show_error=False, footer_links=["gradio"],
                max_file_size=MAX_UPLOAD, app_kwargs=app_kwargs)
    if args.share:
        if demo.share_url:
            config.share_message = f"Share link: {demo.share_url} (login required)"
            log.warning("* Share link: %s — user: %s", demo.share_url, auth[0][0])
        else:
            config.share_message = ("Share link could not be created (no internet connection to the share "
                                    "service?). Serving locally only at " + demo.local_url)
            log.warning("* %s", config.share_message)
    try:
        while not stop.wait(0.5):
            pass
        finished = service.shutdown(STOP_TIMEOUT_S)
    except KeyboardInterrupt:
        finished = False
    demo.close()
    log.warning("Stopped%s.", "" if finished else " (the running job had not finished)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
