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

from foldserve.errors import ConfigError, WorkerUnavailable
from server.core import heap
from server.core.admission import Admission
from server.core.coordinator import Coordinator, LocalCoordinator
from server.core.dataplane import DataPlane
from server.core.runfolder import reuse_port_socket
from server.grpc.servicer import build_grpc_server, set_health
from server.rest.app import InferFirst, create_app
from server.rest.protocol import protocol_class
from server.settings import Settings

logger = logging.getLogger(__name__)


def raise_fd_limit() -> None:
    """The soft file-descriptor limit up to the hard one (the connection caps are derived from it)."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 1 << 20), hard))
        except (ValueError, OSError):
            pass


class RepeatFilter(logging.Filter):
    """One record per message template per ``every_s`` seconds; later ones are counted and the count is
    logged with the next record that passes (asyncio logs "socket.accept() out of system resource" once per
    accept attempt when fds run out: hundreds of thousands a minute)."""

    def __init__(self, every_s: float = 10.0) -> None:
        super().__init__()
        self.every_s = every_s
        self.last: dict[tuple[str, str], float] = {}
        self.suppressed: dict[tuple[str, str], int] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        import time

        key = (record.name, str(record.msg))
        now = time.monotonic()
        if now - self.last.get(key, -1e9) < self.every_s:
            self.suppressed[key] = self.suppressed.get(key, 0) + 1
            return False
        self.last[key] = now
        n = self.suppressed.pop(key, 0)
        if n:
            record.msg = f"{record.msg} (and {n} more like it in the last {self.every_s:g} s)"
        return True


def rate_limit_repeated_logs() -> None:
    for name in ("asyncio", "uvicorn.error", "grpc._cython.cygrpc", "grpc"):
        log = logging.getLogger(name)
        if not any(isinstance(f, RepeatFilter) for f in log.filters):
            log.addFilter(RepeatFilter())


async def refresh_gauges(dp: DataPlane, every_s: float = 1.0) -> None:
    """With several workers, each publishes its gauges (queue lengths, in flight) for whichever renders."""
    while True:
        dp.refresh_gauges()
        await asyncio.sleep(every_s)


async def start_http(settings: Settings, dp: DataPlane, reuse_port: bool) -> tuple[uvicorn.Server, asyncio.Task, int]:
    """uvicorn on the REST port (shared with the other workers when ``reuse_port``); returns once bound."""
    admission = Admission(settings.concurrency_limit(), dp.monitor)
    app = InferFirst(create_app(settings, dp, admission))
    ssl = {}
    if settings.tls_cert:
        import ssl as _ssl

        ssl = {"ssl_certfile": str(settings.tls_cert),
               "ssl_keyfile": str(settings.tls_key) if settings.tls_key else None}
        if settings.tls_ca:
            ssl.update(ssl_ca_certs=str(settings.tls_ca), ssl_cert_reqs=_ssl.CERT_REQUIRED)
    config = uvicorn.Config(app, host=settings.host, port=settings.http_port, log_level="warning", access_log=False,
                            lifespan="off", timeout_graceful_shutdown=max(int(settings.grace_period_s), 1),
                            limit_concurrency=None, timeout_keep_alive=max(1, int(settings.idle_timeout_s)),
                            http=protocol_class(settings, settings.connection_limit(), admission), **ssl)
    http = uvicorn.Server(config)
    http.install_signal_handlers = lambda: None  # type: ignore[attr-defined]  # we handle signals below
    sockets = [reuse_port_socket(settings.host, settings.http_port)] if reuse_port else None
    http_task = asyncio.create_task(http.serve(sockets=sockets))
    while not http.started:
        if http_task.done():
            await http_task
            raise OSError(f"cannot bind HTTP to {settings.host}:{settings.http_port}")
        await asyncio.sleep(0.01)
    http_port = http.servers[0].sockets[0].getsockname()[1]

    return http, http_task, http_port


EXIT_NOT_JOINED = 3      # a worker that could not serve what its cluster serves: the supervisor replaces it


# long function: the lifecycle, start to stop, in order
async def serve(settings: Settings, coordinator: Coordinator | None = None) -> int:
    problem = settings.fail_open()
    if problem:  # the CLI refuses these in one line; a programmatic start must not fail open either
        raise ValueError(problem)
    raise_fd_limit()
    rate_limit_repeated_logs()
    coordinator = coordinator or LocalCoordinator()
    dp = DataPlane(settings, coordinator=coordinator)
    try:
        await dp.start()
    except WorkerUnavailable as exc:   # a worker that cannot serve what the rest of the cluster serves
        logger.error("%s", exc)
        await dp.stop()
        return EXIT_NOT_JOINED
    grpc_server, grpc_port, health, janitor = build_grpc_server(settings, dp, reuse_port=coordinator.shared_ports)
    await grpc_server.start()
    await set_health(health, True)
    sweeping = asyncio.create_task(janitor.run())

    http, http_task, http_port = await start_http(settings, dp, reuse_port=coordinator.shared_ports)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    ready = [f"{m.name}:{m.version}" for m in dp.repository_index(ready_only=True)]
    scheme = "https" if settings.tls_cert else "http"
    try:
        await coordinator.join()
    except WorkerUnavailable as exc:
        logger.error("%s", exc)
        sweeping.cancel()
        await asyncio.gather(grpc_server.stop(0), return_exceptions=True)
        http.should_exit = True
        await asyncio.gather(http_task, return_exceptions=True)
        await dp.stop()
        return EXIT_NOT_JOINED
    gauges = asyncio.create_task(refresh_gauges(dp)) if coordinator.shared_ports else None
    heap.manage()       # what starting made lives on; collections under load skip it (server/core/heap.py)
    event = "worker serving" if coordinator.shared_ports else "serving"
    print(json.dumps({"event": event, "grpc": f"{settings.host}:{grpc_port}",
                      "http": f"{scheme}://{settings.host}:{http_port}", "models": ready,
                      **coordinator.identity()}), flush=True)
    logger.info("serving gRPC on %s:%d and HTTP on %s:%d; ready models: %s", settings.host, grpc_port,
                settings.host, http_port, ready or "none")

    await stop.wait()
    logger.info("shutting down: not ready, finishing in-flight requests (grace %.1f s)", settings.grace_period_s)
    coordinator.leave()  # no more cluster operations reach this process
    if gauges is not None:
        gauges.cancel()
    sweeping.cancel()
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


def run(settings: Settings, coordinator: Coordinator | None = None) -> int:
    """Serve until SIGTERM/SIGINT on uvloop (``--event-loop auto`` when installed, as uvicorn[standard] brings it:
    3-9% lower REST p50 at concurrency 1 and 2-9% more throughput at 32 on both transports, measured with
    perf_analyzer and the benchmark's client), else asyncio's own loop."""
    if settings.event_loop != "asyncio":
        try:
            import uvloop
        except ImportError:
            if settings.event_loop == "uvloop":
                raise ConfigError("--event-loop uvloop: uvloop is not installed (pip install uvloop)") from None
        else:
            return uvloop.run(serve(settings, coordinator))
    return asyncio.run(serve(settings, coordinator))


if __name__ == "__main__":  # pragma: no cover
    logging.basicConfig(level=logging.INFO)
    sys.exit(run(Settings()))
