"""AUTOMATIC1111's extras, upscaling only: ``POST /extra-single-image`` and ``/extra-batch-images``. The body's
fields by A1111's names and defaults (``models.ExtrasBaseRequest``), the pictures upscaled by the backend's
``upscale`` (the same path as the CLI's ``upscale`` and the hires fix's upscalers), the answer in A1111's shape.
Face restoration is not in sdxl_ui: a visibility above 0 is named in ``html_info`` as ignored."""
from __future__ import annotations

import asyncio
import html
import logging
import time
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request

from ..edits import Upscale
from ..jobs import CancelToken, capabilities_of
from ..schema import ValidationError
from .adapter import decode_picture, detail_422, error_body, preview_base64
from .models import ExtrasBatchImagesResponse, ExtrasSingleImageResponse, answers, body_of

log = logging.getLogger("sdxl_ui")

MAX_BATCH = 16
IGNORED = {"gfpgan_visibility": "no face restoration in sdxl_ui", "codeformer_visibility":
           "no face restoration in sdxl_ui"}


@dataclass(frozen=True)
class Extras:
    """A parsed extras body: the pictures, what to do to them, whether to send them back, what was ignored."""

    pictures: list
    spec: Upscale
    show: bool = True
    ignored: dict = field(default_factory=dict)


def _number(body: dict, name: str, default):
    value = body.get(name)
    return default if value is None else value


def parse_extras(body: Any, batch: bool) -> Extras:
    """An extras body (single: ``image``; batch: ``imageList`` of ``{data, name}``), or a ValidationError naming
    the A1111 field."""
    if not isinstance(body, dict):
        raise ValidationError("body", type(body).__name__, "must be a JSON object")
    if batch:
        items = body.get("imageList")
        if not isinstance(items, list) or not items:
            raise ValidationError("imageList", items, "must be a list of {data, name} pictures")
        if len(items) > MAX_BATCH:
            raise ValidationError("imageList", f"{len(items)} pictures", f"at most {MAX_BATCH} per request")
        pictures = [decode_picture(f"imageList[{i}].data", item.get("data") if isinstance(item, dict) else item)
                    for i, item in enumerate(items)]
    else:
        pictures = [decode_picture("image", body.get("image"))]
    mode = _number(body, "resize_mode", 0)
    if mode not in (0, 1) or isinstance(mode, bool):
        raise ValidationError("resize_mode", mode, "must be 0 (by upscaling_resize) or 1 (to upscaling_resize_w × "
                                                   "upscaling_resize_h)")
    crop = _number(body, "upscaling_crop", True)
    show = _number(body, "show_extras_results", True)
    for name, value in (("upscaling_crop", crop), ("show_extras_results", show)):
        if not isinstance(value, bool):
            raise ValidationError(name, value, "must be true or false")
    spec = Upscale(upscaler=_number(body, "upscaler_1", "None"), scale=_number(body, "upscaling_resize", 2),
                   width=_number(body, "upscaling_resize_w", 512) if mode == 1 else 0,
                   height=_number(body, "upscaling_resize_h", 512) if mode == 1 else 0, crop=crop,
                   upscaler_2=_number(body, "upscaler_2", "None"),
                   visibility_2=_number(body, "extras_upscaler_2_visibility", 0))
    ignored = {}
    for name, reason in IGNORED.items():
        value = body.get(name)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0:
            ignored[name] = reason
    return Extras(pictures, spec, show, ignored)


def html_info(extras: Extras, results: list) -> str:
    """A1111's ``html_info``: the upscale's fields as its infotext writes them, in a paragraph."""
    text = extras.spec.infotext()
    if results:
        text += f", Size: {results[0].width}x{results[0].height}"
    if extras.ignored:
        text += "; ignored: " + ", ".join(f"{k} ({v})" for k, v in extras.ignored.items())
    return f"<p>{html.escape(text)}</p>"


def add_extras(router, api, caller_of, reply, read_json) -> None:
    """The two extras routes, through the backend's ``upscale`` (501 on a backend without it: the Ray workers)."""
    for path, batch, model in (("extra-single-image", False, ExtrasSingleImageResponse),
                               ("extra-batch-images", True, ExtrasBatchImagesResponse)):
        router.add_api_route(f"/{path}", _extras_route(api, caller_of, reply, read_json, batch, path), methods=["POST"],
                             **answers(model, 422, 429, 500), openapi_extra=body_of(path))


def _extras_route(api, caller_of, reply, read_json, batch: bool, name: str):
    async def route(request: Request, caller: str = caller_of):
        backend = api.backend
        if not capabilities_of(backend).upscale:
            return reply(error_body("NotImplementedError", f"/sdapi/v1/{name} runs only with the in-process "
                                                           "backend (not on the Ray workers)"), 501)
        try:
            extras = parse_extras(await read_json(request), batch)
        except ValidationError as exc:
            log.info("api: refused a %s from %s: %s", name, caller, exc)
            return reply(detail_422(exc), 422)
        refused = api.limit.check(caller, time.monotonic())
        if refused:
            return reply(error_body("HTTPException", refused), 429, {"Retry-After": "60"})
        cancel = CancelToken()
        work = asyncio.create_task(asyncio.to_thread(backend.upscale, extras.pictures, extras.spec, cancel))
        while not work.done():
            await asyncio.wait({work}, timeout=0.1)
            if not work.done() and not cancel.cancelled and await request.is_disconnected():
                log.info("api: the client of %s went away; its upscale is cancelled", caller)
                cancel.cancel()
        try:
            results = work.result()
        except ValidationError as exc:
            return reply(detail_422(exc), 422)
        except Exception as exc:  # noqa: BLE001 - the client gets A1111's error shape, the console the traceback
            log.exception("api: %s failed", name)
            return reply(error_body(type(exc).__name__, f"upscale failed: {str(exc)[:300]}"), 500)
        info = html_info(extras, results)
        images = await asyncio.to_thread(lambda: [preview_base64(r) for r in results]) if extras.show else []
        if batch:
            return {"html_info": info, "images": images}
        return {"html_info": info, "image": images[0] if images else None}

    route.__name__ = name.replace("-", "_")
    return route
