"""OpenTelemetry tracing of inference requests, and Triton's trace extension to steer it at run time.

Configured by the standard ``OTEL_*`` environment variables: on when ``OTEL_TRACES_EXPORTER`` is ``otlp`` (the
OTLP exporter, ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` / ``OTEL_EXPORTER_OTLP_ENDPOINT`` and their protocol,
headers, timeout; service name from ``OTEL_SERVICE_NAME``) or ``console``; off otherwise, and then the hot path
pays one attribute check. A traced request gets a span ``ModelInfer`` (kind SERVER, child of the client's W3C
``traceparent`` where it sent one) with the model, version, protocol, batch size, the batch of the execution
that computed it, its queue and compute times, and the outcome; Triton's TIMESTAMPS (QUEUE_START,
COMPUTE_START, COMPUTE_INPUT_END, COMPUTE_OUTPUT_START, COMPUTE_END) are its events, laid on the request's own
timeline. Spans are built after the response, from the times the data plane measures anyway, so tracing never
adds work inside the scheduler.

Triton's trace extension settings: ``trace_level`` (``["OFF"]``, or ``TIMESTAMPS`` and / or ``TENSORS``: the
request's input and output tensors as span events, each cut to ``TENSOR_ELEMENTS`` elements), ``trace_rate``
(trace one request in N), ``trace_count`` (stop after N traced requests; -1: no limit), ``log_frequency``
(accepted, no effect: spans are exported in batches). As in Triton, each is set globally or per model, field by
field: a model's field it does not set follows the global one, and ``null`` clears a field (a model's returns
to the global value, a global one to the value the server started with). Values come and go as Triton writes
them (strings, lists for ``trace_level``).
"""
from __future__ import annotations

import itertools
import json
import logging
import os
import threading
from dataclasses import dataclass, field, replace
from typing import Any

from foldserve.errors import InvalidInput

logger = logging.getLogger(__name__)

LEVELS = ("OFF", "TIMESTAMPS", "TENSORS")
TENSOR_ELEMENTS = 16      # elements of each tensor a TENSORS trace records (its shape and datatype in full)
EXPORTERS = ("otlp", "console")


@dataclass
class TraceSettings:
    trace_level: list[str] = field(default_factory=lambda: ["OFF"])
    trace_rate: int = 1
    trace_count: int = -1
    log_frequency: int = 0

    def to_json(self) -> dict[str, Any]:
        """Triton's representation: numbers as strings, the level as a list; plus how spans leave."""
        return {"trace_level": list(self.trace_level), "trace_rate": str(self.trace_rate),
                "trace_count": str(self.trace_count), "log_frequency": str(self.log_frequency),
                "trace_mode": "opentelemetry", "trace_file": ""}


def _int(key: str, value: Any, minimum: int) -> int:
    if isinstance(value, list) and len(value) == 1:
        value = value[0]
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise InvalidInput(f"trace setting {key!r} must be an integer, got {value!r}") from None
    if isinstance(value, bool) or number < minimum:
        raise InvalidInput(f"trace setting {key!r} must be an integer >= {minimum}, got {value!r}")
    return number


def normalized(updates: dict[str, Any], exporter: str) -> dict[str, Any]:
    """Triton's settings (strings, lists) as the values in force, checked; ``None`` values are left out (the
    caller clears those fields)."""
    out: dict[str, Any] = {}
    for key, value in updates.items():
        if value is None:
            continue
        if key == "trace_level":
            levels = value if isinstance(value, list) else [value]
            if not levels or any(v not in LEVELS for v in levels) or ("OFF" in levels and len(levels) > 1):
                raise InvalidInput(f"trace setting 'trace_level' must be [\"OFF\"] or a list of TIMESTAMPS and / or "
                                   f"TENSORS, got {value!r}")
            if levels != ["OFF"] and not exporter:
                raise InvalidInput("trace setting 'trace_level': tracing has no exporter; start the server with "
                                   "OTEL_TRACES_EXPORTER=otlp (and OTEL_EXPORTER_OTLP_ENDPOINT) or console")
            out[key] = list(dict.fromkeys(levels))
        elif key == "trace_rate":
            out[key] = _int(key, value, 1)
        elif key == "trace_count":
            out[key] = _int(key, value, -1)
        elif key == "log_frequency":
            out[key] = _int(key, value, 0)
        elif key == "trace_file":
            raise InvalidInput(f"trace file location can not be updated through network protocol (foldserve "
                               f"traces with OpenTelemetry: spans go to the OTEL_* exporter; got {value!r})")
        elif key == "trace_mode":
            if value not in ("opentelemetry", ["opentelemetry"]):
                raise InvalidInput(f"trace setting 'trace_mode': foldserve traces with OpenTelemetry only, got "
                                   f"{value!r}")
        else:
            raise InvalidInput(f"unknown trace setting {key!r}; the settings are trace_level, trace_rate, "
                               f"trace_count, log_frequency")
    return out


def tensor_attributes(name: str, datatype: str, arr: Any) -> dict[str, Any]:
    """A tensor as span-event attributes: its name, datatype and shape, and its first ``TENSOR_ELEMENTS`` elements
    as JSON (BYTES elements as text where they are UTF-8, else their hex)."""
    flat = arr.reshape(-1)[:TENSOR_ELEMENTS]
    if flat.dtype == object:
        values: list[Any] = [x.decode("utf-8", "backslashreplace") if isinstance(x, bytes) else str(x) for x in flat]
    else:
        values = flat.tolist()
    return {"tensor.name": name, "tensor.datatype": datatype, "tensor.shape": [int(d) for d in arr.shape],
            "tensor.data": json.dumps(values), "tensor.truncated": bool(arr.size > TENSOR_ELEMENTS)}


class Tracing:
    """This process's tracer (or none) and the settings in force, global and per model."""

    def __init__(self) -> None:
        self.exporter = os.environ.get("OTEL_TRACES_EXPORTER", "").strip().lower()
        if self.exporter not in EXPORTERS:
            self.exporter = ""
        self.initial = TraceSettings(trace_level=["TIMESTAMPS"] if self.exporter else ["OFF"])
        self.settings = self.initial                      # in force globally, and per model below
        self.models: dict[str, TraceSettings] = {}
        self.overrides: dict[str, Any] = {"global": {}, "models": {}}   # the fields set, globally and per model
        self._seen = itertools.count()
        self._traced = 0
        self._tracer: Any = None
        self._provider: Any = None
        self.enabled = False
        if self.exporter:
            self._start()
        self._refresh()

    def _start(self) -> None:
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter

        if self.exporter == "otlp":
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
            exporter: Any = OTLPSpanExporter()
        else:
            exporter = ConsoleSpanExporter()
        resource = Resource.create({"service.name": os.environ.get("OTEL_SERVICE_NAME", "foldserve")})
        # shutdown_on_exit off: the exit would otherwise wait on a collector that never answers (see shutdown)
        self._provider = TracerProvider(resource=resource, shutdown_on_exit=False)
        self._provider.add_span_processor(BatchSpanProcessor(exporter))
        self._tracer = self._provider.get_tracer("foldserve")
        logger.info("tracing on: OpenTelemetry spans to the %s exporter", self.exporter)

    def _refresh(self) -> None:
        self.enabled = self._tracer is not None and (
            self.settings.trace_level != ["OFF"] or any(s.trace_level != ["OFF"] for s in self.models.values()))

    def apply(self, overrides: dict[str, Any]) -> None:
        """The fields set, from the coordinator (the same on every worker): {"global": {field: value},
        "models": {name: {field: value}}}; every other field follows the global value, or the starting one."""
        self.overrides = {"global": dict(overrides.get("global", {})),
                          "models": {k: dict(v) for k, v in overrides.get("models", {}).items()}}
        self.settings = replace(self.initial, **self.overrides["global"])
        self.models = {k: replace(self.settings, **v) for k, v in self.overrides["models"].items()}
        self._refresh()

    def state(self) -> dict[str, Any]:
        """The fields set (a copy to change and :meth:`apply`)."""
        return {"global": dict(self.overrides["global"]),
                "models": {k: dict(v) for k, v in self.overrides["models"].items()}}

    def updated(self, model: str, updates: dict[str, Any]) -> dict[str, Any]:
        """The overrides after Triton's update of ``model`` (or the global settings): given fields set, ``null``
        ones cleared."""
        state = self.state()
        target = state["models"].setdefault(model, {}) if model else state["global"]
        for key in [k for k, v in updates.items() if v is None]:
            target.pop(key, None)
        target.update(normalized(updates, self.exporter))
        if model and not target:
            del state["models"][model]
        return state

    def for_model(self, model: str) -> TraceSettings:
        return self.models.get(model, self.settings)

    def sample(self, model: str) -> bool:
        """Whether this request of ``model`` is traced (rate and count of the settings in force)."""
        s = self.for_model(model)
        if s.trace_level == ["OFF"] or (0 <= s.trace_count <= self._traced):
            return False
        if next(self._seen) % s.trace_rate:
            return False
        self._traced += 1
        return True

    def record(self, *, model: str, version: str, protocol: str, carrier: dict[str, str] | None, start_ns: int,
               end_ns: int, queued_s: float, compute: tuple[int, int, int], batch: int, exec_batch: int,
               error: str | None, tensors: list[tuple[str, str, str, Any]] | None = None) -> None:
        """One request's span, with Triton's TIMESTAMPS as events on its timeline (one span, not three: at a
        trace rate of 1 the span objects are most of what tracing costs)."""
        from opentelemetry import propagate
        from opentelemetry.trace import SpanKind, Status, StatusCode

        span = self._tracer.start_span("ModelInfer", context=propagate.extract(carrier or {}), kind=SpanKind.SERVER,
                                       start_time=start_ns, attributes={
                                           "model.name": model, "model.version": version, "rpc.system": protocol,
                                           "inference.batch_size": batch, "inference.execution_batch_size": exec_batch,
                                           "inference.queue_ns": int(queued_s * 1e9),
                                           "inference.compute_input_ns": compute[0],
                                           "inference.compute_infer_ns": compute[1],
                                           "inference.compute_output_ns": compute[2]})
        span.add_event("QUEUE_START", timestamp=start_ns)
        if compute[1]:
            t = start_ns + int(queued_s * 1e9)
            for name, step in (("COMPUTE_START", 0), ("COMPUTE_INPUT_END", compute[0]),
                               ("COMPUTE_OUTPUT_START", compute[1]), ("COMPUTE_END", compute[2])):
                t += step
                span.add_event(name, timestamp=t)
        for kind, name, datatype, arr in tensors or ():   # TENSORS: (INPUT / OUTPUT, name, datatype, array)
            span.add_event(f"TENSOR_{kind}", timestamp=end_ns if kind == "OUTPUT" else start_ns,
                           attributes=tensor_attributes(name, datatype, arr))
        if error is not None:
            span.set_status(Status(StatusCode.ERROR, error))
        span.end(end_time=end_ns)

    def shutdown(self, timeout_s: float = 2.0) -> None:
        """Export the spans still buffered, for at most ``timeout_s``: an OTLP collector that never answers held
        SIGTERM for 33 s (the exporter's timeout and retries); past the bound they are dropped, with a warning."""
        if self._provider is None:
            return
        worker = threading.Thread(target=self._provider.shutdown, name="otel-shutdown", daemon=True)
        worker.start()
        worker.join(timeout_s)
        if worker.is_alive():
            logger.warning("tracing: the exporter did not finish within %.1f s of shutdown; the spans still "
                           "buffered are dropped", timeout_s)
