"""A server as a real subprocess, shared by the tests and the benchmark: started, waited for until it prints its
ready line, and stopped (SIGTERM, then SIGKILL after a grace period) when the ``with`` block ends.

``FoldserveProcess(repository, *flags)`` starts ``foldserve serve`` on two free ports; ``ServerProcess`` starts
any command (a load generator, a peer server) that prints a line containing a token.
"""
from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import IO, Any

from bench.loadgen import free_port

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


class ServerProcess:
    """A subprocess that is up once it prints a line containing ``ready_token``."""

    def __init__(self, cmd: list[str], ready_token: str, *, timeout: float = 120, env: dict[str, str] | None = None,
                 preexec_fn: Callable[[], Any] | None = None, keep_stderr: bool = True) -> None:
        self.cmd = cmd
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE if keep_stderr else subprocess.DEVNULL, text=True,
                                     cwd=ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
                                     preexec_fn=preexec_fn)
        self.lines: queue.Queue[str] = queue.Queue()
        self.stderr: list[str] = []
        threading.Thread(target=self._pump, args=(self.proc.stdout, self.lines), daemon=True).start()
        if keep_stderr:
            threading.Thread(target=self._pump_err, daemon=True).start()
        self.line = self._wait(ready_token, timeout)
        try:
            self.info: dict[str, Any] = json.loads(self.line) if self.line.startswith("{") else {}
        except ValueError:
            self.info = {}

    def set_ports(self, http_port: int, grpc_port: int) -> None:
        self.http_port, self.grpc_port = http_port, grpc_port
        self.http, self.grpc = f"127.0.0.1:{http_port}", f"127.0.0.1:{grpc_port}"

    @staticmethod
    def _pump(stream: IO[str] | None, q: queue.Queue[str]) -> None:
        for line in stream or ():
            q.put(line)

    def _pump_err(self) -> None:
        for line in self.proc.stderr or ():
            self.stderr.append(line)

    def _wait(self, token: str, timeout: float) -> str:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None and self.lines.empty():
                raise RuntimeError(f"{' '.join(self.cmd[:3])} exited with {self.proc.returncode}:\n"
                                   f"{self.log()[-3000:]}")
            try:
                line = self.lines.get(timeout=0.2)
            except queue.Empty:
                continue
            if token in line:
                return line
        self.stop()
        raise RuntimeError(f"{' '.join(self.cmd[:3])} did not start within {timeout} s:\n{self.log()[-3000:]}")

    def pids(self) -> list[int]:
        """The serving processes: the workers a supervisor reported, else the process itself."""
        return [int(p) for p in self.info.get("pids") or [self.proc.pid]]

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return int(self.proc.returncode)

    def log(self) -> str:
        return "".join(self.stderr)

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


class FoldserveProcess(ServerProcess):
    """``foldserve serve --repository REPO *extra`` on two free ports (``http``/``grpc`` are their HOST:PORT)."""

    def __init__(self, repository: Path, *extra: str, env: dict[str, str] | None = None,
                 preexec_fn: Callable[[], Any] | None = None, timeout: float = 90, log_level: str | None = None) -> None:
        http_port, grpc_port = free_port(), free_port()
        self.set_ports(http_port, grpc_port)
        cmd = [str(BIN / "foldserve"), *(["--log-level", log_level] if log_level else []), "serve", "--repository",
               str(repository), "--http-port", str(http_port), "--grpc-port", str(grpc_port), *extra]
        super().__init__(cmd, '"serving"', timeout=timeout, env=env, preexec_fn=preexec_fn)
