"""Items 6 and 7 of the third review: workers that hang or drift. A replacement worker serves exactly the versions
and bytes the cluster serves (pinned by SHA-256 in the cluster state) or it does not join; a worker that stops
answering is noticed and replaced."""
from __future__ import annotations

import json
import os
import shutil
import signal
import time
import urllib.error
import urllib.request

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from tests.server.conftest import ServerProcess, digits_batch
from tests.server.test_workers import _listeners

pytestmark = [pytest.mark.hardening, pytest.mark.subprocess]


def _infer(http: str, timeout: float = 10) -> tuple[int, dict]:
    x = digits_batch(1)
    body = json.dumps({"inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32",
                                   "data": x.ravel().tolist()}]}).encode()
    req = urllib.request.Request(f"http://{http}/v2/models/digits/infer", data=body, method="POST",
                                 headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, {"error": exc.read().decode()}


def _replace_worker(srv, victim: int, timeout: float = 60) -> int:
    """SIGKILL ``victim``; the pid of the worker that replaced it, once it listens."""
    os.kill(victim, signal.SIGKILL)
    deadline = time.time() + timeout
    while time.time() < deadline:
        new = _listeners(srv.http_port) - set(srv.info["pids"]) - {srv.proc.pid}
        if new:
            return new.pop()
        time.sleep(0.2)
    raise AssertionError(f"no replacement worker within {timeout} s:\n{srv.log()[-2000:]}")


def test_a_replacement_serves_the_versions_the_cluster_serves_not_a_new_one_on_disk(repository, tmp_path):
    """A version 2 folded next to version 1 (no load call): the replacement still serves version 1 only."""
    repo = tmp_path / "repo"
    shutil.copytree(repository / "digits", repo / "digits")
    with ServerProcess(repo, "--workers", "2") as srv:
        shutil.copytree(repo / "digits" / "1", repo / "digits" / "2")       # verified, newer, not loaded
        _replace_worker(srv, srv.info["pids"][1])
        answers = [_infer(srv.http) for _ in range(12)]                   # fresh connections: both workers
        assert {code for code, _ in answers} == {200}, answers
        assert {doc["model_version"] for _, doc in answers} == {"1"}, answers


def test_a_replacement_that_cannot_load_the_pinned_bytes_does_not_join(repository, tmp_path):
    """model.onnx edited on disk after the cluster loaded it: a replacement cannot serve the pinned bytes, so
    it never takes a connection (no 503s while readiness says 200) and the log says why."""
    repo = tmp_path / "repo"
    shutil.copytree(repository / "digits", repo / "digits")
    with ServerProcess(repo, "--workers", "2") as srv:
        path = repo / "digits" / "1" / "model.onnx"
        m = onnx.load(str(path))
        t = max(m.graph.initializer, key=lambda i: int(np.prod(i.dims)))
        t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t) * 1.5, t.name))
        onnx.save(m, str(path))
        survivor, victim = srv.info["pids"]
        os.kill(victim, signal.SIGKILL)
        deadline = time.time() + 30
        while "does not join" not in srv.log() and time.time() < deadline:
            time.sleep(0.2)
        assert "does not join" in srv.log(), srv.log()[-2000:]
        answers = [_infer(srv.http) for _ in range(12)]
        assert {code for code, _ in answers} == {200}, answers        # only the survivor takes connections
        assert survivor in _listeners(srv.http_port) and srv.proc.poll() is None
