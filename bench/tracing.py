"""Benchmark section ``tracing``: what OpenTelemetry tracing costs. The same server and model with tracing off
(no OTEL_* exporter) and on at trace_rate 1 (every request, OTLP/HTTP to a receiver in this process that decodes
nothing): gRPC p50 at concurrency 1 and throughput at concurrency 32."""
from __future__ import annotations

import asyncio
import http.server
import threading
from pathlib import Path
from typing import Any

import numpy as np

from bench.loadgen import closed_loop, free_port, grpc_sender_factory
from bench.process import FoldserveProcess

INFER = "/inference.GRPCInferenceService/ModelInfer"


class _Sink:
    """An OTLP/HTTP endpoint that accepts and counts export requests."""

    def __init__(self) -> None:
        self.requests = 0
        sink = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("content-length", 0)))
                sink.requests += 1
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.port = free_port()
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


def bench_tracing(repo: Path, model: str, shape: list[int], quick: bool) -> dict[str, Any]:
    from foldserve.client import grpc_infer_request

    payload = grpc_infer_request(model, {"input": np.random.rand(1, *shape).astype(np.float32)}).SerializeToString()
    n1, n32 = (100, 500) if quick else (500, 3000)
    sink = _Sink()
    out: dict[str, Any] = {"model": model}
    try:
        for label, env in (("off", {}), ("on_rate_1", {
                "OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": f"http://127.0.0.1:{sink.port}/v1/traces"})):
            with FoldserveProcess(repo, "--batching", env=env, log_level="WARNING", timeout=120) as srv:
                make = lambda: grpc_sender_factory(f"127.0.0.1:{srv.grpc_port}", INFER, payload)
                out[label] = {"grpc_c1": asyncio.run(closed_loop(make(), 1, n1)).to_dict(),
                              "grpc_c32": asyncio.run(closed_loop(make(), 32, n32)).to_dict()}
        out["exports_received"] = sink.requests
        off, on = out["off"], out["on_rate_1"]
        out["p50_c1_ratio"] = on["grpc_c1"]["p50_ms"] / off["grpc_c1"]["p50_ms"]
        out["throughput_c32_ratio"] = on["grpc_c32"]["throughput"] / off["grpc_c32"]["throughput"]
    finally:
        sink.server.shutdown()
    return out


def markdown(r: dict[str, Any]) -> list[str]:
    t = r.get("tracing", {})
    if "off" not in t:
        return ["", f"Tracing: {t.get('skipped', 'not run')}"]
    off, on = t["off"], t["on_rate_1"]
    return ["", f"Tracing cost ({t['model']}, gRPC): p50 at concurrency 1 {off['grpc_c1']['p50_ms']:.3f} -> "
                f"{on['grpc_c1']['p50_ms']:.3f} ms ({t['p50_c1_ratio']:.2f}x), throughput at concurrency 32 "
                f"{off['grpc_c32']['throughput']:.0f} -> {on['grpc_c32']['throughput']:.0f} req/s "
                f"({t['throughput_c32_ratio']:.2f}x), every request traced (OTLP/HTTP exports received: "
                f"{t['exports_received']})"]
