"""gRPC transport (grpc.aio): the v2 GRPCInferenceService, grpc.health.v1 and server reflection.

Errors are mapped once, in :func:`_rpc`: a :class:`FoldserveError` becomes its gRPC status with its
message; anything else is INTERNAL with a generic message (the detail goes to the log).
"""
from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from foldserve.errors import FoldserveError, InvalidInput, PayloadTooLarge
from foldserve.protocol import grpc_service_pb2 as pb
from foldserve.protocol import grpc_service_pb2_grpc as pb_grpc
from server.core.admission import Admission
from server.core.auth import Op, authorize
from server.core.dataplane import DataPlane
from server.grpc import converters as conv
from server.grpc.janitor import ConnectionJanitor, PeerActivity
from server.settings import Settings

logger = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name


GRPC_CONNECTION_AGE_MS = 10 * 60 * 1000


class BadRequest:
    """What a request that is not a valid protobuf message (or is larger than any loaded model can need)
    deserialises to (see :func:`_tolerant`)."""

    def __init__(self, error: FoldserveError, size: int = 0) -> None:
        self.error, self.size = error, size


TRACE_HEADERS = ("traceparent", "tracestate")   # W3C trace context, read only where tracing is on
TRIM_BYTES = 8 << 20          # after refusing a message this large, hand the freed memory back to the system


def _model_name(data: bytes) -> str | None:
    """Field 1 of a ModelInferRequest (model_name) when it comes first, as protobuf serialisers write it; None
    when it does not (the bound is then every loaded model's)."""
    if len(data) < 2 or data[0] != 0x0A:
        return None
    length, i = _varint(data, 1)
    if length is None or length > 1024 or i + length > len(data):
        return None
    try:
        return data[i:i + length].decode()
    except UnicodeDecodeError:
        return None


#: the most entries one repeated top-level field of a request may hold (a model's inputs, outputs, raw contents,
#: parameters): 4M empty ``inputs`` entries (7.8 KB gzip) cost 28.6 s and 1.8 GB to parse before this bound
MAX_ENTRIES = 1024


def too_many_entries(data: bytes, limit: int = MAX_ENTRIES) -> str | None:
    """The first top-level repeated field of a serialised message with more than ``limit`` entries (by field
    number), found by walking the wire format's top-level tags only (a length-delimited field is skipped, not
    read) and stopping at the bound; None when every field is within it or the bytes are not well formed (the
    parser then says so)."""
    if len(data) <= 2 * limit:
        return None                     # every entry takes 2 bytes at least: no field can pass the bound
    counts: dict[int, int] = {}
    i, n = 0, len(data)
    while i < n:
        key, i = _varint(data, i)
        if key is None:
            return None
        field, wire = key >> 3, key & 7
        if wire == 0:
            _, i = _varint(data, i)
        elif wire == 2:
            length, i = _varint(data, i)
            if length is None:
                return None
            i += length
        elif wire in (1, 5):
            i += 8 if wire == 1 else 4
        else:
            return None
        if i > n:
            return None
        counts[field] = counts.get(field, 0) + 1
        if counts[field] > limit:
            return ENTRY_FIELDS.get(field, f"field {field}")
    return None


#: ModelInferRequest's repeated fields, by number (grpc_service.proto)
ENTRY_FIELDS = {4: "parameters", 5: "inputs", 6: "outputs", 7: "raw_input_contents"}


def _varint(data: bytes, i: int) -> tuple[int | None, int]:
    value, shift = 0, 0
    while i < len(data) and shift < 64:
        b = data[i]
        value |= (b & 0x7F) << shift
        i += 1
        if not b & 0x80:
            return value, i
        shift += 7
    return None, i


def _tolerant(parse: Callable[[bytes], Any], limit: Callable[[str | None], int],
              infer: bool) -> Callable[[bytes], Any]:
    """A deserializer that never raises (grpc would answer UNKNOWN; we answer INVALID_ARGUMENT) and refuses a
    message larger than the largest request its model can need (``infer``; any other call is small) before
    protobuf parses it."""
    def deserialize(data: bytes) -> Any:
        bound = limit(_model_name(data)) if infer else limit("")
        if len(data) > bound:
            return BadRequest(PayloadTooLarge(f"the request message is {len(data)} bytes (decompressed), more than "
                                              f"the {bound} bytes the largest request of the loaded models needs"),
                              len(data))
        if infer and (field := too_many_entries(data)) is not None:
            return BadRequest(InvalidInput(f"the request has more than {MAX_ENTRIES} '{field}' entries"), len(data))
        try:
            return parse(data)
        except Exception as exc:  # protobuf's DecodeError and friends
            return BadRequest(InvalidInput(f"the request is not a valid protobuf message ({exc})"), len(data))
    return deserialize


def release_memory() -> None:
    """Return freed heap memory to the system (glibc keeps it otherwise: RSS stayed +560 MB after 9 refused
    64 MB messages)."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


async def _chain(first: Any, rest: AsyncIterator[Any]) -> AsyncIterator[Any]:
    yield first
    async for item in rest:
        yield item


def _authorize(context: grpc.aio.ServicerContext, op: Op, settings: Settings) -> None:
    authorize(op, settings, [v for k, v in (context.invocation_metadata() or ()) if k == "authorization"])


def _rpc(op: Op) -> Callable:
    """Map the error hierarchy to gRPC status codes; check the token ``op`` needs (server.core.auth.ACCESS)."""

    def wrap(fn: Callable) -> Callable:
        @functools.wraps(fn)
        async def handler(self: InferenceServicer, request: Any, context: grpc.aio.ServicerContext):
            try:
                if isinstance(request, BadRequest):
                    if request.size >= TRIM_BYTES:      # off the event loop: it can take a while
                        await asyncio.get_running_loop().run_in_executor(None, release_memory)
                    raise request.error
                _authorize(context, op, self.settings)
                return await fn(self, request, context)
            except FoldserveError as exc:
                await context.abort(getattr(grpc.StatusCode, exc.grpc_status), str(exc))
            except grpc.aio.AbortError:
                raise
            except Exception:
                logger.exception("internal error in %s", fn.__name__)
                await context.abort(grpc.StatusCode.INTERNAL, "internal error (see the server log)")
        return handler
    return wrap


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, settings: Settings, dataplane: DataPlane) -> None:
        self.settings = settings
        self.dp = dataplane
        # taken once a call's message has arrived and its token checked: idle calls never hold a slot
        self.admission = Admission(settings.concurrency_limit(), dataplane.monitor)

    @_rpc(Op.SERVER_LIVE)
    async def ServerLive(self, request, context):
        return pb.ServerLiveResponse(live=self.dp.live())

    @_rpc(Op.SERVER_READY)
    async def ServerReady(self, request, context):
        return pb.ServerReadyResponse(ready=self.dp.ready())

    @_rpc(Op.MODEL_READY)
    async def ModelReady(self, request, context):
        return pb.ModelReadyResponse(ready=self.dp.model_readiness(request.name, request.version).ready)

    @_rpc(Op.SERVER_METADATA)
    async def ServerMetadata(self, request, context):
        return conv.server_metadata_to_proto(self.dp.metadata())

    @_rpc(Op.MODEL_METADATA)
    async def ModelMetadata(self, request, context):
        return conv.metadata_to_proto(self.dp.model_metadata(request.name, request.version))

    @_rpc(Op.INFER)
    async def ModelInfer(self, request, context):
        req = conv.request_from_proto(request)
        if self.dp.tracing.enabled:
            req.trace = {k: v for k, v in context.invocation_metadata() or () if k in TRACE_HEADERS}
        with self.admission.slot():
            resp = await self.dp.infer(req, "grpc")
        return conv.response_to_proto(resp)

    async def ModelStreamInfer(self, request_iterator: AsyncIterator[pb.ModelInferRequest], context):
        try:
            _authorize(context, Op.INFER, self.settings)
        except FoldserveError as exc:
            await context.abort(getattr(grpc.StatusCode, exc.grpc_status), str(exc))
        messages = request_iterator.__aiter__()
        try:   # a stream that opens and sends nothing is ended (a unary call reaches us only with its message)
            async with asyncio.timeout(self.settings.body_timeout_s):
                first = await anext(messages)
        except StopAsyncIteration:
            return
        except TimeoutError:
            await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, f"no message within "
                                f"{self.settings.body_timeout_s:g} s of opening the stream (--body-timeout-s)")
        async for request in _chain(first, messages):
            if isinstance(request, BadRequest):
                yield pb.ModelStreamInferResponse(error_message=str(request.error))
                continue
            try:
                with self.admission.slot():
                    resp = await self.dp.infer(conv.request_from_proto(request), "grpc")
                yield pb.ModelStreamInferResponse(infer_response=conv.response_to_proto(resp))
            except FoldserveError as exc:
                yield pb.ModelStreamInferResponse(error_message=str(exc),
                                                  infer_response=pb.ModelInferResponse(id=request.id))
            except Exception:
                logger.exception("internal error in ModelStreamInfer")
                yield pb.ModelStreamInferResponse(error_message="internal error (see the server log)",
                                                  infer_response=pb.ModelInferResponse(id=request.id))

    @_rpc(Op.MODEL_CONFIG)
    async def ModelConfig(self, request, context):
        return pb.ModelConfigResponse(config=self.dp.model_config(request.name, request.version))

    @_rpc(Op.STATISTICS)
    async def ModelStatistics(self, request, context):
        return conv.stats_to_proto(await self.dp.statistics(request.name, request.version))

    @_rpc(Op.REPOSITORY_INDEX)
    async def RepositoryIndex(self, request, context):
        return conv.index_to_proto(self.dp.repository_index(request.ready))

    @_rpc(Op.LOAD)
    async def RepositoryModelLoad(self, request, context):
        params = {key: getattr(value, value.WhichOneof("parameter_choice") or "string_param")
                  for key, value in request.parameters.items()}
        await self.dp.load(request.model_name, params)
        return pb.RepositoryModelLoadResponse()

    @_rpc(Op.UNLOAD)
    async def RepositoryModelUnload(self, request, context):
        await self.dp.unload(request.model_name)
        return pb.RepositoryModelUnloadResponse()

    # --- shared memory: registering is part of inference (the inference token), status is metadata -----

    @_rpc(Op.SHM_STATUS)
    async def SystemSharedMemoryStatus(self, request, context):
        return conv.shm_status_to_proto(self.dp.shm_status(request.name))

    @_rpc(Op.SHM_REGISTER)
    async def SystemSharedMemoryRegister(self, request, context):
        await self.dp.shm_register(request.name, request.key, request.offset, request.byte_size)
        return pb.SystemSharedMemoryRegisterResponse()

    @_rpc(Op.SHM_UNREGISTER)
    async def SystemSharedMemoryUnregister(self, request, context):
        await self.dp.shm_unregister(request.name)
        return pb.SystemSharedMemoryUnregisterResponse()

    @_rpc(Op.TRACE)
    async def TraceSetting(self, request, context):
        updates: dict[str, Any] = {}
        for key, value in request.settings.items():
            values = list(value.value)
            updates[key] = None if not values else values if key == "trace_level" else values[0]
        settings = await self.dp.update_trace_settings(request.model_name, updates)
        response = pb.TraceSettingResponse()
        for key, value in settings.items():
            response.settings[key].value.extend(value if isinstance(value, list) else [str(value)])
        return response

    @_rpc(Op.LOGGING)
    async def LogSettings(self, request, context):
        updates = {key: getattr(value, value.WhichOneof("parameter_choice") or "string_param")
                   for key, value in request.settings.items()}
        settings = await self.dp.update_log_settings(updates)
        response = pb.LogSettingsResponse()
        for key, value in settings.items():
            slot = response.settings[key]
            if isinstance(value, bool):
                slot.bool_param = value
            elif isinstance(value, int):
                slot.uint32_param = value
            else:
                slot.string_param = str(value)
        return response

    @_rpc(Op.CUDA_SHM)
    async def CudaSharedMemoryStatus(self, request, context):
        self.dp.cuda_shm_status(request.name)
        return pb.CudaSharedMemoryStatusResponse()

    @_rpc(Op.CUDA_SHM)
    async def CudaSharedMemoryRegister(self, request, context):
        self.dp.cuda_shm_register(request.name)

    @_rpc(Op.CUDA_SHM)
    async def CudaSharedMemoryUnregister(self, request, context):
        self.dp.cuda_shm_unregister(request.name)
        return pb.CudaSharedMemoryUnregisterResponse()


def _credentials(settings: Settings) -> grpc.ServerCredentials | None:
    if not settings.tls_cert:
        return None
    key = Path(settings.tls_key).read_bytes() if settings.tls_key else None
    cert = Path(settings.tls_cert).read_bytes()
    ca = Path(settings.tls_ca).read_bytes() if settings.tls_ca else None
    return grpc.ssl_server_credentials([(key, cert)], root_certificates=ca, require_client_auth=ca is not None)


def _tracked(fn: Callable, activity: PeerActivity, streaming: bool) -> Callable:
    """``fn`` with its calls counted per client address (what the connection janitor needs to know)."""
    if streaming:
        async def stream(request_iterator: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            with activity.call(context):
                async for response in fn(request_iterator, context):
                    yield response
        return stream

    async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
        with activity.call(context):
            return await fn(request, context)
    return unary


class TrackedHealth(health.aio.HealthServicer):
    """grpc's health service, its calls counted per client address too (a prober's connection is not idle)."""

    def __init__(self, activity: PeerActivity) -> None:
        super().__init__()
        self.activity = activity

    async def Check(self, request: Any, context: Any) -> Any:
        with self.activity.call(context):
            return await super().Check(request, context)

    async def Watch(self, request: Any, context: Any) -> None:
        with self.activity.call(context, public=True):      # open to all: bounded as busy (janitor.PeerActivity)
            await super().Watch(request, context)


def _service_handler(servicer: InferenceServicer, activity: PeerActivity) -> grpc.GenericRpcHandler:
    """The v2 service's method handlers, with tolerant request deserializers and calls counted per client."""
    from google.protobuf import symbol_database

    db = symbol_database.Default()
    handlers = {}
    for method in pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].methods:
        req_cls = db.GetSymbol(method.input_type.full_name)
        resp_cls = db.GetSymbol(method.output_type.full_name)
        fn = _tracked(getattr(servicer, method.name), activity, method.client_streaming)
        make = (grpc.stream_stream_rpc_method_handler if method.client_streaming
                else grpc.unary_unary_rpc_method_handler)
        infer = method.input_type.name == "ModelInferRequest"
        handlers[method.name] = make(fn, request_deserializer=_tolerant(req_cls.FromString,
                                                                        servicer.dp.largest_message, infer),
                                     response_serializer=resp_cls.SerializeToString)
    return grpc.method_handlers_generic_handler(SERVICE_NAME, handlers)


def build_grpc_server(settings: Settings, dataplane: DataPlane, reuse_port: bool = False
                      ) -> tuple[grpc.aio.Server, int, health.aio.HealthServicer, ConnectionJanitor]:
    """A grpc.aio server with the v2 service, health and reflection; returns (server, bound port, health, the
    janitor that keeps its connection slots free: run ``janitor.run()`` while serving)."""
    limit = settings.max_request_bytes
    # No maximum_concurrent_rpcs: grpc core would count calls that opened and never sent a message, and
    # shed health and liveness with inference. Inference is admitted in the servicer once its message is
    # in. Connections are capped (below the fd limit) and recycled (GOAWAY, clients reconnect) after a
    # maximum age, which ends calls left idle. Streams per connection are capped (HTTP/2 SETTINGS): a client
    # past the cap queues its calls locally. grpc core's "overload protection" is off: with it, a flood at
    # twice capacity on one connection (tests/hardening/test_overload.py) had streams refused
    # (REFUSED_STREAM, which clients see as UNAVAILABLE: 15k of 30k in 6 s); without it the excess waits in
    # the client and the server sheds with RESOURCE_EXHAUSTED as designed.
    server = grpc.aio.server(options=[
        ("grpc.max_receive_message_length", limit), ("grpc.max_send_message_length", limit),
        ("grpc.so_reuseport", 1 if reuse_port else 0),   # workers share the port
        ("grpc.max_concurrent_streams", settings.max_streams_per_connection),
        ("grpc.http.overload_protection", 0),
        ("grpc.max_allowed_incoming_connections", settings.connection_limit()),
        ("grpc.max_connection_idle_ms", int(settings.idle_timeout_s * 1000)),
        ("grpc.max_connection_age_ms", GRPC_CONNECTION_AGE_MS),
        ("grpc.max_connection_age_grace_ms", int(settings.body_timeout_s * 1000)),
        # a connection that has not finished its handshake within the header timeout is dropped; one that
        # finished it and sends nothing is closed by the janitor when slots run short (grpc core cannot
        # close idle connections to make room at its cap, as the REST side does)
        ("grpc.server_handshake_timeout_ms", int(settings.header_timeout_s * 1000)),
    ])
    activity = PeerActivity()
    server.add_generic_rpc_handlers((_service_handler(InferenceServicer(settings, dataplane), activity),))
    health_servicer = TrackedHealth(activity)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME), server)
    address = f"{settings.host}:{settings.grpc_port}"
    creds = _credentials(settings)
    port = server.add_secure_port(address, creds) if creds else server.add_insecure_port(address)
    if port == 0:
        raise OSError(f"cannot bind gRPC to {address}")
    return server, port, health_servicer, ConnectionJanitor(port, settings.connection_limit(), activity)


async def set_health(health_servicer: health.aio.HealthServicer, serving: bool) -> None:
    status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, status)
