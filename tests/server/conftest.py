"""Server fixtures: a real repository entry and the server as a real process on free ports.

The test process talks to the server with tritonclient. It never imports our generated stubs
(foldserve.protocol): both define proto package ``inference`` and cannot live in one process.
"""
from __future__ import annotations

import json
import os
import queue
import shutil
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import BIN, ROOT


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    def __init__(self, repository: Path, *extra: str, env: dict | None = None, preexec_fn=None) -> None:
        self.http_port, self.grpc_port = free_port(), free_port()
        self.http = f"127.0.0.1:{self.http_port}"
        self.grpc = f"127.0.0.1:{self.grpc_port}"
        cmd = [str(BIN / "foldserve"), "serve", "--repository", str(repository), "--http-port", str(self.http_port),
               "--grpc-port", str(self.grpc_port), *extra]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}, preexec_fn=preexec_fn)
        self.lines: queue.Queue[str] = queue.Queue()
        self.stderr: list[str] = []
        threading.Thread(target=self._pump, args=(self.proc.stdout, self.lines), daemon=True).start()
        threading.Thread(target=self._pump_err, daemon=True).start()
        self.info = self._wait_serving()

    @staticmethod
    def _pump(stream, q) -> None:
        for line in stream:
            q.put(line)

    def _pump_err(self) -> None:
        for line in self.proc.stderr:
            self.stderr.append(line)

    def _wait_serving(self, timeout: float = 90) -> dict:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{''.join(self.stderr)[-3000:]}")
            try:
                line = self.lines.get(timeout=0.2)
            except queue.Empty:
                continue
            if line.startswith("{") and '"serving"' in line:
                return json.loads(line)
        self.stop()
        raise RuntimeError(f"server did not start within {timeout} s:\n{''.join(self.stderr)[-3000:]}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def log(self) -> str:
        return "".join(self.stderr)


@pytest.fixture(scope="module")
def server(repository, tmp_path_factory):
    repo = tmp_path_factory.mktemp("served")
    shutil.copytree(repository / "digits", repo / "digits")
    shutil.copytree(repository / "digits", repo / "digits_b")
    cfg = (repo / "digits_b" / "config.pbtxt")
    cfg.write_text(cfg.read_text().replace('name: "digits"', 'name: "digits_b"'))
    srv = ServerProcess(repo, "--repository-api")
    srv.repo = repo
    yield srv
    srv.stop()


@pytest.fixture(scope="session")
def reference_session(repository):
    import onnxruntime as ort

    return ort.InferenceSession(str(repository / "digits" / "1" / "model.onnx"), providers=["CPUExecutionProvider"])


def digits_batch(n: int, seed: int = 0) -> np.ndarray:
    return (np.random.default_rng(seed).random((n, 1, 8, 8)) * 16).astype(np.float32)
