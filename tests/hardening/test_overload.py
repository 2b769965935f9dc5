"""Overload: about twice the server's capacity, open loop. It stays up, sheds with RESOURCE_EXHAUSTED,
keeps the p99 of accepted requests bounded, and serves normally right afterwards."""
from __future__ import annotations

import asyncio
import time

import grpc
import numpy as np
import pytest
from tritonclient.grpc import service_pb2 as tpb

from tests.hardening.conftest import FULL, gauges
from tests.server.conftest import ServerProcess

pytestmark = [pytest.mark.hardening, pytest.mark.subprocess]

DURATION_S = 60 if FULL else 6
QUEUE = 16
METHOD = "/inference.GRPCInferenceService/ModelInfer"


def _payload(batch: int) -> bytes:
    x = np.random.default_rng(0).random((batch, 1, 8, 8), dtype=np.float32) * 16
    req = tpb.ModelInferRequest(model_name="digits")
    req.inputs.add(name="input", datatype="FP32", shape=list(x.shape))
    req.raw_input_contents.append(x.tobytes())
    return req.SerializeToString()


async def _capacity(address: str, payload: bytes, seconds: float = 2.0) -> float:
    async with grpc.aio.insecure_channel(address) as ch:
        call = ch.unary_unary(METHOD, request_serializer=None, response_deserializer=None)
        done = 0
        t0 = time.perf_counter()

        async def worker():
            nonlocal done
            while time.perf_counter() - t0 < seconds:
                await call(payload, timeout=30)
                done += 1

        await asyncio.gather(*(worker() for _ in range(16)))
        return done / (time.perf_counter() - t0)


async def _open_loop(address: str, payload: bytes, rate: float, seconds: float):
    codes: dict[str, int] = {}
    latencies: list[float] = []
    async with grpc.aio.insecure_channel(address) as ch:
        call = ch.unary_unary(METHOD, request_serializer=None, response_deserializer=None)

        async def one():
            t = time.perf_counter()
            try:
                await call(payload, timeout=30)
                latencies.append(time.perf_counter() - t)
                codes["OK"] = codes.get("OK", 0) + 1
            except grpc.aio.AioRpcError as exc:
                codes[exc.code().name] = codes.get(exc.code().name, 0) + 1

        tasks = []
        t0 = time.perf_counter()
        n = 0
        while time.perf_counter() - t0 < seconds:
            target = t0 + n / rate
            delay = target - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one()))
            n += 1
            if len(tasks) > 5000:
                await asyncio.gather(*tasks)
                tasks.clear()
        await asyncio.gather(*tasks)
    return codes, latencies


def _latency_histogram(srv) -> dict[float, int]:
    """Server-side latency histogram of gRPC requests to digits: upper bound (s) -> cumulative count."""
    import urllib.request

    from tests.conftest import metric_samples

    with urllib.request.urlopen(f"http://{srv.http}/metrics", timeout=10) as r:
        samples = metric_samples(r.read().decode())
    return {float(lab["le"]): int(v) for n, lab, v in samples
            if n == "foldserve_request_duration_seconds_bucket" and lab.get("model") == "digits"
            and lab.get("protocol") == "grpc"}


def _p99(before: dict[float, int], after: dict[float, int]) -> float:
    counts = {k: after[k] - before.get(k, 0) for k in after}
    total = counts[float("inf")]
    for bound in sorted(counts):
        if counts[bound] >= 0.99 * total:
            return bound
    return float("inf")


def test_overload_sheds_load_and_recovers(hardening_repo):
    with ServerProcess(hardening_repo, "--allow-unverified", "--max-queue-size", str(QUEUE)) as srv:
        payload = _payload(8)
        capacity = asyncio.run(_capacity(srv.grpc, payload))
        hist_before = _latency_histogram(srv)
        codes, latencies = asyncio.run(_open_loop(srv.grpc, payload, 2 * capacity, DURATION_S))
        server_p99 = _p99(hist_before, _latency_histogram(srv))
        client_p99 = float(np.percentile(latencies, 99)) if latencies else float("nan")
        print(f"\ncapacity {capacity:.0f} req/s; offered {2 * capacity:.0f} req/s for {DURATION_S} s: {codes}; "
              f"accepted p99: server-side <= {server_p99 * 1000:.0f} ms, client-side {client_p99 * 1000:.0f} ms "
              f"(the client shares the 2 cores and queues too)")
        assert srv.proc.poll() is None, "the server died under overload"
        assert set(codes) <= {"OK", "RESOURCE_EXHAUSTED"}, codes
        assert codes.get("RESOURCE_EXHAUSTED", 0) > 0, f"no load was shed at 2x capacity: {codes}"
        assert codes.get("OK", 0) > 0.3 * capacity * DURATION_S, codes
        # a request admitted waits behind a bounded queue: its server-side p99 stays bounded
        assert server_p99 <= 0.5, server_p99
        # recovers at once: the queue drains and a lone request is served promptly
        time.sleep(0.5)
        g = gauges(srv)
        queues = {k: v for k, v in g.items() if k == ("foldserve_queue_length", "digits:1")}
        assert queues == {("foldserve_queue_length", "digits:1"): 0}, g
        t = time.perf_counter()
        with grpc.insecure_channel(srv.grpc) as ch:
            ch.unary_unary(METHOD, request_serializer=None, response_deserializer=None)(payload, timeout=10)
        assert time.perf_counter() - t < 1.0
