"""/sdapi beside the page under load (the tiny model): 8 API clients and 2 page users share one bounded line,
nothing lost, nothing mixed, a full line answered 503 with Retry-After; and the flags: no --api, no /sdapi;
--share without a login refuses to start."""
from __future__ import annotations

import json
import subprocess
import sys
import threading
import time

import pytest
from tests.helpers import ROOT, launched
from tests.helpers.a1111 import Server, http

PAGE_ARGS = dict(negative_text="", quality_label="High quality", n_steps=10, cfg=8.0, n_images=1,
                 size_label="Custom", w=64, h=64, sched="auto")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with launched(tmp_path_factory.mktemp("a1111-serve"), "--api", "--model", "tiny", "--queue-size", "4",
                  app=Server) as running:
        yield running


def api_client(server, i: int, out: dict, steps: int = 20, side: int = 64) -> None:
    body = {"prompt": f"client {i} prompt", "seed": 100 + i, "steps": steps, "width": side, "height": side,
            "sampler_name": "Euler", "sampler_index": "Euler", "eta": 0, "restore_faces": False}
    out[i] = http(server.api + "txt2img", body, timeout=180)
    out[f"done{i}"] = time.monotonic()


def page_user(server, i: int, out: dict) -> None:
    from gradio_client import Client

    try:
        result = Client(server.url, verbose=False).predict(prompt_text=f"page {i} prompt", seed_value=200 + i,
                                                           api_name="/generate", **PAGE_ARGS)
        out[f"page{i}"] = ("ok", result)
    except Exception as exc:  # noqa: BLE001 - reported by the test
        out[f"page{i}"] = ("error", str(exc))


def start(target, *args, **kwargs) -> threading.Thread:
    thread = threading.Thread(target=target, args=args, kwargs=kwargs, daemon=True)
    thread.start()
    return thread


def test_eight_api_clients_and_two_page_users_share_one_line(server):
    """Client 0's long job runs; the 2 page users, then API clients 1-7 arrive while it runs: 4 of them wait
    (--queue-size 4), 5 are refused; every job served comes back with its own prompt and seed."""
    from sdxl_ui.metadata import parse_parameters, read_parameters

    out: dict = {}
    begin = time.time()
    threads = [start(api_client, server, 0, out, steps=150, side=256)]
    end = time.time() + 60
    while not http(server.api + "progress")[2]["state"]["sampling_step"]:
        assert time.time() < end, "client 0's job did not start"
        time.sleep(0.05)
    threads += [start(page_user, server, i, out) for i in range(2)]
    time.sleep(1.5)  # the page users are in line first
    for i in range(1, 8):
        threads.append(start(api_client, server, i, out))
        time.sleep(0.05)
    arrived = time.monotonic()
    for t in threads:
        t.join(240)
    served, refused = _judge(out, parse_parameters, read_parameters)
    print(f"served {served}, refused {refused} in {time.time() - begin:.1f} s")
    assert len(served) + len(refused) == 10 and 0 in served  # nothing lost
    if out["done0"] > arrived:  # client 0 ran while all the others arrived: the line held exactly 4
        assert len(served) == 5 and len(refused) == 5, (served, refused)
    assert time.time() - begin < 120


def _judge(out, parse_parameters, read_parameters) -> tuple[list, list]:
    served, refused = [], []
    for i in range(8):
        status, headers, body = out[i]
        if status == 503:
            assert set(body) == {"error", "detail", "body", "errors"} and "queue full" in body["detail"], body
            assert int(headers["retry-after"]) > 0
            refused.append(i)
            continue
        assert status == 200, body
        info = json.loads(body["info"])
        assert info["all_prompts"] == [f"client {i} prompt"] and info["all_seeds"] == [100 + i]  # its own
        assert f"Seed: {100 + i}" in info["infotexts"][0] and len(body["images"]) == 1
        served.append(i)
    for i in range(2):
        kind, result = out[f"page{i}"]
        if kind == "ok" and isinstance(result[3], (int, float)):
            image = result[2]["path"] if isinstance(result[2], dict) else result[2]
            params = parse_parameters(read_parameters(image))
            assert params["prompt"] == f"page {i} prompt" and params["Seed"] == str(200 + i)
            served.append(f"page{i}")
        else:
            text = result if kind == "error" else result[0]
            assert "queue full" in text.lower(), text
            refused.append(f"page{i}")
    return served, refused


def test_the_page_still_generates_through_the_shared_line(server):
    from gradio_client import Client

    result = Client(server.url, verbose=False).predict(prompt_text="alone", seed_value=5, api_name="/generate",
                                                       **PAGE_ARGS)
    assert result[3] == 5


def test_without_a_login_progress_and_interrupt_are_per_client_address(server):
    status, _, body = http(server.api + "progress")
    assert status == 200 and body["state"]["job_count"] == 0 and body["current_image"] is None
    assert http(server.api + "interrupt", {})[0] == 200


def test_without_api_nothing_under_sdapi_exists(tmp_path):
    plain = Server("--model", "tiny", "--outputs", str(tmp_path))
    try:
        plain.wait_for("Running on local URL")
        for path in ("txt2img", "progress", "sd-models", "img2img"):
            assert http(plain.api + path, {} if path in ("txt2img", "img2img") else None)[0] == 404
    finally:
        plain.stop()


def test_share_without_a_login_refuses_the_api():
    done = subprocess.run([sys.executable, "app.py", "--api", "--share", "--model", "tiny", "--device", "cpu"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 2 and "--api-auth" in done.stderr + done.stdout


def test_by_default_the_pages_logins_guard_the_api(tmp_path):
    guarded = Server("--api", "--auth", "page:pw-page", "--model", "tiny", "--outputs", str(tmp_path))
    try:
        guarded.wait_for("Running on local URL")
        assert http(guarded.api + "sd-models")[0] == 401
        assert http(guarded.api + "sd-models", login=("page", "wrong"))[0] == 401
        status, _, body = http(guarded.api + "sd-models", login=("page", "pw-page"))
        assert status == 200 and body[0]["title"] == "tiny"
    finally:
        guarded.stop()


def test_the_page_and_the_api_share_one_per_user_job_limit(tmp_path):
    """--max-jobs-per-user 1: a job from the page uses the hour's one job of this address, so the API's next
    txt2img from the same address is refused (429), and the other way round needs no second test."""
    from gradio_client import Client

    limited = Server("--api", "--model", "tiny", "--max-jobs-per-user", "1", "--outputs", str(tmp_path))
    try:
        limited.wait_for("Model loaded")
        Client(limited.url, verbose=False).predict(prompt_text="page job", seed_value=1, api_name="/generate",
                                                   **{**PAGE_ARGS, "n_steps": 2})
        status, _, body = http(limited.api + "txt2img", {"prompt": "api job", "steps": 2, "width": 64,
                                                         "height": 64})
        assert status == 429, (status, body)
        assert "max_jobs_per_user" in json.dumps(body)
    finally:
        limited.stop()
