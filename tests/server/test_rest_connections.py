"""How the REST transport's connection protocol (server/rest/protocol.py) closes connections, on a real uvicorn
server with that protocol in this process (the answers come from a trivial ASGI app: the protocol is what is
tested). A connection closed while the kernel still holds bytes of it is *reset*, and the client loses its answer:
CI saw one such ``ConnectionResetError`` in a burst of 5,000 REST requests (tests/hardening/test_burst.py)."""
from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest
import uvicorn

from server.core.admission import Admission
from server.rest import protocol
from server.settings import Settings

REQUEST = b"GET /ok HTTP/1.1\r\nhost: x\r\n\r\n"


async def _app(scope, receive, send) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
    await send({"type": "http.response.body", "body": b"ok"})


@contextmanager
def _server(http: type, **settings) -> Iterator[tuple[int, uvicorn.Server]]:
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(_app, http=http, lifespan="off", log_level="warning", **settings))
    server.install_signal_handlers = lambda: None  # type: ignore[method-assign]
    thread = threading.Thread(target=asyncio.run, args=(server.serve(sockets=[sock]),), daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.01)
    try:
        yield sock.getsockname()[1], server
    finally:
        server.should_exit = True
        thread.join(10)


def _connect(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=10)


def _silent_past_grace(server: uvicorn.Server, n: int) -> None:
    """Wait until the server holds n connections, then past the grace a silent one gets to send."""
    t0 = time.monotonic()
    while len(server.server_state.connections) < n and time.monotonic() - t0 < 10:
        time.sleep(0.01)
    time.sleep(protocol.EVICT_GRACE_S + 0.1)


def _answer(s: socket.socket) -> bytes:
    """Everything the server sends until it closes (a reset raises)."""
    out = b""
    while chunk := s.recv(65536):
        out += chunk
    return out


def _late_loop(cls: type, before: Callable[[], None]) -> type:
    """The protocol, with ``before`` run at the start of each new connection's ``connection_made``: whatever it
    sends reaches the server's kernel in the same turn of the event loop, before the loop reads it, as when the
    loop runs late under a burst."""
    class LateLoop(cls):  # type: ignore[misc, valid-type]
        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            before()
            super().connection_made(transport)
    return LateLoop


def test_a_silent_connection_whose_request_reached_the_kernel_is_not_closed_for_a_new_one(monkeypatch):
    monkeypatch.setattr(protocol, "EVICT_GRACE_S", 0.2)
    sent = threading.Event()
    first: list[socket.socket] = []       # set once the first connection was accepted

    def send_first_request() -> None:     # the first connection's request arrives just as the second connects
        if first and not sent.is_set():
            first[0].sendall(REQUEST)
            time.sleep(0.05)              # delivered to the server's socket (loopback)
            sent.set()

    cls = _late_loop(protocol.protocol_class(Settings(), max_connections=1), send_first_request)
    with _server(cls) as (port, server):
        s = _connect(port)
        _silent_past_grace(server, 1)     # accepted, and silent past the grace: it may be closed to make room...
        first.append(s)
        second = _connect(port)
        answer = first[0].recv(4096)     # ...but its request is there: without the check it was reset here
        assert sent.is_set()
        assert answer.startswith(b"HTTP/1.1 200"), answer
        assert _answer(second).startswith(b"HTTP/1.1 503")    # every connection busy: the new one is refused
        # a connection that is really silent still makes room, and is told why (a 503, then a FIN)
        third = _connect(port)
        _silent_past_grace(server, 1)
        fourth = _connect(port)
        fourth.sendall(REQUEST)
        assert fourth.recv(4096).startswith(b"HTTP/1.1 200")
        assert _answer(third).startswith(b"HTTP/1.1 503")
        for s in (first[0], second, third, fourth):
            s.close()


@pytest.mark.parametrize("refusal", ["431", "429"])
def test_a_refusal_reaches_a_client_still_uploading(refusal):
    """The server answers before the request is complete (headers too large; inference shed before the body is
    read) and then reads and drops the rest: the client finishes its upload and reads the status, instead of
    ``ECONNRESET`` in the middle of it."""
    admission = Admission(limit=0) if refusal == "429" else None          # every inference request is shed
    cls = protocol.protocol_class(Settings(max_header_bytes=4096), max_connections=16, admission=admission)
    if refusal == "431":
        head = b"GET /ok HTTP/1.1\r\nhost: x\r\nx-big: "
    else:
        head = b"POST /v2/models/m/infer HTTP/1.1\r\nhost: x\r\ncontent-length: %d\r\n\r\n" % (8 << 20)
    with _server(cls) as (port, _):
        s = _connect(port)
        s.sendall(head)
        for _ in range(8):
            s.sendall(b"a" * (1 << 20))   # 8 MB more after the server has answered
        s.shutdown(socket.SHUT_WR)
        answer = _answer(s)
        assert answer.startswith(b"HTTP/1.1 " + refusal.encode()), answer[:100]
        assert b"connection: close" in answer
        s.close()
        # the server keeps serving, and a client that neither sends more nor closes is let go after LINGER_S
        s = _connect(port)
        s.sendall(head + b"a" * 8192)
        t0 = time.monotonic()
        assert _answer(s).startswith(b"HTTP/1.1 " + refusal.encode())
        assert time.monotonic() - t0 < protocol.LINGER_S + 5
        s.close()
        ok = _connect(port)
        ok.sendall(REQUEST)
        assert ok.recv(4096).startswith(b"HTTP/1.1 200")
        ok.close()


def test_a_client_closed_to_make_room_reads_why_even_if_it_sends_late(monkeypatch):
    """A client that connected but was slow to send (a starved process under a burst) and was closed at the cap
    for a new connection reads a 503, not a connection closed without an answer ('rest_closed' in the burst)."""
    monkeypatch.setattr(protocol, "EVICT_GRACE_S", 0.2)
    with _server(protocol.protocol_class(Settings(), max_connections=1)) as (port, server):
        slow = _connect(port)
        _silent_past_grace(server, 1)
        new = _connect(port)
        new.sendall(REQUEST)
        assert new.recv(4096).startswith(b"HTTP/1.1 200")
        time.sleep(0.1)
        slow.sendall(REQUEST)             # its request, after it was closed
        answer = _answer(slow)
        assert answer.startswith(b"HTTP/1.1 503") and b"connection limit" in answer, answer
        slow.close()
        new.close()


def test_a_refusal_at_the_cap_reaches_a_client_whose_request_is_already_there():
    """At the cap with every connection busy, the new connection's request has often reached the kernel before
    the loop accepts it (a burst, a late loop): closing with those bytes unread would reset the connection and
    lose the 503. They are read and dropped first, so the close is a FIN after the answer."""

    def late() -> None:
        time.sleep(0.1)                   # the loop runs late: the new client's request arrives meanwhile

    cls = _late_loop(protocol.protocol_class(Settings(), max_connections=1), late)
    with _server(cls) as (port, server):
        busy = _connect(port)
        busy.sendall(b"GET /ok HTTP/1.1\r\nhost: x\r\n")      # a request begun: busy, never idle
        t0 = time.monotonic()
        while len(server.server_state.connections) < 1 and time.monotonic() - t0 < 10:
            time.sleep(0.01)
        time.sleep(0.2)
        for _ in range(5):
            s = _connect(port)
            s.sendall(REQUEST)
            assert _answer(s).startswith(b"HTTP/1.1 503")     # before: ConnectionResetError
            s.close()
        busy.close()


def test_requests_in_the_kernel_when_the_loop_was_late_are_answered_not_timed_out(repository, tmp_path):
    """A server stopped (SIGSTOP: a loop running late) while clients send their requests, past the header timeout:
    on waking, uvloop runs the timeout sweep before it reads, and 100 of 100 connections were closed without an
    answer. A connection whose request is already in the kernel is read and answered."""
    import os
    import shutil
    import signal

    from tests.server.conftest import ServerProcess

    shutil.copytree(repository / "digits", tmp_path / "digits")
    with ServerProcess(tmp_path, "--header-timeout-s", "1") as srv:
        host, port = srv.http.split(":")
        socks = [socket.create_connection((host, int(port)), timeout=10) for _ in range(50)]
        time.sleep(0.3)                                      # every connection accepted, its clock started
        os.kill(srv.proc.pid, signal.SIGSTOP)
        try:
            for s in socks:
                s.sendall(b"GET /v2/health/ready HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
            time.sleep(1.5)                                  # past the header timeout, the loop asleep
        finally:
            os.kill(srv.proc.pid, signal.SIGCONT)
        answers = []
        for s in socks:
            data = b""
            with contextlib.suppress(OSError):
                while chunk := s.recv(4096):
                    data += chunk
            s.close()
            answers.append(data.split(b"\r\n", 1)[0])
        assert answers.count(b"HTTP/1.1 200 OK") == 50, answers[:5]
