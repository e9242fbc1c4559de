"""The API's /openapi.json and /docs (sdxl_ui/a1111/openapi.py, models.py): behind the API's login when it has one,
describing txt2img's request and response fields by AUTOMATIC1111's names, every route with its answer's model, the
one HTTP Basic scheme; the request model and the adapter agree on the fields and their defaults."""
from __future__ import annotations

import pytest

from sdxl_ui.a1111.adapter import A1111_FIELDS, parse_txt2img
from sdxl_ui.a1111.models import Txt2ImgRequest
from tests.frontends.test_a1111_snapshot import _client

TXT2IMG_FIELDS = ("prompt", "negative_prompt", "styles", "seed", "subseed", "subseed_strength", "sampler_name",
                  "scheduler", "batch_size", "n_iter", "steps", "cfg_scale", "width", "height", "restore_faces",
                  "tiling", "denoising_strength", "override_settings", "enable_hr", "hr_scale", "send_images",
                  "save_images", "alwayson_scripts", "script_name", "script_args", "sampler_index", "sdxl_ui")
NULL_ANSWERS = {("post", "/sdapi/v1/options"), *(("post", f"/sdapi/v1/refresh-{x}") for x in
                                                 ("checkpoints", "loras", "vae", "embeddings"))}


@pytest.fixture(scope="module")
def login():
    return _client(logins={"alice": "pw"})


@pytest.fixture(scope="module")
def document(login):
    reply = login.get("/openapi.json", auth=("alice", "pw"))
    assert reply.status_code == 200, reply.text
    return reply.json()


def _resolve(document, schema: dict) -> dict:
    ref = schema.get("$ref") or (schema.get("items") or {}).get("$ref")
    return document["components"]["schemas"][ref.rsplit("/", 1)[1]] if ref else schema


@pytest.mark.parametrize("path", ["/openapi.json", "/docs"])
def test_the_schema_and_docs_need_the_apis_login(login, path):
    for auth in (None, ("alice", "wrong")):
        reply = login.get(path, auth=auth)
        assert reply.status_code == 401 and reply.headers["www-authenticate"] == 'Basic realm="sdxl_ui API"'
        assert "txt2img" not in reply.text
    assert login.get(path, auth=("alice", "pw")).status_code == 200


def test_without_a_login_the_schema_is_open_like_the_api():
    document = _client().get("/openapi.json").json()
    assert "/sdapi/v1/txt2img" in document["paths"] and "securitySchemes" not in document.get("components", {})


def test_txt2img_request_fields_are_described_by_a1111s_names_types_and_defaults(document):
    post = document["paths"]["/sdapi/v1/txt2img"]["post"]
    body = _resolve(document, post["requestBody"]["content"]["application/json"]["schema"])
    assert body["title"] == "StableDiffusionProcessingTxt2Img"
    fields = body["properties"]
    assert set(TXT2IMG_FIELDS) <= set(fields), sorted(set(TXT2IMG_FIELDS) - set(fields))
    assert {k: fields[k]["default"] for k in ("prompt", "seed", "steps", "cfg_scale", "batch_size", "n_iter",
                                             "send_images", "save_images", "sampler_index", "denoising_strength")} \
        == {"prompt": "", "seed": -1, "steps": 50, "cfg_scale": 7.0, "batch_size": 1, "n_iter": 1,
            "send_images": True, "save_images": False, "sampler_index": "Euler", "denoising_strength": 0.75}
    types = {k: {t.get("type") for t in fields[k]["anyOf"]} for k in ("steps", "cfg_scale", "prompt", "tiling")}
    assert types == {"steps": {"integer", "null"}, "cfg_scale": {"number", "null"}, "prompt": {"string", "null"},
                     "tiling": {"boolean", "null"}}
    steps = next(t for t in fields["steps"]["anyOf"] if t.get("type") == "integer")
    assert (steps["minimum"], steps["maximum"]) == (1, 150)  # sdxl_ui's limits, as its 422 names them


def test_txt2img_response_fields_and_errors_are_described(document):
    responses = document["paths"]["/sdapi/v1/txt2img"]["post"]["responses"]
    answer = _resolve(document, responses["200"]["content"]["application/json"]["schema"])
    assert {"images", "parameters", "info"} <= set(answer["properties"])
    assert {"401", "422", "429", "500", "503"} <= set(responses)
    detail = _resolve(document, responses["422"]["content"]["application/json"]["schema"])
    assert detail["title"] == "ValidationDetail"


def test_every_route_names_its_answers_model_and_the_one_basic_scheme(document):
    assert document["components"]["securitySchemes"] == {"HTTPBasic": {
        "type": "http", "scheme": "basic", "description": document["components"]["securitySchemes"]["HTTPBasic"][
            "description"]}}
    for path, methods in document["paths"].items():
        assert path.startswith("/sdapi/v1/"), path  # the API's routes only: never the page's gradio routes
        for method, operation in methods.items():
            assert operation["security"] == [{"HTTPBasic": []}], (method, path)
            if (method, path) in NULL_ANSWERS:
                continue
            schema = operation["responses"]["200"]["content"]["application/json"]["schema"]
            assert "$ref" in schema or "$ref" in schema.get("items", {}), (method, path, schema)
    for route in ("progress", "sd-models", "samplers", "schedulers", "options", "png-info", "loras", "cmd-flags",
                  "memory", "embeddings", "prompt-styles", "upscalers", "scripts", "interrupt", "skip"):
        assert any(p == f"/sdapi/v1/{route}" for p in document["paths"]), route


def test_the_request_model_and_the_adapter_agree():
    assert set(Txt2ImgRequest.model_fields) == set(A1111_FIELDS)  # the fields `parameters` echoes
    defaults = Txt2ImgRequest()
    job = parse_txt2img({"seed": 1}, native=64, model="demo")
    assert (job.request.requested_steps, job.request.guidance_scale) == (defaults.steps, defaults.cfg_scale)
    assert (job.batch_size, job.n_iter, job.send_images, job.save_images) == (
        defaults.batch_size, defaults.n_iter, defaults.send_images, defaults.save_images)
    assert job.request.prompt == defaults.prompt and job.request.negative_prompt == defaults.negative_prompt


def test_every_route_is_behind_the_one_login():
    from fastapi.routing import APIRoute

    client = _client(logins={"alice": "pw"})
    routes = [r for r in client.app.routes if isinstance(r, APIRoute)]
    assert len(routes) > 25
    for route in routes:
        for method in route.methods:
            path = route.path.replace("{rest:path}", "anything")
            reply = client.request(method, path)
            assert reply.status_code == 401 and "www-authenticate" in reply.headers, (method, path)
            assert client.request(method, path, auth=("alice", "pw")).status_code != 401, (method, path)
