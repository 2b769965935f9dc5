"""The run folder several worker processes share (what the supervisor needs, and nothing heavy: it is used
before any gRPC or onnxruntime object may exist), and the SO_REUSEPORT listening socket.

The folder is private (mode 0700): ``supervisor.pid`` (so that a later start can tell a folder whose supervisor was
killed and remove it), ``state.json`` (the cluster
state, :class:`server.core.cluster_state.ClusterState`), ``cluster.lock``, ``ready/INDEX`` per ready worker,
``up`` once every worker of the first start was ready, ``wINDEX.sock`` (each worker's control socket),
``hINDEX.sock`` (each worker's hand-off socket), ``load`` (the load board: each worker's executions under way,
one signed 64-bit slot per worker, -1 while it takes no hand-offs; see server/core/handoff.py) and ``metrics/``
(prometheus_client's multiprocess files).
"""
from __future__ import annotations

import contextlib
import json
import os
import socket as _socket
import struct
from pathlib import Path

from foldserve.records import read_record, write_record
from server.core.cluster_state import ClusterState

RUN_DIR_ENV = "FOLDSERVE_RUN_DIR"
WORKER_ENV = "FOLDSERVE_WORKER_INDEX"
BOARD_SLOT = struct.Struct("<q")
CLOSED = -1          # a board slot whose worker takes no hand-offs (not ready yet, stopping, dead)


class RunFolder:
    """The files the supervisor and the workers share."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.pid = self.root / "supervisor.pid"
        self.state = self.root / "state.json"
        self.lock = self.root / "cluster.lock"
        self.up = self.root / "up"
        self.metrics = self.root / "metrics"
        self.board = self.root / "load"

    def socket(self, index: int) -> Path:
        return self.root / f"w{index}.sock"

    def handoff(self, index: int) -> Path:
        return self.root / f"h{index}.sock"

    def create_board(self, workers: int) -> None:
        """The load board with every slot closed (before any worker starts)."""
        self.board.write_bytes(BOARD_SLOT.pack(CLOSED) * workers)

    def close_slot(self, index: int) -> None:
        """Close a dead worker's slot (it cannot do it itself): no peer hands it anything more."""
        with contextlib.suppress(OSError), open(self.board, "r+b") as f:
            f.seek(index * BOARD_SLOT.size)
            f.write(BOARD_SLOT.pack(CLOSED))

    def ready(self, index: int) -> Path:
        return self.root / "ready" / str(index)

    def create(self) -> None:
        """The folder's files; the settings (tokens inside) go to each worker's standard input, never here."""
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        (self.root / "ready").mkdir(mode=0o700, exist_ok=True)
        self.metrics.mkdir(mode=0o700, exist_ok=True)
        self.pid.write_text(str(os.getpid()))
        self.write_state(ClusterState())

    def read_state(self) -> ClusterState:
        return read_record(ClusterState, self.state)

    def write_state(self, state: ClusterState) -> None:
        write_record(self.state, state)

    def ready_pid(self, index: int) -> int | None:
        try:
            return int(json.loads(self.ready(index).read_text())["pid"])
        except (OSError, ValueError, KeyError, TypeError):
            return None


PREFIX = "foldserve-run-"


def remove_stale(parent: Path) -> list[Path]:
    """Run folders under ``parent`` left by a supervisor that was killed (its pid is gone), of this user only."""
    import shutil

    removed = []
    for d in Path(parent).glob(f"{PREFIX}*"):
        try:
            if d.is_symlink() or not d.is_dir() or d.stat().st_uid != os.getuid():
                continue
            pid = int((d / "supervisor.pid").read_text())
        except (OSError, ValueError):
            continue                 # not ours to judge (no pid file: being created, or another tool's)
        try:
            os.kill(pid, 0)
            continue                 # its supervisor is alive
        except ProcessLookupError:
            pass
        except PermissionError:
            continue
        shutil.rmtree(d, ignore_errors=True)
        removed.append(d)
    return removed


def reuse_port_socket(host: str, port: int, listen: bool = True) -> _socket.socket:
    """A TCP socket on ``port`` with SO_REUSEPORT, which other workers bind too (the kernel spreads connections
    among the listening ones). ``listen=False`` only holds the port (the supervisor, for a port of 0)."""
    sock = _socket.socket(_socket.AF_INET6 if ":" in host else _socket.AF_INET, _socket.SOCK_STREAM)
    sock.setsockopt(_socket.SOL_SOCKET, _socket.SO_REUSEADDR, 1)
    sock.setsockopt(_socket.SOL_SOCKET, _socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    if listen:
        sock.listen(2048)
        sock.setblocking(False)
    return sock
