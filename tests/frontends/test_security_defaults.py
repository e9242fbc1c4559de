"""Security defaults and rate limits (issues 6 and 12): local-only and no share by default, a generated share login,
only the outputs folder served, no queue-jumping API, the pinned gradio, and the per-user job limit. The attacker's
probes of the running app are in test_security.py."""
from __future__ import annotations

import urllib.error
import urllib.request

from tests.helpers import ARGS, ROOT, App

from sdxl_ui.service import GenerationService
from sdxl_ui.settings import AppSettings

def test_security_defaults(app, tmp_path):
    import app as app_module

    args = app_module.parse_args([])
    assert args.host == "127.0.0.1" and args.share is False
    share_args = app_module.parse_args(["--share"])
    creds, generated = app_module.resolve_auth(share_args)
    [(user, password)] = creds
    assert generated and user and len(password) >= 12
    # Only the outputs folder is served: other files on disk are refused.
    for probe_path in ("/etc/passwd", str(ROOT / "app.py")):
        try:
            with urllib.request.urlopen(f"{app.url}gradio_api/file={probe_path}", timeout=10) as r:
                status = r.status
        except urllib.error.HTTPError as exc:
            status = exc.code
        assert status in (403, 404), probe_path
    # The HTTP API cannot jump the queue.
    from sdxl_ui.ui import build_ui

    demo = build_ui(GenerationService(AppSettings(model="tiny", outputs=tmp_path)))
    assert demo.api_open is False
    # gradio pinned to a release with the latest fixed advisories.
    reqs = [l.strip() for l in (ROOT / "requirements.txt").read_text().splitlines()
            if l.strip() and not l.lstrip().startswith("#")]
    assert "gradio>=6.22,<7" in reqs
    assert not [l for l in reqs if l.lower().startswith(("torchvision", "open_clip", "open-clip", "timm"))]


def test_max_jobs_per_user(tmp_path):
    from gradio_client import Client

    limited = App("--model", "tiny", "--outputs", str(tmp_path), "--max-jobs-per-user", "2")
    try:
        limited.wait_for("Model loaded")
        client = Client(limited.url, verbose=False)
        logs = [client.predict(prompt_text="x", seed_value=i, n_steps=2, api_name="/generate", **ARGS)[0]
                for i in range(3)]
        assert "✅ Image saved" in logs[0] and "✅ Image saved" in logs[1]
        assert "❌ max_jobs_per_user: 2 jobs per hour reached" in logs[2]
    finally:
        limited.stop()
