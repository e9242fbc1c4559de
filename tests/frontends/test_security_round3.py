"""Security and reliability round 3 (issue 21), each attack as it was found, against a launched app.py: a stranger
stopping someone's job (heartbeat, /cancel), forged X-Forwarded-For at the login, flags app.py did not check,
wrongly shaped API calls, a prompt of NULs. Each case counts in the reliability summary line (conftest.py)."""
from __future__ import annotations

import http.client
import json
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from http.cookiejar import CookieJar

import pytest
from tests.helpers import RELIABILITY, ROOT, App, free_port, launched

from sdxl_ui.metadata import ImageParameters, parse_parameters, read_parameters

ARGS = dict(negative_text="", quality_label="High quality", cfg=8.0, size_label="Native (256×256)", w=256, h=256,
            sched="auto")
LONG = dict(n_steps=150, n_images=1, **ARGS)  # 105 steps of the tiny model: seconds, time enough to attack it


def request(url: str, data=None, headers: dict | None = None, form: bool = False, opener=None,
            timeout: float = 30, read: int | None = None) -> tuple[int, str]:
    """(status, body) of a GET (data None) or a POST (JSON, or form-encoded). ``read``: read only so many bytes
    and close (a stream that would stay open)."""
    head, body = dict(headers or {}), None
    if data is not None:
        body = urllib.parse.urlencode(data).encode() if form else json.dumps(data).encode()
        head.setdefault("Content-Type", "application/x-www-form-urlencoded" if form else "application/json")
    try:
        with (opener or urllib.request.build_opener()).open(urllib.request.Request(url, body, head),
                                                           timeout=timeout) as response:
            return response.status, response.read(read).decode("utf-8", "replace")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode("utf-8", "replace")


def login_from(url: str, source: str, user: str, password: str, forwarded: str | None = None) -> int:
    """A login POST sent from the local address ``source`` (any 127.x.y.z is this machine); its status."""
    parsed = urllib.parse.urlsplit(url)
    connection = http.client.HTTPConnection(parsed.hostname, parsed.port, timeout=60, source_address=(source, 0))
    headers = {"Content-Type": "application/x-www-form-urlencoded"}
    if forwarded:
        headers["X-Forwarded-For"] = forwarded
    try:
        connection.request("POST", "/login", urllib.parse.urlencode({"username": user, "password": password}),
                           headers)
        return connection.getresponse().status
    finally:
        connection.close()


def running_job(client, **kwargs):
    """A long job of ``client``, once it runs: (job, its event id)."""
    job = client.submit(prompt_text="the victim's job", seed_value=5, api_name="/generate", **{**LONG, **kwargs})
    deadline = time.time() + 60
    while time.time() < deadline and not (client.pending_event_ids and job.outputs()):
        time.sleep(0.05)
    assert client.pending_event_ids and job.outputs(), "the job did not start"
    return job, next(iter(client.pending_event_ids))


def generate_index(client) -> int:
    return next(d["id"] for d in client.config["dependencies"] if d.get("api_name") == "generate")


def refused_lines(app, before: int) -> list[str]:
    time.sleep(0.3)  # the server's log lines
    return [line for line in app.lines[before:] if "refused" in line]


# ---------------------------------------------------------------- 1. stopping someone else's job

@pytest.fixture(scope="module")
def login_app(tmp_path_factory):
    with launched(tmp_path_factory.mktemp("r3-login"), "--model", "tiny", "--auth", "alice:secret",
                  "--auth", "bob:other") as running:
        yield running


def test_with_a_login_a_stranger_cannot_stop_a_users_job(login_app):
    from gradio_client import Client

    url = login_app.url
    victim = Client(url, auth=("alice", "secret"), verbose=False)
    job, event_id = running_job(victim)
    session = victim.session_hash
    cancel = {"session_hash": session, "event_id": event_id, "fn_index": generate_index(victim)}
    # A stranger without a login: the heartbeat (opened and closed), /cancel, the queue's messages.
    assert request(f"{url}gradio_api/heartbeat/{session}", timeout=5, read=5)[0] == 401
    assert request(f"{url}gradio_api/cancel", cancel)[0] == 401
    assert request(f"{url}gradio_api/queue/data?session_hash={session}", timeout=5, read=5)[0] == 401
    assert request(f"{url}gradio_api/file={login_app.outputs}")[0] == 401
    assert request(f"{url}gradio_api/heartbeat/x%0Aforged%20log%20line", timeout=5, read=5)[0] == 401
    time.sleep(0.3)
    assert not any(line.startswith("forged") for line in login_app.lines), "a request wrote its own log line"
    # Another login (bob) may not act on alice's session either, nor cancel her event from his own session.
    bob = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(CookieJar()))
    assert request(f"{url}login", {"username": "bob", "password": "other"}, form=True, opener=bob)[0] == 200
    assert request(f"{url}gradio_api/heartbeat/{session}", opener=bob, timeout=5, read=5)[0] == 403
    assert request(f"{url}gradio_api/cancel", cancel, opener=bob)[0] == 403
    assert request(f"{url}gradio_api/cancel", {**cancel, "session_hash": "bob-session"}, opener=bob)[0] == 403
    result = job.result(timeout=300)
    assert result[2] is not None and "done" in result[1], result[1]  # the victim's job ran to its end
    for case in ("stranger's heartbeat (login)", "stranger's cancel (login)", "another user's cancel"):
        RELIABILITY["bad_inputs"].add(case)


def test_the_login_page_and_a_logged_in_browser_still_work(login_app, browser):
    """The guard lets the login page through and a logged-in browser run a job (its heartbeat, queue, results)."""
    before = len(login_app.lines)
    page = browser.new_page()
    page.goto(login_app.url)
    page.get_by_label("username").fill("bob")
    page.get_by_label("password").fill("other")
    page.get_by_role("button", name="Login").click()
    page.get_by_label("Prompt", exact=True).fill("a red fox")
    page.locator("#generate").click()
    page.wait_for_function("document.querySelector('#sdxl-step')?.textContent.includes('done')", timeout=90_000)
    page.wait_for_selector("#output img", timeout=10_000)
    page.close()
    assert not refused_lines(login_app, before), "the guard refused the page's own calls"


@pytest.fixture(scope="module")
def open_app(tmp_path_factory):
    with launched(tmp_path_factory.mktemp("r3-open"), "--model", "tiny") as running:
        yield running


def test_without_a_login_cancel_and_disconnect_act_only_on_the_callers_own_job(open_app):
    from gradio_client import Client

    url = open_app.url
    victim, other = Client(url, verbose=False), Client(url, verbose=False)
    job, event_id = running_job(victim)
    before = len(open_app.lines)
    # Another session cancels the victim's event from its own session (gradio closed the job's generator, then
    # restarted the job from step 0), or with the victim's session hash; a stranger listens to the heartbeat.
    other_cookies = urllib.request.build_opener()
    other_cookies.addheaders = [("Cookie", "; ".join(f"{k}={v}" for k, v in other.cookies.items()))]
    cancel = {"session_hash": other.session_hash, "event_id": event_id, "fn_index": generate_index(victim)}
    assert request(f"{url}gradio_api/cancel", cancel, opener=other_cookies)[0] == 403
    assert request(f"{url}gradio_api/cancel", {**cancel, "session_hash": victim.session_hash})[0] == 403
    assert request(f"{url}gradio_api/heartbeat/{victim.session_hash}", timeout=5, read=5)[0] == 403
    assert request(f"{url}gradio_api/queue/data?session_hash={victim.session_hash}", timeout=5, read=5)[0] == 403
    assert len(refused_lines(open_app, before)) == 4
    result = job.result(timeout=300)
    assert result[2] is not None and "done" in result[1], result[1]
    # Each update's last step, and the steps of the final log, only go up: the job was not restarted.
    peaks = [max(_steps(update) or [0]) for update in job.outputs()]
    assert peaks == sorted(peaks) and _steps(result) == sorted(_steps(result)), "the job was restarted"
    # The victim's own cancel still works, and a cancelled job never starts again.
    pngs = len(list(open_app.outputs.rglob("*.png")))
    job, _ = running_job(victim, n_images=4)
    job.cancel()
    time.sleep(8)
    assert len(list(open_app.outputs.rglob("*.png"))) - pngs <= 1, "the cancelled job went on or restarted"
    for case in ("cancel of another session's event", "stranger's heartbeat (no login)"):
        RELIABILITY["bad_inputs"].add(case)


def _steps(outputs) -> list[int]:
    """The step numbers in a generate output's log pane, in order."""
    import re

    text = str(outputs[0]) if isinstance(outputs, (list, tuple)) and outputs else str(outputs)
    return [int(n) for n in re.findall(r"step (\d+)/\d+", text)]


# ---------------------------------------------------------------- 2. whose address a login failure counts against

def test_a_forged_x_forwarded_for_burst_is_counted_against_the_real_address(tmp_path):
    """30 wrong passwords, each with another forged X-Forwarded-For: once they got 30 × 400 (uvicorn believed the
    header from this machine). Now they count against the real address, which is locked out after 10; the
    account is only slowed down, so its owner, from another address, still logs in with the right password."""
    running = App("--model", "tiny", "--outputs", str(tmp_path), "--auth", "alice:secret")
    try:
        running.wait_for("Running on local URL")
        codes = []
        for i in range(30):
            codes.append(login_from(running.url, "127.0.0.1", "alice", "wrong", forwarded=f"10.0.0.{i}"))
            if codes[-1] == 429:
                break
        assert codes[-1] == 429 and len(codes) <= 11, codes
        assert login_from(running.url, "127.0.0.1", "alice", "secret") == 429  # the attacker's own address
        assert login_from(running.url, "127.0.0.2", "alice", "secret") == 200  # the owner, elsewhere
        time.sleep(0.3)
        assert "from 127.0.0.1 (10 failed in 15 min)" in running.output
        assert "10.0.0." not in running.output
    finally:
        running.stop()
    RELIABILITY["bad_inputs"].add("forged X-Forwarded-For login burst")


def test_rotating_addresses_do_not_speed_up_guessing_and_the_owner_still_gets_in(tmp_path, monkeypatch):
    """Behind a trusted proxy (the one case where the forwarded address counts), guesses from ever new addresses:
    the account slows them down, never locks it; a fixed forged address locks out only that address."""
    import gradio as gr
    from starlette.middleware import Middleware

    from sdxl_ui.logins import LoginThrottle
    from sdxl_ui.ui.access import LoginThrottleMiddleware

    monkeypatch.setenv("FORWARDED_ALLOW_IPS", "127.0.0.1")  # what app.py --forwarded-allow-ips 127.0.0.1 sets
    throttle = LoginThrottle(free=2, lock_after=3, base_delay_s=0.5, max_delay_s=0.5, account_free=3,
                             account_max_delay_s=1.0, window_s=60)
    with gr.Blocks() as demo:
        gr.Markdown("x")
    port = free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True,
                auth=[("alice", "secret")],
                app_kwargs={"middleware": [Middleware(LoginThrottleMiddleware, throttle=throttle)]})
    url, took = f"http://127.0.0.1:{port}/", []
    try:
        assert login_from(url, "127.0.0.1", "alice", "secret", forwarded="10.1.1.1") == 200  # a known address
        for i in range(6):  # each from a new address: no address reaches its own limit
            start = time.monotonic()
            assert login_from(url, "127.0.0.1", "alice", "wrong", forwarded=f"10.0.0.{i}") == 400
            took.append(time.monotonic() - start)
        assert max(took[:3]) < 0.4 and min(took[3:]) >= 0.5, took  # slowed per account after 3
        start = time.monotonic()
        assert login_from(url, "127.0.0.1", "alice", "secret", forwarded="10.0.0.99") == 200  # new: slowed
        assert time.monotonic() - start >= 0.5
        start = time.monotonic()
        assert login_from(url, "127.0.0.1", "alice", "secret", forwarded="10.1.1.1") == 200  # known: at once
        assert time.monotonic() - start < 0.4
        for _ in range(3):  # a fixed forged address: locked out, and nobody else
            login_from(url, "127.0.0.1", "alice", "wrong", forwarded="10.2.2.2")
        assert login_from(url, "127.0.0.1", "alice", "secret", forwarded="10.2.2.2") == 429
        assert login_from(url, "127.0.0.1", "alice", "secret", forwarded="10.3.3.3") == 200
    finally:
        demo.close()
    RELIABILITY["bad_inputs"].add("login guesses from rotating addresses")


# ---------------------------------------------------------------- 3. app.py's flags

BAD_FLAGS = [
    ("--port 70000", ["--port", "70000"], {}, "--port"),
    ("--port 0", ["--port", "0"], {}, "--port"),
    ("--port text", ["--port", "http"], {}, "--port"),
    ("--queue-size 0", ["--queue-size", "0"], {}, "--queue-size"),
    ("--queue-size -1", ["--queue-size", "-1"], {}, "--queue-size"),
    ("--max-jobs-per-user -5", ["--max-jobs-per-user", "-5"], {}, "--max-jobs-per-user"),
    ("--workers text", ["--workers", "two"], {}, "--workers"),
    ("--worker-cpus text", ["--worker-cpus", "one"], {}, "--worker-cpus"),
    ("--threads text", ["--threads", "many"], {}, "--threads"),
    ("--device unknown", ["--device", "quantum"], {}, "--device"),
    ("--forwarded-allow-ips not an address", ["--forwarded-allow-ips", "proxy.local"], {},
     "--forwarded-allow-ips"),
    ("--operator without a login", ["--operator", "bob"], {}, "--operator"),
    ("SDXL_UI_THREADS text", [], {"SDXL_UI_THREADS": "many"}, "SDXL_UI_THREADS"),
    ("SDXL_UI_DEVICE unknown", [], {"SDXL_UI_DEVICE": "quantum"}, "SDXL_UI_DEVICE"),
    ("SDXL_UI_FORWARDED_ALLOW_IPS bad", [], {"SDXL_UI_FORWARDED_ALLOW_IPS": "10.0.0.300"},
     "SDXL_UI_FORWARDED_ALLOW_IPS"),
    ("SDXL_UI_AUTH without a password", [], {"SDXL_UI_AUTH": "alice"}, "SDXL_UI_AUTH"),
]


@pytest.mark.parametrize("case,argv,env,name", BAD_FLAGS, ids=[c[0] for c in BAD_FLAGS])
def test_bad_app_flags_exit_2_with_one_line_naming_the_flag(case, argv, env, name):
    import os

    clean = {k: v for k, v in os.environ.items() if not k.startswith("SDXL_UI_")}
    proc = subprocess.run([sys.executable, "app.py", *argv], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**clean, "HF_HUB_OFFLINE": "1", **env})
    lines = [line for line in (proc.stdout + proc.stderr).splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1, (proc.returncode, proc.stdout + proc.stderr)
    assert lines[0].startswith(f"error: {name}: ") and "(got " in lines[0], lines[0]
    RELIABILITY["bad_inputs"].add(f"app.py {case}")


def test_a_port_in_use_is_one_line_and_exit_1(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = subprocess.run([sys.executable, "app.py", "--model", "tiny", "--device", "cpu", "--port", str(port),
                               "--outputs", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=300,
                              env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"})
    output = proc.stdout + proc.stderr
    assert proc.returncode == 1 and "Traceback" not in output, output
    assert [line for line in output.splitlines() if line.startswith("error:")] == [
        f"error: --port: cannot listen on 127.0.0.1:{port}: Cannot find empty port in range: {port}-{port} "
        f"(got {port})"], output
    RELIABILITY["bad_inputs"].add("app.py --port already in use")


# ---------------------------------------------------------------- 4. wrongly shaped API calls

MALFORMED = [
    ("generate with 3 data items", "queue/join", {"data": [1, 2, 3], "fn_index": "generate"}, "data: "),
    ("generate with 12 data items", "queue/join", {"data": [None] * 12, "fn_index": "generate"}, "data: "),
    ("fn_index 99", "queue/join", {"data": [], "fn_index": 99}, "fn_index: "),
    ("fn_index -1", "queue/join", {"data": [], "fn_index": -1}, "fn_index: "),
    ("fn_index as text", "queue/join", {"data": [], "fn_index": "7"}, "fn_index: "),
    ("data not a list", "queue/join", {"data": "x", "fn_index": "generate"}, "data: "),
    ("POST /run/predict", "run/predict", {"data": []}, "api_name: "),
    ("generate with 3 items over /call", "call/generate", {"data": [1, 2, 3]}, "data: "),
]


@pytest.mark.parametrize("case,route,body,field", MALFORMED, ids=[c[0] for c in MALFORMED])
def test_a_wrongly_shaped_api_call_is_a_4xx_and_one_log_line(case, route, body, field, open_app):
    from gradio_client import Client

    if body.get("fn_index") == "generate":
        body = {**body, "fn_index": generate_index(Client(open_app.url, verbose=False))}
    session = f"malformed-{abs(hash(case))}"
    before = len(open_app.lines)
    status, text = request(f"{open_app.url}gradio_api/{route}", {**body, "session_hash": session})
    assert 400 <= status < 500 and field in text, (status, text)
    # The stream of such a session (gradio raised its 404 inside the stream: a traceback) is a 404 too.
    assert request(f"{open_app.url}gradio_api/queue/data?session_hash={session}", timeout=10)[0] == 404
    lines = refused_lines(open_app, before)
    assert not any("Traceback" in line for line in open_app.lines[before:]), "\n".join(open_app.lines[before:])
    assert len(lines) == 2 and field in lines[0], lines
    RELIABILITY["bad_inputs"].add(f"API call: {case}")


# ---------------------------------------------------------------- 5. control characters in prompts

def test_a_prompt_of_nuls_is_refused_and_no_control_character_reaches_the_png(open_app):
    from gradio_client import Client

    client = Client(open_app.url, verbose=False)
    log_html = client.predict(prompt_text="\x00\x00\x00", seed_value=1, n_steps=2, n_images=1, api_name="/generate",
                              **ARGS)[0]
    assert "❌ prompt: must not be empty once control characters are removed (got " in log_html, log_html
    result = client.predict(prompt_text="a fox\x00 in\x1b[31m snow\r\n\tlate", negative_text="blur\x07",
                            seed_value=2, n_steps=2, n_images=1, api_name="/generate",
                            **{k: v for k, v in ARGS.items() if k != "negative_text"})
    params = parse_parameters(read_parameters(result[2]))
    assert params["prompt"] == "a fox in[31m snow\n\tlate" and params["negative_prompt"] == "blur"
    text = ImageParameters("a\x00b", "c\x9b", 2, "Euler", 8.0, 1, 64, 64, "m\x00", "cpu", "fp32").to_text()
    assert not any(ord(c) < 32 and c not in "\n\t" or 0x7F <= ord(c) <= 0x9F for c in text), repr(text)
    RELIABILITY["bad_inputs"].add("prompt of NUL characters")
    RELIABILITY["bad_inputs"].add("control characters in a prompt")
