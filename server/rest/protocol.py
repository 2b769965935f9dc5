"""The HTTP/1.1 connection protocol: uvicorn's httptools protocol with the limits it lacks.

* a cap on open connections (``--max-connections``, below the process's file-descriptor limit). At the cap
  a new connection is served by closing the oldest idle one (no request in flight and none begun: a kept-alive
  connection between requests, or one that sent no byte within ``EVICT_GRACE_S``, which is answered 503
  first), as nginx and HAProxy do; only when every connection is busy does the new one get ``503`` and close
  at once. Held-open idle connections therefore never lock a new client out, and unfinished connections
  cannot exhaust the fds;
* a header size limit (``--max-header-bytes``, ``431``): bytes are fed to the parser only up to the limit
  while a request's headers are incomplete, so a 100 MB header is never buffered;
* a header timeout (``--header-timeout-s``, ``408``, like nginx's ``client_header_timeout``): a request's
  headers (and a new connection's first request) must arrive within it, so slowly dripped headers or
  connections that send nothing are closed (checked by one sweep over the connections every fifth of the
  timeout, at most every 0.5 s, rather than a timer per request);
* idle keep-alive connections are closed after ``--idle-timeout-s`` (uvicorn's ``timeout_keep_alive``);
* a refusal (``408``, ``429``, ``431``) is a *lingering close*, as nginx's ``lingering_close``: the answer, then
  a FIN, then what the client still sends is read and dropped until it closes (at most ``LINGER_S``). Closing a
  socket with unread bytes sends a reset instead of a FIN, and a client still uploading its body, or whose
  answer sits unread in its kernel, then sees ``ECONNRESET`` instead of the status (RFC 9112 section 9.6).
  The ``503`` at the connection cap closes at once (there the descriptor matters more), after reading and
  dropping what the client has already sent, so that the close is a FIN and not a reset;
* a connection counts as silent only while the kernel holds no byte of it either: when the event loop runs
  late, a request may have arrived but not yet been read, and closing that connection would reset it.

The body has its own limit and timeout in :func:`server.rest.routes.read_body` (``--body-timeout-s``).
"""
from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import struct
import termios
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from server.core.admission import Admission
from server.settings import Settings

EVICT_GRACE_S = 1.0       # a silent new connection is not closed for another before it had this long to send
LINGER_S = 2.0            # after a refusal, what the client still sends is dropped this long at most
REASONS = {408: b"Request Timeout", 429: b"Too Many Requests", 431: b"Request Header Fields Too Large",
           503: b"Service Unavailable"}


class GuardedHttpProtocol(HttpToolsProtocol):
    max_connections = 4096
    max_header_bytes = 16 * 1024
    header_timeout_s = 10.0
    admission: Admission | None = None       # the REST transport's: inference is shed before routing when full

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self._refused = False              # answered with a refusal: this connection takes no more requests
        self._linger: asyncio.TimerHandle | None = None
        self._header_bytes = 0
        self._in_headers = True
        super().connection_made(transport)
        self._header_started = self.loop.time()
        idle = self._idle_sets()
        if len(self.connections) > self.max_connections:
            victim = self._oldest_idle(idle)
            if victim is None:
                self._refuse(503, f"the server is at its connection limit ({self.max_connections}) with every "
                                  f"connection busy; retry later", linger=False)
                return
            victim._make_room(self.max_connections)
        idle[0][self] = self._header_started
        self._schedule_sweep()

    # Idle connections in two insertion-ordered sets per server (oldest first), so that finding the one to close
    # at the cap costs O(1) even when thousands of connections arrive at once: kept alive after a response (any
    # may go), and silent since they were accepted (they may go only after EVICT_GRACE_S: a connection accepted a
    # moment ago has not had time to send its request).
    def _idle_sets(self) -> tuple[dict[GuardedHttpProtocol, float], dict[GuardedHttpProtocol, float]]:
        state = self.server_state
        sets = getattr(state, "_foldserve_idle", None)
        if sets is None:
            sets = state._foldserve_idle = ({}, {})  # type: ignore[attr-defined]
        return sets  # type: ignore[no-any-return]

    def _oldest_idle(self, idle: tuple[dict[GuardedHttpProtocol, float], dict[GuardedHttpProtocol, float]]
                     ) -> GuardedHttpProtocol | None:
        silent, kept = idle
        for pool, grace in ((kept, None), (silent, EVICT_GRACE_S)):
            while pool:
                conn, since = next(iter(pool.items()))
                if grace is not None and self.loop.time() - since <= grace:
                    break                    # the rest of this set is newer still
                if conn._refused or not unread_bytes(conn.transport):
                    return conn
                del pool[conn]   # its next request reached the kernel but not yet the loop: busy, not idle
        return None

    def _make_room(self, cap: int) -> None:
        """Closed for a new connection at the cap. A kept-alive connection is just closed (a FIN: clients check a
        pooled connection before they reuse it, as nginx's reuse of keep-alive connections relies on); one that
        never sent a request is told why first, so that a client slow to send (a starved process, a slow link)
        reads a 503 instead of a connection closed without an answer."""
        kept = self in self._idle_sets()[1]
        self._not_idle()
        if kept or self._refused:
            self.transport.close()
        else:
            self._refuse(503, f"the server is at its connection limit ({cap}) and this connection sent no request "
                              f"within {EVICT_GRACE_S:g} s; it was closed to make room", linger=False)

    def _not_idle(self) -> None:
        silent, kept = self._idle_sets()
        silent.pop(self, None)
        kept.pop(self, None)

    def on_response_complete(self) -> None:
        self._not_idle()
        self._idle_sets()[1][self] = self.loop.time()     # kept alive: the newest idle connection
        super().on_response_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        # asyncio closes the socket right after this: bytes of it the loop has not read would make the kernel
        # send a reset instead of the answer and a FIN (a request that arrived while this one was refused)
        drain_unread(self.transport)
        self._not_idle()
        if self._linger is not None:
            self._linger.cancel()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return                           # a refused request's remainder: dropped
        if self._in_headers:
            room = self.max_header_bytes - self._header_bytes
            if len(data) > room:
                head, rest = data[:max(room, 0)], data[max(room, 0):]
                self._header_bytes += len(head)
                if head:
                    super().data_received(head)
                if self._in_headers and not self.transport.is_closing():
                    self._refuse(431, f"request headers exceed {self.max_header_bytes} bytes (--max-header-bytes)")
                    return
                if rest and not self.transport.is_closing():
                    self.data_received(rest)
                return
            self._header_bytes += len(data)
        super().data_received(data)

    def on_message_begin(self) -> None:
        if self._refused:
            return
        self._not_idle()                     # a request begun: busy until its response is complete
        super().on_message_begin()
        if not self._in_headers:            # the next request on a kept-alive connection
            self._in_headers, self._header_bytes = True, 0
            self._header_started = self.loop.time()

    def on_headers_complete(self) -> None:
        if self._refused:
            return
        self._in_headers = False
        why = self.admission.refusal() if self.admission is not None else None
        if why and self.parser.get_method() == b"POST" and self.url.split(b"?", 1)[0].endswith(b"/infer") \
                and not self._answering():   # a pipelined request behind an answer is queued by uvicorn
            self._refuse(429, why)           # shed before routing, parsing or reading the body
            return
        super().on_headers_complete()

    def on_body(self, body: bytes) -> None:
        if not self._refused:
            super().on_body(body)

    def on_message_complete(self) -> None:
        if not self._refused:
            super().on_message_complete()

    # One sweep per server every fraction of the timeout instead of a timer per request (cheaper at high rates).
    def _schedule_sweep(self) -> None:
        state = self.server_state
        if getattr(state, "_foldserve_sweep", None) is None:
            interval = min(0.5, self.header_timeout_s / 5)
            state._foldserve_sweep = self.loop.call_later(interval, self._sweep, state, interval)  # type: ignore[attr-defined]

    def _sweep(self, state: Any, interval: float) -> None:
        now = self.loop.time()
        for conn in list(state.connections):
            if isinstance(conn, GuardedHttpProtocol) and conn._in_headers and \
                    now - conn._header_started > conn.header_timeout_s and not conn.transport.is_closing() \
                    and not conn._answering() and not unread_bytes(conn.transport):
                # bytes in the kernel arrived before this late sweep (uvloop runs timers before it polls): they are
                # read first, and the request is answered
                conn._header_timeout()
        state._foldserve_sweep = self.loop.call_later(interval, self._sweep, state, interval)

    def _header_timeout(self) -> None:
        if self._header_bytes == 0 and self.cycle is None:
            self.transport.close()          # a connection that never sent anything: just close it
            return
        self._refuse(408, f"request headers did not arrive within {self.header_timeout_s:g} s (--header-timeout-s)")

    def _answering(self) -> bool:
        return self.cycle is not None and not self.cycle.response_complete

    def _refuse(self, status: int, message: str, linger: bool = True) -> None:
        self._refused, self._in_headers = True, False
        self._not_idle()
        if self._answering():                # a pipelined request: an answer here would cut into the one under way
            self.transport.close()
            return
        body = ('{"error":"' + message.replace('"', "'") + '"}').encode()
        self.transport.write(b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n"
                             b"connection: close\r\n\r\n" % (status, REASONS[status], len(body)) + body)
        if not linger or not self.transport.can_write_eof():
            self.transport.close()
            return
        self.transport.write_eof()           # the answer and a FIN; the client's EOF then closes (eof_received)
        self._linger = self.loop.call_later(LINGER_S, self.transport.close)
        self._idle_sets()[1][self] = self.loop.time()      # answered: the first to go at the cap


def unread_bytes(transport: asyncio.BaseTransport) -> int:
    """Bytes the kernel holds for this connection that the event loop has not read yet (FIONREAD)."""
    sock = transport.get_extra_info("socket")
    if sock is None:
        return 0
    try:
        return int(struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.FIONREAD, b"\0\0\0\0"))[0])
    except OSError:
        return 0


def drain_unread(transport: asyncio.BaseTransport, limit: int = 1 << 22) -> None:
    """Read and drop what the kernel holds for this connection (at most ``limit`` bytes, without waiting)."""
    sock = transport.get_extra_info("socket")
    if sock is None or not unread_bytes(transport):
        return
    fd, dropped = sock.fileno(), 0
    with contextlib.suppress(OSError):           # BlockingIOError once it is empty; a reset; a closed socket
        while dropped < limit and (chunk := os.read(fd, 1 << 16)):
            dropped += len(chunk)


def protocol_class(settings: Settings, max_connections: int,
                   admission: Admission | None = None) -> type[GuardedHttpProtocol]:
    """The protocol class with this server's limits (uvicorn instantiates it per connection)."""
    attrs: dict[str, Any] = {"max_connections": max_connections, "max_header_bytes": settings.max_header_bytes,
                             "header_timeout_s": settings.header_timeout_s, "admission": admission}
    return type("FoldserveHttpProtocol", (GuardedHttpProtocol,), attrs)
