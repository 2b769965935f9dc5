"""Per-model statistics (Triton's ModelStatistics) and Prometheus metrics, both transport-free."""
from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

logger = logging.getLogger(__name__)


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
        """One model execution: the execution count and the per-batch-size statistics."""
        with self.lock:
            self.execution_count += 1
            b = self.batch.setdefault(batch_size, [Duration(), Duration(), Duration()])
            b[0].add(input_ns)
            b[1].add(infer_ns)
            b[2].add(output_ns)

    def record_request(self, ok: bool, total_ns: int, queue_ns: int, batch_size: int,
                       compute: tuple[int, int, int] = (0, 0, 0)) -> None:
        """One request. As Triton times them, its compute input / infer / output are those of the execution that
        computed it: a batched execution's time counts once for every request in the batch."""
        with self.lock:
            if ok:
                self.success.add(total_ns)
                self.queue.add(queue_ns)
                self.compute_input.add(compute[0])
                self.compute_infer.add(compute[1])
                self.compute_output.add(compute[2])
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


#: one system family as rendered: name, help, type, samples (labels, value)
SystemFamily = tuple[str, str, str, list[tuple[dict[str, str], float]]]


def triton_text(families: dict[str, Any], system: list[SystemFamily]) -> bytes:
    """Triton's families in Prometheus text: counters named as Triton names them (no _total), then the pending
    gauge, then the system families (CPU, and GPU where NVML sees one)."""
    lines: list[str] = []

    def family(name: str, doc: str, kind: str, samples: list[tuple[dict[str, str], float]]) -> None:
        lines.extend([f"# HELP {name} {doc}", f"# TYPE {name} {kind}"])
        for labels, value in samples:
            text = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
            lines.append(f"{name}{{{text}}} {value:.17g}" if text else f"{name} {value:.17g}")

    for key, (name, doc) in TRITON_COUNTERS.items():
        f = families.get(key)
        samples = [(dict(s.labels), s.value) for s in (f.samples if f else []) if s.name.endswith("_total")]
        family(name, doc, "counter", samples)
    pending = families.get("pending")
    family(TRITON_PENDING[0], TRITON_PENDING[1], "gauge",
           [(dict(s.labels), s.value) for s in (pending.samples if pending else [])])
    for name, doc, kind, samples in system:
        family(name, doc, kind, samples)
    return ("\n".join(lines) + "\n").encode()


#: Triton's GPU families (docs/user_guide/metrics.md; Triton reads them from DCGM, we from NVML), per GPU,
#: labelled ``gpu_uuid``: (name, help, type, NVML reading -> value)
GPU_FAMILIES: tuple[tuple[str, str, str, str], ...] = (
    ("nv_gpu_utilization", "GPU utilization rate [0.0 - 1.0)", "gauge", "utilization"),
    ("nv_gpu_memory_total_bytes", "GPU total memory, in bytes", "gauge", "memory_total"),
    ("nv_gpu_memory_used_bytes", "GPU used memory, in bytes", "gauge", "memory_used"),
    ("nv_gpu_power_usage", "GPU power usage in watts", "gauge", "power"),
    ("nv_gpu_power_limit", "GPU power management limit in watts", "gauge", "power_limit"),
    ("nv_energy_consumption", "GPU energy consumption in joules since the server started", "counter", "energy"),
)


def gpu_sampler(visible: str | None = None) -> Callable[[], list[SystemFamily]]:
    """A function giving Triton's GPU families for the GPUs NVML sees (only those named in
    ``CUDA_VISIBLE_DEVICES``, by index or UUID, where it is set); one that gives none where there is no NVML
    library or no GPU (a CPU machine). A reading a GPU does not support is left out for that GPU."""
    try:
        import pynvml

        pynvml.nvmlInit()
        handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
        uuids = [str(pynvml.nvmlDeviceGetUUID(h)) for h in handles]
    except Exception as exc:  # ImportError, pynvml.NVMLError_LibraryNotFound / _DriverNotLoaded / ...
        logger.debug("no GPU metrics: %s", exc)
        return list
    visible = os.environ.get("CUDA_VISIBLE_DEVICES") if visible is None else visible
    if visible is not None:                       # unset: every GPU; "": none
        wanted = [t.strip() for t in visible.split(",") if t.strip()]
        keep = [i for i, u in enumerate(uuids) if str(i) in wanted or any(u.startswith(w) for w in wanted
                                                                           if w.startswith("GPU-"))]
        handles, uuids = [handles[i] for i in keep], [uuids[i] for i in keep]

    readers: dict[str, Callable[[Any], float]] = {
        "utilization": lambda h: pynvml.nvmlDeviceGetUtilizationRates(h).gpu / 100.0,
        "memory_total": lambda h: float(pynvml.nvmlDeviceGetMemoryInfo(h).total),
        "memory_used": lambda h: float(pynvml.nvmlDeviceGetMemoryInfo(h).used),
        "power": lambda h: pynvml.nvmlDeviceGetPowerUsage(h) / 1000.0,                # mW -> W
        "power_limit": lambda h: pynvml.nvmlDeviceGetEnforcedPowerLimit(h) / 1000.0,
        "energy": lambda h: pynvml.nvmlDeviceGetTotalEnergyConsumption(h) / 1000.0,    # mJ -> J, since boot
    }
    since_boot: dict[str, float] = {}            # energy at start: Triton counts it from the server's start
    for h, u in zip(handles, uuids, strict=True):
        try:
            since_boot[u] = readers["energy"](h)
        except pynvml.NVMLError:
            pass

    def sample() -> list[SystemFamily]:
        out: list[SystemFamily] = []
        for name, doc, kind, reading in GPU_FAMILIES:
            samples = []
            for h, u in zip(handles, uuids, strict=True):
                if reading == "energy" and u not in since_boot:
                    continue
                try:
                    value = readers[reading](h)
                except pynvml.NVMLError:
                    continue
                samples.append(({"gpu_uuid": u}, value - since_boot[u] if reading == "energy" else value))
            if samples:
                out.append((name, doc, kind, samples))
        return out
    return sample


CPU_FAMILIES = {"nv_cpu_utilization": "CPU utilization rate [0.0 - 1.0]",
                "nv_cpu_memory_total_bytes": "CPU total memory (RAM), in bytes",
                "nv_cpu_memory_used_bytes": "CPU used memory (RAM), in bytes"}


def cpu_sampler() -> Callable[[], list[SystemFamily]]:
    """A function giving Triton's CPU gauges from /proc: utilisation since the previous call (all cores), total
    and used memory (used = total - available); a reading /proc does not give is left out."""
    last: list[tuple[int, int]] = []

    def times() -> tuple[int, int]:
        with open("/proc/stat") as fh:
            values = [int(v) for v in fh.readline().split()[1:]]
        idle = values[3] + (values[4] if len(values) > 4 else 0)
        return sum(values), idle

    def sample() -> list[SystemFamily]:
        out: dict[str, float] = {}
        try:
            total, idle = times()
            d_total, d_idle = (total - last[0][0], idle - last[0][1]) if last else (0, 0)
            out["nv_cpu_utilization"] = max(0.0, min(1.0, 1 - d_idle / d_total)) if d_total > 0 else 0.0
            last[:] = [(total, idle)]
            mem = {}
            with open("/proc/meminfo") as fh:
                for line in fh:
                    key, _, rest = line.partition(":")
                    mem[key] = int(rest.split()[0]) * 1024
            out["nv_cpu_memory_total_bytes"] = float(mem["MemTotal"])
            out["nv_cpu_memory_used_bytes"] = float(mem["MemTotal"] - mem.get("MemAvailable", mem.get("MemFree", 0)))
        except (OSError, ValueError, KeyError, IndexError):
            pass
        return [(name, doc, "gauge", [({}, out[name])]) for name, doc in CPU_FAMILIES.items() if name in out]
    return sample


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


TRITON_PREFIX = "foldserve_triton_"
#: Triton's inference metric families (docs/user_guide/metrics.md): exposed under their Triton names, with
#: Triton's units and labels, so that its Grafana dashboards, alerts and autoscaling rules read this server
#: the ``reason`` label of nv_inference_request_failure (server.core.dataplane.failure_reason picks one)
FAILURE_REASONS = ("REJECTED", "CANCELED", "BACKEND", "OTHER")
TRITON_COUNTERS = {
    "request_success": ("nv_inference_request_success", "Number of successful inference requests, all batch sizes"),
    "request_failure": ("nv_inference_request_failure", "Number of failed inference requests, all batch sizes"),
    "count": ("nv_inference_count", "Number of inferences performed (a batch of n counts n)"),
    "exec_count": ("nv_inference_exec_count", "Number of model executions performed"),
    "request_duration_us": ("nv_inference_request_duration_us",
                            "Cumulative inference request duration in microseconds"),
    "queue_duration_us": ("nv_inference_queue_duration_us", "Cumulative inference queuing duration in microseconds"),
    "compute_input_duration_us": ("nv_inference_compute_input_duration_us",
                                  "Cumulative compute input duration in microseconds"),
    "compute_infer_duration_us": ("nv_inference_compute_infer_duration_us",
                                  "Cumulative compute inference duration in microseconds"),
    "compute_output_duration_us": ("nv_inference_compute_output_duration_us",
                                   "Cumulative inference compute output duration in microseconds"),
}
TRITON_PENDING = ("nv_inference_pending_request_count",
                  "Instantaneous number of pending requests awaiting execution per-model.")


class _Families:
    """A fixed list of metric families, as a collector (what generate_latest reads)."""

    def __init__(self, families: list[Any]) -> None:
        self.families = families

    def collect(self) -> list[Any]:
        return self.families


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
        self.handoffs = Counter("foldserve_handoffs", "Executions handed between workers: sent to an idle peer, "
                                "received from a busy one, or returned untaken and run where they arrived.",
                                ["model", "direction"], registry=r)
        # Triton's families, kept under internal names (prometheus_client would add _total to a counter's name;
        # Triton's have none) and renamed when rendered
        self.triton = {key: Counter(TRITON_PREFIX + key, doc, ["model", "version", "reason"] if key == "request_failure"
                                    else ["model", "version"], registry=r)
                       for key, (_, doc) in TRITON_COUNTERS.items()}
        self.pending = Gauge(TRITON_PREFIX + "pending", TRITON_PENDING[1], ["model", "version"], registry=r,
                             multiprocess_mode="livesum")
        self._cpu = cpu_sampler()
        self._gpu = gpu_sampler()
        self._queue_labels: set[tuple[str, str]] = set()

    def request(self, model: str, protocol: str, code: str, seconds: float) -> None:
        self.requests.labels(model, protocol, code).inc()
        if code not in ("OK", "200"):
            self.failures.labels(model, protocol).inc()
        self.latency.labels(model, protocol).observe(seconds)

    def succeeded(self, model: str, version: str, batch: int, total_ns: int, queue_ns: int,
                  compute: tuple[int, int, int]) -> None:
        t = self.triton
        t["request_success"].labels(model, version).inc()
        t["count"].labels(model, version).inc(batch)
        for key, ns in (("request_duration_us", total_ns), ("queue_duration_us", queue_ns),
                        ("compute_input_duration_us", compute[0]), ("compute_infer_duration_us", compute[1]),
                        ("compute_output_duration_us", compute[2])):
            t[key].labels(model, version).inc(ns // 1000)

    def model_loaded(self, model: str, version: str) -> None:
        """Every per-model family at 0 as a version loads, as Triton creates them (one nv_inference_request_failure
        per reason): a rate() alert then sees 0, not "no data"."""
        for key, counter in self.triton.items():
            if key == "request_failure":
                for reason in FAILURE_REASONS:
                    counter.labels(model, version, reason).inc(0)
            else:
                counter.labels(model, version).inc(0)

    def failed(self, model: str, version: str, reason: str) -> None:
        self.triton["request_failure"].labels(model, version, reason).inc()

    def handoff(self, model: str, direction: str) -> None:
        self.handoffs.labels(model, direction).inc()

    def queued(self, model: str, seconds: float) -> None:
        self.queue_time.labels(model).observe(seconds)

    def executed(self, model: str, batch_size: int, name: str = "", version: str = "") -> None:
        self.batch_size.labels(model).observe(batch_size)
        if name:
            self.triton["exec_count"].labels(name, version).inc()

    def set_gauges(self, queue_lengths: dict[tuple[str, str], int], inflight: int) -> None:
        """The gauges from current values (versions unloaded since the last call drop to 0 / disappear)."""
        for labels in self._queue_labels - set(queue_lengths):
            for gauge in (self.queue_length, self.pending):
                if self.multiprocess:   # other workers' files keep the label: report 0, not a stale value
                    gauge.labels(*labels).set(0)
                else:
                    gauge.remove(*labels)
        self._queue_labels = set(queue_lengths)
        for (model, version), n in queue_lengths.items():
            self.queue_length.labels(model, version).set(n)
            self.pending.labels(model, version).set(n)
        self.inflight.set(inflight)

    def render(self, queue_lengths: dict[tuple[str, str], int], inflight: int) -> bytes:
        """Prometheus text; the gauges are set from the given current values first."""
        from prometheus_client import CollectorRegistry, generate_latest

        self.set_gauges(queue_lengths, inflight)
        if self.multiprocess:
            from prometheus_client.multiprocess import MultiProcessCollector

            registry = CollectorRegistry()
            MultiProcessCollector(registry)
            families = list(registry.collect())
        else:
            families = list(self.registry.collect())
        ours = [f for f in families if not f.name.startswith(TRITON_PREFIX)]
        triton = {f.name[len(TRITON_PREFIX):]: f for f in families if f.name.startswith(TRITON_PREFIX)}
        return generate_latest(_Families(ours)) + triton_text(triton, self._cpu() + self._gpu())
