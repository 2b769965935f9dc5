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
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

from bench.loadgen import free_port

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
        if shutil.which("debootstrap") is None or os.geteuid() != 0:
            return "perf_analyzer needs glibc 2.38: run as root with debootstrap installed to build a trixie root"
        r = _run(["debootstrap", "--variant=minbase", "--include=libssl3t64,zlib1g", "trixie", str(root)],
                 timeout=1200)
        if r.returncode != 0 or not loader.exists():
            shutil.rmtree(root, ignore_errors=True)
            return f"debootstrap trixie failed: {r.stderr[-300:]}"
    libs = f"{root}/usr/lib/x86_64-linux-gnu:{root}/lib/x86_64-linux-gnu"
    return [str(loader), "--library-path", libs, str(binary)]


def perf_analyzer(cmd: list[str], model: str, grpc_address: str, concurrencies: list[int], work: Path,
                  interval_ms: int = 3000) -> dict[str, Any]:
    """Run perf_analyzer over gRPC at each concurrency; per concurrency: req/s and latencies (ms)."""
    result: dict[Any, Any] = {}
    for c in concurrencies:
        out = work / f"pa-{model}-{c}-{int(time.time() * 1000)}.csv"
        r = _run([*cmd, "-m", model, "-u", grpc_address, "-i", "grpc", "--concurrency-range", f"{c}:{c}",
                  "--measurement-interval", str(interval_ms), "--stability-percentage", "30",
                  "--max-trials", "12", "-f", str(out)], timeout=1200)
        if r.returncode != 0 or not out.exists():
            result[c] = {"error": (r.stdout + r.stderr)[-500:]}
            continue
        with open(out) as f:
            row = next(csv.DictReader(f))
        result[c] = {"throughput": float(row["Inferences/Second"]), "p50_ms": float(row["p50 latency"]) / 1000,
                     "p90_ms": float(row["p90 latency"]) / 1000, "p99_ms": float(row["p99 latency"]) / 1000}
    return result
