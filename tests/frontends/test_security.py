"""What a probe of the running app found (issue 12), as an attacker and as a careless client would send it: the
model switch over HTTP, other sessions' images, login brute force, uploads, refused API values. Each case counts
in the reliability summary line (conftest.py)."""
from __future__ import annotations

import json
import re
import time
import urllib.error
import urllib.parse
import urllib.request
from http.cookiejar import CookieJar

import gradio as gr
import pytest
from tests.helpers import RELIABILITY, App, free_port, launched, load_probe

from sdxl_ui.schema import ServiceState
from sdxl_ui.service import GenerationService
from sdxl_ui.settings import AppSettings
from sdxl_ui.ui import UIConfig, build_ui
from sdxl_ui.logins import LoginThrottle
from sdxl_ui.ui.access import Access, LoginThrottleMiddleware

ARGS = dict(negative_text="", quality_label="High quality", cfg=8.0, n_images=1, size_label="Native (256×256)",
            w=256, h=256, sched="auto")


def http(url: str, data: dict | bytes | None = None, opener=None, form: bool = False,
         headers: dict | None = None, timeout: float = 30) -> tuple[int, str]:
    """(status, body) of a GET (data None) or a POST (JSON, form-encoded, or raw bytes)."""
    body, head = None, dict(headers or {})
    if isinstance(data, bytes):
        body = data
    elif data is not None and form:
        body = urllib.parse.urlencode(data).encode()
    elif data is not None:
        body, head["Content-Type"] = json.dumps(data).encode(), "application/json"
    request = urllib.request.Request(url, data=body, headers=head)
    try:
        with (opener or urllib.request.build_opener()).open(request, timeout=timeout) as response:
            return response.status, response.read().decode("utf-8", "replace")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode("utf-8", "replace")


def launch(demo, **kwargs) -> str:
    port = free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, show_error=False,
                quiet=True, **kwargs)
    return f"http://127.0.0.1:{port}/"


def fn_index(demo, name: str) -> int:
    return next(i for i, f in demo.fns.items() if f.name == name)


def try_every_route(url: str, index: int, opener=None, session: str = "attacker") -> None:
    """Call a page handler the three ways an HTTP client can: /run, /call, and the queue with its fn_index."""
    def attempt(*args, **kwargs) -> tuple[int, str]:
        try:
            return http(*args, **kwargs)
        except OSError:  # e.g. an event stream that stays open until the timeout
            return 0, ""

    attempt(f"{url}gradio_api/run/use_demo_model", {"data": []}, opener)
    status, body = attempt(f"{url}gradio_api/call/use_demo_model", {"data": []}, opener)
    if status == 200 and "event_id" in body:
        attempt(f"{url}gradio_api/call/use_demo_model/{json.loads(body)['event_id']}", opener=opener, timeout=10)
    status, body = attempt(f"{url}gradio_api/queue/join",
                           {"data": [], "fn_index": index, "session_hash": session, "event_data": None}, opener)
    if status == 200:
        attempt(f"{url}gradio_api/queue/data?session_hash={session}", opener=opener, timeout=10)


# ---------------------------------------------------------------- 1. the model switch

def test_nobody_can_switch_a_working_model_over_http(tmp_path):
    service = GenerationService(AppSettings(model="tiny", outputs=tmp_path, device="cpu"))
    service.ensure_loaded()
    demo = build_ui(service)  # no login: the operator is whoever connects from this machine, as this test does
    url = launch(demo)
    try:
        try_every_route(url, fn_index(demo, "use_demo_model"))
    finally:
        demo.close()
    assert service.settings.model == "tiny" and service.loaded, "an HTTP call replaced the working model"
    RELIABILITY["bad_inputs"].add("model switch over HTTP while the model works")


def _failed_service(tmp_path) -> GenerationService:
    """A service whose model cannot load (a folder without model_index.json: no loading needed to know)."""
    (tmp_path / "broken-model").mkdir()
    service = GenerationService(AppSettings(model=str(tmp_path / "broken-model"), outputs=tmp_path),
                                probe=load_probe("cpu_epyc_avx512_bf16"))
    if service.status()["state"] != ServiceState.ERROR:  # a service that learns it only by loading (app.py preloads)
        service.preload_in_background().join(300)
    assert service.status()["state"] == ServiceState.ERROR  # the state the "use the demo model" button is shown in
    return service


def login(url: str, user: str, password: str):
    opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(CookieJar()))
    status, body = http(f"{url}login", {"username": user, "password": password}, opener, form=True)
    assert status == 200, body
    return opener


def test_with_a_login_only_the_operator_may_switch_the_model(tmp_path):
    service = _failed_service(tmp_path)
    broken = service.settings.model
    demo = build_ui(service, UIConfig(access=Access(login=True, operator="op")))
    url = launch(demo, auth=[("op", "op-pass"), ("guest", "guest-pass")])
    try:
        index = fn_index(demo, "use_demo_model")
        try_every_route(url, index, login(url, "guest", "guest-pass"), "guest-session")
        assert service.settings.model == broken, "a logged-in guest switched the model"
        status, body = http(f"{url}gradio_api/run/use_demo_model", {"data": []}, login(url, "op", "op-pass"))
        assert status == 200, body
    finally:
        demo.close()
    assert service.settings.model != broken  # the operator may (the button's purpose)
    RELIABILITY["bad_inputs"].add("model switch by a logged-in guest")


def test_without_a_login_only_this_machine_may_switch_the_model(tmp_path):
    service = _failed_service(tmp_path)
    broken = service.settings.model
    demo = build_ui(service)
    use_demo = next(f.fn for f in demo.fns.values() if f.name == "use_demo_model")
    with pytest.raises(gr.Error, match="operator"):
        use_demo(gr.Request(client={"host": "203.0.113.7"}))
    with pytest.raises(gr.Error, match="operator"):
        use_demo(None)
    assert service.settings.model == broken
    use_demo(gr.Request(client={"host": "127.0.0.1"}))
    assert service.settings.model != broken
    RELIABILITY["bad_inputs"].add("model switch from another machine")


def test_only_generate_is_a_public_endpoint(tmp_path):
    demo = build_ui(GenerationService(AppSettings(model="tiny", outputs=tmp_path)))
    public = sorted(f.api_name for f in demo.fns.values() if f.fn is not None and f.api_visibility != "private")
    assert public == ["generate"]


# ---------------------------------------------------------------- the running app (no login)

@pytest.fixture(scope="module")
def app(tmp_path_factory):
    with launched(tmp_path_factory.mktemp("sec-out"), "--model", "tiny") as running:
        yield running


def test_a_session_reads_only_its_own_images(app):
    from gradio_client import Client

    result = Client(app.url, verbose=False, download_files=False).predict(
        prompt_text="A's secret prompt", seed_value=14, n_steps=2, api_name="/generate", **ARGS)
    log_html, served = result[0], result[2]["path"]
    (saved,) = [p for p in app.outputs.rglob("*.png") if "-14." in p.name]
    # B fetches A's PNG by its name in the outputs folder (a counter and the seed): refused.
    for path in (str(saved), str(saved.resolve())):
        status, _ = http(f"{app.url}gradio_api/file={path}")
        assert status in (403, 404), f"{path} was served to another session"
    # Session A's copy lives in a folder named by 128 random bits; session B cannot list or guess it.
    assert re.search(r"/sdxl-[0-9a-f]{32}/", served), served
    # The log pane names the file inside the outputs folder, never the server's absolute path.
    assert "Image saved to outputs/" in log_html and str(app.outputs) not in log_html
    RELIABILITY["bad_inputs"].add("guessed name of another session's image")


def test_uploads_are_limited(app):
    boundary = "sdxlboundary"
    payload = b"\0" * (2 * 1024 * 1024)
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"big.bin\"\r\n"
            "Content-Type: application/octet-stream\r\n\r\n").encode() + payload + f"\r\n--{boundary}--\r\n".encode()
    status, text = http(f"{app.url}gradio_api/upload", body,
                        headers={"Content-Type": f"multipart/form-data; boundary={boundary}"}, timeout=60)
    assert status == 413, (status, text[:200])
    RELIABILITY["bad_inputs"].add("2 MB upload")


@pytest.mark.parametrize("case,field,values", [
    ("size None from the API", "size", {"size_label": None}),
    ("size not offered", "size", {"size_label": "4096×4096"}),
    ("quality None from the API", "quality", {"quality_label": None}),
    ("quality not offered", "quality", {"quality_label": "Best"}),
    ("steps 10^6 from the API", "steps", {"n_steps": 10**6}),
    ("guidance as text from the API", "guidance", {"cfg": "lots"}),
])
def test_refused_api_values_name_the_field_and_log_one_line(case, field, values, app):
    from gradio_client import Client

    before = len(app.lines)
    result = Client(app.url, verbose=False).predict(
        prompt_text="a fox", seed_value=1, api_name="/generate", **{**ARGS, "n_steps": 2, **values})
    assert f"❌ {field}: " in result[0] and "(got " in result[0], result[0]
    time.sleep(0.3)  # the server's log line
    new = app.lines[before:]
    assert not any("Traceback" in line for line in new), "\n".join(new)
    assert sum(f"refused a request from 127.0.0.1: {field}:" in line for line in new) == 1, "\n".join(new)
    RELIABILITY["bad_inputs"].add(case)


# ---------------------------------------------------------------- 4. logins

def test_failed_logins_are_slowed_then_refused_and_logged(tmp_path, caplog):
    """Few, short delays here (the defaults are 3 free, 1-8 s, refused after 10 for 15 min: README)."""
    from starlette.middleware import Middleware

    throttle = LoginThrottle(free=2, lock_after=4, base_delay_s=1.0, max_delay_s=2.0, window_s=60)
    demo = build_ui(GenerationService(AppSettings(model="tiny", outputs=tmp_path)))
    url = launch(demo, auth=[("op", "right")],
                 app_kwargs={"middleware": [Middleware(LoginThrottleMiddleware, throttle=throttle)]})
    took, codes = [], []
    try:
        with caplog.at_level("WARNING", logger="sdxl_ui"):
            for _ in range(4):
                start = time.monotonic()
                codes.append(http(f"{url}login", {"username": "op", "password": "wrong"}, form=True)[0])
                took.append(time.monotonic() - start)
            refused, body = http(f"{url}login", {"username": "op", "password": "right"}, form=True)
    finally:
        demo.close()
    assert codes == [400] * 4
    assert took[2] >= 1.0 and took[3] >= 2.0 and max(took[:2]) < took[2], took  # 2 free, then 1 s, 2 s
    assert refused == 429 and "Too many failed logins" in body  # even the right password, while locked out
    assert caplog.text.count("login failed for user 'op' from 127.0.0.1") == 4
    assert "refusing its logins for 1 min" in caplog.text and "login refused from 127.0.0.1" in caplog.text
    RELIABILITY["bad_inputs"].add("password guessing")


def test_the_app_throttles_logins_when_it_has_them(tmp_path):
    running = App("--model", "tiny", "--outputs", str(tmp_path), "--auth", "op:right", "--auth", "guest:other")
    try:
        running.wait_for("Running on local URL")
        took = []
        for _ in range(4):
            start = time.monotonic()
            assert http(f"{running.url}login", {"username": "op", "password": "wrong"}, form=True)[0] == 400
            took.append(time.monotonic() - start)
        assert took[3] >= 1.0, took  # the 4th failure waited (3 free, then 1 s)
        time.sleep(0.3)
        assert "login failed for user 'op' from 127.0.0.1 (4 failed in 15 min)" in running.output
        assert "* Operator (may switch the model for everyone): op" in running.output
    finally:
        running.stop()
