"""The peers the benchmark compares against, each set up by the harness itself:

* Seldon MLServer, in its own virtual environment (its FastAPI pin conflicts with ours), serving the same
  ONNX file through a minimal custom runtime, with adaptive batching at the same limits as ours.
* Triton's perf_analyzer (the standard load generator for v2 servers). PyPI's binary needs glibc 2.38,
  newer than Debian 12's, so it runs through the loader and libraries of a Debian trixie root made with
  debootstrap.

Both are cached under ``bench/.cache`` (ignored by git). A peer that cannot be set up is reported as
skipped with the reason, never silently left out.
"""
from __future__ import annotations

import csv
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from bench.loadgen import free_port
from foldserve.procnet import socket_descriptors, tcp_sockets

CACHE = Path(__file__).resolve().parent / ".cache"
MLSERVER_VERSION = "1.7.1"
PERF_ANALYZER_VERSION = "2.60.0"

RUNTIME = '''
import numpy as np
import onnxruntime as ort
from mlserver import MLModel
from mlserver.codecs import NumpyCodec
from mlserver.types import InferenceRequest, InferenceResponse


class OnnxRuntime(MLModel):
    """Minimal MLServer runtime: one onnxruntime session, numpy in and out."""

    async def load(self) -> bool:
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.session = ort.InferenceSession(self.settings.parameters.uri, sess_options=opts,
                                            providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        x = NumpyCodec.decode_input(payload.inputs[0]).astype(np.float32, copy=False)
        y = self.session.run(None, {self.input_name: x})[0]
        return InferenceResponse(model_name=self.name, outputs=[NumpyCodec.encode_output("output", y)])
'''


def _run(cmd: list[str], timeout: float = 900, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)


# --- MLServer ---------------------------------------------------------------------------------------

def ensure_mlserver() -> Path | str:
    """The mlserver executable of our own venv, or the reason it cannot be had."""
    venv = CACHE / "mlserver-venv"
    exe = venv / "bin" / "mlserver"
    if exe.exists():
        return exe
    CACHE.mkdir(parents=True, exist_ok=True)
    r = _run([sys.executable, "-m", "venv", str(venv)])
    if r.returncode != 0:
        return f"venv failed: {r.stderr[-300:]}"
    # uvloop 0.22+ breaks MLServer 1.7's parallel workers ("no current event loop"): pin the last good one
    r = _run([str(venv / "bin" / "pip"), "install", "-q", f"mlserver=={MLSERVER_VERSION}", "onnxruntime==1.31.1",
              "uvloop==0.21.0"])
    if r.returncode != 0 or not exe.exists():
        shutil.rmtree(venv, ignore_errors=True)
        return f"pip install mlserver failed: {r.stderr[-300:]}"
    return exe


class MLServerPeer:
    def __init__(self, exe: Path, model_path: Path, name: str, max_batch_size: int, max_delay_s: float,
                 http_port: int, grpc_port: int, work: Path) -> None:
        root = work / "mlserver"
        mdir = root / name
        mdir.mkdir(parents=True, exist_ok=True)
        (mdir / "peer_runtime.py").write_text(RUNTIME)
        (mdir / "model-settings.json").write_text(json.dumps({
            "name": name, "implementation": "peer_runtime.OnnxRuntime",
            "parameters": {"uri": str(model_path)},
            "max_batch_size": max_batch_size, "max_batch_time": max_delay_s}))
        (root / "settings.json").write_text(json.dumps({
            "http_port": http_port, "grpc_port": grpc_port, "metrics_port": free_port(), "host": "127.0.0.1",
            "debug": False}))
        self.proc = subprocess.Popen([str(exe), "start", str(root)], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL, cwd=root,
                                     env={**os.environ, "PYTHONPATH": str(mdir)})
        deadline = time.time() + 180
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mlserver exited with {self.proc.returncode}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/v2/models/{name}/ready", timeout=1) as r:
                    if r.status == 200:
                        break
            except OSError:
                time.sleep(0.5)
        else:
            self.stop()
            raise RuntimeError("mlserver did not become ready")
        time.sleep(1.0)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()


# --- perf_analyzer ------------------------------------------------------------------------------------

def ensure_perf_analyzer() -> list[str] | str:
    """The command prefix that runs perf_analyzer here, or the reason it cannot be had."""
    pa_dir = CACHE / "perf_analyzer"
    binary = pa_dir / "perf_analyzer" / "bin" / "perf_analyzer"
    root = CACHE / "trixie"
    if not binary.exists():
        pa_dir.mkdir(parents=True, exist_ok=True)
        r = _run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "--platform",
                  "manylinux_2_38_x86_64", f"perf-analyzer=={PERF_ANALYZER_VERSION}", "-d", str(pa_dir)])
        wheels = list(pa_dir.glob("perf_analyzer-*.whl"))
        if r.returncode != 0 or not wheels:
            return f"cannot download perf-analyzer {PERF_ANALYZER_VERSION}: {r.stderr[-300:]}"
        import zipfile

        with zipfile.ZipFile(wheels[0]) as z:
            z.extractall(pa_dir)
        binary.chmod(0o755)
    loader = root / "lib64" / "ld-linux-x86-64.so.2"
    if not loader.exists():
        if os.geteuid() != 0:
            return "perf_analyzer needs glibc 2.38: run the benchmark as root once (it builds a trixie root)"
        if shutil.which("debootstrap") is None:   # as `make test-docker` installs what it needs
            r = _run(["apt-get", "install", "-y", "-q", "debootstrap"], timeout=600,
                     env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
            if r.returncode != 0:
                _run(["apt-get", "update", "-q"], timeout=600)
                r = _run(["apt-get", "install", "-y", "-q", "debootstrap"], timeout=600,
                         env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
            if shutil.which("debootstrap") is None:
                return f"perf_analyzer needs glibc 2.38 and installing debootstrap failed: {r.stderr[-300:]}"
        r = _run(["debootstrap", "--variant=minbase", "--include=libssl3t64,zlib1g", "trixie", str(root)],
                 timeout=1200)
        if r.returncode != 0 or not loader.exists():
            shutil.rmtree(root, ignore_errors=True)
            return f"debootstrap trixie failed: {r.stderr[-300:]}"
    libs = f"{root}/usr/lib/x86_64-linux-gnu:{root}/lib/x86_64-linux-gnu"
    return [str(loader), "--library-path", libs, str(binary)]


def perf_analyzer(cmd: list[str], model: str, grpc_address: str, concurrencies: list[int], work: Path,
                  interval_ms: int = 3000, extra: list[str] | None = None,
                  during: Any = None, server_pids: list[int] | None = None) -> dict[str, Any]:
    """Run perf_analyzer over gRPC at each concurrency; per concurrency: req/s and latencies (ms), the number
    of TCP connections it held to the server and, given the serving pids, how they were split among them
    (counted from /proc half-way through).
    ``during(c)``, if given, runs while the measurement at concurrency ``c`` is under way."""
    result: dict[Any, Any] = {}
    port = int(grpc_address.rsplit(":", 1)[1])
    for c in concurrencies:
        out = work / f"pa-{model}-{c}-{int(time.time() * 1000)}.csv"
        proc = subprocess.Popen([*cmd, "-m", model, "-u", grpc_address, "-i", "grpc", "--concurrency-range",
                                 f"{c}:{c}", "--measurement-interval", str(interval_ms), "--stability-percentage",
                                 "30", "--max-trials", "8", "-f", str(out), *(extra or [])],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        time.sleep(min(3.0, interval_ms / 1000))
        connections = tcp_connections_to(port, proc.pid)
        split = connection_split(port, server_pids) if server_pids else None
        extra_result = during(c) if during is not None else None
        try:
            text, _ = proc.communicate(timeout=1200)
        except subprocess.TimeoutExpired:
            proc.kill()
            text, _ = proc.communicate()
        if proc.returncode != 0 or not out.exists():
            result[c] = {"error": text[-500:]}
            continue
        with open(out) as f:
            row = next(csv.DictReader(f))
        server = server_section(text)
        result[c] = {"throughput": float(row["Inferences/Second"]), "p50_ms": float(row["p50 latency"]) / 1000,
                     "p90_ms": float(row["p90 latency"]) / 1000, "p99_ms": float(row["p99 latency"]) / 1000,
                     "connections": connections, **({"per_worker": split} if split else {}),
                     **({"server": server} if server else {})}
        if extra_result is not None:
            result[c]["profile"] = extra_result
    return result


_SERVER_COUNTS = {"inference_count": "Inference count", "execution_count": "Execution count",
                  "success_count": "Successful request count"}
SERVER_PARTS = ("overhead", "queue", "compute input", "compute infer", "compute output")


def server_section(text: str) -> dict[str, Any] | None:
    """perf_analyzer's "Server:" section of its final measurement (what it read from the statistics
    extension: counts, and the average request latency split into overhead, queue, compute input / infer /
    output, in microseconds), or None when it printed none."""
    start = text.rfind("  Server:")
    if start < 0:
        return None
    block = text[start:].split("\n\n", 1)[0]
    out: dict[str, Any] = {}
    for key, label in _SERVER_COUNTS.items():
        m = re.search(rf"{label}: (\d+)", block)
        if m:
            out[key] = int(m.group(1))
    m = re.search(r"Avg request latency: (\d+) usec", block)
    if m:
        out["avg_request_us"] = int(m.group(1))
    for part in SERVER_PARTS:
        m = re.search(rf"{part} (\d+) usec", block)
        if m:
            out[f"{part.replace(' ', '_')}_us"] = int(m.group(1))
    return out or None


def tcp_connections_to(port: int, pid: int | None = None) -> int:
    """Established TCP connections to ``port`` on this machine, of process ``pid`` only if given (a client's
    connections: the benchmark's own earlier clients may still hold some)."""
    inodes = [t.inode for t in tcp_sockets() if t.remote[1] == port]
    if pid is None:
        return len(inodes)
    mine = socket_descriptors(pid)
    return sum(i in mine for i in inodes)


def connection_split(port: int, pids: list[int]) -> list[int]:
    """How many established connections on the server's ``port`` each serving process holds."""
    inodes = {t.inode for t in tcp_sockets() if t.local[1] == port}
    return [len(inodes & set(socket_descriptors(p))) for p in pids]


def profile(pids: list[int], seconds: float = 4.0) -> dict[str, Any]:
    """Where the server's time goes: py-spy samples every thread of each pid for ``seconds``; returns the
    share of samples per function (own time) and per stage of a request (time inside it), over all pids."""
    exe = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(exe).exists():
        return {"skipped": "py-spy is not installed"}
    stacks: dict[str, int] = {}
    procs = []
    for pid in pids:
        out = Path(tempfile.mkstemp(suffix=".txt")[1])
        procs.append((subprocess.Popen([exe, "record", "-p", str(pid), "-d", str(max(1, round(seconds))), "-r", "250", "-f", "raw",
                                        "-o", str(out), "--nonblocking"], stdout=subprocess.DEVNULL,
                                       stderr=subprocess.PIPE, text=True), out))
    for proc, out in procs:
        try:
            _, err = proc.communicate(timeout=seconds + 60)
        except subprocess.TimeoutExpired:
            proc.kill()
            err = "timed out"
        if proc.returncode != 0 or not out.exists():
            return {"skipped": f"py-spy failed: {err.strip()[-300:]}"}
        for line in out.read_text().splitlines():
            stack, _, count = line.rpartition(" ")
            if stack and count.isdigit():
                stacks[stack] = stacks.get(stack, 0) + int(count)
        out.unlink()
    return summarize_stacks(stacks)


STAGES = {  # a request's stages, by the function that is on the stack while it runs
    "onnxruntime run": ("server/core/runtime.py",),
    "protobuf request -> core": ("request_from_proto",),
    "core -> protobuf response": ("response_to_proto",),
    "validation": ("validate_request",),
    "REST body / JSON codec": ("parse_infer_request", "encode_infer_response", "read_body"),
    "gRPC server (grpc.aio, cython)": ("grpc/_cython", "grpc/aio"),
    "asyncio event loop": ("asyncio/base_events.py", "asyncio/events.py", "uvloop"),
}


def summarize_stacks(stacks: dict[str, int]) -> dict[str, Any]:
    total = sum(stacks.values()) or 1
    own: dict[str, int] = {}
    stages = {k: 0 for k in STAGES}
    for stack, n in stacks.items():
        frames = stack.split(";")
        leaf = frames[-1]
        own[leaf] = own.get(leaf, 0) + n
        for stage, marks in STAGES.items():
            if any(m in f for f in frames for m in marks):
                stages[stage] += n
    top = sorted(own.items(), key=lambda kv: -kv[1])[:12]
    return {"samples": total, "stages_pct": {k: round(100 * v / total, 1) for k, v in stages.items()},
            "top_own_pct": [{"function": k, "pct": round(100 * v / total, 1)} for k, v in top]}
