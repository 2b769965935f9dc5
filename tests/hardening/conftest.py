"""Hardening fixtures: a repository with the digits model plus two synthetic ones (a dynamic-shape model and
one that onnxruntime fails on for odd batch sizes), and helpers to read a server's memory and gauges.

``make test`` runs these short; ``make test-hardening`` sets FOLDSERVE_HARDENING_FULL=1 for the full
60 s overload and the 10,000-case fuzz run.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from foldserve.entry import entry_digests
from tests.server.conftest import ServerProcess

FULL = os.environ.get("FOLDSERVE_HARDENING_FULL") == "1"


def _write_model(repo: Path, name: str, model: onnx.ModelProto, config: str) -> None:
    d = repo / name / "1"
    d.mkdir(parents=True)
    onnx.save(model, str(d / "model.onnx"))
    (repo / name / "config.pbtxt").write_text(config)
    (d / "verification.json").write_text(json.dumps({"passed": True, "candidates": {}, "files": entry_digests(d)}))


def dynamic_model() -> onnx.ModelProto:
    """y = 2 * x for x of shape (N, L), L dynamic: declared shapes decide the size."""
    two = numpy_helper.from_array(np.array(2.0, np.float32), "two")
    g = helper.make_graph([helper.make_node("Mul", ["x", "two"], ["y"])], "dyn",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", "l"])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", "l"])], [two])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m


def odd_failing_model() -> onnx.ModelProto:
    """Reshape (N, 4) -> (-1, 8): onnxruntime raises at run time when N is odd."""
    shape = numpy_helper.from_array(np.array([-1, 8], np.int64), "shape")
    g = helper.make_graph([helper.make_node("Reshape", ["x", "shape"], ["y"])], "odd",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["m", 8])], [shape])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m


@pytest.fixture(scope="module")
def hardening_repo(repository, tmp_path_factory) -> Path:
    repo = tmp_path_factory.mktemp("hardening_repo")
    shutil.copytree(repository / "digits", repo / "digits")
    _write_model(repo, "dynamic", dynamic_model(),
                 'name: "dynamic"\nplatform: "onnxruntime_onnx"\nmax_batch_size: 8\n'
                 'input [ { name: "x" data_type: TYPE_FP32 dims: [ -1 ] } ]\n'
                 'output [ { name: "y" data_type: TYPE_FP32 dims: [ -1 ] } ]\n')
    _write_model(repo, "odd", odd_failing_model(),
                 'name: "odd"\nplatform: "onnxruntime_onnx"\nmax_batch_size: 0\n'
                 'input [ { name: "x" data_type: TYPE_FP32 dims: [ -1, 4 ] } ]\n'
                 'output [ { name: "y" data_type: TYPE_FP32 dims: [ -1, 8 ] } ]\n')
    return repo


@pytest.fixture(scope="module")
def hserver(hardening_repo):
    srv = ServerProcess(hardening_repo, "--repository-api", "--max-request-bytes", str(8 << 20),
                        "--max-elements", str(1 << 20), "--max-queue-size", "64")
    yield srv
    srv.stop()


def post_json(http: str, path: str, doc: dict | bytes | None = None, timeout: float = 60) -> tuple[int, str]:
    """POST a JSON document (or these bytes; ``{}`` by default) to HOST:PORT; (status, body text)."""
    data = doc if isinstance(doc, bytes) else json.dumps(doc if doc is not None else {}).encode()
    req = urllib.request.Request(f"http://{http}{path}", data=data, method="POST",
                                 headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def rss_mb(pid: int) -> float:
    text = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+) kB", text).group(1)) / 1024


def gauges(srv) -> dict[tuple[str, str], float]:
    """The queue-length gauges (per model:version) and the in-flight gauge; fails if either is absent."""
    from tests.conftest import metric_samples

    with urllib.request.urlopen(f"http://{srv.http}/metrics", timeout=10) as r:
        samples = metric_samples(r.read().decode())
    out = {(n, f"{lab.get('model', '')}:{lab.get('version', '')}"): v for n, lab, v in samples
           if n in ("foldserve_queue_length", "foldserve_inflight_requests")}
    assert any(n == "foldserve_queue_length" for n, _ in out), "no foldserve_queue_length gauge in /metrics"
    assert any(n == "foldserve_inflight_requests" for n, _ in out), "no foldserve_inflight_requests gauge"
    return out
