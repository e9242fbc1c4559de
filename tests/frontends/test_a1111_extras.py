"""AUTOMATIC1111's extras, upscaling only (``a1111/extras.py``): ``/extra-single-image`` and ``/extra-batch-images``
by A1111's field names and defaults, through the service's upscale (the CLI's path); ``/upscalers`` listing the
user's models; bad input a 422 naming the A1111 field; a backend without upscaling (the Ray workers) a 501."""
from __future__ import annotations

import base64
import io

import numpy as np
import pytest
from PIL import Image, ImageDraw

from tests.pipeline.test_sr_models import tiny_esrgan


def b64(image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def unb64(text: str):
    return Image.open(io.BytesIO(base64.b64decode(text)))


def picture(width=64, height=48):
    image = Image.new("RGB", (width, height), "white")
    ImageDraw.Draw(image).rectangle((10, 10, 40, 30), fill=(30, 60, 220))
    return image


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from sdxl_ui.a1111 import A1111Api, ApiConfig
    from sdxl_ui.service import GenerationService
    from sdxl_ui.settings import AppSettings

    folder = tmp_path_factory.mktemp("upscalers")
    tiny_esrgan(folder, "4x-tiny", 4)
    service = GenerationService(AppSettings(model="demo", device="cpu", upscaler_dir=folder))
    return TestClient(FastAPI(routes=A1111Api(service, ApiConfig()).routes()))


def test_extra_single_image_by_a1111s_fields(client):
    source = picture()
    reply = client.post("/sdapi/v1/extra-single-image", json={"image": b64(source), "upscaler_1": "Lanczos",
                                                               "upscaling_resize": 2})
    assert reply.status_code == 200, reply.text
    body = reply.json()
    result = unb64(body["image"])
    assert result.size == (128, 96)
    assert np.array_equal(np.asarray(result.convert("RGB")), np.asarray(source.resize((128, 96), Image.LANCZOS)))
    assert "Postprocess upscale by: 2, Postprocess upscaler: Lanczos" in body["html_info"]
    to = client.post("/sdapi/v1/extra-single-image", json={"image": b64(source), "upscaler_1": "4x-tiny",
                                                            "resize_mode": 1, "upscaling_resize_w": 200,
                                                            "upscaling_resize_h": 100}).json()
    assert unb64(to["image"]).size == (200, 100) and "Postprocess upscaler: 4x-tiny" in to["html_info"]


def test_a1111s_defaults_leave_the_picture_and_name_what_is_ignored(client):
    source = picture()
    body = client.post("/sdapi/v1/extra-single-image", json={"image": b64(source), "gfpgan_visibility": 0.5}).json()
    assert unb64(body["image"]).size == source.size  # upscaler_1 "None": as A1111, nothing done
    assert "ignored: gfpgan_visibility (no face restoration in sdxl_ui)" in body["html_info"]
    hidden = client.post("/sdapi/v1/extra-single-image", json={"image": b64(source), "upscaler_1": "Nearest",
                                                                "show_extras_results": False}).json()
    assert hidden["image"] is None


def test_extra_batch_images_in_the_order_sent(client):
    pictures = [picture(), picture(32, 32)]
    body = client.post("/sdapi/v1/extra-batch-images", json={
        "imageList": [{"data": b64(p), "name": f"p{i}.png"} for i, p in enumerate(pictures)],
        "upscaler_1": "Nearest", "upscaling_resize": 3}).json()
    assert [unb64(i).size for i in body["images"]] == [(192, 144), (96, 96)]


def test_upscalers_lists_the_users_models_by_name_only(client):
    listed = client.get("/sdapi/v1/upscalers").json()
    assert [u["name"] for u in listed] == ["None", "Lanczos", "Nearest", "4x-tiny"]
    assert listed[3] == {"name": "4x-tiny", "model_name": "4x-tiny", "model_path": "4x-tiny.safetensors",
                         "model_url": None, "scale": 4}  # never the server's folder


@pytest.mark.parametrize("body,field", [
    ({"image": "not base64!"}, "image"),
    ({"image": base64.b64encode(b"text, not a picture").decode()}, "image"),
    ({"image": None, "upscaler_1": "Lanczos"}, "image"),
    ({"upscaler_1": "R-ESRGAN 4x+"}, "upscaler_1"),
    ({"upscaler_1": "Lanczos", "upscaling_resize": 12}, "upscaling_resize"),
    ({"upscaler_1": "Lanczos", "resize_mode": 2}, "resize_mode"),
    ({"upscaler_1": "Lanczos", "upscaler_2": "nope", "extras_upscaler_2_visibility": 0.5}, "upscaler_2"),
])
def test_bad_extras_are_a_422_naming_the_field(client, body, field):
    reply = client.post("/sdapi/v1/extra-single-image", json={"image": b64(picture()), **body})
    assert reply.status_code == 422, reply.text
    assert reply.json()["detail"][0]["loc"] == ["body", field], reply.json()


def test_a_batch_too_large_or_malformed_is_refused(client):
    item = {"data": b64(picture(16, 16)), "name": "x.png"}
    for body, loc in (({"imageList": [item] * 17}, ["imageList"]), ({"imageList": []}, ["imageList"]),
                      ({"imageList": [{"name": "x"}]}, ["imageList[0]", "data"])):
        reply = client.post("/sdapi/v1/extra-batch-images", json={"upscaler_1": "Nearest", **body})
        assert reply.status_code == 422 and reply.json()["detail"][0]["loc"] == ["body", *loc], reply.text


def test_a_backend_without_upscaling_answers_501():
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from sdxl_ui.a1111 import A1111Api, ApiConfig
    from sdxl_ui.jobs import Capabilities
    from sdxl_ui.settings import AppSettings

    class Remote:  # the Ray backend's capabilities: no upscale
        capabilities = Capabilities(upscale=False)
        concurrency = 1
        settings = AppSettings(model="demo")

    client = TestClient(FastAPI(routes=A1111Api(Remote(), ApiConfig()).routes()))
    reply = client.post("/sdapi/v1/extra-single-image", json={"image": b64(picture())})
    assert reply.status_code == 501 and "in-process backend" in reply.json()["detail"]
