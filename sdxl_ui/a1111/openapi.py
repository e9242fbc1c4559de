"""``/openapi.json`` and ``/docs`` of the API, as AUTOMATIC1111 serves them: the schema of the ``/sdapi/v1`` routes
only (never the page's gradio routes), with every request and response field by A1111's names (``models``), behind
the same dependency as every API route (HTTP Basic when the API has logins, with its 401 challenge, so a browser
asks for the login before showing ``/docs``).
"""
from __future__ import annotations

from fastapi import APIRouter
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse

from .models import REQUESTS

TITLE = "sdxl_ui: AUTOMATIC1111-compatible API"
VERSION = "1.10.1-sdxl_ui"  # the A1111 API version whose shapes it answers in
DESCRIPTION = ("AUTOMATIC1111's /sdapi/v1 as sdxl_ui serves it (docs/api.md). Request "
               "bodies are read by the server's own checks: a refused field is a 422 naming it, `field: problem "
               "(got value)`; fields A1111 does not know are ignored.")


def schema(routes) -> dict:
    """The OpenAPI document of ``routes``, with the request bodies the routes describe (``routes.body_of``)."""
    document = get_openapi(title=TITLE, version=VERSION, description=DESCRIPTION, routes=routes)
    components = document.setdefault("components", {}).setdefault("schemas", {})
    for model in REQUESTS.values():
        own = model.model_json_schema(ref_template="#/components/schemas/{model}")
        for name, definition in own.pop("$defs", {}).items():
            components.setdefault(name, definition)
        components[own.get("title", model.__name__)] = own
    return document


def docs_routes(routes, caller_of) -> list:
    """GET /openapi.json and GET /docs (Swagger UI), behind ``caller_of`` (the API's one dependency)."""
    router = APIRouter(dependencies=[caller_of])
    built: dict = {}

    @router.get("/openapi.json", include_in_schema=False)
    async def openapi_json():
        if "schema" not in built:
            built["schema"] = schema(routes)
        return JSONResponse(built["schema"])

    @router.get("/docs", include_in_schema=False)
    async def docs():
        return get_swagger_ui_html(openapi_url="/openapi.json", title=f"{TITLE} - Swagger UI")

    return list(router.routes)
