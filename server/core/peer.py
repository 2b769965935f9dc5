"""Peer RPC between worker processes: the operations that must reach every worker, as typed messages (one
record class per :class:`ClusterOp`) over each worker's Unix socket, one JSON line per request and reply.

A peer that is not there to answer (died, being replaced) is :data:`GONE`, not an error: it catches up from
the cluster state when it joins. A peer that does not answer in time is a :class:`WorkerUnavailable`.
"""
from __future__ import annotations

import asyncio
import contextlib
import enum
import json
import logging
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from foldserve import errors
from foldserve.errors import FoldserveError, WorkerUnavailable
from foldserve.records import Record, RecordError, decode, encode

logger = logging.getLogger(__name__)

LINE_LIMIT = 64 * 1024 * 1024


class ClusterOp(enum.Enum):
    PREPARE = "prepare"                  # build and warm a model's new versions; keep them pending
    COMMIT = "commit"                    # swap the pending versions in
    ABORT = "abort"                      # drop them (the old versions keep serving)
    UNLOAD = "unload"
    STATS = "stats"                      # this worker's statistics
    SHM_REGISTER = "shm_register"
    SHM_UNREGISTER = "shm_unregister"
    LOG_SETTINGS = "log_settings"         # Triton's logging extension: every worker logs alike
    TRACE_SETTINGS = "trace_settings"     # Triton's trace extension: every worker traces alike
    PING = "ping"                        # liveness: the supervisor's heartbeat, and a long call's watchdog


@dataclass
class Message(Record):
    OP: ClassVar[ClusterOp]


@dataclass
class Prepare(Message):
    OP = ClusterOp.PREPARE
    model: str
    txn: str
    config: str = ""            # a config override (JSON ModelConfig); "" is a plain load, which ends one


@dataclass
class Commit(Message):
    OP = ClusterOp.COMMIT
    txn: str


@dataclass
class Abort(Message):
    OP = ClusterOp.ABORT
    model: str
    txn: str
    reason: str


@dataclass
class Unload(Message):
    OP = ClusterOp.UNLOAD
    model: str


@dataclass
class Stats(Message):
    OP = ClusterOp.STATS
    model: str = ""
    version: str = ""


@dataclass
class ShmRegister(Message):
    OP = ClusterOp.SHM_REGISTER
    name: str
    key: str
    offset: int
    byte_size: int


@dataclass
class ShmUnregister(Message):
    OP = ClusterOp.SHM_UNREGISTER
    name: str = ""


@dataclass
class LogSettingsMessage(Message):
    OP = ClusterOp.LOG_SETTINGS
    settings: dict[str, Any]


@dataclass
class TraceSettingsMessage(Message):
    OP = ClusterOp.TRACE_SETTINGS
    settings: dict[str, Any]


@dataclass
class Ping(Message):
    OP = ClusterOp.PING


MESSAGES: dict[ClusterOp, type[Message]] = {cls.OP: cls for cls in (Prepare, Commit, Abort, Unload, Stats,
                                                                   ShmRegister, ShmUnregister, LogSettingsMessage,
                                                                   TraceSettingsMessage, Ping)}
PING_LINE = json.dumps({"op": ClusterOp.PING.value, "args": {}}).encode() + b"\n"
#: a worker that does not answer a ping within this long has stopped answering (hung, stopped, swapping)
PING_TIMEOUT_S = 3.0

Handler = Callable[[Message], Awaitable[Any]]


class Gone:
    """A worker that was not there to answer."""


GONE = Gone()


def _error(kind: str, message: str) -> FoldserveError:
    cls = getattr(errors, kind, None)
    if not (isinstance(cls, type) and issubclass(cls, FoldserveError)):
        cls = FoldserveError
    return cls(message)


def parse(line: bytes) -> Message:
    request = json.loads(line)
    try:
        cls = MESSAGES[ClusterOp(request["op"])]
    except (KeyError, ValueError, TypeError):
        shown = request.get("op") if isinstance(request, dict) else request
        raise FoldserveError(f"unknown cluster operation {shown!r}") from None
    return decode(cls, request.get("args", {}), f"cluster operation {cls.OP.value}")


class PeerServer:
    """This worker's control socket: each request line is parsed into its message and given to ``handle``."""

    def __init__(self, index: int, handle: Handler) -> None:
        self.index, self.handle = index, handle
        self._server: asyncio.AbstractServer | None = None

    async def start(self, path: Path) -> None:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        self._server = await asyncio.start_unix_server(self._serve, path=str(path), limit=LINE_LIMIT)
        os.chmod(path, 0o600)

    def close(self) -> None:
        if self._server is not None:
            self._server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while line := await reader.readline():
                op = "?"
                try:
                    message = parse(line)
                    op = message.OP.value
                    reply = {"ok": True, "result": await self.handle(message)}
                except (FoldserveError, RecordError) as exc:
                    reply = {"ok": False, "kind": type(exc).__name__, "error": str(exc)}
                except Exception as exc:  # never let a peer's bug hang the coordinator
                    logger.exception("worker %d: cluster operation %s failed", self.index, op)
                    reply = {"ok": False, "kind": "FoldserveError",
                             "error": f"worker {self.index}: internal error ({type(exc).__name__})"}
                writer.write(json.dumps(reply).encode() + b"\n")
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()


async def ping(path: Path, timeout_s: float = PING_TIMEOUT_S) -> bool:
    """Whether the worker at ``path`` answers at all within ``timeout_s`` (on a connection of its own)."""
    try:
        async with asyncio.timeout(timeout_s):
            reader, writer = await asyncio.open_unix_connection(str(path))
            try:
                writer.write(PING_LINE)
                await writer.drain()
                return bool(await reader.readline())
            finally:
                writer.close()
    except (OSError, TimeoutError):
        return False


async def call(path: Path, index: int, message: Message, timeout_s: float) -> Any:
    """Send ``message`` to the worker listening at ``path``; its result, GONE, or the error it raised. While the
    answer takes long (a load), the worker is pinged every PING_TIMEOUT_S: one that stops answering fails the
    call in seconds, not at ``timeout_s``."""
    try:
        reader, writer = await asyncio.open_unix_connection(str(path), limit=LINE_LIMIT)
    except (FileNotFoundError, ConnectionError):
        return GONE
    try:
        writer.write(json.dumps({"op": message.OP.value, "args": encode(message)}).encode() + b"\n")
        async with asyncio.timeout(timeout_s):
            await writer.drain()
            answer = asyncio.ensure_future(reader.readline())
            while True:
                done, _ = await asyncio.wait({answer}, timeout=PING_TIMEOUT_S)
                if done:
                    line = answer.result()
                    break
                if not await ping(path):
                    answer.cancel()
                    raise WorkerUnavailable(f"worker {index} stopped answering during {message.OP.value} (no "
                                            f"answer to a ping within {PING_TIMEOUT_S:g} s)")
    except TimeoutError:
        raise WorkerUnavailable(f"worker {index} did not answer {message.OP.value} within {timeout_s:g} s") from None
    except ConnectionError:
        return GONE
    finally:
        writer.close()
    if not line:   # the worker died while answering: it catches up from the cluster state when replaced
        return GONE
    reply = json.loads(line)
    if not reply["ok"]:
        raise _error(reply["kind"], reply["error"])
    return reply["result"]
