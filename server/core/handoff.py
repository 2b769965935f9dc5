"""Load, not connections, across workers: a worker that is behind hands executions to an idle one.

With ``serve --workers N`` the kernel spreads connections (SO_REUSEPORT hashes each new one to a worker), not
requests: a client that holds two gRPC connections has both on one worker half of the time, and that worker
then does all the work while the other idles (perf_analyzer at concurrency 8, 3x224x224: 31 req/s against 55
with one connection on each).

So each worker publishes how many executions it has under way (queued or running in its schedulers) in its
slot of the :class:`LoadBoard`, a small file of the run folder every worker maps. Before a request that
arrived on one of its own connections is executed, a worker compares its count with the least busy peer's;
when it has at least ``MARGIN`` more, it sends the execution (the decoded inputs, the outputs wanted, the batch
size, the request's remaining time and queue parameters) over that peer's hand-off socket
(:class:`HandoffServer`), and the peer runs it through its own scheduler, batched with the peer's own
requests. Everything else about the request (validation, shared memory, outputs, statistics, tracing) stays
with the worker the client is connected to, so that a hand-off is invisible to the client. A handed-off
execution is never handed on.

A peer that cannot take it (gone, being replaced, the model or version not ready there, its queue full) costs
one attempt and the request runs where it arrived; an execution that fails there fails as it would here.
Requests with string tensors (object arrays), and requests to models with string outputs, stay where they are.

A peer acknowledges an execution as soon as it has read it; one that does not within ACK_S (stopped, hung,
its loop swamped) gets the execution cancelled, is passed over for SUSPECT_S and the request runs here, so a
hung worker delays a peer's request by half a second at most, once, until the supervisor replaces it.

Wire format, both ways on a Unix socket, one execution at a time per connection: a 4-byte big-endian length,
a JSON header, then the tensors' bytes back to back in the header's order; the answer is preceded by ACK.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import mmap
import os
import struct
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from foldserve import errors
from foldserve.errors import FoldserveError, ModelNotFound, ModelNotReady, QueueFull, RequestTimeout
from server.core.runfolder import BOARD_SLOT, CLOSED
from server.core.scheduler import Outcome, Scheduler

logger = logging.getLogger(__name__)

MARGIN = 2                  # executions under way beyond the least busy peer's before one is handed to it
HEADER = struct.Struct(">I")
HEADER_LIMIT = 1 << 20
IDLE_CONNECTIONS = 32       # per peer, kept open for the next hand-off
ACK = b"\x06"               # a peer's first answer: it has the execution (its loop runs)
ACK_S = 0.5                 # ... within this long, or the execution runs here and the peer is passed over
SUSPECT_S = 5.0             # ... for this long (a stopped or swamped worker; the supervisor replaces a hung one)
#: errors after which the execution runs where it arrived: the peer could not take it (not: it ran and failed)
DECLINED = (ModelNotFound, ModelNotReady, QueueFull)


class LoadBoard:
    """Every worker's count of executions under way: the run folder's ``load`` file, mapped."""

    def __init__(self, path: Path, workers: int) -> None:
        self.workers = workers
        with open(path, "r+b") as f:
            self._map = mmap.mmap(f.fileno(), workers * BOARD_SLOT.size)

    def set(self, index: int, value: int) -> None:
        BOARD_SLOT.pack_into(self._map, index * BOARD_SLOT.size, value)

    def counts(self) -> list[int]:
        return [BOARD_SLOT.unpack_from(self._map, i * BOARD_SLOT.size)[0] for i in range(self.workers)]

    def close(self) -> None:
        self._map.close()


@dataclass
class Execution:
    """What a worker runs for a request: the arguments of :meth:`Scheduler.infer` and the version to run it on."""

    model: str
    version: str
    feeds: dict[str, np.ndarray]
    outputs: list[str]
    batch: int
    timeout_s: float
    priority: int = 0
    timeout_us: int = 0

    def portable(self) -> bool:
        return all(a.dtype != object for a in self.feeds.values())

    async def run_on(self, scheduler: Scheduler) -> Outcome:
        """Execute it here, on this process's scheduler of its version."""
        return await scheduler.infer(self.feeds, self.outputs, self.batch, self.timeout_s, self.priority,
                                     self.timeout_us)


def _pack(header: dict[str, Any], arrays: list[np.ndarray]) -> list[bytes | memoryview]:
    header["tensors"] = [[a.dtype.str, list(a.shape), a.nbytes] for a in arrays]
    head = json.dumps(header).encode()
    return [HEADER.pack(len(head)), head, *(np.ascontiguousarray(a).reshape(-1).view(np.uint8).data for a in arrays)]


async def _unpack(reader: asyncio.StreamReader) -> tuple[dict[str, Any], list[np.ndarray]]:
    (n,) = HEADER.unpack(await reader.readexactly(HEADER.size))
    if n > HEADER_LIMIT:
        raise ValueError(f"hand-off header of {n} bytes")
    header = json.loads(await reader.readexactly(n))
    arrays = []
    for dtype, shape, nbytes in header.pop("tensors"):
        data = await reader.readexactly(nbytes) if nbytes else b""
        arrays.append(np.frombuffer(data, dtype=np.dtype(dtype)).reshape(shape))
    return header, arrays


@dataclass
class Balance:
    """One worker's side of the hand-off: its slot on the board, its socket, its connections to its peers."""

    board: LoadBoard
    index: int
    sockets: list[Path]                 # every worker's hand-off socket, by index
    running: int = 0                    # executions under way here (own and handed to us)
    #: executions this worker has sent to each peer and not had back (a peer's slot counts them only once
    #: they arrived: a burst must not all go to the peer whose slot has not caught up yet)
    in_transit: dict[int, int] = field(default_factory=dict)
    suspect_until: dict[int, float] = field(default_factory=dict)   # peers that did not acknowledge in time
    _idle: dict[int, list[tuple[asyncio.StreamReader, asyncio.StreamWriter]]] = field(default_factory=dict)
    _server: asyncio.AbstractServer | None = None
    _run: Callable[[Execution], Awaitable[Outcome]] | None = None

    # --- counting -------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def under_way(self) -> Iterator[None]:
        """Count an execution under way here; published while this worker takes hand-offs (else its slot stays
        closed)."""
        self._publish(+1)
        try:
            yield
        finally:
            self._publish(-1)

    def _publish(self, change: int) -> None:
        self.running += change
        if self._server is not None:
            self.board.set(self.index, self.running)

    def pick(self) -> int | None:
        """The least busy open peer when this worker has MARGIN executions more than it, else None."""
        now = time.monotonic()
        open_peers = [(max(count, self.in_transit.get(i, 0)), i) for i, count in enumerate(self.board.counts())
                      if i != self.index and count != CLOSED and self.suspect_until.get(i, 0.0) <= now]
        if not open_peers:
            return None
        count, peer = min(open_peers)
        return peer if self.running - count >= MARGIN else None

    # --- the sending side -----------------------------------------------------------------------------

    async def send(self, peer: int, ex: Execution) -> Outcome | None:
        """Run ``ex`` on ``peer``; None when the peer could not take it (run it here): gone, declined, or no
        acknowledgement within ACK_S (stopped, hung, swamped: then it is passed over for SUSPECT_S)."""
        conn = await self._connection(peer)
        if conn is None:
            return None
        reader, writer = conn
        done = False
        self.in_transit[peer] = self.in_transit.get(peer, 0) + 1
        try:
            header = {"model": ex.model, "version": ex.version, "outputs": ex.outputs, "batch": ex.batch,
                      "timeout_s": ex.timeout_s, "priority": ex.priority, "timeout_us": ex.timeout_us,
                      "inputs": list(ex.feeds)}
            writer.writelines(_pack(header, list(ex.feeds.values())))
            try:
                async with asyncio.timeout(ACK_S):
                    await writer.drain()
                    await reader.readexactly(len(ACK))
            except TimeoutError:
                self.suspect_until[peer] = time.monotonic() + SUSPECT_S
                logger.warning("worker %d: worker %d did not take a hand-off within %g s; passed over for %g s",
                               self.index, peer, ACK_S, SUSPECT_S)
                return None
            async with asyncio.timeout(ex.timeout_s + 5.0):
                reply, arrays = await _unpack(reader)
            done = True
        except TimeoutError:
            raise RequestTimeout(f"model {ex.model}: no result within {ex.timeout_s:g} s") from None
        except (OSError, asyncio.IncompleteReadError, ValueError):
            return None               # the peer went away mid-way: the execution runs here
        finally:
            self.in_transit[peer] -= 1
            if done and len(self._idle.setdefault(peer, [])) < IDLE_CONNECTIONS:
                self._idle[peer].append(conn)
            else:
                writer.close()
        if not reply["ok"]:
            cls = getattr(errors, reply["kind"], None)
            cls = cls if isinstance(cls, type) and issubclass(cls, FoldserveError) else FoldserveError
            if issubclass(cls, DECLINED):
                return None
            raise cls(reply["error"])
        c_in, c_infer, c_out = reply["compute"]
        return arrays, reply["queued"], (c_in, c_infer, c_out), reply["exec_batch"]

    async def _connection(self, peer: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter] | None:
        idle = self._idle.setdefault(peer, [])
        while idle:
            reader, writer = idle.pop()
            if not writer.is_closing() and not reader.at_eof():
                return reader, writer
            writer.close()
        try:
            return await asyncio.open_unix_connection(str(self.sockets[peer]))
        except OSError:
            return None

    # --- the receiving side ---------------------------------------------------------------------------

    async def open(self, run: Callable[[Execution], Awaitable[Outcome]]) -> None:
        """Take hand-offs: listen on this worker's socket, then open its slot on the board. ``run(ex)`` runs an
        execution here (the data plane's scheduler call)."""
        path = self.sockets[self.index]
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        self._run = run
        self._server = await asyncio.start_unix_server(self._serve, path=str(path))
        os.chmod(path, 0o600)
        self.board.set(self.index, self.running)

    def stop_taking(self) -> None:
        """No more hand-offs to this worker (it is stopping): its slot closes."""
        if self._server is not None:
            self.board.set(self.index, CLOSED)
            self._server.close()
            self._server = None

    def close(self) -> None:
        self.stop_taking()
        for conns in self._idle.values():
            for _, writer in conns:
                writer.close()
        self._idle.clear()
        with contextlib.suppress(FileNotFoundError):
            self.sockets[self.index].unlink()
        self.board.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                try:
                    header, arrays = await _unpack(reader)
                except asyncio.IncompleteReadError:
                    return
                ex = Execution(header["model"], header["version"], dict(zip(header["inputs"], arrays, strict=True)),
                               header["outputs"], header["batch"], header["timeout_s"], header["priority"],
                               header["timeout_us"])
                writer.write(ACK)
                parts = await self._answer(ex, reader)
                if parts is None:
                    return
                writer.writelines(parts)
                await writer.drain()
        except (OSError, asyncio.IncompleteReadError):
            pass                          # the sender went away (its client cancelled): nothing to answer
        except Exception as exc:          # only peers of the same run folder write here: a bug, not an attack
            logger.warning("worker %d: a hand-off connection failed: %s", self.index, exc)
        finally:
            writer.close()

    async def _answer(self, ex: Execution, reader: asyncio.StreamReader) -> list[bytes | memoryview] | None:
        """Run ``ex`` and pack its answer; None when the sender hung up meanwhile (the execution is cancelled:
        the sender's client went away, or it gave up)."""
        if self._run is None:
            return _pack({"ok": False, "kind": "ModelNotReady", "error": f"worker {self.index} takes no hand-offs"}, [])
        run = asyncio.ensure_future(self._run(ex))
        hangup = asyncio.ensure_future(reader.read(1))     # nothing else comes while the sender waits
        try:
            await asyncio.wait({run, hangup}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            hangup.cancel()
        if not run.done():
            run.cancel()
            with contextlib.suppress(BaseException):
                await run
            return None
        try:
            results, queued, compute, exec_batch = run.result()
        except FoldserveError as exc:
            return _pack({"ok": False, "kind": type(exc).__name__, "error": str(exc)}, [])
        except Exception as exc:  # a bug here must not hang the peer waiting for this answer
            logger.exception("worker %d: a handed-off execution of %s failed", self.index, ex.model)
            return _pack({"ok": False, "kind": "FoldserveError",
                          "error": f"worker {self.index}: internal error ({type(exc).__name__})"}, [])
        return _pack({"ok": True, "queued": queued, "compute": list(compute), "exec_batch": exec_batch}, results)
