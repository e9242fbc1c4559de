"""Security and reliability round 4 (issue 27), each finding as it was found, against a launched app.py (the tiny
model): another user's job by a repeated query parameter, a png-info that froze the server, 500s and tracebacks for
bad input, a non-ASCII login header, bodies without a size limit, bad start-up paths, server paths shown to
visitors, forged log lines, the OpenAPI schema without a login, a SIGTERM that lost finished images, and a reply that
echoed a password. Each case counts in the reliability summary line (conftest.py)."""
from __future__ import annotations

import base64
import http.client as httpclient
import io
import json
import os
import signal
import struct
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import zlib
from http.cookiejar import CookieJar

import pytest
from tests.helpers import RELIABILITY, ROOT, launched
from tests.helpers.a1111 import Server, http

ALICE, BOB = ("alice", "secret"), ("bob", "other")
PAGE = dict(negative_text="", quality_label="High quality", cfg=8.0, n_images=1, size_label="Native (256×256)",
            w=256, h=256, sched="auto")
SMALL = {"steps": 2, "width": 64, "height": 64, "sampler_name": "Euler"}


def strict(text: str):
    """The reply parsed as JSON as RFC 8259 has it (NaN and Infinity are not JSON): a ValueError otherwise."""
    def refuse(token):
        raise ValueError(f"{token} is not JSON")

    return json.loads(text, parse_constant=refuse)


def raw(url: str, data: bytes | None = None, headers: dict | None = None, method: str | None = None,
        opener=None, timeout: float = 60, read: int | None = None) -> tuple[int, str]:
    """(status, body text) of a request with raw bytes and headers as given."""
    request = urllib.request.Request(url, data=data, headers=headers or {}, method=method)
    try:
        with (opener or urllib.request.build_opener()).open(request, timeout=timeout) as response:
            return response.status, response.read(read).decode("utf-8", "replace")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode("utf-8", "replace")


def basic(login) -> dict:
    return {"Authorization": "Basic " + base64.b64encode(f"{login[0]}:{login[1]}".encode()).decode()}


def logged_in(url: str, login) -> urllib.request.OpenerDirector:
    opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(CookieJar()))
    body = urllib.parse.urlencode({"username": login[0], "password": login[1]}).encode()
    assert raw(f"{url}login", body, {"Content-Type": "application/x-www-form-urlencoded"}, opener=opener)[0] == 200
    return opener


def new_lines(app, before: int) -> list[str]:
    time.sleep(0.5)  # the server's log lines
    return app.lines[before:]


def no_traceback(app, before: int) -> None:
    lines = new_lines(app, before)
    assert not any("Traceback" in line for line in lines), "\n".join(lines[-40:])


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory):
    """An absolute LoRA folder with one good LoRA for the tiny model."""
    from tests.helpers.loras import make_lora

    from sdxl_ui.models import build_tiny

    folder = tmp_path_factory.mktemp("r4-private-loras").resolve()
    base, _ = build_tiny(with_refiner=False)
    make_lora(base.unet, folder, seed=4, scale=0.5, name="ink.safetensors")
    return folder


@pytest.fixture(scope="module")
def login_api(tmp_path_factory, lora_dir):
    """--api with two page logins (alice is the operator), an absolute --lora-dir and an absolute --lora."""
    with launched(tmp_path_factory.mktemp("r4-login"), "--api", "--model", "tiny", "--auth", "alice:secret",
                  "--auth", "bob:other", "--lora-dir", str(lora_dir), "--lora", f"{lora_dir}/ink.safetensors@0.5",
                  app=Server) as running:
        yield running


@pytest.fixture(scope="module")
def open_api(tmp_path_factory):
    with launched(tmp_path_factory.mktemp("r4-open"), "--api", "--model", "tiny", app=Server) as running:
        yield running


# ---------------------------------------------------------------- 1. a repeated session_hash

def _queued(client, steps: int, prompt: str):
    return client.submit(prompt_text=prompt, seed_value=5, n_steps=steps, api_name="/generate", **PAGE)


@pytest.mark.parametrize("mode", ["login", "no login"])
def test_a_repeated_session_hash_is_refused_and_never_streams_another_users_job(mode, request):
    """The guard read the first session_hash, gradio the last: a user with a job of its own in line read the
    victim's whole job by naming both."""
    from gradio_client import Client

    app = request.getfixturevalue("login_api" if mode == "login" else "open_api")
    url = app.url
    victim = Client(url, auth=ALICE, verbose=False) if mode == "login" else Client(url, verbose=False)
    attacker = Client(url, auth=BOB, verbose=False) if mode == "login" else Client(url, verbose=False)
    if mode == "login":
        opener = logged_in(url, BOB)
    else:
        opener = urllib.request.build_opener()
        opener.addheaders = [("Cookie", "; ".join(f"{k}={v}" for k, v in attacker.cookies.items()))]
    job = _queued(victim, 150, "the victim's secret prompt")
    deadline = time.time() + 60
    while time.time() < deadline and not job.outputs():
        time.sleep(0.05)
    mine = _queued(attacker, 2, "the attacker's own job")  # waits in line behind the victim's
    time.sleep(1)
    mine_hash, victim_hash = attacker.session_hash, victim.session_hash
    before = len(app.lines)
    for query in (f"session_hash={mine_hash}&session_hash={victim_hash}",
                  f"session_hash={victim_hash}&session_hash={mine_hash}",
                  f"session_hash={mine_hash}&session%5Fhash={victim_hash}"):
        status, text = raw(f"{url}gradio_api/queue/data?{query}", opener=opener, timeout=10, read=400)
        assert status == 400 and "session_hash: " in text and "secret prompt" not in text, (query, status, text)
    # Two Cookie headers (the guard read the last one, the framework the first): refused too.
    parsed = urllib.parse.urlsplit(url)
    connection = httpclient.HTTPConnection(parsed.hostname, parsed.port, timeout=10)
    connection.putrequest("GET", f"/gradio_api/queue/data?session_hash={victim_hash}")
    connection.putheader("Cookie", "sdxl-client=one")
    connection.putheader("Cookie", "sdxl-client=two")
    connection.endheaders()
    assert connection.getresponse().status == 400
    connection.close()
    no_traceback(app, before)
    assert job.result(timeout=300)[2] is not None  # the victim's picture
    mine.result(timeout=300)
    RELIABILITY["bad_inputs"].add(f"repeated session_hash in queue/data ({mode})")
    RELIABILITY["bad_inputs"].add("two Cookie headers")


def test_a_repeated_key_in_a_call_body_is_refused(open_api):
    from gradio_client import Client

    client = Client(open_api.url, verbose=False)
    index = next(d["id"] for d in client.config["dependencies"] if d.get("api_name") == "generate")
    body = ('{"data": [], "fn_index": %d, "session_hash": "mine", "session_hash": "theirs"}' % index).encode()
    status, text = raw(f"{open_api.url}gradio_api/queue/join", body, {"Content-Type": "application/json"})
    assert status == 400 and "session_hash: is given 2 times" in text, (status, text)
    RELIABILITY["bad_inputs"].add("repeated session_hash key in a call body")


# ---------------------------------------------------------------- 2. png-info that froze the server

def png(text: str | None = None, size=(8, 8), chunks: list[tuple[bytes, bytes]] = (), mode="RGB") -> bytes:
    """A small PNG with a ``parameters`` text chunk and extra raw chunks before its pixels."""
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    if text is not None:
        info.add_text("parameters", text)
    for kind, data in chunks:
        info.add(kind, data)
    buffer = io.BytesIO()
    Image.new(mode, size).save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


def b64(data: bytes) -> dict:
    return {"image": "data:image/png;base64," + base64.b64encode(data).decode()}


def test_png_info_with_a_long_line_without_a_colon_answers_at_once_and_never_blocks_others(open_api):
    text = "a fox\nNegative prompt: blur\nSteps: 20, Sampler: Euler, " + "word " * 10_600  # 53 KB, no colon
    answers = {}

    def other():
        time.sleep(0.3)
        start = time.monotonic()
        answers["other"] = (http(open_api.api + "samplers")[0], time.monotonic() - start)

    thread = threading.Thread(target=other)
    thread.start()
    start = time.monotonic()
    status, _, body = http(open_api.api + "png-info", b64(png(text)))
    took = time.monotonic() - start
    thread.join()
    assert status == 200 and body["parameters"]["Steps"] == "20", (status, body if status != 200 else "")
    assert took < 2.0, f"png-info took {took:.1f} s"
    assert answers["other"][0] == 200 and answers["other"][1] < 1.0, answers
    RELIABILITY["bad_inputs"].add("png-info: a long infotext line without a colon")


# ---------------------------------------------------------------- 3. 500s and tracebacks for bad input

def _ihdr(data: bytes, width: int, height: int) -> bytes:
    """The PNG ``data`` with its header's size replaced (and its CRC made right)."""
    fields = struct.pack(">II", width, height) + data[24:29]
    return data[:16] + fields + struct.pack(">I", zlib.crc32(b"IHDR" + fields)) + data[33:]


def _gif(width: int, height: int) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("P", (1, 1)).save(buffer, format="GIF")
    data = bytearray(buffer.getvalue())
    data[6:10] = struct.pack("<HH", width, height)  # the logical screen
    at = data.index(b",")  # the image descriptor
    data[at + 5:at + 9] = struct.pack("<HH", width, height)
    return bytes(data)


def _bmp(width: int, height: int) -> bytes:
    header = struct.pack("<IiiHHIIiiII", 40, width, height, 1, 24, 0, 0, 2835, 2835, 0, 0)
    return b"BM" + struct.pack("<IHHI", 14 + 40, 0, 0, 14 + 40) + header


def _ztxt(size: int) -> tuple[bytes, bytes]:
    return b"zTXt", b"parameters\x00\x00" + zlib.compress(b"a" * size, 9)


PNG_INFO_BAD = [
    ("a decompression-bomb PNG header", lambda: _ihdr(png("x"), 100_000, 100_000), "image: "),
    ("a huge GIF", lambda: _gif(65_000, 65_000), "image: "),
    ("a huge BMP", lambda: _bmp(60_000, 60_000), "image: "),
    ("an oversized zTXt chunk", lambda: png(chunks=[_ztxt(2 << 20)]), "image: "),
    ("many text chunks", lambda: png(chunks=[(b"zTXt", b"k%d\x00\x00" % i + zlib.compress(b"a" * 1_000_000, 9))
                                           for i in range(70)]), "image: "),
    ("a 13000x13000 PNG", lambda: _ihdr(png("x"), 13_000, 13_000), "image: "),
]


@pytest.mark.parametrize("case,make,field", PNG_INFO_BAD, ids=[c[0] for c in PNG_INFO_BAD])
def test_png_info_refuses_bad_images_with_a_422_and_no_traceback(case, make, field, open_api):
    before = len(open_api.lines)
    status, _, body = http(open_api.api + "png-info", b64(make()))
    assert status == 422, (status, body)
    strict(json.dumps(body))
    assert body["detail"][0]["msg"].startswith(field) and len(body["detail"][0]["msg"]) < 300, body
    no_traceback(open_api, before)
    RELIABILITY["bad_inputs"].add(f"png-info: {case}")


def test_png_info_keeps_an_infotext_value_with_an_invalid_json_escape_as_text(open_api):
    before = len(open_api.lines)
    status, _, body = http(open_api.api + "png-info", b64(png('a fox\nSteps: 20, Note: "bad \\q escape", Seed: 3')))
    assert status == 200 and body["parameters"]["Note"] == '"bad \\q escape"' and body["parameters"]["Seed"] == "3", \
        (status, body)
    no_traceback(open_api, before)
    RELIABILITY["bad_inputs"].add("png-info: an invalid JSON escape in the infotext")


TXT2IMG_BAD = [(f"{token} as {field}", f'{{"prompt": "x", "{field}": {token}}}'.encode())
               for field in ("seed", "batch_size", "n_iter") for token in ("NaN", "Infinity", "-Infinity")] + [
    ("1e400 as steps", b'{"prompt": "x", "steps": 1e400}'),
    ("a 5,000-digit seed", b'{"prompt": "x", "seed": ' + b"9" * 5000 + b"}"),
    ("a body nested 100,000 arrays deep", b'{"prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"),
]


@pytest.mark.parametrize("case,body", TXT2IMG_BAD, ids=[c[0] for c in TXT2IMG_BAD])
def test_txt2img_refuses_non_json_numbers_and_deep_bodies_with_valid_json(case, body, open_api):
    before = len(open_api.lines)
    status, text = raw(open_api.api + "txt2img", body, {"Content-Type": "application/json"})
    assert status == 422, (status, text[:300])
    reply = strict(text)
    assert ": " in reply["detail"][0]["msg"] and "(got " in reply["detail"][0]["msg"], reply
    no_traceback(open_api, before)
    RELIABILITY["bad_inputs"].add(f"txt2img: {case}")


def test_a_gradio_call_nested_100000_deep_is_a_422(open_api):
    before = len(open_api.lines)
    status, text = raw(f"{open_api.url}gradio_api/queue/join", b"[" * 100_000 + b"]" * 100_000,
                       {"Content-Type": "application/json"})
    assert status == 422 and "body: " in text, (status, text[:200])
    no_traceback(open_api, before)
    RELIABILITY["bad_inputs"].add("gradio call: a body nested 100,000 arrays deep")


# ---------------------------------------------------------------- 5. a non-ASCII Authorization header

@pytest.mark.parametrize("route,method", [("sd-models", "GET"), ("txt2img", "POST"), ("progress", "GET"),
                                          ("png-info", "POST"), ("img2img", "POST")])
def test_a_non_ascii_basic_header_is_a_401(route, method, login_api):
    before = len(login_api.lines)
    parsed = urllib.parse.urlsplit(login_api.url)
    connection = httpclient.HTTPConnection(parsed.hostname, parsed.port, timeout=30)
    connection.putrequest(method, f"/sdapi/v1/{route}")
    connection.putheader("Authorization", b"Basic \xe9\xe8\xff==")
    connection.putheader("Content-Length", "2" if method == "POST" else "0")
    connection.endheaders(b"{}" if method == "POST" else None)
    response = connection.getresponse()
    status, text = response.status, response.read().decode("utf-8", "replace")
    connection.close()
    assert status == 401, (status, text[:300])
    strict(text)
    no_traceback(login_api, before)
    RELIABILITY["bad_inputs"].add("a non-ASCII Authorization: Basic header")


# ---------------------------------------------------------------- 6. body size and pixels

def _post_too_much(url: str, route: str, limit: int, chunked: bool) -> tuple[int, str]:
    """POST more than ``limit`` bytes, stopping as soon as the server answers; (status, body)."""
    import select

    parsed = urllib.parse.urlsplit(url)
    connection = httpclient.HTTPConnection(parsed.hostname, parsed.port, timeout=60)
    connection.putrequest("POST", route)
    connection.putheader("Content-Type", "application/json")
    connection.putheader(*(("Transfer-Encoding", "chunked") if chunked else ("Content-Length", str(limit + 10))))
    connection.endheaders()
    piece, sent, total = b"a" * (1 << 20), 0, limit + 10 if not chunked else limit + (2 << 20)
    try:
        while sent < total and not select.select([connection.sock], [], [], 0.05)[0]:
            part = piece[:total - sent]
            connection.send(b"%x\r\n%s\r\n" % (len(part), part) if chunked else part)
            sent += len(part)
        if chunked and not select.select([connection.sock], [], [], 0.05)[0]:
            connection.send(b"0\r\n\r\n")
    except (BrokenPipeError, ConnectionResetError):
        pass
    response = connection.getresponse()
    body = response.read().decode("utf-8", "replace")
    connection.close()
    return response.status, body, sent


MAX_BODY = 16 << 20  # README: what the app trusts


def test_an_api_body_over_the_limit_is_a_413_before_it_is_read(open_api):
    before = len(open_api.lines)
    for route in ("txt2img", "png-info", "options"):
        status, text, sent = _post_too_much(open_api.url, f"/sdapi/v1/{route}", MAX_BODY, chunked=False)
        assert status == 413 and f"larger than {MAX_BODY} bytes" in strict(text)["detail"], (route, status, text)
        assert sent < MAX_BODY, f"the server read {sent} bytes before it answered"
    # Streamed without a Content-Length (chunked): counted as it comes.
    status, text, sent = _post_too_much(open_api.url, "/sdapi/v1/txt2img", MAX_BODY, chunked=True)
    assert status == 413 and "larger than" in strict(text)["detail"], (status, text)
    no_traceback(open_api, before)
    from sdxl_ui.a1111 import limits

    assert limits.MAX_BODY == MAX_BODY
    RELIABILITY["bad_inputs"].add("an API body over the limit")
    RELIABILITY["bad_inputs"].add("a chunked API body over the limit")


def test_png_info_reads_the_text_without_decoding_the_pixels(open_api):
    import psutil

    data = png("a fox\nSteps: 20", size=(8000, 8000), mode="L")  # 64 M pixels, ~60 KB
    server = psutil.Process(open_api.proc.pid)
    before, peak, done = server.memory_info().rss, [0], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], server.memory_info().rss)
            time.sleep(0.005)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        status, _, body = http(open_api.api + "png-info", b64(data))
    finally:
        done.set()
        sampler.join()
    grew = peak[0] - before
    assert status == 200 and body["parameters"]["Steps"] == "20", (status, body)
    assert grew < 40 << 20, f"png-info grew the server by {grew >> 20} MB"
    RELIABILITY["bad_inputs"].add("png-info: a 64-megapixel PNG")


# ---------------------------------------------------------------- 7. bad start-up paths

def _bad_paths(tmp):
    a_file = tmp / "not-a-folder.txt"
    a_file.write_text("x")
    return [("--tiny-decoder a missing folder", ["--tiny-decoder", str(tmp / "missing")], "--tiny-decoder"),
            ("--tiny-decoder ../../etc", ["--tiny-decoder", "../../etc"], "--tiny-decoder"),
            ("--tiny-decoder a file", ["--tiny-decoder", str(a_file)], "--tiny-decoder"),
            ("--tiny-decoder ./relative-missing", ["--tiny-decoder", "./no-such-decoder"], "--tiny-decoder"),
            ("--lora-dir a file", ["--lora-dir", str(a_file)], "--lora-dir")]


BAD_PATH_IDS = ["--tiny-decoder a missing folder", "--tiny-decoder ../../etc", "--tiny-decoder a file",
                "--tiny-decoder ./relative-missing", "--lora-dir a file"]


@pytest.mark.parametrize("index", range(5), ids=BAD_PATH_IDS)
def test_a_bad_start_up_path_exits_2_with_one_line_naming_the_flag(index, tmp_path):
    case, argv, flag = _bad_paths(tmp_path)[index]
    clean = {k: v for k, v in os.environ.items() if not k.startswith("SDXL_UI_")}
    try:
        proc = subprocess.run([sys.executable, "app.py", "--model", "tiny", "--device", "cpu", "--outputs",
                               str(tmp_path / "out"), *argv], cwd=ROOT, capture_output=True, text=True, timeout=90,
                              env={**clean, "HF_HUB_OFFLINE": "1"})
    except subprocess.TimeoutExpired as exc:
        raise AssertionError(f"{case}: app.py started serving instead of refusing the flag:\n"
                             f"{(exc.stdout or b'')[-2000:]}") from None
    lines = [line for line in (proc.stdout + proc.stderr).splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1, (case, proc.returncode, proc.stdout + proc.stderr)
    assert lines[0].startswith(f"error: {flag}: ") and "(got " in lines[0], lines[0]
    RELIABILITY["bad_inputs"].add(f"app.py {case}")


def test_a_path_like_tiny_decoder_never_asks_the_hub(tmp_path, monkeypatch):
    from diffusers import AutoencoderTiny

    from sdxl_ui.optimizations.tiny_decoder import TinyDecoderError, load

    def asked(*args, **kwargs):
        raise AssertionError(f"from_pretrained was asked for {args[0]!r} ({kwargs.get('local_files_only')=})")

    monkeypatch.setattr(AutoencoderTiny, "from_pretrained", asked)
    (tmp_path / "a-file").write_text("x")
    for source in ("../../etc", "./missing", str(tmp_path / "missing"), str(tmp_path / "a-file")):
        with pytest.raises(TinyDecoderError) as caught:
            load(source, None, "cpu", local_files_only=False)
        assert any(p in str(caught.value) for p in ("no such folder", "not a folder", "without a config.json")), \
            str(caught.value)


# ---------------------------------------------------------------- 8. server paths shown to visitors

def test_the_page_never_shows_the_lora_folders_server_path(login_api, lora_dir):
    opener = logged_in(login_api.url, BOB)
    status, config = raw(f"{login_api.url}config", opener=opener)
    assert status == 200 and "ink.safetensors" in config, status
    assert str(lora_dir) not in config, "the page's config holds the LoRA folder's server path"
    status, text = raw(f"{login_api.url}gradio_api/info", opener=opener)
    assert str(lora_dir) not in text
    RELIABILITY["bad_inputs"].add("an absolute --lora-dir shown to visitors")


def test_the_status_panel_and_lora_errors_name_lora_folders_by_name(tmp_path, lora_dir):
    from sdxl_ui.service import GenerationService
    from sdxl_ui.settings import AppSettings
    from sdxl_ui.ui.app import _public_text

    settings = AppSettings(model="tiny", device="cpu", lora_dir=lora_dir, outputs=tmp_path,
                           loras=(f"{lora_dir}/ink.safetensors@0.5",))
    service = GenerationService(settings)
    panel = json.dumps(service.status())
    assert str(lora_dir) in panel  # the service's own status (the operator's console) keeps it
    assert str(lora_dir) not in _public_text(panel, settings)
    message = f"lora: '{lora_dir}/x.safetensors' cannot be read"
    assert _public_text(message, settings) == f"lora: '{lora_dir.name}/x.safetensors' cannot be read"


# ---------------------------------------------------------------- 9, 12. what the API logs and echoes

def test_ignored_field_names_are_logged_escaped_and_truncated_and_never_echoed(login_api):
    before = len(login_api.lines)
    body = {"prompt": "a fox", **SMALL, "seed": 3, "url": "http://127.0.0.1:7860", "auth": "bob:other",
            "x\nforged log line": 1, "y" * 100_000: 2, "restore_faces": False}
    status, _, reply = http(login_api.api + "txt2img", body, login=BOB)
    assert status == 200, (status, reply)
    lines = new_lines(login_api, before)
    assert not any(line.startswith("forged") for line in lines), "a field name wrote its own log line"
    assert max(len(line) for line in lines) < 2000, "a field name made a huge log line"
    assert any("ignored fields" in line and "'x\\nforged log line'" in line for line in lines), lines
    echoed = reply["parameters"]
    assert "auth" not in echoed and "url" not in echoed and "x\nforged log line" not in echoed, sorted(echoed)
    assert echoed["prompt"] == "a fox" and echoed["restore_faces"] is False and echoed["seed"] == 3
    assert "other" not in json.dumps(echoed)
    RELIABILITY["bad_inputs"].add("a field name with a newline (log injection)")
    RELIABILITY["bad_inputs"].add("a 100 KB field name")
    RELIABILITY["bad_inputs"].add("unknown txt2img fields echoed (a password)")


# ---------------------------------------------------------------- 10. the OpenAPI schema without a login

def test_the_openapi_schema_and_docs_need_a_login(login_api):
    for path in ("openapi.json", "docs", "redoc", "gradio_api/openapi.json"):
        status, text = raw(f"{login_api.url}{path}")
        assert status in (401, 404) and "/sdapi/v1/txt2img" not in text, (path, status)
    RELIABILITY["bad_inputs"].add("/openapi.json without a login")


def test_with_the_login_the_openapi_schema_describes_the_api_only(login_api):
    status, _, document = http(f"{login_api.url}openapi.json", login=ALICE)
    assert status == 200, (status, document)
    assert "/sdapi/v1/txt2img" in document["paths"] and all(p.startswith("/sdapi/v1/") for p in document["paths"])
    assert {"prompt", "steps", "cfg_scale", "sampler_name"} <= set(
        document["components"]["schemas"]["StableDiffusionProcessingTxt2Img"]["properties"])
    status, _, page = http(f"{login_api.url}docs", login=BOB)
    assert status == 200 and "swagger" in page.lower() and "/openapi.json" in page


# ---------------------------------------------------------------- 5 (again). the page's login is unchanged

def test_the_api_still_answers_a_right_login(login_api):
    status, _, reply = http(login_api.api + "sd-models", login=ALICE)
    assert status == 200 and reply[0]["title"] == "tiny", (status, reply)


# ---------------------------------------------------------------- 11. SIGTERM during a multi-image job

def test_sigterm_during_a_multi_image_api_job_returns_the_finished_images(tmp_path):
    outputs = tmp_path / "out"
    with launched(outputs, "--api", "--model", "tiny", app=Server) as app:
        body = {"prompt": "a fox", "steps": 60, "width": 128, "height": 128, "sampler_name": "Euler",
                "n_iter": 6, "save_images": True, "seed": 11}
        answer = {}
        thread = threading.Thread(target=lambda: answer.update(r=http(app.api + "txt2img", body, timeout=300)))
        thread.start()
        deadline = time.time() + 240
        while time.time() < deadline and len(list(outputs.rglob("*.png"))) < 2:
            time.sleep(0.1)
        saved = len(list(outputs.rglob("*.png")))
        assert saved >= 2, app.output[-2000:]
        app.proc.send_signal(signal.SIGTERM)
        thread.join(300)
        app.proc.wait(120)
    status, _, reply = answer["r"]
    finished = len(list(outputs.rglob("*.png")))
    assert status == 200 and len(reply["images"]) == finished >= 2, (status, reply if status != 200 else
                                                                     len(reply["images"]), finished)
    info = json.loads(reply["info"])
    assert len(info["all_seeds"]) == finished
    RELIABILITY["faults"].add("SIGTERM during a multi-image API job")
