"""A burst for tests/hardening/test_burst.py, run as a process of its own: N gRPC requests (over 50 connections)
and M REST requests (one connection each) at once against the digits model; prints the outcome counts as JSON.

usage: python -m tests.hardening.burst_client HOST HTTP_PORT GRPC_PORT N_GRPC N_REST
"""
from __future__ import annotations

import asyncio
import json
import sys
import time

import grpc
import numpy as np
from tritonclient.grpc import service_pb2 as tpb

METHOD = "/inference.GRPCInferenceService/ModelInfer"


def _payloads() -> tuple[bytes, bytes]:
    x = (np.random.default_rng(0).random((1, 1, 8, 8)) * 16).astype(np.float32)
    req = tpb.ModelInferRequest(model_name="digits", raw_input_contents=[x.tobytes()])
    req.inputs.add(name="input", datatype="FP32", shape=[1, 1, 8, 8])
    body = json.dumps({"inputs": [{"name": "input", "shape": [1, 1, 8, 8], "datatype": "FP32",
                                   "data": x.ravel().tolist()}]}).encode()
    head = (b"POST /v2/models/digits/infer HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
            b"content-length: %d\r\nconnection: close\r\n\r\n" % len(body))
    return req.SerializeToString(), head + body


async def burst(host: str, http_port: int, grpc_port: int, n_grpc: int, n_rest: int) -> dict[str, float]:
    payload, http_request = _payloads()
    codes: dict[str, float] = {}

    def count(key: str) -> None:
        codes[key] = codes.get(key, 0) + 1

    async def rest_one() -> None:
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(host, http_port), 30)
            writer.write(http_request)
            await writer.drain()
            line = await asyncio.wait_for(reader.readline(), 60)
            count("rest_" + (line.split()[1].decode() if line else "closed"))
            writer.close()
        except (OSError, TimeoutError) as exc:
            count("rest_" + type(exc).__name__)

    channels = [grpc.aio.insecure_channel(f"{host}:{grpc_port}", options=[("grpc.use_local_subchannel_pool", 1)])
                for _ in range(50)]
    calls = [ch.unary_unary(METHOD) for ch in channels]

    async def grpc_one(i: int) -> None:
        try:
            await calls[i % len(calls)](payload, timeout=60)
            count("grpc_OK")
        except grpc.aio.AioRpcError as exc:
            count("grpc_" + exc.code().name)

    t0 = time.time()
    await asyncio.gather(*(grpc_one(i) for i in range(n_grpc)), *(rest_one() for _ in range(n_rest)))
    codes["seconds"] = round(time.time() - t0, 2)
    for ch in channels:
        await ch.close()
    return codes


if __name__ == "__main__":
    host, http_port, grpc_port, n_grpc, n_rest = sys.argv[1], *map(int, sys.argv[2:6])
    print(json.dumps(asyncio.run(burst(host, http_port, grpc_port, n_grpc, n_rest))), flush=True)
