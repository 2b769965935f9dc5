"""REST transport (FastAPI): the KServe v2 HTTP/REST protocol with Triton's binary tensor extension.

``create_app(settings, dataplane)`` builds the app; nothing happens at import time. Errors are mapped
once, in the exception-handler table: a :class:`FoldserveError` becomes its HTTP status with
``{"error": message}`` (Triton's error body); anything else is a 500 with a generic message.
"""
from __future__ import annotations

import logging
from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from foldserve import __version__
from foldserve.errors import FoldserveError, InvalidInput, PayloadTooLarge, QueueFull
from server.core.auth import check_bearer
from server.core.dataplane import DataPlane
from server.rest.codec import HEADER, decompress, encode_infer_response, parse_infer_request
from server.settings import Settings

logger = logging.getLogger(__name__)


# --- documentation models (the infer body is parsed by hand for speed; these describe it) -------------

class TensorIn(BaseModel):
    name: str
    datatype: str = Field(description="BOOL, UINT8..UINT64, INT8..INT64, FP16, FP32, FP64")
    shape: list[int]
    data: list[Any] | None = Field(None, description="row-major values (nested or flat)")
    parameters: dict[str, Any] | None = Field(None, description="binary_data_size for binary data")


class OutputIn(BaseModel):
    name: str
    parameters: dict[str, Any] | None = Field(None, description="binary_data (bool), classification (int)")


class InferRequestBody(BaseModel):
    id: str | None = None
    parameters: dict[str, Any] | None = None
    inputs: list[TensorIn]
    outputs: list[OutputIn] | None = None


class ErrorBody(BaseModel):
    error: str


class ORJSONResponse(JSONResponse):
    def render(self, content: Any) -> bytes:
        return orjson.dumps(content, option=orjson.OPT_SERIALIZE_NUMPY)


def _error(status: int, message: str) -> Response:
    return ORJSONResponse({"error": message}, status_code=status)


def create_app(settings: Settings, dataplane: DataPlane) -> FastAPI:
    app = FastAPI(title="foldserve", version=__version__, default_response_class=ORJSONResponse,
                  description="KServe v2 / Open Inference Protocol REST API for BN-folded ONNX models")
    dp = dataplane
    errors = {400: {"model": ErrorBody}, 404: {"model": ErrorBody}, 503: {"model": ErrorBody}}

    limit = settings.concurrency_limit()
    active = [0]  # inference requests in flight on this transport (admission control)

    @app.exception_handler(FoldserveError)
    async def _foldserve_error(request: Request, exc: FoldserveError) -> Response:
        return _error(exc.http_status, str(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
        detail = exc.detail if isinstance(exc.detail, str) else "request failed"
        if exc.status_code == 404:
            detail = f"no such endpoint: {request.method} {request.url.path}"
        return _error(exc.status_code, detail)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> Response:
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()))
        return _error(400, f"invalid request: {where}: {first.get('msg', 'invalid')}")

    @app.exception_handler(Exception)
    async def _internal_error(request: Request, exc: Exception) -> Response:
        logger.exception("internal error on %s %s", request.method, request.url.path)
        return _error(500, "internal error (see the server log)")

    def _auth(request: Request, token: str | None, what: str) -> None:
        check_bearer(request.headers.get("authorization"), token, what)

    async def _read_body(request: Request) -> bytes:
        """The body, refused before it is read in full when it is larger than max_request_bytes."""
        limit = settings.max_request_bytes
        declared = request.headers.get("content-length")
        if declared is not None:
            try:
                too_big = int(declared) > limit
            except ValueError:
                raise InvalidInput("Content-Length is not an integer") from None
            if too_big:
                raise PayloadTooLarge(f"request body of {declared} bytes exceeds the {limit}-byte limit "
                                      f"(--max-request-bytes)")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise PayloadTooLarge(f"request body exceeds the {limit}-byte limit (--max-request-bytes)")
            chunks.append(chunk)
        body = b"".join(chunks)
        return decompress(body, request.headers.get("content-encoding"), limit)

    # --- server ---------------------------------------------------------------------------------

    @app.get("/v2", summary="Server metadata")
    async def server_metadata() -> Any:
        return dp.metadata()

    @app.get("/v2/health/live", summary="Liveness")
    async def live() -> Response:
        return Response(status_code=200 if dp.live() else 503)

    @app.get("/v2/health/ready", summary="Readiness")
    async def ready() -> Response:
        return Response(status_code=200 if dp.ready() else 503)

    # --- models ---------------------------------------------------------------------------------

    @app.get("/v2/models/{model}", summary="Model metadata", responses=errors)
    @app.get("/v2/models/{model}/versions/{version}", summary="Model metadata (one version)", responses=errors)
    async def model_metadata(model: str, version: str = "") -> Any:
        return dp.model_metadata(model, version)

    @app.get("/v2/models/{model}/ready", summary="Model readiness", responses=errors)
    @app.get("/v2/models/{model}/versions/{version}/ready", summary="Model readiness (one version)", responses=errors)
    async def model_ready(model: str, version: str = "") -> Response:
        dp.model(model, version)  # unknown model or version: 404; known but not ready: 503
        return Response(status_code=200 if dp.model_ready(model, version) else 503)

    @app.get("/v2/models/{model}/config", summary="Model configuration (Triton's JSON form)", responses=errors)
    @app.get("/v2/models/{model}/versions/{version}/config", summary="Model configuration", responses=errors)
    async def model_config(model: str, version: str = "") -> Any:
        return dp.model_config(model, version)

    @app.get("/v2/models/stats", summary="Statistics of all models")
    @app.get("/v2/models/{model}/stats", summary="Model statistics", responses=errors)
    @app.get("/v2/models/{model}/versions/{version}/stats", summary="Model statistics", responses=errors)
    async def model_stats(model: str = "", version: str = "") -> Any:
        return {"model_stats": dp.statistics(model, version)}

    infer_doc = {"requestBody": {"content": {
        "application/json": {"schema": InferRequestBody.model_json_schema()},
        "application/octet-stream": {"schema": {"type": "string", "format": "binary",
                                                "description": "JSON header + binary tensors "
                                                               "(Inference-Header-Content-Length)"}}},
        "required": True}}

    @app.post("/v2/models/{model}/infer", summary="Inference", responses=errors, openapi_extra=infer_doc)
    @app.post("/v2/models/{model}/versions/{version}/infer", summary="Inference (one version)", responses=errors,
              openapi_extra=infer_doc)
    async def infer(model: str, request: Request, version: str = "") -> Response:
        _auth(request, settings.auth_token, "inference")
        if active[0] >= limit:  # past the limit answer at once instead of queueing without bound
            raise QueueFull(f"server busy: {active[0]} requests in flight (limit {limit}); retry later")
        active[0] += 1
        try:
            body = await _read_body(request)
            req = parse_infer_request(model, version, body, request.headers.get(HEADER))
            resp = await dp.infer(req, "http")
        finally:
            active[0] -= 1
        payload, header_len = encode_infer_response(resp, bool(req.parameters.get("binary_data_output")))
        if header_len is None:
            return Response(payload, media_type="application/json")
        return Response(payload, media_type="application/octet-stream",
                        headers={"Inference-Header-Content-Length": str(header_len)})

    # --- repository -------------------------------------------------------------------------------

    @app.post("/v2/repository/index", summary="Repository index")
    async def repository_index(request: Request) -> Any:
        ready_only = False
        body = await request.body()
        if body.strip():
            try:
                doc = orjson.loads(body)
            except orjson.JSONDecodeError:
                raise InvalidInput("repository index body must be JSON, e.g. {\"ready\": true}") from None
            ready_only = bool(doc.get("ready", False)) if isinstance(doc, dict) else False
        return dp.repository_index(ready_only)

    @app.post("/v2/repository/models/{model}/load", summary="Load or reload a model", responses=errors)
    async def load(model: str, request: Request) -> Response:
        _auth(request, settings.admin_token, "the repository API")
        await dp.load(model)
        return Response(status_code=200)

    @app.post("/v2/repository/models/{model}/unload", summary="Unload a model", responses=errors)
    async def unload(model: str, request: Request) -> Response:
        _auth(request, settings.admin_token, "the repository API")
        await dp.unload(model)
        return Response(status_code=200)

    @app.get("/metrics", summary="Prometheus metrics", response_class=PlainTextResponse)
    async def metrics() -> Response:
        return PlainTextResponse(dp.render_metrics(), media_type="text/plain; version=0.0.4")

    return app
