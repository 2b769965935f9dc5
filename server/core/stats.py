"""Per-model statistics (Triton's ModelStatistics) and Prometheus metrics, both transport-free."""
from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Duration:
    count: int = 0
    ns: int = 0

    def add(self, ns: int, count: int = 1) -> None:
        self.count += count
        self.ns += ns


DURATIONS = ("success", "fail", "queue", "compute_input", "compute_infer", "compute_output")


@dataclass
class ModelStats:
    """Cumulative counters of one model version, in Triton's vocabulary."""

    name: str
    version: str
    last_inference_ms: int = 0
    inference_count: int = 0
    execution_count: int = 0
    success: Duration = field(default_factory=Duration)
    fail: Duration = field(default_factory=Duration)
    queue: Duration = field(default_factory=Duration)
    compute_input: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)
    compute_output: Duration = field(default_factory=Duration)
    batch: dict[int, list[Duration]] = field(default_factory=dict)   # size -> [input, infer, output]
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def record_execution(self, batch_size: int, input_ns: int, infer_ns: int, output_ns: int) -> None:
        with self.lock:
            self.execution_count += 1
            self.compute_input.add(input_ns)
            self.compute_infer.add(infer_ns)
            self.compute_output.add(output_ns)
            b = self.batch.setdefault(batch_size, [Duration(), Duration(), Duration()])
            b[0].add(input_ns)
            b[1].add(infer_ns)
            b[2].add(output_ns)

    def record_request(self, ok: bool, total_ns: int, queue_ns: int, batch_size: int) -> None:
        with self.lock:
            if ok:
                self.success.add(total_ns)
                self.queue.add(queue_ns)
                self.inference_count += batch_size
                self.last_inference_ms = int(time.time() * 1000)
            else:
                self.fail.add(total_ns)

    def add(self, other: ModelStats) -> None:
        """Sum ``other``'s counters into these (another worker's statistics of the same version)."""
        with self.lock:
            self.last_inference_ms = max(self.last_inference_ms, other.last_inference_ms)
            self.inference_count += other.inference_count
            self.execution_count += other.execution_count
            for name in DURATIONS:
                mine, theirs = getattr(self, name), getattr(other, name)
                mine.add(theirs.ns, theirs.count)
            for size, durations in other.batch.items():
                mine_b = self.batch.setdefault(size, [Duration(), Duration(), Duration()])
                for m, t in zip(mine_b, durations, strict=True):
                    m.add(t.ns, t.count)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelStats:
        """Back from Triton's JSON form (what another worker sends)."""
        def dur(x: dict[str, int]) -> Duration:
            return Duration(int(x["count"]), int(x["ns"]))

        inf = d["inference_stats"]
        st = cls(str(d["name"]), str(d["version"]), int(d["last_inference"]), int(d["inference_count"]),
                 int(d["execution_count"]))
        for name in DURATIONS:
            setattr(st, name, dur(inf[name]))
        st.batch = {int(b["batch_size"]): [dur(b["compute_input"]), dur(b["compute_infer"]), dur(b["compute_output"])]
                    for b in d["batch_stats"]}
        return st

    def to_dict(self) -> dict[str, Any]:
        """Triton's JSON form of ModelStatistics (also the source of the gRPC message)."""
        def d(x: Duration) -> dict[str, int]:
            return {"count": x.count, "ns": x.ns}

        with self.lock:
            return {
                "name": self.name, "version": self.version, "last_inference": self.last_inference_ms,
                "inference_count": self.inference_count, "execution_count": self.execution_count,
                "inference_stats": {"success": d(self.success), "fail": d(self.fail), "queue": d(self.queue),
                                    "compute_input": d(self.compute_input), "compute_infer": d(self.compute_infer),
                                    "compute_output": d(self.compute_output)},
                "batch_stats": [{"batch_size": bs, "compute_input": d(v[0]), "compute_infer": d(v[1]),
                                 "compute_output": d(v[2])} for bs, v in sorted(self.batch.items())],
            }


def merge_stats(parts: list[list[ModelStats]]) -> list[ModelStats]:
    """Statistics of several worker processes, summed per (model, version)."""
    merged: dict[tuple[str, str], ModelStats] = {}
    for part in parts:
        for st in part:
            key = (st.name, st.version)
            if key not in merged:
                merged[key] = ModelStats(st.name, st.version)
            merged[key].add(st)
    return [merged[k] for k in sorted(merged)]


# --- Prometheus ------------------------------------------------------------------------------------

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


MULTIPROCESS_ENV = "PROMETHEUS_MULTIPROC_DIR"


class Metrics:
    """Prometheus metrics of one server, in their own ``prometheus_client`` registry (so that several data
    planes in one process, as in tests, never share counters).

    With several worker processes (``PROMETHEUS_MULTIPROC_DIR`` set by the supervisor before any worker
    starts) the values live in that folder's files, and :meth:`render` aggregates every worker's:
    counters and histograms summed, the gauges summed over live workers.
    """

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.multiprocess = bool(os.environ.get(MULTIPROCESS_ENV))
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("foldserve_requests", "Inference requests by model, protocol and result code.",
                                ["model", "protocol", "code"], registry=r)
        self.failures = Counter("foldserve_request_failures", "Inference requests that failed.",
                                ["model", "protocol"], registry=r)
        self.latency = Histogram("foldserve_request_duration_seconds", "End-to-end request latency.",
                                 ["model", "protocol"], buckets=LATENCY_BUCKETS, registry=r)
        self.queue_time = Histogram("foldserve_queue_duration_seconds", "Time requests wait for an execution.",
                                    ["model"], buckets=LATENCY_BUCKETS, registry=r)
        self.batch_size = Histogram("foldserve_batch_size", "Batch size of each model execution.", ["model"],
                                    buckets=BATCH_BUCKETS, registry=r)
        self.queue_length = Gauge("foldserve_queue_length", "Requests waiting for an execution.",
                                  ["model", "version"], registry=r, multiprocess_mode="livesum")
        self.inflight = Gauge("foldserve_inflight_requests", "Inference requests being handled.", registry=r,
                              multiprocess_mode="livesum")
        self._queue_labels: set[tuple[str, str]] = set()

    def request(self, model: str, protocol: str, code: str, seconds: float) -> None:
        self.requests.labels(model, protocol, code).inc()
        if code not in ("OK", "200"):
            self.failures.labels(model, protocol).inc()
        self.latency.labels(model, protocol).observe(seconds)

    def queued(self, model: str, seconds: float) -> None:
        self.queue_time.labels(model).observe(seconds)

    def executed(self, model: str, batch_size: int) -> None:
        self.batch_size.labels(model).observe(batch_size)

    def set_gauges(self, queue_lengths: dict[tuple[str, str], int], inflight: int) -> None:
        """The gauges from current values (versions unloaded since the last call drop to 0 / disappear)."""
        for labels in self._queue_labels - set(queue_lengths):
            if self.multiprocess:   # other workers' files keep the label: report 0, not a stale value
                self.queue_length.labels(*labels).set(0)
            else:
                self.queue_length.remove(*labels)
        self._queue_labels = set(queue_lengths)
        for (model, version), n in queue_lengths.items():
            self.queue_length.labels(model, version).set(n)
        self.inflight.set(inflight)

    def render(self, queue_lengths: dict[tuple[str, str], int], inflight: int) -> bytes:
        """Prometheus text; the gauges are set from the given current values first."""
        from prometheus_client import CollectorRegistry, generate_latest

        self.set_gauges(queue_lengths, inflight)
        if not self.multiprocess:
            return generate_latest(self.registry)
        from prometheus_client.multiprocess import MultiProcessCollector

        registry = CollectorRegistry()
        MultiProcessCollector(registry)
        return generate_latest(registry)
