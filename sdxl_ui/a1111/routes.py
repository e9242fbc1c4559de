"""The FastAPI routes of ``/sdapi/v1``: HTTP Basic on every route (``auth``: one router-level dependency), then the
adapter and the shared queue.

Errors: 401 (login), 403 (not the operator), 422 (FastAPI's ``detail`` shape, naming the field and the value),
429 (login throttle, job limit), 503 (queue full, with Retry-After), 501 (an AUTOMATIC1111 endpoint sdxl_ui does not
serve); the others in AUTOMATIC1111's error shape ``{"error", "detail", "body", "errors"}``.
"""
from __future__ import annotations

import asyncio
import base64
import binascii
import io
import json
import logging
import time

from fastapi import APIRouter, Depends, Request, Response

from ..logins import LOOPBACK
from ..metadata import parse_parameters
from ..optimizations.registry import SWITCHES
from ..schema import ErrorKind, ValidationError
from .adapter import SAMPLERS, SCHEDULERS, detail_422, error_body, field_names, parse_json, \
    parse_txt2img, preview_base64, public_name, quality_presets, txt2img_response
from .auth import caller_dependency, client_of
from .catalog import SERVED, add_catalog
from .extras import add_extras
from .img2img import parse_img2img
from .models import (A1111JSON, MemoryResponse, Nothing, Options, PNGInfoResponse, ProgressResponse, SamplerItem,
                     SchedulerItem, ScriptsList, SDModelItem, TextToImageResponse, answers, body_of, errors)
from .openapi import docs_routes

log = logging.getLogger("sdxl_ui")

RETRY_AFTER_S = 30
MAX_PIXELS = 8192 * 8192  # png-info: larger images are refused (their pixels are never decoded either way)
ERROR_STATUS = {ErrorKind.VALIDATION: 422, ErrorKind.BUSY: 503, ErrorKind.CANCELLED: 503, ErrorKind.MEMORY: 500,
                ErrorKind.MODEL: 500, ErrorKind.RUNTIME: 500}
SUPPORTED = ", ".join(("txt2img", "img2img", "extra-single-image", "extra-batch-images", "progress", "interrupt", "skip", "sd-models", "samplers", "schedulers", "options",
                       "memory", "scripts", "png-info", *SERVED))


def reply(payload, status: int = 200, headers: dict | None = None) -> Response:
    """JSON with \\u escapes: a prompt that is not valid Unicode can still be named in a 422."""
    return Response(json.dumps(payload), status_code=status, media_type="application/json", headers=headers)


def public_model(settings) -> str:
    """The model's name as clients see it: a local folder by its last part, never the server's path."""
    return public_name(settings.model)


async def read_json(request: Request):
    """The request's JSON body (parsed off the event loop), or ValidationError naming what is wrong with it."""
    raw = await request.body()
    return await asyncio.to_thread(_parse_body, raw) if len(raw) > 65536 else _parse_body(raw)


def api_routes(api) -> list:
    """The routes app.py serves: /sdapi/v1, then its /openapi.json and /docs, all behind one caller dependency."""
    caller_of = Depends(caller_dependency(api.config))
    router = build_router(api, caller_of)
    return [*router.routes, *docs_routes(router.routes, caller_of)]


def build_router(api, caller_of) -> APIRouter:
    """Every route behind the one caller dependency (``Depends`` of ``auth.caller_dependency``: HTTP Basic when the
    API has logins); a route that needs the caller's name reads the same dependency (FastAPI calls it once)."""
    router = APIRouter(prefix="/sdapi/v1", dependencies=[caller_of], default_response_class=A1111JSON,
                       responses=errors(401, 413, 429) if api.config.logins else errors(413))
    add_txt2img(router, api, caller_of)
    add_progress(router, api, caller_of)
    add_info(router, api, caller_of)
    add_catalog(router, api, caller_of)  # the listing endpoints, before the catch-all below
    add_extras(router, api, caller_of, reply, read_json)

    @router.api_route("/{rest:path}", methods=["GET", "POST", "PUT", "PATCH", "DELETE"], include_in_schema=False)
    async def not_supported(rest: str):
        return reply(error_body("NotImplementedError", f"/sdapi/v1/{rest[:100]} is not supported by sdxl_ui "
                                                       f"(no interrogation, face restoration, …); supported: "
                                                       f"{SUPPORTED}"), 501)

    return router


def add_txt2img(router, api, caller_of) -> None:
    """``txt2img`` and ``img2img``: one job route each, the same queue, the same answer."""
    for name, parse in (("txt2img", parse_txt2img), ("img2img", parse_img2img)):
        router.add_api_route(f"/{name}", _job_route(api, name, parse, caller_of), methods=["POST"],
                             **answers(TextToImageResponse, 422, 500, 503), openapi_extra=body_of(name))


def _job_route(api, name: str, parse, caller_of):
    async def route(request: Request, caller: str = caller_of):
        backend = api.backend
        try:
            body = await read_json(request)
            spec = parse(body, backend.native_size(), public_model(backend.settings), SWITCHES,
                         api.config.steps_policy, api.config.styles)
            if spec.request.hires is not None:  # an upscaler this server lacks: refused before the queue
                from ..upscalers import find

                find(spec.request.hires.upscaler, backend.settings.upscaler_dir, "hr_upscaler")
        except ValidationError as exc:
            log.info("api: refused a %s from %s: %s", name, caller, exc)
            return reply(detail_422(exc), 422)
        if spec.ignored:
            log.info("api: %s from %s: ignored fields %s", name, caller, field_names(spec.ignored))
        refused = api.limit.check(caller, time.monotonic())
        if refused:
            return reply(error_body("HTTPException", refused), 429, {"Retry-After": "60"})
        job = api.jobs.submit(caller, spec)
        if job is None:
            message = f"queue full ({api.config.queue_size} jobs waiting); try again later"
            log.info("api: %s from %s refused: %s", name, caller, message)
            return reply(error_body("HTTPException", message), 503, {"Retry-After": str(RETRY_AFTER_S)})
        while not job.done.is_set():
            await asyncio.sleep(0.05)
            if not job.interrupted and await request.is_disconnected():
                log.info("api: the client of %s went away; its job is cancelled", caller)
                job.interrupt()
        if job.error is not None:
            status = ERROR_STATUS.get(job.error.kind, 500)
            headers = {"Retry-After": str(RETRY_AFTER_S)} if status == 503 else None
            return reply(error_body("GenerationError", job.error.message), status, headers)
        return await asyncio.to_thread(txt2img_response, spec, job.results, public_model(backend.settings))

    route.__name__ = name
    return route


def _idle_progress() -> dict:
    return {"progress": 0.0, "eta_relative": 0.0,
            "state": {"skipped": False, "interrupted": False, "stopping_generation": False, "job": "",
                      "job_count": 0, "job_timestamp": "0", "job_no": 0, "sampling_step": 0, "sampling_steps": 0},
            "current_image": None, "textinfo": None}


def add_progress(router, api, caller_of) -> None:
    @router.get("/progress", **answers(ProgressResponse))
    async def progress(skip_current_image: bool = False, caller: str = caller_of):
        job = api.jobs.current(caller)
        if job is None:
            return _idle_progress()
        image = None if skip_current_image else await asyncio.to_thread(preview_base64, job.preview)
        return {
            "progress": round(job.progress, 4), "eta_relative": float(job.eta_s or 0.0),
            "state": {"skipped": job.skipped, "interrupted": job.interrupted, "stopping_generation": False,
                      "job": f"txt2img ({job.state})", "job_count": job.spec.n_iter, "job_timestamp": "0",
                      "job_no": job.job_no, "sampling_step": job.step, "sampling_steps": job.total},
            "current_image": image, "textinfo": job.textinfo}

    @router.post("/interrupt", **answers(Nothing))
    async def interrupt(caller: str = caller_of):
        if api.jobs.interrupt(caller):
            log.info("api: %s interrupted its job", caller)
        return {}

    @router.post("/skip", **answers(Nothing))
    async def skip(caller: str = caller_of):
        api.jobs.skip(caller)
        return {}


def switch_targets(api) -> dict[str, str]:
    """The models clients may name (as they see them) → the model to load: the one this server was started with,
    then the ones its operator named with --api-models. Nothing else (not even the built-in demo or tiny)."""
    targets = {public_model(api.backend.settings): str(api.backend.settings.model)}
    for model in api.config.models:
        targets.setdefault(public_name(model), str(model))
    return targets


def _models(api) -> list[str]:
    return list(switch_targets(api))


def add_info(router, api, caller_of) -> None:
    @router.get("/sd-models", **answers(list[SDModelItem]))
    async def sd_models():
        return [{"title": m, "model_name": m, "hash": None, "sha256": None, "filename": m, "config": None}
                for m in _models(api)]

    @router.get("/samplers", **answers(list[SamplerItem]))
    async def samplers():
        return SAMPLERS

    @router.get("/schedulers", **answers(list[SchedulerItem]))
    async def schedulers():
        return SCHEDULERS

    @router.get("/scripts", **answers(ScriptsList))
    async def scripts():
        return {"txt2img": [], "img2img": []}

    @router.get("/options", **answers(Options))
    async def options():
        return {"sd_model_checkpoint": public_model(api.backend.settings), "sd_checkpoint_hash": None,
                "samples_format": "png", "samples_save": True, "live_previews_enable": True,
                "sdxl_ui_quality_presets": quality_presets(), "sdxl_ui_techniques": [s.name for s in SWITCHES]}

    @router.post("/options", **answers(None, 403, 422), openapi_extra=body_of("options"))
    async def set_options(request: Request, caller: str = caller_of):
        return await change_options(api, request, caller)

    @router.get("/memory", **answers(MemoryResponse))
    async def memory():
        import psutil

        ram = psutil.virtual_memory()
        device = api.backend.status().get("device", "?")
        return {"ram": {"free": ram.available, "used": ram.total - ram.available, "total": ram.total},
                "cuda": {"error": f"not reported by sdxl_ui's API (device: {device})"}}

    @router.post("/png-info", **answers(PNGInfoResponse, 422), openapi_extra=body_of("png-info"))
    async def png_info(request: Request):
        raw = await request.body()  # at most MAX_BODY (limits.BodyLimitMiddleware); the work is off the event loop
        try:
            return await asyncio.to_thread(png_info_reply, raw)
        except ValidationError as exc:
            return reply(detail_422(exc), 422)


def png_info_reply(raw: bytes) -> dict:
    """The png-info answer for a request body: its image's ``parameters`` text, as text and parsed."""
    text = read_png_parameters(_parse_body(raw))
    return {"info": text or "", "items": {"parameters": text} if text else {},
            "parameters": parse_parameters(text) if text else {}}


def _parse_body(raw: bytes):
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValidationError("body", raw[max(0, exc.start - 10):exc.start + 10].decode("latin-1"),
                              f"is not valid UTF-8 text (byte {exc.start + 1})") from None
    return parse_json(text)


def read_png_parameters(body) -> str | None:
    """The ``parameters`` text chunk, read from the chunks before the pixels (as AUTOMATIC1111 reads
    ``image.info``): the pixels are never decoded, and an image of more than MAX_PIXELS is refused."""
    from PIL import Image

    data = body.get("image") if isinstance(body, dict) else None
    if not isinstance(data, str) or not data:
        raise ValidationError("image", data, "must be a base64 PNG")
    payload = data.split(",", 1)[1] if data.startswith("data:") else data
    try:
        raw = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise ValidationError("image", data, "is not valid base64") from None
    try:
        with Image.open(io.BytesIO(raw)) as image:
            width, height = image.size
            text = image.info.get("parameters")
    except Image.DecompressionBombError:
        raise ValidationError("image", data, f"has more than {MAX_PIXELS} pixels") from None
    except Exception as exc:  # noqa: BLE001 - not an image, a broken chunk, a text chunk over PIL's limits
        raise ValidationError("image", data, f"is not an image this app reads ({_first_line(exc)})") from None
    if width * height > MAX_PIXELS:
        raise ValidationError("image", f"{width}x{height}", f"has more than {MAX_PIXELS} pixels")
    return text if isinstance(text, str) else None


def _first_line(exc: Exception) -> str:
    text = str(exc).strip().splitlines()[0][:120] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


async def change_options(api, request: Request, caller: str) -> Response:
    try:
        body = await read_json(request)
        if not isinstance(body, dict):
            raise ValidationError("body", type(body).__name__, "must be a JSON object")
        wanted = body.get("sd_model_checkpoint")
        if wanted == "":  # Open WebUI posts "" while no model is chosen: no change
            wanted = None
        if wanted is not None and wanted not in _models(api):
            raise ValidationError("sd_model_checkpoint", wanted, f"unknown model; known: {', '.join(_models(api))}")
    except ValidationError as exc:
        return reply(detail_422(exc), 422)
    other = sorted(k for k in body if k != "sd_model_checkpoint")
    if other:
        log.info("api: options from %s: ignored settings %s", caller, field_names(other))
    if wanted is None or wanted == public_model(api.backend.settings):
        return reply(None)
    config = api.config
    operator = caller == config.operator if config.logins else \
        client_of(request) in LOOPBACK
    if not operator:
        log.warning("api: refused a model switch to %r from %s: not the operator", wanted, caller)
        return reply(error_body("HTTPException", "Only the operator of this app may switch the model "
                                                 "(docs/security.md)"), 403)
    log.info("api: %s switched the model to %r", caller, wanted)
    backend = api.backend
    model = switch_targets(api)[wanted]
    await asyncio.to_thread(backend.reconfigure, backend.settings.with_(model=model, refiner="auto"))
    backend.preload_in_background()
    return reply(None)
