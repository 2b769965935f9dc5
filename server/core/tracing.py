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

Triton's trace extension settings: ``trace_level`` (``["OFF"]`` or ``["TIMESTAMPS"]``), ``trace_rate`` (trace
one request in N), ``trace_count`` (stop after N traced requests; -1: no limit), ``log_frequency`` (accepted,
no effect: spans are exported in batches), global or per model (a model's ``null`` clears its own). Values
come and go as Triton writes them (strings, lists for ``trace_level``).
"""
from __future__ import annotations

import itertools
import logging
import os
import threading
from dataclasses import dataclass, field, replace
from typing import Any

from foldserve.errors import InvalidInput

logger = logging.getLogger(__name__)

LEVELS = ("OFF", "TIMESTAMPS")
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


def merged(base: TraceSettings, updates: Any, exporter: str) -> TraceSettings:
    """``base`` with ``updates`` (Triton's setting names), checked."""
    if not isinstance(updates, dict):
        raise InvalidInput(f"trace settings must be a JSON object, got {type(updates).__name__}")
    out = replace(base, trace_level=list(base.trace_level))
    for key, value in updates.items():
        if key == "trace_level":
            levels = value if isinstance(value, list) else [value]
            if not levels or any(v not in LEVELS for v in levels) or ("OFF" in levels and len(levels) > 1):
                raise InvalidInput(f"trace setting 'trace_level' must be [\"OFF\"] or [\"TIMESTAMPS\"], got {value!r}")
            if levels != ["OFF"] and not exporter:
                raise InvalidInput("trace setting 'trace_level': tracing has no exporter; start the server with "
                                   "OTEL_TRACES_EXPORTER=otlp (and OTEL_EXPORTER_OTLP_ENDPOINT) or console")
            out.trace_level = list(levels)
        elif key == "trace_rate":
            out.trace_rate = _int(key, value, 1)
        elif key == "trace_count":
            out.trace_count = _int(key, value, -1)
        elif key == "log_frequency":
            out.log_frequency = _int(key, value, 0)
        elif key in ("trace_file", "trace_mode"):
            if value not in ("", "opentelemetry", [""], ["opentelemetry"]):
                raise InvalidInput(f"trace setting {key!r}: foldserve traces with OpenTelemetry only (spans go to "
                                   f"the OTEL_* exporter), got {value!r}")
        else:
            raise InvalidInput(f"unknown trace setting {key!r}; the settings are trace_level, trace_rate, "
                               f"trace_count, log_frequency")
    return out


class Tracing:
    """This process's tracer (or none) and the settings in force, global and per model."""

    def __init__(self) -> None:
        self.exporter = os.environ.get("OTEL_TRACES_EXPORTER", "").strip().lower()
        if self.exporter not in EXPORTERS:
            self.exporter = ""
        self.settings = TraceSettings(trace_level=["TIMESTAMPS"] if self.exporter else ["OFF"])
        self.models: dict[str, TraceSettings] = {}
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

    def apply(self, settings: dict[str, Any]) -> None:
        """Settings from the coordinator (the same on every worker): {"global": ..., "models": {name: ...}}."""
        self.settings = TraceSettings(**settings["global"])
        self.models = {k: TraceSettings(**v) for k, v in settings.get("models", {}).items()}
        self._refresh()

    @staticmethod
    def plain(s: TraceSettings) -> dict[str, Any]:
        return {"trace_level": list(s.trace_level), "trace_rate": s.trace_rate, "trace_count": s.trace_count,
                "log_frequency": s.log_frequency}

    def state(self) -> dict[str, Any]:
        return {"global": self.plain(self.settings), "models": {k: self.plain(v) for k, v in self.models.items()}}

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
               error: str | None) -> None:
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
