"""A small closed-loop load generator (asyncio) for gRPC and HTTP/1.1, and the echo servers that give
the transport floors.

Requests are serialised once, up front, and sent as bytes (gRPC generic calls; a hand-written HTTP/1.1
keep-alive client), so the client's own cost stays small and identical for every target compared.
"""
from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from bench.cpu import cpu_seconds


@dataclass
class LoadResult:
    concurrency: int
    requests: int
    errors: int
    seconds: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    throughput: float          # successful requests per second
    samples_per_s: float = 0.0
    cpu_ms_per_request: float | None = None     # the serving processes' CPU time, when they were given

    def to_dict(self) -> dict:
        return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in self.__dict__.items()
                if v is not None}


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    k = min(len(s) - 1, max(0, round(q / 100 * (len(s) - 1))))
    return s[k]


def median_ms(fn: Callable[[], object], n: int) -> float:
    """The median wall time of ``n`` calls of ``fn`` after one warm-up call, in milliseconds."""
    fn()
    times = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return percentile(times, 50) * 1000


async def closed_loop(make_sender: Callable[[int], Awaitable[Callable[[], Awaitable[bool]]]], concurrency: int,
                      requests: int, warmup: int = 20, batch: int = 1,
                      server_pids: list[int] | None = None) -> LoadResult:
    """``concurrency`` workers, each sending back-to-back until ``requests`` are done in total. Given the serving
    processes, the result also says their CPU time per request over the measured requests (warm-up excluded)."""
    senders = [await make_sender(i) for i in range(concurrency)]
    for i in range(min(warmup, requests)):
        await senders[i % concurrency]()
    latencies: list[float] = []
    errors = 0
    remaining = [requests]

    async def worker(send):
        nonlocal errors
        while remaining[0] > 0:
            remaining[0] -= 1
            t0 = time.perf_counter()
            ok = await send()
            if ok:
                latencies.append(time.perf_counter() - t0)
            else:
                errors += 1

    cpu0 = cpu_seconds(server_pids) if server_pids else 0.0
    t0 = time.perf_counter()
    await asyncio.gather(*(worker(s) for s in senders))
    elapsed = time.perf_counter() - t0
    cpu = (cpu_seconds(server_pids) - cpu0) * 1000 / max(len(latencies) + errors, 1) if server_pids else None
    ms = [x * 1000 for x in latencies]
    return LoadResult(concurrency, len(latencies), errors, elapsed, percentile(ms, 50), percentile(ms, 90),
                      percentile(ms, 99), len(latencies) / elapsed, len(latencies) * batch / elapsed, cpu)


# --- clients -----------------------------------------------------------------------------------------

def grpc_sender_factory(address: str, method: str, payload: bytes, channels: int = 4):
    import grpc

    calls: list = []  # channels are made inside the event loop that uses them

    async def make(i: int):
        if not calls:
            for _ in range(channels):
                # a subchannel pool of its own: otherwise grpc shares one connection among identical channels
                # (and with several workers, one connection lands on one worker)
                ch = grpc.aio.insecure_channel(address, options=[("grpc.max_receive_message_length", 256 << 20),
                                                                 ("grpc.max_send_message_length", 256 << 20),
                                                                 ("grpc.use_local_subchannel_pool", 1)])
                calls.append(ch.unary_unary(method, request_serializer=None, response_deserializer=None))
        call = calls[i % len(calls)]

        async def send() -> bool:
            try:
                await call(payload, timeout=60)
                return True
            except grpc.aio.AioRpcError:
                return False
        return send
    return make


class HttpConnection:
    """One HTTP/1.1 keep-alive connection sending a pre-built request."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def request(self, raw: bytes) -> tuple[int, bytes]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port, limit=1 << 26)
        self.writer.write(raw)
        await self.writer.drain()
        status_line = await self.reader.readline()
        if not status_line:
            self.writer = None
            raise ConnectionError("connection closed")
        status = int(status_line.split()[1])
        length = 0
        while True:
            line = await self.reader.readline()
            if line in (b"\r\n", b"\n", b""):
                break
            k, _, v = line.decode("latin-1").partition(":")
            if k.lower() == "content-length":
                length = int(v)
        body = await self.reader.readexactly(length) if length else b""
        return status, body


def http_request_bytes(host: str, port: int, path: str, body: bytes, headers: dict[str, str] | None = None) -> bytes:
    h = {"Host": f"{host}:{port}", "Content-Type": "application/json", "Content-Length": str(len(body)),
         "Connection": "keep-alive", **(headers or {})}
    return (f"POST {path} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in h.items()) + "\r\n").encode() + body


def http_sender_factory(host: str, port: int, raw: bytes):
    async def make(i: int):
        conn = HttpConnection(host, port)

        async def send() -> bool:
            try:
                status, _ = await conn.request(raw)
                return status == 200
            except (ConnectionError, asyncio.IncompleteReadError, OSError):
                conn.writer = None
                return False
        return send
    return make


# --- echo servers (transport floors) -------------------------------------------------------------------

async def grpc_echo(port: int) -> None:
    import grpc

    async def echo(request: bytes, context) -> bytes:
        return request

    handler = grpc.method_handlers_generic_handler(
        "echo.Echo", {"Echo": grpc.unary_unary_rpc_method_handler(echo, request_deserializer=None,
                                                                  response_serializer=None)})
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", 256 << 20),
                                      ("grpc.max_send_message_length", 256 << 20)])
    server.add_generic_rpc_handlers((handler,))
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    print("ready", flush=True)
    await server.wait_for_termination()


def http_echo(port: int) -> None:
    import uvicorn

    async def app(scope, receive, send):
        if scope["type"] != "http":
            return
        body = b""
        more = True
        while more:
            msg = await receive()
            body += msg.get("body", b"")
            more = msg.get("more_body", False)
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/octet-stream"),
                                (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})

    print("ready", flush=True)
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)


if __name__ == "__main__":
    kind, port = sys.argv[1], int(sys.argv[2])
    if kind == "grpc":
        asyncio.run(grpc_echo(port))
    else:
        http_echo(port)

