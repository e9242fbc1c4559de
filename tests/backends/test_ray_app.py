"""Issue 14, done when: `python app.py --workers 2 --model tiny` serves the page, two sessions generating at once are
served by two different replicas (the log says which), and stopping the app stops the Ray instance it started.

The app runs in a subprocess with its own small Ray instance (one per module, as in test_ray_serve.py)."""
from __future__ import annotations

import shutil
import signal
import subprocess
import tempfile
import threading

import pytest
from tests.helpers import App

pytest.importorskip("ray", reason="Ray Serve is optional: pip install -r requirements-serve.txt")


def ray_processes() -> set[int]:
    out = subprocess.run(["ps", "-eo", "pid=,args="], capture_output=True, text=True).stdout
    return {int(line.split(None, 1)[0]) for line in out.splitlines()
            if "raylet" in line or "gcs_server" in line}


def test_app_with_two_workers_serves_two_sessions_on_two_replicas_and_stops_its_ray(tmp_path):
    from gradio_client import Client

    before = ray_processes()
    temp = tempfile.mkdtemp(prefix="sdxlapp")  # Ray's socket paths must stay short
    app = App("--workers", "2", "--model", "tiny", "--outputs", str(tmp_path), env={"RAY_TMPDIR": temp})
    try:
        app.wait_for("Running on local URL")
        args = dict(negative_text="", quality_label="High quality", cfg=8.0, n_images=1,
                    size_label="Native (256×256)", w=256, h=256, sched="auto")
        logs = {}

        def session(i):
            logs[i] = Client(app.url, verbose=False).predict(prompt_text=f"session {i}", seed_value=i, n_steps=30,
                                                             api_name="/generate", **args)[0]

        threads = [threading.Thread(target=session, args=(i,)) for i in (1, 2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(300)
        workers = {i: logs[i].split("🖥 Worker ")[1].split(" ")[0] for i in (1, 2)}
        assert workers[1] != workers[2], logs
        for worker in workers.values():  # the app's own log says which replica ran what
            assert f"[{worker}] 🖥 Worker {worker} on " in app.output
        app.proc.send_signal(signal.SIGTERM)
        assert app.proc.wait(120) == 0
        assert "Stopped." in app.output
    finally:
        if app.proc.poll() is None:
            app.stop()
        shutil.rmtree(temp, ignore_errors=True)
    assert ray_processes() <= before, "the app left its Ray instance running"
