"""Issue 14, done when: `python app.py --workers 2 --model tiny` serves the page, two sessions generating at once are
served by two different replicas (the log says which), and stopping the app stops the Ray instance it started.

The app runs in a subprocess with its own small Ray instance (one per module, as in test_ray_serve.py). Issue 20:
the app joins a cluster started the way a team starts one (`ray start --head`, token authentication on)."""
from __future__ import annotations

import html
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import pytest
from tests.helpers import ROOT, App, free_port

pytest.importorskip("ray", reason="Ray Serve is optional: pip install -r requirements-serve.txt")
pytestmark = pytest.mark.ray


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
        # Both replicas loaded first (one-step jobs until the status panel says so): a job sent while one replica
        # still loads goes to the other, and so may the next one.
        client, end = Client(app.url, verbose=False), time.time() + 300
        while True:
            warm = replica_rows(client.predict(prompt_text="warm-up", seed_value=0, n_steps=1, api_name="/generate",
                                               **args)[-1])  # the page's last output: the status panel
            if len(warm) == 2 and all(state in ("idle", "busy") for state, _ in warm.values()):
                break
            assert time.time() < end, f"two replicas not loaded within 300 s: {warm}"
            time.sleep(1)
        outs, ended = {}, {}

        def session(i):
            outs[i] = Client(app.url, verbose=False).predict(prompt_text=f"session {i}", seed_value=i, n_steps=30,
                                                             api_name="/generate", **args)
            ended[i] = time.time()

        threads = [threading.Thread(target=session, args=(i,)) for i in (1, 2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(300)
        # Which replicas ran the two jobs: the status panel's table of replicas (from their reports, not the log)
        # as the later session received it, against the one after the warm-up. One job each: two replicas.
        last = max(ended, key=ended.get)
        after = replica_rows(outs[last][-1])
        jobs = {replica: taken - warm[replica][1] for replica, (_, taken) in after.items()}
        assert sorted(jobs.values()) == [1, 1], (warm, after, [outs[i][0] for i in (1, 2)])
        for worker in jobs:  # the app's own log says which replica ran what
            assert f"[{worker}] 🖥 Worker {worker} on " in app.output
        app.proc.send_signal(signal.SIGTERM)
        assert app.proc.wait(120) == 0
        assert "Stopped." in app.output
    finally:
        if app.proc.poll() is None:
            app.stop()
        shutil.rmtree(temp, ignore_errors=True)
    assert ray_processes() <= before, "the app left its Ray instance running"


def replica_rows(status_panel: str) -> dict[str, tuple[str, int]]:
    """The status panel's table of Ray replicas: replica id → (state, jobs it has taken)."""
    rows = re.findall(r"<tr><td>([^<]+)</td><td>[^<]*</td><td>\d+</td>(?:<td>[^<]*</td>){2}<td>([^<]*)</td>"
                      r"<td>(\d+)</td></tr>", status_panel)
    return {html.unescape(replica): (state, int(jobs)) for replica, state, jobs in rows}


@pytest.fixture
def token_cluster():
    """A cluster as a team starts one: `ray start --head` on a machine that has a Ray token, so Ray 2.60 turns token
    authentication on. Small (3 CPUs, a 100 MB object store, no dashboard), on free ports, with its own temp folder
    and token file (RAY_AUTH_TOKEN_PATH, instead of ~/.ray/auth_token). Stopped by its own process group at the
    end, not by `ray stop`, which stops every Ray instance on the machine."""
    temp = tempfile.mkdtemp(prefix="sdxlauth")  # Ray's socket paths must stay short
    token = Path(temp) / "auth_token"
    token.write_text(uuid.uuid4().hex)
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_ADDRESS")}
    env["RAY_AUTH_TOKEN_PATH"] = str(token)
    port = free_port()
    command = [str(Path(sys.executable).parent / "ray"), "start", "--head", "--port", str(port),
               "--num-cpus", "3", "--object-store-memory", "100000000", "--include-dashboard", "false",
               "--dashboard-agent-listen-port", str(free_port()), "--ray-client-server-port", str(free_port()),
               "--temp-dir", temp, "--disable-usage-stats"]
    start = subprocess.Popen(command, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True, start_new_session=True)  # its own process group: stopped by it below
    try:
        out, _ = start.communicate(timeout=180)
        assert start.returncode == 0, out
        yield {"address": f"127.0.0.1:{port}", "env": env, "token": str(token)}
    finally:
        _stop_group(start.pid)
        shutil.rmtree(temp, ignore_errors=True)


def _stop_group(pgid: int) -> None:
    for sig, wait in ((signal.SIGTERM, 15.0), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            return
        end = time.time() + wait
        while time.time() < end:
            try:
                os.killpg(pgid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.2)


def test_app_joins_a_ray_start_cluster_with_token_auth_and_says_what_to_set_without_it(token_cluster, tmp_path):
    from gradio_client import Client

    address, env = token_cluster["address"], token_cluster["env"]
    # As a new user tries it: no RAY_AUTH_MODE. One line says what to set and where the token lives.
    refused = subprocess.run([sys.executable, "app.py", "--ray-address", address, "--model", "tiny", "--device",
                              "cpu", "--port", str(free_port()), "--outputs", str(tmp_path)],
                             cwd=ROOT, env={**env, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True,
                             timeout=300)
    lines = [line for line in (refused.stdout + refused.stderr).splitlines() if "RAY_AUTH_MODE=token" in line]
    assert refused.returncode == 1 and len(lines) == 1, refused.stdout[-3000:] + refused.stderr[-3000:]
    assert "error: Ray Serve could not start" in lines[0] and address in lines[0]
    assert token_cluster["token"] in lines[0] and "~/.ray/auth_token" in lines[0]
    # With RAY_AUTH_MODE=token it joins, deploys its worker on the cluster and serves the page.
    app = App("--ray-address", address, "--model", "tiny", "--outputs", str(tmp_path),
              env={"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": token_cluster["token"]})
    try:
        app.wait_for("Running on local URL")
        out = Client(app.url, verbose=False).predict(
            prompt_text="from the team's cluster", seed_value=21, n_steps=2, api_name="/generate",
            negative_text="", quality_label="High quality", cfg=8.0, n_images=1, size_label="Native (256×256)",
            w=256, h=256, sched="auto")
        assert out[3] == 21 and "🖥 Worker " in out[0] and "✅ Image saved to" in out[0], out[0][-2000:]
        app.proc.send_signal(signal.SIGTERM)
        assert app.proc.wait(120) == 0
    finally:
        if app.proc.poll() is None:
            app.stop()
