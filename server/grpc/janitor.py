"""gRPC connection slots at the cap: idle connections make room for new clients, as on the REST side.

grpc core caps the connections it accepts (``grpc.max_allowed_incoming_connections``) and refuses the rest, but
it cannot close an idle connection to make room, and it keeps a connection that finished its HTTP/2 handshake
and sends nothing until ``max_connection_idle`` (the idle timeout), so that thousands of such connections would
lock every new client out until then. This process's own view closes that gap:

* :class:`PeerActivity` counts, per client address, the calls in flight (fed by every v2 handler and the
  health service: a stream that sends nothing for minutes is not idle);
* :class:`ConnectionJanitor` looks, every ``interval_s`` (0.1 s), at how many file descriptors the process
  holds (one ``stat``); only when they could be near the cap does it list the established TCP connections on the gRPC
  port that this process holds (``/proc/self/fd`` and ``/proc/net/tcp{,6}``). Past ``cap - headroom`` it
  shuts down (``shutdown(SHUT_RDWR)`` on a duplicate of the descriptor, checked to still be that socket)
  enough connections with no call in flight, those idle longest first, idle as the kernel counts it (TCP_INFO's
  time since data was last received; under ``MIN_IDLE_MS`` none is taken, so a client between its connect and
  its first call keeps its connection). grpc core sees the peer gone and frees the slot; a client that was
  only idle reconnects on its next call.

Each serving process (worker) sweeps its own connections (with ``SO_REUSEPORT`` each has its own cap).
"""
from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import socket
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass

from foldserve.procnet import ip_text, socket_descriptors, tcp_sockets

logger = logging.getLogger(__name__)

PeerKey = tuple[str, int]          # (client IP as ipaddress writes it, client port)


def peer_key(peer: str) -> PeerKey | None:
    """grpc's ``context.peer()`` ("ipv4:127.0.0.1:5000", "ipv6:[::1]:5000", "ipv6:%5B::1%5D:5000") as a key."""
    family, _, rest = peer.partition(":")
    if family not in ("ipv4", "ipv6") or ":" not in rest:
        return None
    host, _, port = rest.replace("%5B", "[").replace("%5D", "]").rpartition(":")
    try:
        return _ip(host.strip("[]")), int(port)
    except ValueError:
        return None


def _ip(text: str) -> str:
    return ip_text(ipaddress.ip_address(text))


class PeerActivity:
    """Calls in flight per client, by grpc's peer string as it comes (parsed only when the janitor looks: the
    hot path only counts). Public streams (health Watch: no token needed) are counted apart: a connection that
    holds only those counts as busy for at most ``public_bound`` clients (the oldest), so a flood of them can
    never pin every slot and lock authenticated clients out."""

    def __init__(self, public_bound: int = 0) -> None:
        self.inflight: Counter[str] = Counter()
        self.public: Counter[str] = Counter()
        self.public_bound = public_bound          # 0: no bound (the janitor sets it from the cap)

    @contextlib.contextmanager
    def call(self, context: object, public: bool = False) -> Iterator[None]:
        peer = getattr(context, "peer", None)
        key = peer() if callable(peer) else None
        if not key:
            yield
            return
        counts = self.public if public else self.inflight
        counts[key] += 1
        try:
            yield
        finally:
            counts[key] -= 1
            if counts[key] <= 0:
                del counts[key]

    def busy(self) -> set[PeerKey]:
        """The addresses with a call in flight (the counters are copied in one step: it may be called from the
        janitor's thread); of those with only public streams, the ``public_bound`` oldest."""
        private = list(self.inflight)
        public_only = [k for k in list(self.public) if k not in self.inflight]
        if self.public_bound:
            public_only = public_only[:self.public_bound]
        return {k for k in map(peer_key, private + public_only) if k is not None}


@dataclass(frozen=True)
class Connection:
    fd: int
    inode: int
    peer: PeerKey


def established(port: int) -> list[Connection]:
    """The established TCP connections to local ``port`` that this process holds, with their descriptors."""
    ours = socket_descriptors()
    return [Connection(ours[t.inode], t.inode, t.remote) for t in tcp_sockets()
            if t.local[1] == port and t.inode in ours]


MIN_IDLE_MS = 100           # a connection that received data more recently than this is never taken
_TCP_INFO_LAST_DATA_RECV = 52   # offset of tcpi_last_data_recv (ms) in Linux's struct tcp_info


@contextlib.contextmanager
def _socket_of(conn: Connection) -> Iterator[socket.socket | None]:
    """A socket object on a duplicate of ``conn.fd`` if that descriptor is still ``conn``'s socket (it may have
    been closed, and its number reused, since the listing), else None."""
    try:
        dup = os.dup(conn.fd)
    except OSError:
        yield None
        return
    try:
        if os.fstat(dup).st_ino != conn.inode:
            yield None
            return
        s = socket.socket(fileno=dup)
        try:
            yield s
        finally:
            s.detach()
    finally:
        os.close(dup)


def idle_ms(conn: Connection) -> int | None:
    """Milliseconds since the connection last received data (the kernel's count), or None if it is gone."""
    with _socket_of(conn) as s:
        if s is None:
            return None
        try:
            info = s.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104)
        except OSError:
            return None
        return int.from_bytes(info[_TCP_INFO_LAST_DATA_RECV:_TCP_INFO_LAST_DATA_RECV + 4], "little")


def shut_down(conn: Connection) -> bool:
    """Shut the connection down under grpc core (which then closes it), if ``conn.fd`` is still that socket."""
    with _socket_of(conn) as s:
        if s is None:
            return False
        try:
            s.shutdown(socket.SHUT_RDWR)
            return True
        except OSError:
            return False


def open_descriptors() -> int:
    """How many file descriptors this process holds: one stat (Linux 6.2+ gives the count as the size of
    /proc/self/fd), else a listing."""
    n = os.stat("/proc/self/fd").st_size
    return n if n > 0 else len(os.listdir("/proc/self/fd"))


class ConnectionJanitor:
    """Keeps the gRPC connections this process holds below ``cap - headroom`` by closing idle ones.

    The cheap look (how many descriptors: one system call) runs every ``interval_s``; the full listing (about
    60 ms for 4,096 connections, in a thread of its own, off the event loop) only when that could be near the
    cap, and then every ``interval_s`` while it finds connections to close or to watch or descriptors were
    opened since the last one, else every ``calm_s``."""

    def __init__(self, port: int, cap: int, activity: PeerActivity, interval_s: float = 0.1,
                 calm_s: float = 2.0) -> None:
        self.port, self.cap, self.activity = port, cap, activity
        self.interval_s, self.calm_s = interval_s, calm_s
        self.headroom = max(2, cap // 16)
        # public streams (health Watch) keep at most this many connections busy: past it they are idle ones
        activity.public_bound = max(1, cap - 2 * self.headroom)
        self.closed = 0
        self._busy = False                             # the last full listing closed some: look again soon

    async def run(self) -> None:
        from concurrent.futures import ThreadPoolExecutor

        loop = asyncio.get_running_loop()
        with ThreadPoolExecutor(1, thread_name_prefix="grpc-janitor") as pool:
            last_full, last_count = 0.0, 0
            while True:
                await asyncio.sleep(self.interval_s)
                try:
                    count = open_descriptors()
                    if count < self.cap - self.headroom:   # fewer descriptors than that: nothing to do
                        continue
                    if not self._busy and count <= last_count and time.monotonic() - last_full < self.calm_s:
                        continue                           # nothing closed last time, nothing new since
                    last_full, last_count = time.monotonic(), count
                    await loop.run_in_executor(pool, self.sweep)
                except Exception:  # never let the janitor take the server down
                    logger.exception("gRPC connection sweep failed")

    def sweep(self) -> int:
        """One full look; returns how many connections it closed."""
        conns = established(self.port)
        excess = len(conns) - (self.cap - self.headroom)
        self._busy = False
        if excess <= 0:
            return 0
        idle, young = [], 0
        busy = self.activity.busy()
        for c in conns:
            if c.peer not in busy:
                ms = idle_ms(c)
                if ms is not None and ms >= MIN_IDLE_MS:
                    idle.append((ms, c))
                elif ms is not None:
                    young += 1
        idle.sort(key=lambda mc: -mc[0])
        closed = sum(shut_down(c) for _, c in idle[:excess])
        self._busy = closed > 0 or young > 0       # look again soon: more may go, or the young ones may
        if closed:
            self.closed += closed
            logger.warning("gRPC connections at %d of %d: closed the %d idle longest (%.1f s and more) to make "
                           "room", len(conns), self.cap, closed, idle[min(closed, len(idle)) - 1][0] / 1000)
        return closed
