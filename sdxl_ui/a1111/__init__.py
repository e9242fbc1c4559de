"""An AUTOMATIC1111-compatible ``/sdapi/v1`` beside the page (``app.py --api``; docs/api.md).

``A1111Api`` wires it: the shared ``DeviceQueue`` (page and API jobs in one line), the backend the page gets
(``page_backend``), and the routes that app.py hands to the FastAPI app gradio serves (``routes()``).
No torch here (like the page).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

from ..schema import ValidationError
from .jobs import CallerJobs, DeviceQueue, HourlyLimit, QueuedBackend

log = logging.getLogger("sdxl_ui")


def add_api_args(parser) -> None:
    group = parser.add_argument_group("AUTOMATIC1111-compatible API (docs/api.md)")
    group.add_argument("--api", action="store_true",
                       help="also serve AUTOMATIC1111's /sdapi/v1 endpoints (txt2img, progress, …) on the same port")
    group.add_argument("--api-auth", action="append", default=None, metavar="USER:PASS[,USER:PASS]",
                       help="HTTP Basic logins for /sdapi (default: the page's --auth logins)")
    group.add_argument("--api-steps-policy", action="store_true",
                       help="apply the CPU steps policy (× 0.7) to the steps API clients name too (default: a client "
                            "that names its steps gets them)")
    group.add_argument("--styles", metavar="FILE",
                       help="AUTOMATIC1111's styles.csv (name,prompt,negative_prompt): the styles requests may name")
    group.add_argument("--api-models", action="append", default=None, metavar="MODEL[,MODEL]",
                       help="further models /sdapi/v1/sd-models lists and the operator may switch to with POST "
                            "/options (default: only the started --model)")


def parse_logins(values) -> dict[str, str]:
    logins: dict[str, str] = {}
    for value in values or []:
        for item in str(value).split(","):
            user, sep, password = item.strip().partition(":")
            if not sep or not user or not password:
                raise ValidationError("api-auth", "…", "expected USER:PASS[,USER:PASS] (a value without ':' or "
                                                       "with an empty part)")
            if user in logins:
                raise ValidationError("api-auth", user, "user is given twice")
            logins[user] = password
    return logins


@dataclass
class ApiConfig:
    logins: dict = field(default_factory=dict)  # user -> password; empty = no login (then per client address)
    operator: str | None = None  # the login that may switch the model (POST /options); None: a loopback client
    queue_size: int = 16
    max_jobs_per_user: int = 0
    throttle: object = None  # ui.access.LoginThrottle shared with the page's login
    steps_policy: bool = False  # --api-steps-policy: the CPU steps policy on the steps clients name too
    styles: dict = field(default_factory=dict)  # --styles: name -> (prompt, negative prompt)
    models: tuple = ()  # --api-models: the models besides the started one that POST /options may switch to
    flags: dict = field(default_factory=dict)  # GET /cmd-flags: the app's flags as A1111's dests (no secrets)


def api_config(args, page_auth, page_operator, throttle=None) -> ApiConfig:
    """--api-auth or the page's explicit logins; --share without an explicit login refuses to start (exit 2)."""
    explicit = parse_logins(args.api_auth)
    if args.share and not explicit and not args.auth:
        import os

        if not os.environ.get("SDXL_UI_AUTH"):
            raise ValidationError("api", "--share", "the share link would expose /sdapi to anyone: give "
                                                    "--api-auth USER:PASS (or --auth)")
    if explicit:
        operator = page_operator if page_operator in explicit else next(iter(explicit))
        logins = explicit
    else:
        logins, operator = dict(page_auth or []), page_operator
    from .styles import read_styles

    styles = read_styles(args.styles) if getattr(args, "styles", None) else {}
    models = tuple(dict.fromkeys(m.strip() for value in getattr(args, "api_models", None) or []
                                 for m in str(value).split(",") if m.strip()))
    return ApiConfig(logins=logins, operator=operator if logins else None, queue_size=args.queue_size,
                     max_jobs_per_user=args.max_jobs_per_user, throttle=throttle,
                     steps_policy=bool(getattr(args, "api_steps_policy", False)), styles=styles, models=models,
                     flags=cmd_flags(args, page_auth))


def cmd_flags(args, page_auth) -> dict:
    """The flags of app.py that A1111 has too, under its argparse ``dest`` names (GET /cmd-flags): never a password
    ("***") nor a server path (a file by its name)."""
    from pathlib import Path

    host = getattr(args, "host", None)
    styles = getattr(args, "styles", None)
    return {"listen": host not in (None, "127.0.0.1", "localhost", "::1"), "server_name": host,
            "share": bool(getattr(args, "share", False)), "gradio_auth": "***" if page_auth else None,
            "styles_file": [Path(styles).name] if styles else []}


class A1111Api:
    def __init__(self, backend, config: ApiConfig):
        self.backend = backend
        self.config = config
        self.queue = DeviceQueue(lambda: max(1, int(backend.concurrency or 1)), config.queue_size)
        self.page_backend = QueuedBackend(backend, self.queue)
        self.jobs = CallerJobs(self.queue, backend)
        self.limit = HourlyLimit(config.max_jobs_per_user)

    def routes(self) -> list:
        """/sdapi/v1 and its /openapi.json and /docs (sdxl_ui/a1111/routes.py)."""
        from .routes import api_routes

        return api_routes(self)
