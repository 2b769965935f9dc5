"""The peers the benchmark compares against, each set up by the harness itself:

* Seldon MLServer, in its own virtual environment (its FastAPI pin conflicts with ours), serving the same
  ONNX file through a minimal custom runtime, with adaptive batching at the same limits as ours.
* Triton's own front end: PyPI's ``nvidia-pytriton`` bundles tritonserver with its Python backend; a Python
  callable runs onnxruntime (the same session options as our workers) on the same ONNX file, with dynamic
  batching at the entry's limits. Two things it needs here: the Python backend's stub links the system's
  libpython, whose patch level may differ from the venv interpreter's (Debian's 3.11.2 against pyenv's 3.11.7:
  ``RLock._recursion_count`` missing), so the stub is pointed at the interpreter's own library
  (``LD_LIBRARY_PATH``); and PyTriton restricts the statistics API to an access token, which perf_analyzer
  cannot send, so the peer restricts every endpoint but that one.
* Triton's perf_analyzer (the standard load generator for v2 servers). PyPI's binary needs glibc 2.38,
  newer than Debian 12's, so it runs through the loader and libraries of a Debian trixie root made with
  debootstrap.

All are cached under ``bench/.cache`` (ignored by git). A peer that cannot be set up is reported as
skipped with the reason, never silently left out.
"""
from __future__ import annotations

import contextlib
import csv
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from bench.cpu import cpu_seconds, process_tree
from bench.loadgen import free_port
from foldserve.procnet import socket_descriptors, tcp_sockets

CACHE = Path(__file__).resolve().parent / ".cache"
MLSERVER_VERSION = "1.7.1"
PYTRITON_VERSION = "0.7.0"
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


def wait_ready(proc: subprocess.Popen, url: str, timeout_s: float) -> str | None:
    """None once ``url`` answers 200 (and a second more, for the peer's last start-up work); else why not."""
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if proc.poll() is not None:
            return f"exited with {proc.returncode}"
        try:
            with urllib.request.urlopen(url, timeout=1) as r:
                if r.status == 200:
                    time.sleep(1.0)
                    return None
        except OSError:
            time.sleep(0.5)
    return f"did not become ready in {timeout_s:g} s"


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
        why = wait_ready(self.proc, f"http://127.0.0.1:{http_port}/v2/models/{name}/ready", 180)
        if why:
            self.stop()
            raise RuntimeError(f"mlserver {why}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()


# --- PyTriton (tritonserver's front end) ------------------------------------------------------------

PYTRITON_RUNNER = '''
import json
import sys

import numpy as np
import onnxruntime as ort
from pytriton.decorators import batch
from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
from pytriton.triton import Triton, TritonConfig, TritonSecurityConfig

cfg = json.loads(sys.argv[1])
opts = ort.SessionOptions()
opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
if cfg["intra_op_threads"]:
    opts.intra_op_num_threads = cfg["intra_op_threads"]
if cfg["spin"]:
    opts.add_session_config_entry("session.force_spinning_stop", "1")
else:
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
session = ort.InferenceSession(cfg["model"], sess_options=opts, providers=["CPUExecutionProvider"])
input_name = session.get_inputs()[0].name
output_name = session.get_outputs()[0].name


@batch
def infer(**inputs):
    return {output_name: session.run(None, {input_name: inputs[input_name]})[0]}


config = TritonConfig(http_port=cfg["http_port"], grpc_port=cfg["grpc_port"], metrics_port=cfg["metrics_port"],
                      http_address="127.0.0.1", grpc_address="127.0.0.1", log_verbose=0)
# every endpoint restricted as PyTriton's default, but statistics (perf_analyzer reads it, without a token)
security = TritonSecurityConfig(restricted_endpoints=["shared-memory", "model-repository", "trace", "logging"])
with Triton(config=config, security_config=security) as triton:
    triton.bind(model_name=cfg["name"], infer_func=infer,
                inputs=[Tensor(name=input_name, dtype=np.float32, shape=tuple(cfg["input_shape"]))],
                outputs=[Tensor(name=output_name, dtype=np.float32, shape=(-1,))],
                config=ModelConfig(max_batch_size=cfg["max_batch_size"],
                                   batcher=DynamicBatcher(max_queue_delay_microseconds=cfg["max_queue_delay_us"])))
    print("ready", flush=True)
    triton.serve()
'''


def ensure_pytriton() -> Path | str:
    """The python of our PyTriton venv, or the reason it cannot be had (it ships x86-64 Linux wheels only)."""
    venv = CACHE / "pytriton-venv"
    python = venv / "bin" / "python"
    if (venv / ".complete").exists():
        return python
    CACHE.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(venv, ignore_errors=True)
    r = _run([sys.executable, "-m", "venv", str(venv)])
    if r.returncode != 0:
        return f"venv failed: {r.stderr[-300:]}"
    r = _run([str(python), "-m", "pip", "install", "-q", f"nvidia-pytriton=={PYTRITON_VERSION}",
              "onnxruntime==1.31.1"])
    if r.returncode != 0:
        shutil.rmtree(venv, ignore_errors=True)
        return f"pip install nvidia-pytriton=={PYTRITON_VERSION} failed: {r.stderr.strip()[-300:]}"
    (venv / ".complete").touch()
    return python


def interpreter_libdir(python: Path) -> str:
    """Where the venv interpreter's own libpython lives (pyenv and python.org builds ship it shared)."""
    r = _run([str(python), "-c", "import sysconfig; print(sysconfig.get_config_var('LIBDIR'))"], timeout=60)
    return r.stdout.strip()


class PyTritonPeer:
    """tritonserver's front end (through PyTriton) serving ``model_path`` with dynamic batching."""

    def __init__(self, python: Path, model_path: Path, name: str, input_shape: list[int], max_batch_size: int,
                 max_queue_delay_us: int, intra_op_threads: int, spin: bool, work: Path) -> None:
        """``intra_op_threads`` 0: onnxruntime's default; ``spin``: whether idle intra-op threads spin."""
        self.http_port, self.grpc_port = free_port(), free_port()
        cfg = {"model": str(model_path), "name": name, "input_shape": input_shape, "max_batch_size": max_batch_size,
               "max_queue_delay_us": max_queue_delay_us, "intra_op_threads": intra_op_threads, "spin": spin,
               "http_port": self.http_port, "grpc_port": self.grpc_port, "metrics_port": free_port()}
        root = work / "pytriton"
        root.mkdir(parents=True, exist_ok=True)
        (root / "runner.py").write_text(PYTRITON_RUNNER)
        libdir = interpreter_libdir(python)
        env = {**os.environ, "LD_LIBRARY_PATH": ":".join(p for p in (libdir, os.environ.get("LD_LIBRARY_PATH")) if p),
               "PYTRITON_HOME": str(root / "home")}
        self.log = root / "pytriton.log"
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen([str(python), str(root / "runner.py"), json.dumps(cfg)], stdout=log,
                                         stderr=subprocess.STDOUT, cwd=root, env=env, start_new_session=True)
        why = wait_ready(self.proc, f"http://127.0.0.1:{self.http_port}/v2/models/{name}/ready", 240)
        if why:
            self.stop()
            raise RuntimeError(f"PyTriton {why}: {self.log_tail()}")

    def log_tail(self) -> str:
        try:
            return self.log.read_text(errors="replace").strip()[-400:]
        except OSError:
            return ""

    def pids(self) -> list[int]:
        """Every process of the peer: the runner, tritonserver, the Python backend's stub."""
        return process_tree(self.proc.pid)

    def stop(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


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


def perf_analyzer(cmd: list[str], model: str, address: str, concurrencies: list[int], work: Path,
                  interval_ms: int = 3000, extra: list[str] | None = None,
                  during: Any = None, server_pids: list[int] | None = None, protocol: str = "grpc") -> dict[str, Any]:
    """Run perf_analyzer over ``protocol`` (grpc, or http with binary tensors) at each concurrency; per
    concurrency: req/s and latencies (ms), the number of TCP connections it held to the server and, given the
    serving pids, how they were split among them (counted from /proc half-way through), and the serving
    processes' CPU time per request over the same seconds.
    ``during(c)``, if given, runs while the measurement at concurrency ``c`` is under way."""
    result: dict[Any, Any] = {}
    port = int(address.rsplit(":", 1)[1])
    for c in concurrencies:
        out = work / f"pa-{model}-{c}-{int(time.time() * 1000)}.csv"
        proc = subprocess.Popen([*cmd, "-m", model, "-u", address, "-i", protocol, "--concurrency-range",
                                 f"{c}:{c}", "--measurement-interval", str(interval_ms), "--stability-percentage",
                                 "30", "--max-trials", "8", "-f", str(out), *(extra or [])],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        time.sleep(min(3.0, interval_ms / 1000))
        connections = tcp_connections_to(port, proc.pid)
        split = connection_split(port, server_pids) if server_pids else None
        cpu_window = None
        if server_pids:   # the servers' CPU seconds over one measurement interval, while the load is steady
            cpu0, t0 = cpu_seconds(server_pids), time.perf_counter()
            time.sleep(interval_ms / 1000)
            if proc.poll() is None:     # still measuring at the end of the window: it held load throughout
                cpu_window = (cpu_seconds(server_pids) - cpu0, time.perf_counter() - t0)
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
                     **({"cpu_ms_per_request": round(1000 * cpu_window[0] / (cpu_window[1] * float(
                         row["Inferences/Second"])), 3)} if cpu_window and float(row["Inferences/Second"]) else {}),
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
