"""A process's TCP sockets as Linux shows them in /proc: which descriptors are sockets (by inode), and the
kernel's table of TCP connections. Read by the gRPC connection janitor (its own connections) and by the
benchmark (how perf_analyzer's connections are split among workers)."""
from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

ESTABLISHED = "01"


def ip_text(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str:
    """An address as text, an IPv4-mapped IPv6 address as the IPv4 one (a dual-stack socket's peers)."""
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
        return str(ip.ipv4_mapped)
    return str(ip)


def _address(text: str) -> tuple[str, int]:
    """An address of /proc/net/tcp{,6} ("0100007F:1F41": the IP as 32-bit words in host order, the port)."""
    addr, port = text.split(":")
    raw = bytes.fromhex(addr)
    words = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))   # little-endian words
    return ip_text(ipaddress.ip_address(words)), int(port, 16)


@dataclass(frozen=True)
class TcpSocket:
    local: tuple[str, int]
    remote: tuple[str, int]
    state: str              # the kernel's state code: "01" established, "0A" listening, ...
    inode: int


def tcp_sockets(state: str | None = ESTABLISHED) -> list[TcpSocket]:
    """Every TCP socket of this network namespace (IPv4 and IPv6) in ``state`` (None: any)."""
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            f = line.split()
            if len(f) < 10 or (state is not None and f[3] != state):
                continue
            found.append(TcpSocket(_address(f[1]), _address(f[2]), f[3], int(f[9])))
    return found


def socket_descriptors(pid: int | str = "self") -> dict[int, int]:
    """The sockets a process holds: inode -> file descriptor (empty if it cannot be read)."""
    out: dict[int, int] = {}
    fd_dir = Path(f"/proc/{pid}/fd")
    try:
        entries = os.listdir(fd_dir)
    except OSError:
        return out
    for entry in entries:
        try:
            link = os.readlink(fd_dir / entry)
        except OSError:
            continue
        if link.startswith("socket:["):
            out[int(link[8:-1])] = int(entry)
    return out
