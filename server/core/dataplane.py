"""The data plane: every v2 operation, in the core's own types. gRPC and REST only translate to it.

Semantics are decided here once for both transports: what is unknown (ModelNotFound) and what is known
but not ready (ModelNotReady), what readiness means, what the statistics of "all models" are.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

import numpy as np

from foldserve import __version__
from foldserve.datatypes import raw_bytes
from foldserve.errors import (
    ClientGone,
    FoldserveError,
    InvalidInput,
    LimitExceeded,
    ModelNotFound,
    ModelNotReady,
    NotSupported,
    PermissionDenied,
    QueueFull,
    QueueRejected,
    RepositoryPollFailed,
    RequestTimeout,
    ServerNotReady,
)
from foldserve.model_config import ModelConfig
from foldserve.records import first_line
from server.core import logsettings
from server.core.admission import LoopMonitor
from server.core.coordinator import Coordinator, LocalCoordinator
from server.core.handoff import Execution
from server.core.loader import LoadedVersion
from server.core.model_config import override_config
from server.core.registry import ModelRegistry
from server.core.repository import ModelRepository, check_model_name
from server.core.scheduler import Outcome
from server.core.shm import CUDA_SHM_UNSUPPORTED, SystemSharedMemory, check_region_name
from server.core.stats import Metrics, ModelStats
from server.core.tracing import Tracing
from server.core.types import (
    IndexEntry,
    InferOutput,
    InferRequest,
    InferResponse,
    ModelMetadata,
    Readiness,
    ServerMetadata,
    TensorMetadata,
)
from server.core.validation import check_request, check_shm_inputs, decode_inputs
from server.settings import Settings, flag

logger = logging.getLogger(__name__)

SMALL_MESSAGE = 1 << 20
#: every extension served, by Triton's names: its request parameters (priority, timeout, binary_data_output,
#: shared memory) are the "parameters" extension, /v2/trace/setting is "trace"
EXTENSIONS = ["classification", "binary_tensor_data", "model_repository", "model_configuration",
              "statistics", "schedule_policy", "system_shared_memory", "logging", "trace", "parameters"]


class DataPlane:
    """Every v2 operation of one server process. The ``coordinator`` carries the operations whose effect must
    be the same in every serving process (load/unload, shared-memory registration, statistics, readiness):
    this process alone by default, every worker with ``serve --workers N``."""

    def __init__(self, settings: Settings, metrics: Metrics | None = None,
                 coordinator: Coordinator | None = None) -> None:
        self.settings = settings
        self.metrics = metrics or Metrics()
        self.repository = ModelRepository(settings.repository)
        self.registry = ModelRegistry(self.repository, settings, self.metrics)
        self.shm = SystemSharedMemory(settings.max_shm_regions)
        self.tracing = Tracing()
        self.monitor = LoopMonitor(settings.shed_lag_ms / 1000)      # both transports' admission read it
        self.coordinator = coordinator or LocalCoordinator()
        self.coordinator.attach(self)
        self._ready = False
        self._inflight = 0

    # --- server ---------------------------------------------------------------------------------

    async def start(self) -> None:
        await self.coordinator.start()
        self.monitor.start()
        self._ready = True

    def begin_shutdown(self) -> None:
        """Readiness goes false at once; new inference requests are refused."""
        self._ready = False

    async def drain(self, timeout_s: float) -> bool:
        """Wait until no inference request is in flight (or the timeout passes); True when drained."""
        deadline = time.monotonic() + timeout_s
        while self._inflight and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        return self._inflight == 0

    async def stop(self) -> None:
        self._ready = False
        await self.coordinator.close()
        await self.monitor.stop()
        await self.registry.close()
        self.shm.close()
        self.tracing.shutdown(min(2.0, self.settings.grace_period_s))    # the spans still buffered, bounded

    def live(self) -> bool:
        return True  # answering at all is liveness

    def ready(self) -> bool:
        if not (self._ready and self.coordinator.up()):
            return False
        return not (self.settings.strict_readiness and self.registry.unready_requested())

    def metadata(self) -> ServerMetadata:
        return ServerMetadata("foldserve", __version__, list(EXTENSIONS))

    def render_metrics(self) -> bytes:
        return self.metrics.render(self._queue_lengths(), self._inflight)

    def refresh_gauges(self) -> None:
        """Publish this worker's gauges (with several workers, another one may render the metrics)."""
        self.metrics.set_gauges(self._queue_lengths(), self._inflight)

    def largest_message(self, model: str | None = None) -> int:
        """The largest gRPC message (decompressed) a request to ``model`` can need: its loaded versions' largest,
        every loaded model's when the name is not known, 1 MiB for anything else (those calls are small; an
        unknown or unloaded model is refused anyway)."""
        r = self.registry
        return max(SMALL_MESSAGE, r.largest_message if model is None else r.message_limits.get(model, 0))

    def _queue_lengths(self) -> dict[tuple[str, str], int]:
        return {(lv.name, str(lv.version)): lv.scheduler.queue_length for lv in self.registry.ready_versions()}

    # --- models ---------------------------------------------------------------------------------

    def model_readiness(self, name: str, version: str = "") -> Readiness:
        """Ready, or why not: ModelNotFound (unknown model or version), ModelNotReady (known, cannot serve,
        or the server is shutting down). A malformed name or version raises InvalidInput."""
        try:
            self.registry.get(name, version)
        except InvalidInput:
            raise
        except FoldserveError as exc:
            return Readiness(False, exc)
        if not self._ready:
            return Readiness(False, ServerNotReady("the server is not ready (starting or shutting down)"))
        return Readiness(True)

    def model(self, name: str, version: str = "") -> LoadedVersion:
        return self.registry.get(name, version)

    def model_metadata(self, name: str, version: str = "") -> ModelMetadata:
        lv = self.registry.get(name, version)
        spec = lv.spec
        params = {"verification": lv.verification.to_dict(), "provider": lv.runtime.provider,
                  "version": str(lv.version), "precision": lv.precision.to_json()}
        if lv.preprocess is not None:
            params["preprocess"] = lv.preprocess
        return ModelMetadata(
            name=name, versions=[str(v.version) for v in self.registry.loaded_versions(name)], platform=spec.platform,
            inputs=[TensorMetadata(t.name, t.datatype, t.full_shape(spec.max_batch_size)) for t in spec.inputs],
            outputs=[TensorMetadata(t.name, t.datatype, t.full_shape(spec.max_batch_size)) for t in spec.outputs],
            parameters=params)

    def model_config(self, name: str, version: str = "") -> ModelConfig:
        """The completed ModelConfig message of the version that would serve."""
        config: ModelConfig = self.registry.get(name, version).spec.config
        return config

    def local_statistics(self, name: str = "", version: str = "") -> list[ModelStats]:
        """This process's statistics of one version, of every loaded version of a model, or of all."""
        if not name:
            if version:
                raise InvalidInput("statistics: a version needs a model name")
            return [lv.stats for lv in self.registry.ready_versions()]
        check_model_name(name)
        if version:
            return [self.registry.get(name, version).stats]
        return [lv.stats for lv in self.registry.loaded_versions(name)]

    async def statistics(self, name: str = "", version: str = "") -> list[dict[str, Any]]:
        """Triton's ModelStatistics (JSON form), summed over every serving process."""
        if not name and version:
            raise InvalidInput("statistics: a version needs a model name")
        if name:
            check_model_name(name)
        return [s.to_dict() for s in await self.coordinator.statistics(name, version)]

    def repository_index(self, ready_only: bool = False) -> list[IndexEntry]:
        idx = self.registry.index()
        return [m for m in idx if m.state == "READY"] if ready_only else idx

    async def load(self, name: str, parameters: dict[str, Any] | None = None) -> None:
        """Load or reload; with several workers it answers once every worker swapped, or fails with the old
        versions serving everywhere. ``parameters`` (Triton's repository extension): ``config``, a ModelConfig in
        JSON that replaces config.pbtxt until the next plain load; anything else is refused, named."""
        self._check_repository_api()
        check_model_name(name, loading=True)
        config = None
        for key, value in (parameters or {}).items():
            if key == "config":
                config = value
            elif key.startswith("file:"):
                raise RepositoryPollFailed(f"failed to load {name!r}: failed to poll from model repository: load "
                                           f"parameter {key[:80]!r} (a model file sent with the request) is not "
                                           f"supported: foldserve serves files folded and verified into the "
                                           f"repository (foldserve fold)")
            else:
                raise InvalidInput(f"failed to load {name!r}: load parameter {key!r} is not supported (only "
                                   f"'config')")
        if config is not None:
            if not self.repository.has(name):
                self.registry.get(name)            # the right error for an unknown model
            override_config(self.repository.config(name), config, name)    # checked before any work
        await self.coordinator.load(name, config)

    async def unload(self, name: str) -> None:
        self._check_repository_api()
        check_model_name(name)
        await self.coordinator.unload(name)

    # --- system shared memory --------------------------------------------------------------------

    async def shm_register(self, name: str, key: str, offset: int, byte_size: int) -> None:
        check_region_name(name)
        await self.coordinator.shm_register(name, key, offset, byte_size)

    async def shm_unregister(self, name: str = "") -> None:
        if name:
            check_region_name(name)
        await self.coordinator.shm_unregister(name)

    def shm_status(self, name: str = "") -> list[dict[str, Any]]:
        if name:
            check_region_name(name)
        return self.shm.status(name)

    # --- Triton's trace extension ---------------------------------------------------------------------

    def trace_settings(self, model: str = "") -> dict[str, Any]:
        if model:
            self._traced_model(model)
        return self.tracing.for_model(model).to_json()

    def _traced_model(self, model: str) -> None:
        """The right error for a model the trace extension cannot name (Triton's words, its spacing, first)."""
        try:
            self.registry.get(model)
        except ModelNotFound as exc:
            raise ModelNotFound(f"Request for unknown model : {model} ({exc})") from None

    async def update_trace_settings(self, model: str, updates: Any) -> dict[str, Any]:
        """Check ``updates`` (Triton's names; for a model, ``null`` values return it to the global settings),
        apply them on every worker, return the settings now in force for ``model`` (or globally)."""
        if model:
            self._traced_model(model)
        if not isinstance(updates, dict):
            raise InvalidInput(f"trace settings must be a JSON object, got {type(updates).__name__}")
        state = self.tracing.updated(model, updates)
        if updates:
            await self.coordinator.trace_settings(state)
        return self.trace_settings(model)

    # --- Triton's logging extension ------------------------------------------------------------------

    def log_settings(self) -> dict[str, Any]:
        return logsettings.current().to_json()

    async def update_log_settings(self, updates: Any) -> dict[str, Any]:
        """Check ``updates`` (Triton's setting names), apply them on every worker, return the settings now."""
        settings = logsettings.merged(updates)
        if updates:
            await self.coordinator.log_settings(settings)
        return logsettings.current().to_json()

    # CUDA shared memory: never registered here (no CUDA device is used for tensors), so status lists nothing and
    # unregistering is a no-op; clients such as tritonclient's examples begin with unregister_cuda_shared_memory()

    def cuda_shm_status(self, name: str = "") -> list[dict[str, Any]]:
        if name:
            check_region_name(name)
            raise InvalidInput(f"CUDA shared-memory region {name!r} is not registered")
        return []

    def cuda_shm_unregister(self, name: str = "") -> None:
        if name:
            check_region_name(name)

    def cuda_shm_register(self, name: str) -> None:
        raise NotSupported(f"failed to register CUDA shared-memory region {name!r}: {CUDA_SHM_UNSUPPORTED}")

    def _check_repository_api(self) -> None:
        if not self.settings.repository_api:
            raise PermissionDenied("the repository load/unload API is disabled; start the server with "
                                   f"{flag('repository_api')} (and {flag('admin_token')}) to enable it")

    # --- inference -------------------------------------------------------------------------------

    async def infer(self, req: InferRequest, protocol: str = "core") -> InferResponse:
        t0 = time.perf_counter()
        traced = self.tracing.enabled and self.tracing.sample(req.model_name)
        start_ns = time.time_ns() if traced else 0
        code = "OK"
        lv: LoadedVersion | None = None
        batch = 0
        queued, compute, exec_batch = 0.0, (0, 0, 0), 0
        error: str | None = None
        held: list[Any] = []
        tensors: list[tuple[str, str, str, Any]] = []
        self._inflight += 1
        try:
            if not self._ready:
                raise ServerNotReady("the server is not ready (starting or shutting down)")
            lv = self.registry.get(req.model_name, req.model_version)
            batch = check_request(req, lv.spec, self.settings.max_elements, self.settings.max_string_elements)
            check_shm_inputs(req, lv.spec, self.settings.max_request_bytes)     # before a byte of them is read
            held = self._read_shm(req)
            feeds = decode_inputs(req, lv.spec.opaque_strings)
            if lv.spec.max_batch_size == 0:
                batch = 1
            wanted = [o.name for o in req.outputs] or [t.name for t in lv.spec.outputs]
            priority, timeout_us = _queue_parameters(req.parameters)
            lv.scheduler.check_parameters(priority, timeout_us)
            results, queued, compute, exec_batch = await self._execute(
                Execution(lv.name, str(lv.version), feeds, wanted, batch, self.settings.request_timeout_s, priority,
                          timeout_us), lv)
            outputs = self._outputs(lv, req, wanted, results)
            if traced and "TENSORS" in self.tracing.for_model(req.model_name).trace_level:
                tensors = ([("INPUT", t.name, t.datatype, feeds[t.name]) for t in req.inputs]
                           + [("OUTPUT", o.name, o.datatype, o.data) for o in outputs])
            total_ns = int((time.perf_counter() - t0) * 1e9)
            lv.stats.record_request(True, total_ns, int(queued * 1e9), batch, compute)
            self.metrics.succeeded(lv.name, str(lv.version), batch, total_ns, int(queued * 1e9), compute)
            return InferResponse(req.model_name, str(lv.version), req.id, outputs)
        except BaseException as exc:
            code = (exc.grpc_status if isinstance(exc, FoldserveError)
                    else "CANCELLED" if isinstance(exc, asyncio.CancelledError) else "INTERNAL")
            error = f"{code}: {first_line(exc, 200)}"
            if lv is not None:
                lv.stats.record_request(False, int((time.perf_counter() - t0) * 1e9), 0, batch)
                self.metrics.failed(lv.name, str(lv.version), failure_reason(exc))
            raise
        finally:
            if held:
                self.shm.release(held)
            self._inflight -= 1
            self.metrics.request(req.model_name if lv is not None else "_unknown", protocol, code,
                                 time.perf_counter() - t0)
            if traced:
                self.tracing.record(model=req.model_name, version=str(lv.version) if lv is not None else "",
                                    protocol=protocol, carrier=req.trace, start_ns=start_ns, end_ns=time.time_ns(),
                                    queued_s=queued, compute=compute, batch=batch, exec_batch=exec_batch,
                                    error=error, tensors=tensors)

    async def _execute(self, ex: Execution, lv: LoadedVersion) -> Outcome:
        """Run a request of this process's own clients: here, or on an idle worker when this one is behind
        (server/core/handoff.py)."""
        balance = self.coordinator.balance
        if balance is None:
            return await ex.run_on(lv.scheduler)
        portable = ex.portable() and all(o.datatype != "BYTES" for o in lv.spec.outputs)
        peer = balance.pick() if portable else None
        if peer is not None:
            outcome = await balance.send(peer, ex)
            self.metrics.handoff(ex.model, "sent" if outcome is not None else "returned")
            if outcome is not None:
                return outcome
        with balance.under_way():
            return await ex.run_on(lv.scheduler)

    async def run_handed(self, ex: Execution) -> Outcome:
        """Run an execution another worker handed to this one (never handed on)."""
        if not self._ready:
            raise ModelNotReady("this worker is not ready (starting or shutting down)")
        lv = self.registry.get(ex.model, ex.version)
        self.metrics.handoff(ex.model, "received")
        balance = self.coordinator.balance
        with balance.under_way() if balance is not None else contextlib.nullcontext():
            return await ex.run_on(lv.scheduler)

    def _read_shm(self, req: InferRequest) -> list[Any]:
        """Hold every region the request reads or writes (in use until the answer is written: an unregister
        meanwhile waits for it, as in Triton), and read its shared-memory inputs; returns what to release."""
        regions = ([(t.shm.region, f"input {t.name!r}") for t in req.inputs if t.shm]
                   + [(o.shm.region, f"output {o.name!r}") for o in req.outputs if o.shm])
        if not regions:
            return []
        held = self.shm.hold(regions)
        try:
            for t in req.inputs:
                if t.shm is not None:
                    t.raw = self.shm.read(t.shm, f"input {t.name!r}")
        except BaseException:
            self.shm.release(held)
            raise
        return held

    def _outputs(self, lv: LoadedVersion, req: InferRequest, wanted: list[str],
                 results: list[np.ndarray]) -> list[InferOutput]:
        outputs = []
        requested = {o.name: o for o in req.outputs}
        for name, arr in zip(wanted, results, strict=False):
            ro = requested.get(name)
            if ro is not None and ro.class_count:
                out = _classification(name, arr, ro.class_count, lv.spec.labels, lv.spec.max_batch_size > 0)
            else:
                spec = lv.spec.output(name)
                if spec is None:          # validation admits declared outputs only
                    raise InvalidInput(f"unknown output {name!r}")
                out = InferOutput(name, spec.datatype, list(arr.shape), arr,
                                  ro.binary if ro is not None else None)
            if ro is not None and ro.shm is not None:
                self.shm.write(ro.shm, raw_bytes(out.datatype, out.data), f"output {name!r}")
                out.shm = ro.shm
            outputs.append(out)
        return outputs


def _queue_parameters(params: dict[str, Any]) -> tuple[int, int]:
    """A request's Triton parameters ``priority`` and ``timeout`` (microseconds in the queue), 0 when absent."""
    out = []
    for key in ("priority", "timeout"):
        value = params.get(key, 0)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise InvalidInput(f"request parameter {key!r} must be a non-negative integer, got {value!r}")
        out.append(int(value))
    return out[0], out[1]


def failure_reason(exc: BaseException) -> str:
    """Triton's ``reason`` label of nv_inference_request_failure: REJECTED (shed: queue full, overloaded, timed out
    in the queue), CANCELED (the client went away), BACKEND (the model's execution failed), OTHER."""
    if isinstance(exc, (asyncio.CancelledError, ClientGone)):
        return "CANCELED"
    if isinstance(exc, (QueueFull, QueueRejected, RequestTimeout, LimitExceeded)):
        return "REJECTED"
    if isinstance(exc, FoldserveError):
        return "OTHER"
    return "BACKEND"


def _classification(name: str, arr: np.ndarray, k: int, labels: list[str], batched: bool) -> InferOutput:
    """Triton's classification extension: "score:index[:label]" strings for the top k classes."""
    scores = arr if batched else arr[None]
    flat = scores.reshape(scores.shape[0], -1)
    k = min(k, flat.shape[1])
    idx = np.argsort(-flat, axis=1, kind="stable")[:, :k]
    rows = []
    for r, row in enumerate(idx):
        rows.append([f"{flat[r, i]:f}:{i}" + (f":{labels[i]}" if i < len(labels) else "") for i in row])
    out = np.array(rows, dtype=object)
    if not batched:
        out = out[0]
    return InferOutput(name, "BYTES", list(out.shape), out)
