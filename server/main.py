"""Run the server: gRPC and REST in one asyncio loop over one data plane.

SIGTERM/SIGINT: readiness goes false at once (REST ready -> 503, gRPC health NOT_SERVING), new inference
requests are refused, in-flight requests finish within ``grace_period_s``, then the process exits 0.
"""
from __future__ import annotations

import asyncio
import json
import logging
import signal
import sys

import uvicorn

from server.core.dataplane import DataPlane
from server.grpc.servicer import build_grpc_server, set_health
from server.rest.app import create_app
from server.settings import Settings

logger = logging.getLogger(__name__)


async def serve(settings: Settings) -> int:
    problem = settings.fail_open()
    if problem:  # the CLI refuses these in one line; a programmatic start must not fail open either
        raise ValueError(problem)
    dp = DataPlane(settings)
    await dp.start()
    grpc_server, grpc_port, health = build_grpc_server(settings, dp)
    await grpc_server.start()
    await set_health(health, True)

    app = create_app(settings, dp)
    ssl = {}
    if settings.tls_cert:
        import ssl as _ssl

        ssl = {"ssl_certfile": str(settings.tls_cert), "ssl_keyfile": str(settings.tls_key) if settings.tls_key else None}
        if settings.tls_ca:
            ssl.update(ssl_ca_certs=str(settings.tls_ca), ssl_cert_reqs=_ssl.CERT_REQUIRED)
    config = uvicorn.Config(app, host=settings.host, port=settings.http_port, log_level="warning", access_log=False,
                            lifespan="off", timeout_graceful_shutdown=max(int(settings.grace_period_s), 1),
                            limit_concurrency=None, **ssl)
    http = uvicorn.Server(config)
    http.install_signal_handlers = lambda: None  # type: ignore[method-assign]  # we handle signals below
    http_task = asyncio.create_task(http.serve())
    while not http.started:
        if http_task.done():
            await http_task
            raise OSError(f"cannot bind HTTP to {settings.host}:{settings.http_port}")
        await asyncio.sleep(0.01)
    http_port = http.servers[0].sockets[0].getsockname()[1]

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    ready = [f"{m.name}:{m.version}" for m in dp.repository_index(ready_only=True)]
    scheme = "https" if settings.tls_cert else "http"
    print(json.dumps({"event": "serving", "grpc": f"{settings.host}:{grpc_port}",
                      "http": f"{scheme}://{settings.host}:{http_port}",
                      "models": ready}), flush=True)
    logger.info("serving gRPC on %s:%d and HTTP on %s:%d; ready models: %s", settings.host, grpc_port,
                settings.host, http_port, ready or "none")

    await stop.wait()
    logger.info("shutting down: not ready, finishing in-flight requests (grace %.1f s)", settings.grace_period_s)
    dp.begin_shutdown()  # new requests get UNAVAILABLE / 503 from here on
    await set_health(health, False)
    drained = await dp.drain(settings.grace_period_s)
    if not drained:
        logger.warning("grace period over with requests still in flight; stopping anyway")
    http.should_exit = True
    await asyncio.gather(grpc_server.stop(1.0), http_task, return_exceptions=True)
    await dp.stop()
    logger.info("stopped")
    return 0


def run(settings: Settings) -> int:
    return asyncio.run(serve(settings))


if __name__ == "__main__":  # pragma: no cover
    logging.basicConfig(level=logging.INFO)
    sys.exit(run(Settings()))
