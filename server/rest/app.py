"""REST transport (FastAPI): the KServe v2 HTTP/REST protocol with Triton's binary tensor extension.

``create_app(settings, dataplane)`` builds the app from the module-level routers in
:mod:`server.rest.routes`; nothing happens at import time. Errors are mapped once, in the
exception-handler table: a :class:`FoldserveError` becomes its HTTP status with ``{"error": message}``
(Triton's error body); anything else is a 500 with a generic message.
"""
from __future__ import annotations

import logging
import re
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from foldserve import __version__
from foldserve.errors import FoldserveError
from server.core.admission import Admission
from server.core.auth import Op
from server.core.dataplane import DataPlane
from server.rest.codec import ORJSONResponse, error_response
from server.rest.routes import ROUTERS, authorize_request, infer
from server.settings import Settings

logger = logging.getLogger(__name__)


async def _foldserve_error(request: Request, exc: FoldserveError) -> Response:
    return error_response(exc.http_status, str(exc))


async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
    detail = exc.detail if isinstance(exc.detail, str) else "request failed"
    if exc.status_code == 404:
        detail = f"no such endpoint: {request.method} {request.url.path}"
    return error_response(exc.status_code, detail)


async def _validation_error(request: Request, exc: RequestValidationError) -> Response:
    first = exc.errors()[0] if exc.errors() else {}
    where = ".".join(str(p) for p in first.get("loc", ()))
    return error_response(400, f"invalid request: {where}: {first.get('msg', 'invalid')}")


async def _internal_error(request: Request, exc: Exception) -> Response:
    logger.exception("internal error on %s %s", request.method, request.url.path)
    return error_response(500, "internal error (see the server log)")


EXCEPTION_HANDLERS = {FoldserveError: _foldserve_error, StarletteHTTPException: _http_error,
                      RequestValidationError: _validation_error, Exception: _internal_error}


DOCS_ASSETS = "/docs-assets"


def _add_offline_docs(app: FastAPI) -> None:
    """Swagger UI at /docs from the assets the swagger-ui-bundle package ships (FastAPI's default loads
    them from a CDN, which leaves the page blank on a machine without internet)."""
    from fastapi.openapi.docs import get_swagger_ui_html
    from fastapi.staticfiles import StaticFiles
    from swagger_ui_bundle import swagger_ui_path

    app.mount(DOCS_ASSETS, StaticFiles(directory=str(swagger_ui_path)), name="docs-assets")

    @app.get("/openapi.json", include_in_schema=False)
    async def openapi(request: Request) -> Response:
        authorize_request(request, Op.DOCS)
        return ORJSONResponse(app.openapi())

    @app.get("/docs", include_in_schema=False)
    async def docs(request: Request) -> Response:
        authorize_request(request, Op.DOCS)
        return get_swagger_ui_html(openapi_url="/openapi.json", title="foldserve - API",
                                   swagger_js_url=f"{DOCS_ASSETS}/swagger-ui-bundle.js",
                                   swagger_css_url=f"{DOCS_ASSETS}/swagger-ui.css",
                                   swagger_favicon_url=f"{DOCS_ASSETS}/favicon-32x32.png")


INFER_PATH = re.compile(r"/v2/models/([^/]+)(?:/versions/([^/]+))?/infer")


class InferFirst:
    """The app as uvicorn runs it: ``POST /v2/models/{model}[/versions/{version}]/infer`` goes straight to its
    handler (the same function the router holds, with the same exception handlers), everything else through
    FastAPI. The router's walk over every route, three middleware layers and the dependency solver cost about
    as much per request as the rest of the REST path of a small model."""

    def __init__(self, app: FastAPI) -> None:
        self.app = app
        self.state = app.state

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        match = INFER_PATH.fullmatch(scope["path"]) if scope["type"] == "http" and scope["method"] == "POST" else None
        if match is None:
            await self.app(scope, receive, send)
            return
        scope["app"] = self.app
        request = Request(scope, receive, send)
        try:
            response = await infer(match[1], request, match[2] or "")
        except Exception as exc:
            response = await _handler(exc)(request, exc)
        await response(scope, receive, send)


def _handler(exc: Exception) -> Any:
    """The handler FastAPI would pick for ``exc``: the first of its classes in EXCEPTION_HANDLERS."""
    return next(EXCEPTION_HANDLERS[cls] for cls in type(exc).__mro__ if cls in EXCEPTION_HANDLERS)


def create_app(settings: Settings, dataplane: DataPlane, admission: Admission | None = None) -> FastAPI:
    app = FastAPI(title="foldserve", version=__version__, default_response_class=ORJSONResponse,
                  description="KServe v2 / Open Inference Protocol REST API for BN-folded ONNX models",
                  exception_handlers=EXCEPTION_HANDLERS, docs_url=None, redoc_url=None,
                  openapi_url=None)
    _add_offline_docs(app)
    app.state.dataplane = dataplane
    app.state.settings = settings
    app.state.admission = admission or Admission(settings.concurrency_limit(), dataplane.monitor)
    for router in ROUTERS:
        app.include_router(router)
    return app
