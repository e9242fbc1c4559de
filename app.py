"""sdxl_ui web app: `python app.py` then open the printed localhost address.

Flags → settings → service (probe, plan, model) → page → queue().launch(). Nothing runs at import.
"""
from __future__ import annotations

import argparse
import logging
import os
import secrets
import sys


def parse_args(argv=None):
    from sdxl_ui.cli import add_settings_args

    parser = argparse.ArgumentParser(description="sdxl_ui: Stable Diffusion XL in the browser")
    add_settings_args(parser)
    parser.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=None, help="port (default 7860, or the next free one)")
    parser.add_argument("--share", action="store_true", help="also make a temporary public link (needs auth)")
    parser.add_argument("--auth", default=None, help="USER:PASS for the page (or env SDXL_UI_AUTH)")
    parser.add_argument("--queue-size", type=int, default=16, help="waiting jobs before 'queue full'")
    parser.add_argument("--max-jobs-per-user", type=int, default=0, help="0 = unlimited")
    return parser.parse_args(argv)


def resolve_auth(args) -> tuple[tuple[str, str] | None, bool]:
    """(credentials, generated). Sharing never runs without auth: credentials are generated when absent."""
    raw = args.auth or os.environ.get("SDXL_UI_AUTH")
    if raw:
        user, sep, password = raw.partition(":")
        if not sep or not user or not password:
            raise SystemExit("error: auth: expected USER:PASS (got a value without ':' or with an empty part)")
        return (user, password), False
    if args.share:
        return ("sdxl", secrets.token_urlsafe(12)), True
    return None, False


def main(argv=None) -> int:
    from sdxl_ui.cli import settings_from_args, setup_logging
    from sdxl_ui.schema import ValidationError

    setup_logging(logging.INFO)
    args = parse_args(argv)
    try:
        settings = settings_from_args(args)
    except ValidationError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    auth, generated = resolve_auth(args)

    from sdxl_ui.service import GenerationService
    from sdxl_ui.ui import UIConfig, build_ui
    from sdxl_ui.ui.render import CSS

    service = GenerationService(settings)
    config = UIConfig(queue_size=args.queue_size, max_jobs_per_user=args.max_jobs_per_user)
    if args.share:
        config.share_message = "Creating a share link…"
    demo = build_ui(service, config)
    # Load the model in the background: the page opens at once and its status panel follows the load.
    service.preload_in_background()
    outputs = settings.outputs.resolve()
    outputs.mkdir(parents=True, exist_ok=True)
    if generated:
        print(f"* Share login — user: {auth[0]}  password: {auth[1]}", flush=True)
    demo.launch(server_name=args.host, server_port=args.port, share=args.share, auth=auth,
                allowed_paths=[str(outputs)], css=CSS, prevent_thread_lock=True, show_error=False,
                footer_links=["gradio"])
    if args.share:
        if demo.share_url:
            config.share_message = f"Share link: {demo.share_url} (login required)"
            print(f"* Share link: {demo.share_url} — user: {auth[0]}", flush=True)
        else:
            config.share_message = ("Share link could not be created (no internet connection to the share "
                                    "service?). Serving locally only at " + demo.local_url)
            print(f"* {config.share_message}", flush=True)
    try:
        demo.block_thread()
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
