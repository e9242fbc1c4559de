"""Every /sdapi/v1 route's answer to a set of representative requests, compared with the recorded answers in
``a1111_responses.json`` (recorded before the layer moved to pydantic models, ``response_model`` and one
router-level HTTP Basic dependency): the status, the headers a client reads, and the body as JSON text (so a 0 that
became 0.0, a key that appeared or went, a message that changed all show). Images are replaced by their size and
their ``parameters`` text, the machine's memory figures by their type, an object's address in a message by
``0x…``; nothing else is normalised.

To record again (only when a change of an answer is meant): ``SDXL_UI_RECORD=1 pytest tests/frontends/test_a1111_snapshot.py``.
"""
from __future__ import annotations

import base64
import io
import json
import os
import re
from pathlib import Path

import pytest

from sdxl_ui.jobs import LOCAL_SERVICE
from sdxl_ui.schema import ErrorEvent, ProgressEvent, ResultEvent

SNAPSHOT = Path(__file__).with_name("a1111_responses.json")
HEADERS = ("content-type", "www-authenticate", "retry-after")
ALICE, BOB = ("alice", "pw"), ("bob", "other")


class StillBackend:
    """A backend that answers at once with an 8×8 picture whose infotext names the request (deterministic)."""

    concurrency = 1
    capabilities = LOCAL_SERVICE  # answers like the local service (the API's scratch folder, its LoRAs)

    def __init__(self):
        from sdxl_ui.settings import AppSettings

        self.settings = AppSettings(model="demo")
        self.switched = []

    def native_size(self):
        return 64

    def status(self):
        return {"device": "cpu"}

    def reconfigure(self, settings):
        self.switched.append(str(settings.model))

    def preload_in_background(self):
        pass

    def generate(self, request, cancel=None, output_path=None):
        from PIL import Image

        if request.prompt == "fail with memory":
            yield ErrorEvent("out of memory on cpu (try a smaller size)", "memory")
            return
        yield ProgressEvent(1, 2, 0.1, 0.1, 0.1, "", None)
        for i in range(request.images):
            text = (f"{request.prompt}\nNegative prompt: {request.negative_prompt}\nSteps: {request.requested_steps}, "
                    f"Sampler: Euler, CFG scale: {request.guidance_scale}, Seed: {request.seed + i}, "
                    f"Size: {request.width}x{request.height}")
            yield ResultEvent(Image.new("RGB", (8, 8), (i * 40, 10, 20)), None, request.seed + i, i,
                              request.requested_steps, request.requested_steps, False, None, None, "demo", "cpu",
                              "fp32", text)


def _client(**config):
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from sdxl_ui.a1111 import A1111Api, ApiConfig

    api = A1111Api(StillBackend(), ApiConfig(**config))
    return TestClient(FastAPI(routes=api.routes()))


def _png(text: str | None) -> str:
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    if text is not None:
        info.add_text("parameters", text)
    buffer = io.BytesIO()
    Image.new("RGB", (4, 4)).save(buffer, format="PNG", pnginfo=info)
    return base64.b64encode(buffer.getvalue()).decode()


INFOTEXT = "a red fox\nNegative prompt: blurry\nSteps: 20, Sampler: Euler a, CFG scale: 6.5, Seed: 9, Size: 64x64"
SILLYTAVERN = {"prompt": "a fox", "negative_prompt": "blurry", "sampler_name": "DDIM", "scheduler": "normal",
               "steps": 3, "cfg_scale": 7, "width": 64, "height": 64, "seed": 5, "restore_faces": False,
               "enable_hr": False, "denoising_strength": 0.7, "hr_scale": 2, "hr_upscaler": "Latent",
               "override_settings": {"CLIP_stop_at_last_layers": 2, "sd_vae": "Automatic"},
               "override_settings_restore_afterwards": True, "url": "http://127.0.0.1:7860", "auth": "u:secret"}
WEBUIAPI = {"prompt": "a cat", "negative_prompt": "", "styles": [], "seed": 11, "subseed": -1,
            "subseed_strength": 0.0, "seed_resize_from_h": 0, "seed_resize_from_w": 0, "sampler_name": "Euler a",
            "scheduler": None, "batch_size": 2, "n_iter": 2, "steps": 4, "cfg_scale": 7.0, "width": 64,
            "height": 72, "restore_faces": False, "tiling": False, "do_not_save_samples": False,
            "do_not_save_grid": False, "eta": 1.0, "denoising_strength": 0.7, "firstphase_width": 0,
            "firstphase_height": 0, "hr_scale": 2, "hr_upscaler": "Latent", "hr_second_pass_steps": 0,
            "hr_resize_x": 0, "hr_resize_y": 0, "hr_checkpoint_name": None, "hr_sampler_name": None,
            "hr_prompt": "", "hr_negative_prompt": "", "s_min_uncond": 0, "s_churn": 0, "s_tmax": 0,
            "s_tmin": 0, "s_noise": 1, "override_settings": {}, "override_settings_restore_afterwards": True,
            "refiner_checkpoint": None, "refiner_switch_at": None, "disable_extra_networks": False,
            "comments": None, "enable_hr": False, "sampler_index": "Euler a", "script_name": None,
            "script_args": [], "send_images": True, "save_images": False, "alwayson_scripts": {},
            "force_task_id": None, "infotext": None}

# (name, client, method, path, login, body): body a dict/list/None as JSON, bytes as they are.
CASES = [
    ("no credentials", "login", "GET", "samplers", None, None),
    ("wrong password", "login", "GET", "sd-models", ("alice", "nope"), None),
    ("unknown user", "login", "GET", "sd-models", ("carol", "pw"), None),
    ("not base64", "login", "GET", "options", "Basic !!!notbase64", None),
    ("not Basic", "login", "GET", "options", "Bearer abc", None),
    ("latin-1 in the header", "login", "POST", "txt2img", b"Basic \xe9\xe8\xff==", {}),
    ("utf-8 login", "login", "GET", "scripts", ("björn", "ünïcode"), None),
    *[(f"GET {path}", "login", "GET", path, ALICE, None) for path in (
        "sd-models", "samplers", "schedulers", "scripts", "options", "memory", "embeddings", "prompt-styles",
        "cmd-flags", "loras", "upscalers", "latent-upscale-modes", "sd-vae", "sd-modules", "face-restorers",
        "hypernetworks", "realesrgan-models", "progress", "progress?skip_current_image=true")],
    *[(f"POST {path}", "login", "POST", path, ALICE, None) for path in (
        "interrupt", "skip", "refresh-checkpoints", "refresh-loras", "refresh-vae", "refresh-embeddings")],
    ("txt2img minimal", "login", "POST", "txt2img", ALICE, {"prompt": "a red circle", "seed": 3, "steps": 2}),
    ("txt2img sillytavern", "login", "POST", "txt2img", BOB, SILLYTAVERN),
    ("txt2img webuiapi", "login", "POST", "txt2img", ALICE, WEBUIAPI),
    ("txt2img nulls", "login", "POST", "txt2img", ALICE, {"prompt": None, "negative_prompt": None, "seed": 4,
                                                         "steps": None, "cfg_scale": None, "width": None,
                                                         "height": None, "batch_size": None, "n_iter": None,
                                                         "sampler_name": None, "send_images": None}),
    ("txt2img no images", "login", "POST", "txt2img", ALICE, {"prompt": "x", "seed": 1, "send_images": False}),
    ("txt2img quality", "login", "POST", "txt2img", ALICE,
     {"prompt": "x", "seed": 2, "sdxl_ui": {"quality": "fast", "techniques": {"tiling": "on"}}}),
    ("txt2img styles", "login", "POST", "txt2img", ALICE, {"prompt": "x", "seed": 2, "styles": ["s", "none"]}),
    ("options empty body", "login", "POST", "options", ALICE, b""),
    ("txt2img non-ASCII", "login", "POST", "txt2img", ALICE, {"prompt": "ünïcode 🦊", "seed": 1, "steps": 1}),
    ("txt2img echoes a lone surrogate", "login", "POST", "txt2img", ALICE,
     b'{"prompt": "x", "seed": 1, "steps": 1, "comments": {"note": "\\udc80"}, "hr_prompt": "\\ud83e"}'),
    ("txt2img echoes a big number", "login", "POST", "txt2img", ALICE,
     {"prompt": "x", "seed": 1, "steps": 1, "subseed": 2 ** 70, "s_churn": 1e300, "hr_scale": 0.5}),
    ("txt2img backend error", "login", "POST", "txt2img", ALICE, {"prompt": "fail with memory", "seed": 1}),
    ("steps text", "login", "POST", "txt2img", ALICE, {"prompt": "x", "steps": "many"}),
    ("steps fraction", "login", "POST", "txt2img", ALICE, {"prompt": "x", "steps": 1.5}),
    ("steps bool", "login", "POST", "txt2img", ALICE, {"prompt": "x", "steps": True}),
    ("steps zero", "login", "POST", "txt2img", ALICE, {"prompt": "x", "steps": 0}),
    ("seed too big", "login", "POST", "txt2img", ALICE, {"prompt": "x", "seed": 2 ** 70}),
    ("seed NaN", "login", "POST", "txt2img", ALICE, b'{"prompt": "x", "seed": NaN}'),
    ("number of 200 digits", "login", "POST", "txt2img", ALICE, b'{"steps": ' + b"9" * 200 + b"}"),
    ("width bool", "login", "POST", "txt2img", ALICE, {"prompt": "x", "width": True}),
    ("width too small", "login", "POST", "txt2img", ALICE, {"prompt": "x", "width": 4}),
    ("cfg text", "login", "POST", "txt2img", ALICE, {"prompt": "x", "cfg_scale": "high"}),
    ("batch too big", "login", "POST", "txt2img", ALICE, {"prompt": "x", "batch_size": 999}),
    ("n_iter too big", "login", "POST", "txt2img", ALICE, {"prompt": "x", "n_iter": 99}),
    ("unknown sampler", "login", "POST", "txt2img", ALICE, {"prompt": "x", "sampler_name": "Bogus"}),
    ("unknown schedule", "login", "POST", "txt2img", ALICE, {"prompt": "x", "scheduler": "bogus"}),
    ("prompt number", "login", "POST", "txt2img", ALICE, {"prompt": 5}),
    ("hires fix, an upscaler not here", "login", "POST", "txt2img", ALICE,
     {"prompt": "x", "enable_hr": True, "hr_upscaler": "ESRGAN_4x"}),
    ("a script", "login", "POST", "txt2img", ALICE, {"prompt": "x", "script_name": "x/y plot"}),
    ("model per request", "login", "POST", "txt2img", ALICE,
     {"prompt": "x", "override_settings": {"sd_model_checkpoint": "other"}}),
    ("bad extension", "login", "POST", "txt2img", ALICE, {"prompt": "x", "sdxl_ui": {"speed": 1}}),
    ("bad quality", "login", "POST", "txt2img", ALICE, {"prompt": "x", "sdxl_ui": {"quality": "ultra"}}),
    ("bad technique", "login", "POST", "txt2img", ALICE, {"prompt": "x", "sdxl_ui": {"techniques": {"warp": "on"}}}),
    ("send_images text", "login", "POST", "txt2img", ALICE, {"prompt": "x", "send_images": "yes"}),
    ("styles not a list", "login", "POST", "txt2img", ALICE, {"prompt": "x", "styles": "s"}),
    ("clip skip too big", "login", "POST", "txt2img", ALICE,
     {"prompt": "x", "override_settings": {"CLIP_stop_at_last_layers": 99}}),
    ("body a list", "login", "POST", "txt2img", ALICE, [1, 2]),
    ("body not JSON", "login", "POST", "txt2img", ALICE, b"{prompt: x}"),
    ("body not UTF-8", "login", "POST", "txt2img", ALICE, b'{"prompt": "\xff\xfe"}'),
    ("body too deep", "login", "POST", "txt2img", ALICE, b"[" * 100_000 + b"]" * 100_000),
    ("lone surrogate", "login", "POST", "txt2img", ALICE, b'{"prompt": "\\ud800 fox", "seed": 1, "steps": 1}'),
    ("png-info with text", "login", "POST", "png-info", ALICE, {"image": _png(INFOTEXT)}),
    ("png-info data url", "login", "POST", "png-info", ALICE, {"image": "data:image/png;base64," + _png("x: 1")}),
    ("png-info without text", "login", "POST", "png-info", ALICE, {"image": _png(None)}),
    ("png-info not base64", "login", "POST", "png-info", ALICE, {"image": "***"}),
    ("png-info no image", "login", "POST", "png-info", ALICE, {}),
    ("png-info not an image", "login", "POST", "png-info", ALICE, {"image": base64.b64encode(b"hello").decode()}),
    ("options unchanged", "login", "POST", "options", ALICE, {"sd_model_checkpoint": "demo", "samples_format": "png"}),
    ("options empty model", "login", "POST", "options", BOB, {"sd_model_checkpoint": ""}),
    ("options unknown model", "login", "POST", "options", ALICE, {"sd_model_checkpoint": "nope"}),
    ("options not the operator", "login", "POST", "options", BOB, {"sd_model_checkpoint": "tiny"}),
    ("options the operator", "login", "POST", "options", ALICE, {"sd_model_checkpoint": "tiny"}),
    ("options a list", "login", "POST", "options", ALICE, [1]),
    ("img2img", "login", "POST", "img2img", ALICE, {"prompt": "x"}),
    ("an unknown GET", "login", "GET", "interrogate", ALICE, None),
    ("an unknown route without a login", "login", "GET", "interrogate", None, None),
    ("open: samplers", "open", "GET", "samplers", None, None),
    ("open: txt2img", "open", "POST", "txt2img", None, {"prompt": "open fox", "seed": 8, "steps": 1}),
    ("open: a model switch from a remote client", "open", "POST", "options", None, {"sd_model_checkpoint": "tiny"}),
    ("open: job limit", "limited", "POST", "txt2img", None, {"prompt": "x", "seed": 1, "steps": 1}),
]


def _clients() -> dict:
    logins = {"alice": "pw", "bob": "other", "björn": "ünïcode"}
    clients = {"login": _client(logins=logins, operator="alice", models=("tiny",), styles={"s": ("{prompt}, ink", "smudge")},
                                flags={"share": False, "gradio_auth": "***"}),
               "open": _client(models=("tiny",)), "limited": _client(max_jobs_per_user=1)}
    clients["limited"].post("/sdapi/v1/txt2img", json={"prompt": "first", "seed": 1, "steps": 1})
    return clients


def _request(client, method, path, login, body):
    headers = {}
    if isinstance(login, tuple):
        headers["Authorization"] = "Basic " + base64.b64encode(f"{login[0]}:{login[1]}".encode()).decode()
    elif login is not None:
        headers["Authorization"] = login
    content = None
    if isinstance(body, bytes):
        content, headers["Content-Type"] = body, "application/json"
    elif body is not None:
        content, headers["Content-Type"] = json.dumps(body).encode(), "application/json"
    return client.request(method, f"/sdapi/v1/{path}", content=content, headers=headers)


def _image(data: str) -> str:
    from PIL import Image

    with Image.open(io.BytesIO(base64.b64decode(data))) as image:
        return f"<PNG {image.size[0]}x{image.size[1]} parameters={image.info.get('parameters')!r}>"


def normalise(path: str, body):
    if isinstance(body, dict) and isinstance(body.get("images"), list):
        body["images"] = [_image(i) for i in body["images"]]
    if path == "memory" and isinstance(body, dict) and "ram" in body:
        body["ram"] = {k: type(v).__name__ for k, v in body["ram"].items()}
    return body


def answer(response, path: str) -> dict:
    text = response.text
    try:
        body = json.loads(text)
    except ValueError:
        return {"status": response.status_code, "headers": _headers(response), "text": text}
    # The body is JSON as json.dumps writes it (\\u escapes, ", " and ": "): the encoding is part of the answer.
    same_encoding = text == json.dumps(body)
    return {"status": response.status_code, "headers": _headers(response), "json_dumps_encoding": same_encoding,
            "body": re.sub(r" at 0x[0-9a-f]+", " at 0x…", json.dumps(normalise(path.split("?")[0], body)))}


def _headers(response) -> dict:
    return {name: response.headers[name] for name in HEADERS if name in response.headers}


def record() -> dict:
    clients = _clients()
    return {name: answer(_request(clients[which], method, path, login, body), path)
            for name, which, method, path, login, body in CASES}


@pytest.fixture(scope="module")
def answers():
    return record()


def test_record_when_asked(answers):
    if os.environ.get("SDXL_UI_RECORD"):
        SNAPSHOT.write_text(json.dumps(answers, indent=1, ensure_ascii=True) + "\n")
    assert SNAPSHOT.exists(), "no recorded answers: SDXL_UI_RECORD=1 records them"


@pytest.mark.parametrize("name", [case[0] for case in CASES])
def test_every_route_answers_as_recorded(name, answers):
    recorded = json.loads(SNAPSHOT.read_text())
    assert name in recorded, f"{name!r} was not recorded"
    assert answers[name] == recorded[name]
