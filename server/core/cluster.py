"""Several worker processes serving one repository on the same ports, as one server.

The supervisor (:mod:`server.supervisor`) makes a private run folder and starts the workers; each
worker serves gRPC and HTTP on the shared ports (SO_REUSEPORT: the kernel spreads connections) and
listens on its own Unix socket in the run folder for the operations that must reach every worker:

* a repository load is two-phase: every worker builds and warms the new versions (``prepare``); only
  when all succeeded does every worker swap them in (``commit``), else every worker drops them
  (``abort``) and the old versions keep serving everywhere. Unload reaches every worker.
* shared-memory regions are registered and unregistered in every worker.
* statistics are gathered from every worker and summed.

Such operations are serialised by a file lock. The outcome is kept in ``state.json`` (models loaded and
when, regions registered), so that a worker started later (a replacement for one that died) loads the
same models and registers the same regions; it joins under the lock, after catching up with any change
made while it was loading. Readiness is one: a worker answers ready only once every worker of the
first start has been ready (the supervisor then creates the ``up`` file) and until it begins draining.

This module imports nothing heavy at import time: the supervisor uses :class:`RunFolder` before any
gRPC or onnxruntime object may exist.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import uuid
from pathlib import Path
from typing import Any, AsyncIterator

from foldserve import errors
from foldserve.atomic import write_json
from foldserve.errors import FoldserveError, ModelNotFound, WorkerUnavailable

logger = logging.getLogger(__name__)

RUN_DIR_ENV = "FOLDSERVE_RUN_DIR"
WORKER_ENV = "FOLDSERVE_WORKER_INDEX"
LOAD_TIMEOUT_S = 600.0       # building and warming a model in every worker
CALL_TIMEOUT_S = 30.0        # any other operation
LINE_LIMIT = 64 * 1024 * 1024


class RunFolder:
    """The files the supervisor and the workers share (the folder is private: mode 0700)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.settings = self.root / "settings.json"
        self.state = self.root / "state.json"
        self.lock = self.root / "cluster.lock"
        self.up = self.root / "up"
        self.metrics = self.root / "metrics"

    def socket(self, index: int) -> Path:
        return self.root / f"w{index}.sock"

    def ready(self, index: int) -> Path:
        return self.root / "ready" / str(index)

    def create(self, settings_json: str) -> None:
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        (self.root / "ready").mkdir(mode=0o700, exist_ok=True)
        self.metrics.mkdir(mode=0o700, exist_ok=True)
        fd = os.open(self.settings, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # tokens inside
        with os.fdopen(fd, "w") as fh:
            fh.write(settings_json)
        write_json(self.state, {"gen": 0, "models": None, "loads": {}, "shm": {}})

    def read_state(self) -> dict[str, Any]:
        return json.loads(self.state.read_text())

    def ready_pid(self, index: int) -> int | None:
        try:
            return int(json.loads(self.ready(index).read_text())["pid"])
        except (OSError, ValueError, KeyError, TypeError):
            return None


def reuse_port_socket(host: str, port: int, listen: bool = True):
    """A TCP socket on ``port`` with SO_REUSEPORT, which other workers bind too (the kernel spreads connections
    among the listening ones). ``listen=False`` only holds the port (the supervisor, for a port of 0)."""
    import socket

    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    if listen:
        sock.listen(2048)
        sock.setblocking(False)
    return sock


def _error(kind: str, message: str) -> FoldserveError:
    cls = getattr(errors, kind, None)
    if not (isinstance(cls, type) and issubclass(cls, FoldserveError)):
        cls = FoldserveError
    return cls(message)


class Cluster:
    """One worker's view of the cluster: its control socket, the coordinator side of every operation that
    must reach all workers, and the peer side that executes them on this worker's data plane."""

    def __init__(self, run_dir: Path, index: int, workers: int) -> None:
        self.run = RunFolder(run_dir)
        self.index = index
        self.workers = workers
        self.dp: Any = None
        self.synced_gen = 0
        self._pending: dict[str, Any] = {}
        self._server: asyncio.AbstractServer | None = None
        self._up = False

    # --- lifecycle (worker side) ------------------------------------------------------------------

    def initial_state(self) -> dict[str, Any]:
        state = self.run.read_state()
        self.synced_gen = state["gen"]
        return state

    async def start(self, dataplane: Any) -> None:
        self.dp = dataplane
        path = self.run.socket(self.index)
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        self._server = await asyncio.start_unix_server(self._serve_peer, path=str(path), limit=LINE_LIMIT)
        os.chmod(path, 0o600)

    async def join(self) -> None:
        """Catch up with changes made while this worker was loading, then count as ready (under the lock,
        so every operation either reaches this worker or is in the state it read)."""
        async with self.lock():
            state = self.run.read_state()
            if state["gen"] != self.synced_gen:
                await self._sync(state)
            write_json(self.run.ready(self.index), {"pid": os.getpid(), "models": [
                f"{m.name}:{m.version}" for m in self.dp.repository_index(ready_only=True)]})

    def leave(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.run.ready(self.index).unlink()

    async def close(self) -> None:
        self.leave()
        if self._server is not None:
            self._server.close()
        with contextlib.suppress(FileNotFoundError):
            self.run.socket(self.index).unlink()

    def up(self) -> bool:
        """Every worker of the first start has been ready (the supervisor's ``up`` file)."""
        if not self._up:
            self._up = self.run.up.exists()
        return self._up

    @contextlib.asynccontextmanager
    async def lock(self) -> AsyncIterator[None]:
        import fcntl

        fd = os.open(self.run.lock, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            await asyncio.to_thread(fcntl.flock, fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)   # releases the lock

    async def _sync(self, state: dict[str, Any]) -> None:
        registry = self.dp.registry
        want = state["models"]
        if want is not None:
            have = set(registry.loaded_names())
            for name in sorted(have - set(want)):
                with contextlib.suppress(ModelNotFound):
                    await registry.unload(name)
            for name in want:
                if name not in have or state["loads"].get(name, 0) > self.synced_gen:
                    try:
                        await registry.load(name)
                    except FoldserveError as exc:
                        logger.error("worker %d: catching up on %s failed: %s", self.index, name, exc)
        self.sync_regions(state)
        self.synced_gen = state["gen"]

    def sync_regions(self, state: dict[str, Any]) -> None:
        """Register the regions ``state`` lists and drop the others (a region whose object is gone is logged)."""
        shm = self.dp.shm
        registered = shm.names()
        for name in registered - set(state["shm"]):
            shm.unregister(name)
        for name, r in state["shm"].items():
            if name not in registered:
                try:
                    shm.register(name, r["key"], r["offset"], r["byte_size"])
                except FoldserveError as exc:
                    logger.error("worker %d: shared-memory region %r: %s", self.index, name, exc)

    def _commit_state(self, loaded: tuple[str, ...] = (), **changes: Any) -> None:
        state = self.run.read_state()
        state.update(changes)
        state["gen"] += 1
        for name in loaded:
            state["loads"][name] = state["gen"]
        write_json(self.run.state, state)
        self.synced_gen = state["gen"]

    # --- peer side ----------------------------------------------------------------------------------

    async def _serve_peer(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while line := await reader.readline():
                request = json.loads(line)
                try:
                    reply = {"ok": True, "result": await self.apply(request["op"], request["args"])}
                except FoldserveError as exc:
                    reply = {"ok": False, "kind": type(exc).__name__, "error": str(exc)}
                except Exception as exc:  # never let a peer's bug hang the coordinator
                    logger.exception("worker %d: cluster operation %s failed", self.index, request.get("op"))
                    reply = {"ok": False, "kind": "FoldserveError", "error": f"worker {self.index}: internal error "
                                                                              f"({type(exc).__name__})"}
                writer.write(json.dumps(reply).encode() + b"\n")
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    async def apply(self, op: str, args: dict[str, Any]) -> Any:
        """Execute one operation on this worker's data plane."""
        registry, shm = self.dp.registry, self.dp.shm
        if op == "prepare":
            self._pending[args["txn"]] = await registry.prepare(args["model"])
        elif op == "commit":
            registry.commit(self._pending.pop(args["txn"]))
        elif op == "abort":
            prepared = self._pending.pop(args["txn"], None)
            if prepared is not None:
                await registry.discard(prepared)
                registry.fail(args["model"], args["reason"])
        elif op == "unload":
            with contextlib.suppress(ModelNotFound):
                await registry.unload(args["model"])
        elif op == "stats":
            return [s.to_dict() for s in self.dp.local_statistics(args["model"], args["version"])]
        elif op == "shm_register":
            shm.register(args["name"], args["key"], args["offset"], args["byte_size"])
        elif op == "shm_unregister":
            shm.unregister(args["name"])
        else:
            raise FoldserveError(f"unknown cluster operation {op!r}")
        return None

    # --- coordinator side ---------------------------------------------------------------------------

    async def _call(self, index: int, op: str, args: dict[str, Any], timeout_s: float) -> Any:
        try:
            reader, writer = await asyncio.open_unix_connection(str(self.run.socket(index)), limit=LINE_LIMIT)
        except (FileNotFoundError, ConnectionError):
            return _Gone()
        try:
            writer.write(json.dumps({"op": op, "args": args}).encode() + b"\n")
            async with asyncio.timeout(timeout_s):
                await writer.drain()
                line = await reader.readline()
        except TimeoutError:
            raise WorkerUnavailable(f"worker {index} did not answer {op} within {timeout_s:g} s") from None
        except ConnectionError:
            return _Gone()
        finally:
            writer.close()
        if not line:   # the worker died while answering: it catches up from state.json when replaced
            return _Gone()
        reply = json.loads(line)
        if not reply["ok"]:
            raise _error(reply["kind"], reply["error"])
        return reply["result"]

    async def everyone(self, op: str, args: dict[str, Any], timeout_s: float = CALL_TIMEOUT_S) -> list[Any]:
        """Run ``op`` on this worker and on every other ready worker at once; returns each result or the
        exception it raised (this worker's first). Workers that are gone (died, being replaced) are
        skipped: they catch up from state.json when they join."""
        peers = [i for i in range(self.workers) if i != self.index and self.run.ready_pid(i) is not None]

        async def local() -> Any:
            return await self.apply(op, args)

        results = await asyncio.gather(local(), *(self._call(i, op, args, timeout_s) for i in peers),
                                       return_exceptions=True)
        return [r for r in results if not isinstance(r, _Gone)]

    async def load(self, name: str) -> None:
        async with self.lock():
            txn = uuid.uuid4().hex
            results = await self.everyone("prepare", {"model": name, "txn": txn}, LOAD_TIMEOUT_S)
            failures = [r for r in results if isinstance(r, BaseException)]
            if failures:
                reason = str(failures[0])
                await self.everyone("abort", {"model": name, "txn": txn, "reason": reason})
                raise failures[0]
            committed = await self.everyone("commit", {"txn": txn})
            self._commit_state(models=self.dp.registry.loaded_names(), loaded=(name,))
            _raise_first(committed)

    async def unload(self, name: str) -> None:
        async with self.lock():
            if name not in self.dp.registry.loaded_names():
                self.dp.registry.get(name)       # the right error for an unknown / never loaded model
                raise ModelNotFound(f"model {name!r} is not loaded")
            results = await self.everyone("unload", {"model": name}, LOAD_TIMEOUT_S)
            self._commit_state(models=self.dp.registry.loaded_names())
            _raise_first(results)

    async def statistics(self, name: str, version: str) -> list[list[dict[str, Any]]]:
        results = await self.everyone("stats", {"model": name, "version": version})
        _raise_first(results)
        return results

    async def shm_register(self, name: str, key: str, offset: int, byte_size: int) -> None:
        async with self.lock():
            self.dp.shm.check_new(name)   # every worker holds the same set: one check is every worker's
            args = {"name": name, "key": key, "offset": offset, "byte_size": byte_size}
            results = await self.everyone("shm_register", args)
            failures = [r for r in results if isinstance(r, BaseException)]
            if failures:
                await self.everyone("shm_unregister", {"name": name})
                raise failures[0]
            shm = self.run.read_state()["shm"]
            shm[name] = {"key": key, "offset": offset, "byte_size": byte_size}
            self._commit_state(shm=shm)

    async def shm_unregister(self, name: str) -> None:
        async with self.lock():
            results = await self.everyone("shm_unregister", {"name": name})
            shm = self.run.read_state()["shm"]
            for n in ([name] if name else list(shm)):
                shm.pop(n, None)
            self._commit_state(shm=shm)
            _raise_first(results)


class _Gone:
    """A worker that was not there to answer."""


def _raise_first(results: list[Any]) -> None:
    for r in results:
        if isinstance(r, BaseException):
            raise r
