"""Per-model statistics (Triton's ModelStatistics) and Prometheus metrics, both transport-free."""
from __future__ import annotations

import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Iterable


@dataclass
class Duration:
    count: int = 0
    ns: int = 0

    def add(self, ns: int, count: int = 1) -> None:
        self.count += count
        self.ns += ns


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


# --- Prometheus ------------------------------------------------------------------------------------

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class _Histogram:
    def __init__(self, buckets: Iterable[float]) -> None:
        self.buckets = tuple(buckets)
        self.counts = [0] * (len(self.buckets) + 1)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        for i, b in enumerate(self.buckets):
            if value <= b:
                self.counts[i] += 1
                break
        else:
            self.counts[-1] += 1
        self.sum += value
        self.count += 1


class Metrics:
    """A small Prometheus registry: request counters and latency, queue-time and batch-size histograms."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.requests: dict[tuple[str, str, str], int] = defaultdict(int)   # (model, protocol, code)
        self.latency: dict[tuple[str, str], _Histogram] = {}
        self.queue: dict[str, _Histogram] = {}
        self.batch: dict[str, _Histogram] = {}
        self.queue_depth: dict[str, int] = defaultdict(int)

    def request(self, model: str, protocol: str, code: str, seconds: float) -> None:
        with self.lock:
            self.requests[(model, protocol, code)] += 1
            self.latency.setdefault((model, protocol), _Histogram(LATENCY_BUCKETS)).observe(seconds)

    def queued(self, model: str, seconds: float) -> None:
        with self.lock:
            self.queue.setdefault(model, _Histogram(LATENCY_BUCKETS)).observe(seconds)

    def executed(self, model: str, batch_size: int) -> None:
        with self.lock:
            self.batch.setdefault(model, _Histogram(BATCH_BUCKETS)).observe(batch_size)

    def render(self) -> str:
        lines: list[str] = []
        with self.lock:
            lines += ["# HELP foldserve_requests_total Inference requests by model, protocol and result code.",
                      "# TYPE foldserve_requests_total counter"]
            for (model, proto, code), n in sorted(self.requests.items()):
                lines.append(f'foldserve_requests_total{{model="{model}",protocol="{proto}",code="{code}"}} {n}')
            lines += ["# HELP foldserve_request_failures_total Inference requests that failed.",
                      "# TYPE foldserve_request_failures_total counter"]
            failures: dict[tuple[str, str], int] = defaultdict(int)
            for (model, proto, code), n in self.requests.items():
                if code not in ("OK", "200"):
                    failures[(model, proto)] += n
            for (model, proto), n in sorted(failures.items()):
                lines.append(f'foldserve_request_failures_total{{model="{model}",protocol="{proto}"}} {n}')
            self._hist(lines, "foldserve_request_duration_seconds", "End-to-end request latency.",
                       {f'model="{m}",protocol="{p}"': h for (m, p), h in self.latency.items()})
            self._hist(lines, "foldserve_queue_duration_seconds", "Time requests wait for an execution.",
                       {f'model="{m}"': h for m, h in self.queue.items()})
            self._hist(lines, "foldserve_batch_size", "Batch size of each model execution.",
                       {f'model="{m}"': h for m, h in self.batch.items()})
        return "\n".join(lines) + "\n"

    @staticmethod
    def _hist(lines: list[str], name: str, help_: str, series: dict[str, _Histogram]) -> None:
        lines += [f"# HELP {name} {help_}", f"# TYPE {name} histogram"]
        for labels, h in sorted(series.items()):
            cum = 0
            for b, c in zip(h.buckets, h.counts):
                cum += c
                lines.append(f'{name}_bucket{{{labels},le="{b}"}} {cum}')
            lines.append(f'{name}_bucket{{{labels},le="+Inf"}} {h.count}')
            lines.append(f"{name}_sum{{{labels}}} {h.sum}")
            lines.append(f"{name}_count{{{labels}}} {h.count}")
