"""The coordinator: the operations of the data plane whose effect must be the same in every process that
serves (load/unload, shared-memory registration, statistics, readiness), behind one interface with two
implementations, attached to the data plane as MLServer attaches its worker pool to its registry:

* :class:`LocalCoordinator`: one process; the operations act on its own registry and regions.
* :class:`ClusterCoordinator`: one of several worker processes on the same ports (``serve --workers N``).

With several workers each listens on its own Unix socket in the run folder (:mod:`server.core.runfolder`)
for the peer operations (:mod:`server.core.peer`):

* a repository load is two-phase: every worker builds and warms the new versions (``Prepare``); only when
  all succeeded does every worker swap them in (``Commit``), else every worker drops them (``Abort``) and the
  old versions keep serving everywhere. Unload reaches every worker.
* shared-memory regions are registered and unregistered in every worker.
* statistics are gathered from every worker and summed as :class:`ModelStats`.

Such operations are serialised by a file lock. The outcome is kept in the cluster state
(:class:`server.core.cluster_state.ClusterState`), so that a worker started later (a replacement for one
that died) loads the same models and registers the same regions; it joins under the lock, after catching up
with any change made while it was loading. Readiness is one: a worker answers ready only once every worker
of the first start has been ready (the supervisor then creates the ``up`` file).
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import uuid
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Awaitable
from pathlib import Path
from typing import Any, Protocol, TypeVar

from foldserve.atomic import write_json
from foldserve.errors import FoldserveError, ModelNotFound, ModelNotReady, WorkerUnavailable
from server.core import logsettings
from server.core.cluster_state import ClusterState, Region
from server.core.handoff import Balance, Execution, LoadBoard
from server.core.logsettings import LogSettings
from server.core.peer import (
    GONE,
    Abort,
    Commit,
    LogSettingsMessage,
    Message,
    PeerServer,
    Ping,
    Prepare,
    ShmRegister,
    ShmUnregister,
    Stats,
    TraceSettingsMessage,
    Unload,
    call,
)
from server.core.registry import ModelRegistry
from server.core.runfolder import RunFolder
from server.core.scheduler import Outcome
from server.core.shm import SystemSharedMemory
from server.core.stats import ModelStats, merge_stats
from server.core.tracing import Tracing
from server.core.types import IndexEntry

logger = logging.getLogger(__name__)

LOAD_TIMEOUT_S = 600.0       # building and warming a model in every worker
CALL_TIMEOUT_S = 5.0         # any other operation (a hung worker fails it in seconds, releasing the lock)
CLUSTER_WAIT_S = 30.0        # how long an operation waits for another one's lock before a 503
MAX_WAITING = 16             # operations waiting for the lock in one worker; past it they are refused at once
LOCK_POLL_S = 0.02

T = TypeVar("T")


class Served(Protocol):
    """What a coordinator acts on: the data plane's registry, regions and local views."""

    registry: ModelRegistry
    shm: SystemSharedMemory
    tracing: Tracing

    def local_statistics(self, name: str = "", version: str = "") -> list[ModelStats]: ...

    async def run_handed(self, ex: Execution) -> Outcome: ...

    def repository_index(self, ready_only: bool = False) -> list[IndexEntry]: ...


class Coordinator(ABC):
    """What the data plane asks for, wherever the other serving processes are."""

    dp: Served
    #: several processes serve the same ports (SO_REUSEPORT) and publish their gauges for whichever renders them
    shared_ports: bool = False
    #: this process's side of the hand-off of executions between workers (server/core/handoff.py), if any
    balance: Balance | None = None

    def attach(self, dataplane: Served) -> None:
        self.dp = dataplane

    @abstractmethod
    async def start(self) -> None:
        """Load what this process is to serve (and take part in the cluster)."""

    async def join(self) -> None:
        """Count as ready (once serving)."""

    def leave(self) -> None:
        """No more operations reach this process (it begins draining)."""

    async def close(self) -> None:
        self.leave()

    def up(self) -> bool:
        return True

    def identity(self) -> dict[str, Any]:
        """What the serving line says about this process's place (nothing for one process)."""
        return {}

    @abstractmethod
    async def load(self, name: str, config: str | None = None) -> None:
        """Load or reload ``name`` everywhere; ``config``: a config override (JSON), else config.pbtxt."""

    @abstractmethod
    async def unload(self, name: str) -> None: ...

    @abstractmethod
    async def statistics(self, name: str, version: str) -> list[ModelStats]: ...

    @abstractmethod
    async def shm_register(self, name: str, key: str, offset: int, byte_size: int) -> None: ...

    @abstractmethod
    async def shm_unregister(self, name: str) -> None: ...

    @abstractmethod
    async def log_settings(self, settings: LogSettings) -> None: ...

    @abstractmethod
    async def trace_settings(self, state: dict[str, Any]) -> None: ...


class LocalCoordinator(Coordinator):
    """One serving process: every operation is this process's own."""

    async def start(self) -> None:
        await self.dp.registry.load_all()

    async def load(self, name: str, config: str | None = None) -> None:
        await self.dp.registry.load(name, override=config)

    async def unload(self, name: str) -> None:
        await self.dp.registry.unload(name)

    async def statistics(self, name: str, version: str) -> list[ModelStats]:
        return self.dp.local_statistics(name, version)

    async def shm_register(self, name: str, key: str, offset: int, byte_size: int) -> None:
        self.dp.shm.register(name, key, offset, byte_size)

    async def shm_unregister(self, name: str) -> None:
        self.dp.shm.unregister(name)

    async def log_settings(self, settings: LogSettings) -> None:
        logsettings.apply(settings)

    async def trace_settings(self, state: dict[str, Any]) -> None:
        self.dp.tracing.apply(state)


class ClusterCoordinator(Coordinator):  # long class: one method per operation, both sides
    """One worker's view of the cluster: its control socket, the coordinating side of every operation, and the
    peer side that executes them on this worker's data plane."""

    shared_ports = True

    def __init__(self, run_dir: Path, index: int, workers: int, handoff: bool = True) -> None:
        self.run = RunFolder(run_dir)
        self.index = index
        self.workers = workers
        if handoff and workers > 1:
            self.balance = Balance(LoadBoard(self.run.board, workers), index,
                                   [self.run.handoff(i) for i in range(workers)])
        self.synced_gen = 0
        self._pending: dict[str, Any] = {}
        self._peer = PeerServer(index, self.apply)
        self._local = asyncio.Lock()
        self._waiting = 0

    def identity(self) -> dict[str, Any]:
        return {"worker": self.index, "pid": os.getpid()}

    # --- lifecycle ----------------------------------------------------------------------------------------

    async def start(self) -> None:
        """The models and regions every other worker has (a replacement worker joins a running cluster)."""
        state = self.run.read_state()
        self.synced_gen = state.gen
        self.dp.registry.overrides = dict(state.overrides)
        await self.dp.registry.load_all(state.models, pins=state.pins())
        self._check_pins(state)             # before the ports are bound: a worker that differs never takes a call
        await self._peer.start(self.run.socket(self.index))
        self.sync_regions(state)
        if state.log_settings:
            logsettings.apply(logsettings.LogSettings(**state.log_settings))
        if state.trace_settings:
            self.dp.tracing.apply(state.trace_settings)

    def _check_pins(self, state: ClusterState) -> None:
        """This worker serves exactly the versions and bytes the cluster serves, or it does not join."""
        want = state.pins()
        if want is None:
            return
        mine = self.dp.registry.served()
        if mine != want:
            names = sorted(n for n in set(mine) | set(want) if mine.get(n) != want.get(n))
            raise WorkerUnavailable(f"worker {self.index} cannot serve what the cluster serves for {names} (versions "
                                    f"or bytes differ: {self._why(names)}); it does not join")

    def _why(self, names: list[str]) -> str:
        reasons = {e.name: e.reason for e in self.dp.repository_index() if e.reason}
        return "; ".join(f"{n}: {reasons.get(n, 'not loaded')}" for n in names)[:600]

    async def join(self) -> None:
        """Catch up with changes made while this worker was loading, then count as ready (under the lock,
        so every operation either reaches this worker or is in the state it read)."""
        async with self.lock(LOAD_TIMEOUT_S):           # behind a load that may take that long
            state = self.run.read_state()
            if state.gen != self.synced_gen:
                await self._sync(state)
            if state.served is None:          # the first worker of the first start to join pins what it serves
                state.pin(self.dp.registry.served())
                self._commit_state(state)
            elif self.dp.registry.served() != state.pins():   # a first start raced a change on disk: catch up
                await self._sync(state)
                self._check_pins(state)
            write_json(self.run.ready(self.index), {"pid": os.getpid(), "models": [
                f"{m.name}:{m.version}" for m in self.dp.repository_index(ready_only=True)]})
        if self.balance is not None:          # warm and serving: peers may hand executions to it from now on
            await self.balance.open(self.dp.run_handed)

    def leave(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.run.ready(self.index).unlink()
        if self.balance is not None:
            self.balance.stop_taking()

    async def close(self) -> None:
        self.leave()
        self._peer.close()
        if self.balance is not None:
            self.balance.close()
        with contextlib.suppress(FileNotFoundError):
            self.run.socket(self.index).unlink()

    def up(self) -> bool:
        """Every worker of the first start has been ready and the supervisor does not report the cluster
        degraded (its ``up`` file; read on every readiness probe, since it can go away)."""
        return self.run.up.exists()

    @contextlib.asynccontextmanager
    async def lock(self, wait_s: float = CLUSTER_WAIT_S) -> AsyncIterator[None]:
        """The cluster's lock (a file lock every worker takes), waited for at most ``wait_s``, then a 503 / UNAVAILABLE
        that says so. The waits never hold a thread: this worker's operations queue on an asyncio lock (at most
        MAX_WAITING of them; past it they are refused at once), and the one at the front polls the file lock without
        blocking. (Blocking flock calls in the default thread pool filled it, starving the lock holder's own work:
        loads, registrations and settings hung for 12+ minutes.)"""
        import fcntl

        if self._waiting >= MAX_WAITING:
            raise WorkerUnavailable(f"the cluster is busy: {self._waiting} cluster operations are already waiting in "
                                    f"this worker; retry later")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait_s
        busy = WorkerUnavailable(f"the cluster is busy with another operation (load, registration or settings "
                                 f"change): waited {wait_s:g} s for it; retry later")
        self._waiting += 1
        try:
            await asyncio.wait_for(self._local.acquire(), wait_s)
        except TimeoutError:
            raise busy from None
        finally:
            self._waiting -= 1
        try:
            fd = os.open(self.run.lock, os.O_RDWR | os.O_CREAT, 0o600)
            try:
                while True:
                    try:
                        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                        break
                    except BlockingIOError:
                        if loop.time() >= deadline:
                            raise busy from None
                        await asyncio.sleep(LOCK_POLL_S)
                yield
            finally:
                os.close(fd)   # releases the file lock
        finally:
            self._local.release()

    async def _sync(self, state: ClusterState) -> None:
        registry = self.dp.registry
        registry.overrides = dict(state.overrides)
        pins = state.pins()
        if pins is not None:               # exactly the pinned versions and bytes
            served = registry.served()
            for name in sorted(set(served) - set(pins)):
                with contextlib.suppress(ModelNotFound):
                    await registry.unload(name)
            for name, versions in sorted(pins.items()):
                if served.get(name) != versions:
                    try:
                        await registry.load(name, versions)
                    except FoldserveError as exc:
                        logger.error("worker %d: catching up on %s failed: %s", self.index, name, exc)
        elif state.models is not None:
            have = set(registry.loaded_names())
            for name in sorted(have - set(state.models)):
                with contextlib.suppress(ModelNotFound):
                    await registry.unload(name)
            for name in state.models:
                if name not in have or state.loads.get(name, 0) > self.synced_gen:
                    try:
                        await registry.load(name)
                    except FoldserveError as exc:
                        logger.error("worker %d: catching up on %s failed: %s", self.index, name, exc)
        self.sync_regions(state)
        self.synced_gen = state.gen

    def sync_regions(self, state: ClusterState) -> None:
        """Register the regions ``state`` lists and drop the others (a region whose object is gone is logged)."""
        shm = self.dp.shm
        registered = shm.names()
        for name in registered - set(state.shm):
            shm.unregister(name)
        for name, r in state.shm.items():
            if name not in registered:
                try:
                    shm.register(name, r.key, r.offset, r.byte_size)
                except FoldserveError as exc:
                    logger.error("worker %d: shared-memory region %r: %s", self.index, name, exc)

    def _commit_state(self, state: ClusterState, loaded: tuple[str, ...] = ()) -> None:
        state.gen += 1
        for name in loaded:
            state.loads[name] = state.gen
        self.run.write_state(state)
        self.synced_gen = state.gen

    # --- peer side: what one worker does --------------------------------------------------------------------

    async def apply(self, message: Message) -> Any:
        """Execute one operation on this worker's data plane."""
        registry, shm = self.dp.registry, self.dp.shm
        if isinstance(message, Prepare):
            prepared = self._pending[message.txn] = await registry.prepare(message.model,
                                                                            override=message.config or None)
            return {str(v): lv.digest for v, lv in sorted(prepared.versions.items())}
        elif isinstance(message, Commit):
            registry.commit(self._pending.pop(message.txn))
        elif isinstance(message, Abort):
            prepared = self._pending.pop(message.txn, None)
            if prepared is not None:
                await registry.discard(prepared)
                registry.fail(message.model, message.reason)
        elif isinstance(message, Unload):
            with contextlib.suppress(ModelNotFound):
                await registry.unload(message.model)
        elif isinstance(message, Stats):
            return [s.to_dict() for s in self.dp.local_statistics(message.model, message.version)]
        elif isinstance(message, ShmRegister):
            shm.register(message.name, message.key, message.offset, message.byte_size)
        elif isinstance(message, ShmUnregister):
            shm.unregister(message.name)
        elif isinstance(message, LogSettingsMessage):
            logsettings.apply(logsettings.LogSettings(**message.settings))
        elif isinstance(message, TraceSettingsMessage):
            self.dp.tracing.apply(message.settings)
        elif isinstance(message, Ping):
            return "pong"
        else:
            raise FoldserveError(f"unhandled cluster operation {message.OP.value}")
        return None

    # --- coordinating side ------------------------------------------------------------------------------------

    async def everyone(self, message: Message, timeout_s: float = CALL_TIMEOUT_S) -> list[Any]:
        """Run ``message`` on this worker and on every other ready worker at once; returns each result or the
        exception it raised (this worker's first). Workers that are gone (died, being replaced) are skipped:
        they catch up from the cluster state when they join."""
        peers = [i for i in range(self.workers) if i != self.index and self.run.ready_pid(i) is not None]
        calls: list[Awaitable[Any]] = [self.apply(message)]
        calls += [call(self.run.socket(i), i, message, timeout_s) for i in peers]
        results = await asyncio.gather(*calls, return_exceptions=True)
        return [r for r in results if r is not GONE]

    async def load(self, name: str, config: str | None = None) -> None:
        async with self.lock():
            txn = uuid.uuid4().hex
            results = await self.everyone(Prepare(name, txn, config or ""), LOAD_TIMEOUT_S)
            failures: list[BaseException] = [r for r in results if isinstance(r, BaseException)]
            if not failures and any(r != results[0] for r in results):
                failures = [ModelNotReady(f"model {name!r} failed to load: the workers read different versions or "
                                          f"bytes (the repository changed during the load); load it again")]
            if failures:
                await self.everyone(Abort(name, txn, str(failures[0])))
                raise failures[0]
            committed = await self.everyone(Commit(txn))
            state = self.run.read_state()
            state.models = self.dp.registry.loaded_names()
            state.pin(self.dp.registry.served(), [name])
            if config:
                state.overrides[name] = config
            else:
                state.overrides.pop(name, None)
            self._commit_state(state, loaded=(name,))
            _raise_first(committed)

    async def unload(self, name: str) -> None:
        async with self.lock():
            if name not in self.dp.registry.loaded_names():
                self.dp.registry.get(name)       # the right error for an unknown / never loaded model
                raise ModelNotFound(f"model {name!r} is not loaded")
            results = await self.everyone(Unload(name), LOAD_TIMEOUT_S)
            state = self.run.read_state()
            state.models = self.dp.registry.loaded_names()
            if state.served is not None:
                state.pin(self.dp.registry.served(), [name])
            self._commit_state(state)
            _raise_first(results)

    async def statistics(self, name: str, version: str) -> list[ModelStats]:
        results = await self.everyone(Stats(name, version))
        _raise_first(results)
        return merge_stats([[ModelStats.from_dict(d) for d in part] for part in results])

    async def shm_register(self, name: str, key: str, offset: int, byte_size: int) -> None:
        self.dp.shm.probe(name, key, offset, byte_size)   # a registration this worker refuses never takes the lock
        async with self.lock():
            self.dp.shm.check_new(name)   # every worker holds the same set: one check is every worker's
            results = await self.everyone(ShmRegister(name, key, offset, byte_size))
            failures = [r for r in results if isinstance(r, BaseException)]
            if failures:
                await self.everyone(ShmUnregister(name))
                raise failures[0]
            state = self.run.read_state()
            state.shm[name] = Region(key, offset, byte_size)
            self._commit_state(state)

    async def shm_unregister(self, name: str) -> None:
        async with self.lock():
            results = await self.everyone(ShmUnregister(name))
            state = self.run.read_state()
            for n in ([name] if name else list(state.shm)):
                state.shm.pop(n, None)
            self._commit_state(state)
            _raise_first(results)


    async def log_settings(self, settings: LogSettings) -> None:
        await self._setting(LogSettingsMessage(settings.to_json()), "log_settings")

    async def trace_settings(self, state: dict[str, Any]) -> None:
        await self._setting(TraceSettingsMessage(state), "trace_settings")

    async def _setting(self, message: LogSettingsMessage | TraceSettingsMessage, field: str) -> None:
        """A process-wide setting: every worker applies it, and the cluster state keeps it for replacements."""
        async with self.lock():
            results = await self.everyone(message)
            cluster = self.run.read_state()
            setattr(cluster, field, message.settings)
            self._commit_state(cluster)
            _raise_first(results)


def _raise_first(results: list[Any]) -> None:
    for r in results:
        if isinstance(r, BaseException):
            raise r
