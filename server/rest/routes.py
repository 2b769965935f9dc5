"""The v2 REST endpoints as module-level routers. Each handler translates HTTP to a data-plane call and
back; semantics (not found vs not ready, what statistics cover) are the data plane's.

Literal paths are registered before parameterised ones (``/v2/models/stats`` before
``/v2/models/{model}``), or the literal one is unreachable.
"""
from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable
from typing import Any, TypeVar

import orjson
from fastapi import APIRouter, Request
from fastapi.responses import Response
from pydantic import BaseModel, Field

from foldserve.errors import BodyTimeout, ClientGone, InvalidInput, PayloadTooLarge
from server.core.auth import Op, authorize
from server.core.dataplane import DataPlane
from server.rest.codec import (
    HEADER,
    decompress,
    encode_infer_response,
    error_response,
    parse_infer_request,
    parse_raw_request,
)
from server.settings import Settings

T = TypeVar("T")

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


ERRORS: dict[int | str, dict[str, Any]] = {400: {"model": ErrorBody}, 404: {"model": ErrorBody},
                                           503: {"model": ErrorBody}}
INFER_DOC = {"requestBody": {"content": {
    "application/json": {"schema": InferRequestBody.model_json_schema()},
    "application/octet-stream": {"schema": {"type": "string", "format": "binary",
                                            "description": "JSON header + binary tensors "
                                                           "(Inference-Header-Content-Length)"}}},
    "required": True}}


def _dp(request: Request) -> DataPlane:
    return request.app.state.dataplane


def _settings(request: Request) -> Settings:
    return request.app.state.settings


def authorize_request(request: Request, op: Op) -> None:
    """The token ``op`` needs (server.core.auth.ACCESS), from the request's authorization header."""
    authorize(op, _settings(request), request.headers.getlist("authorization"))


# --- server ---------------------------------------------------------------------------------------------

health = APIRouter(tags=["server"])


@health.get("/v2", summary="Server metadata")
async def server_metadata(request: Request) -> Any:
    authorize_request(request, Op.SERVER_METADATA)
    return _dp(request).metadata().to_dict()


@health.get("/v2/health/live", summary="Liveness")
async def live(request: Request) -> Response:
    return Response(status_code=200 if _dp(request).live() else 503)


@health.get("/v2/health/ready", summary="Readiness")
async def ready(request: Request) -> Response:
    return Response(status_code=200 if _dp(request).ready() else 503)


@health.get("/metrics", summary="Prometheus metrics")
async def metrics(request: Request) -> Response:
    authorize_request(request, Op.METRICS)
    return Response(_dp(request).render_metrics(), media_type="text/plain; version=0.0.4; charset=utf-8")


# --- models: literal paths first -------------------------------------------------------------------------

models = APIRouter(tags=["models"])


@models.get("/v2/models/stats", summary="Statistics of all loaded models")
async def all_stats(request: Request) -> Any:
    authorize_request(request, Op.STATISTICS)
    return {"model_stats": await _dp(request).statistics()}


@models.get("/v2/models/{model}", summary="Model metadata", responses=ERRORS)
@models.get("/v2/models/{model}/versions/{version}", summary="Model metadata (one version)", responses=ERRORS)
async def model_metadata(model: str, request: Request, version: str = "") -> Any:
    authorize_request(request, Op.MODEL_METADATA)
    return _dp(request).model_metadata(model, version).to_dict()


@models.get("/v2/models/{model}/ready", summary="Model readiness", responses=ERRORS)
@models.get("/v2/models/{model}/versions/{version}/ready", summary="Model readiness (one version)", responses=ERRORS)
async def model_ready(model: str, request: Request, version: str = "") -> Response:
    r = _dp(request).model_readiness(model, version)
    if r.ready:
        return Response(status_code=200)
    return error_response(getattr(r.error, "http_status", 503), str(r.error))


@models.get("/v2/models/{model}/config", summary="Model configuration (Triton's JSON form)", responses=ERRORS)
@models.get("/v2/models/{model}/versions/{version}/config", summary="Model configuration", responses=ERRORS)
async def model_config(model: str, request: Request, version: str = "") -> Any:
    """Triton's JSON form of the ModelConfig message (protobuf's JSON mapping, proto field names)."""
    authorize_request(request, Op.MODEL_CONFIG)
    from google.protobuf import json_format

    return json_format.MessageToDict(_dp(request).model_config(model, version), preserving_proto_field_name=True)


@models.get("/v2/models/{model}/stats", summary="Model statistics", responses=ERRORS)
@models.get("/v2/models/{model}/versions/{version}/stats", summary="Model statistics", responses=ERRORS)
async def model_stats(model: str, request: Request, version: str = "") -> Any:
    authorize_request(request, Op.STATISTICS)
    return {"model_stats": await _dp(request).statistics(model, version)}


async def until_disconnected(request: Request, work: Awaitable[T]) -> T:
    """``work``, cancelled if the client closes its connection first (a queued request is then dropped before it
    executes, counted as CANCELED): ClientGone instead of its result."""
    task = asyncio.current_task()
    gone = False

    async def watch() -> None:
        nonlocal gone
        while (await request.receive())["type"] != "http.disconnect":
            pass
        gone = True
        if task is not None:
            task.cancel()

    watcher = asyncio.ensure_future(watch())
    try:
        return await work
    except asyncio.CancelledError:
        if not gone or task is None:
            raise
        task.uncancel()
        raise ClientGone("the client closed its connection before the answer") from None
    finally:
        watcher.cancel()


async def read_body(request: Request, limit: int, timeout_s: float | None = None) -> bytes:
    """The body, refused before it is read in full when it is larger than ``limit`` bytes (decoded), and
    when it has not arrived within ``timeout_s`` (408)."""
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            too_big = int(declared) > limit
        except ValueError:
            raise InvalidInput("Content-Length is not an integer") from None
        if too_big:
            raise PayloadTooLarge(f"request JSON size of {declared} bytes exceeds the maximum allowed input size of "
                                  f"{limit} bytes (this request's largest for this model; --max-request-bytes caps "
                                  f"it)")

    async def read() -> bytes:
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise PayloadTooLarge(f"request JSON size exceeds the maximum allowed input size of {limit} bytes "
                                      f"(this request's largest for this model)")
            chunks.append(chunk)
        return b"".join(chunks)

    try:
        async with asyncio.timeout(timeout_s):      # no extra task per request (wait_for would make one)
            raw = await read()
    except TimeoutError:
        raise BodyTimeout(f"the request body did not arrive within {timeout_s:g} s (--body-timeout-s)") from None
    return decompress(raw, request.headers.get("content-encoding"), limit)


@models.post("/v2/models/{model}/infer", summary="Inference", responses=ERRORS, openapi_extra=INFER_DOC)
@models.post("/v2/models/{model}/versions/{version}/infer", summary="Inference (one version)", responses=ERRORS,
             openapi_extra=INFER_DOC)
async def infer(model: str, request: Request, version: str = "") -> Response:
    settings, admission = _settings(request), request.app.state.admission
    authorize_request(request, Op.INFER)
    # the whole body first (within --body-timeout-s), then a slot: slow senders never hold one
    lv = _dp(request).model(model, version)
    body = await read_body(request, lv.request_bytes_limit, settings.body_timeout_s)
    with admission.slot():
        header = request.headers.get(HEADER)
        req = (parse_raw_request(model, version, body, lv.spec) if header is not None and header.strip() == "0"
               else parse_infer_request(model, version, body, header, lv.request_elements_limit))
        if _dp(request).tracing.enabled:
            req.trace = {k: request.headers[k] for k in ("traceparent", "tracestate") if k in request.headers}
        work = _dp(request).infer(req, "http")
        # where requests wait for a batch window, a client that leaves is dropped from the queue; elsewhere a
        # request is answered in the time the watch would cost (4-8% of a 0.6 ms round trip)
        resp = await (until_disconnected(request, work) if lv.scheduler.may_wait else work)
    payload, header_len = encode_infer_response(resp, bool(req.parameters.get("binary_data_output")))
    if header_len is None:
        return Response(payload, media_type="application/json")
    return Response(payload, media_type="application/octet-stream",
                    headers={"Inference-Header-Content-Length": str(header_len)})


# --- repository -------------------------------------------------------------------------------------------

repository = APIRouter(tags=["repository"])


@repository.post("/v2/repository/index", summary="Repository index")
async def repository_index(request: Request) -> Any:
    authorize_request(request, Op.REPOSITORY_INDEX)
    ready_only = False
    body = await read_body(request, LOAD_BODY, _settings(request).body_timeout_s)
    if body.strip():
        try:
            doc = orjson.loads(body)
        except orjson.JSONDecodeError:
            if _READY_NOT_BOOL.match(body):      # too deep to parse, but 'ready' is plainly no boolean
                raise InvalidInput("Invalid value for 'ready': expected a boolean") from None
            raise InvalidInput("repository index body must be JSON, e.g. {\"ready\": true}") from None
        if not isinstance(doc, dict):
            raise InvalidInput("repository index body must be a JSON object, e.g. {\"ready\": true}")
        ready = doc.get("ready", False)
        if not isinstance(ready, bool):
            raise InvalidInput(f"Invalid value for 'ready': expected a boolean, got {type(ready).__name__}")
        ready_only = ready
    return [m.to_dict() for m in _dp(request).repository_index(ready_only)]


@repository.post("/v2/repository/models/{model}/load", summary="Load or reload a model", responses=ERRORS)
async def load(model: str, request: Request) -> Response:
    """Body (optional): ``{"parameters": {"config": "<ModelConfig as JSON>"}}`` (Triton's repository extension)."""
    authorize_request(request, Op.LOAD)
    doc = await _optional_json(request, LOAD_BODY, f"failed to load {model!r}: the request body")
    if not isinstance(doc, dict) or not isinstance(doc.get("parameters", {}), dict):
        raise InvalidInput(f"failed to load {model!r}: the body must be a JSON object, its 'parameters' an object")
    await _dp(request).load(model, doc.get("parameters", {}))
    return Response(status_code=200)


@repository.post("/v2/repository/models/{model}/unload", summary="Unload a model", responses=ERRORS)
async def unload(model: str, request: Request) -> Response:
    authorize_request(request, Op.UNLOAD)
    await _dp(request).unload(model)
    return Response(status_code=200)


# --- system shared memory (Triton's extension) ---------------------------------------------------------

shared_memory = APIRouter(tags=["shared memory"])
SMALL_BODY = 64 * 1024


async def _optional_json(request: Request, limit: int, what: str) -> Any:
    """A small JSON body (``{}`` when there is none), read within the body limits; 400 naming ``what``."""
    body = await read_body(request, limit, _settings(request).body_timeout_s)
    if not body.strip():
        return {}
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise InvalidInput(f"{what} is not valid JSON ({exc})") from None
_READY_NOT_BOOL = re.compile(rb'\s*\{\s*"ready"\s*:\s*[\[{"0-9-]')
LOAD_BODY = 1 << 20         # a config override; larger (model files sent with the request) is refused unread


@shared_memory.get("/v2/systemsharedmemory/status", summary="Registered system shared-memory regions")
@shared_memory.get("/v2/systemsharedmemory/region/{name}/status", summary="One region's status", responses=ERRORS)
async def shm_status(request: Request, name: str = "") -> Any:
    authorize_request(request, Op.SHM_STATUS)
    return _dp(request).shm_status(name)


@shared_memory.post("/v2/systemsharedmemory/region/{name}/register", summary="Register a region", responses=ERRORS)
async def shm_register(name: str, request: Request) -> Response:
    """Body: ``{"key": "/shm_key", "offset": 0, "byte_size": N}``; the key is a POSIX shared-memory object."""
    authorize_request(request, Op.SHM_REGISTER)
    body = await read_body(request, SMALL_BODY, _settings(request).body_timeout_s)
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        doc = None
    if not isinstance(doc, dict) or not isinstance(doc.get("key"), str) or "byte_size" not in doc:
        raise InvalidInput('register body must be JSON {"key": "/name", "offset": 0, "byte_size": N}')
    await _dp(request).shm_register(name, doc["key"], doc.get("offset", 0), doc["byte_size"])
    return Response(status_code=200)


@shared_memory.post("/v2/systemsharedmemory/unregister", summary="Unregister every region")
@shared_memory.post("/v2/systemsharedmemory/region/{name}/unregister", summary="Unregister a region",
                    responses=ERRORS)
async def shm_unregister(request: Request, name: str = "") -> Response:
    authorize_request(request, Op.SHM_UNREGISTER)
    await _dp(request).shm_unregister(name)
    return Response(status_code=200)


@shared_memory.get("/v2/cudasharedmemory/status", summary="CUDA shared-memory regions (none: not offered)")
@shared_memory.get("/v2/cudasharedmemory/region/{name}/status", summary="One CUDA region's status",
                   responses=ERRORS)
async def cuda_shm_status(request: Request, name: str = "") -> Any:
    authorize_request(request, Op.CUDA_SHM)
    return _dp(request).cuda_shm_status(name)


@shared_memory.post("/v2/cudasharedmemory/region/{name}/register", include_in_schema=False)   # 501: not offered
async def cuda_shm_register(request: Request, name: str) -> Response:
    authorize_request(request, Op.CUDA_SHM)
    _dp(request).cuda_shm_register(name)
    return Response(status_code=200)


@shared_memory.post("/v2/cudasharedmemory/unregister", summary="Unregister every CUDA region (none are registered)")
@shared_memory.post("/v2/cudasharedmemory/region/{name}/unregister", summary="Unregister a CUDA region",
                    responses=ERRORS)
async def cuda_shm_unregister(request: Request, name: str = "") -> Response:
    authorize_request(request, Op.CUDA_SHM)
    _dp(request).cuda_shm_unregister(name)
    return Response(status_code=200)


# --- Triton's logging extension -------------------------------------------------------------------------

logging_api = APIRouter(tags=["logging"])


@logging_api.get("/v2/logging", summary="The server's log settings (Triton's logging extension)")
async def log_settings(request: Request) -> Any:
    authorize_request(request, Op.LOGGING)
    return _dp(request).log_settings()


@logging_api.post("/v2/logging", summary="Change log settings on every worker; returns them", responses=ERRORS)
async def update_log_settings(request: Request) -> Any:
    """Body: some of ``log_info``, ``log_warning``, ``log_error`` (bool), ``log_verbose_level`` (uint),
    ``log_format`` ("default" or "ISO8601"), ``log_file`` ("" only)."""
    authorize_request(request, Op.LOGGING)
    doc = await _optional_json(request, SMALL_BODY, "log settings body")
    return await _dp(request).update_log_settings(doc)


@logging_api.get("/v2/trace/setting", summary="Global trace settings (Triton's trace extension)")
@logging_api.get("/v2/models/{model}/trace/setting", summary="A model's trace settings", responses=ERRORS)
async def trace_settings(request: Request, model: str = "") -> Any:
    authorize_request(request, Op.TRACE)
    return _dp(request).trace_settings(model)


@logging_api.post("/v2/trace/setting", summary="Change the global trace settings on every worker", responses=ERRORS)
@logging_api.post("/v2/models/{model}/trace/setting", summary="Change a model's trace settings (null: the global "
                  "ones again)", responses=ERRORS)
async def update_trace_settings(request: Request, model: str = "") -> Any:
    """Body: some of ``trace_level`` (["OFF"] or ["TIMESTAMPS"]), ``trace_rate``, ``trace_count``,
    ``log_frequency`` (numbers as Triton sends them: strings or integers)."""
    authorize_request(request, Op.TRACE)
    doc = await _optional_json(request, SMALL_BODY, "trace settings body")
    return await _dp(request).update_trace_settings(model, doc)


ROUTERS = (health, models, repository, shared_memory, logging_api)
