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
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from tests.hardening.conftest import post_json
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


def test_a_stopped_worker_fails_cluster_operations_in_seconds_and_is_replaced(repository, tmp_path):
    """SIGSTOP one of two workers: a repository load fails in seconds (it held the cluster lock for over 100 s,
    its timeout was 600 s), the supervisor's heartbeat kills and replaces the worker within 30 s, and then every
    fresh connection is served again."""
    repo = tmp_path / "repo"
    shutil.copytree(repository / "digits", repo / "digits")
    with ServerProcess(repo, "--workers", "2", "--repository-api") as srv:
        survivor, victim = srv.info["pids"]
        os.kill(victim, signal.SIGSTOP)
        try:
            t0 = time.monotonic()
            try:         # coordinated by the survivor it fails in seconds; on the stopped worker's port it ends
                outcome = post_json(srv.http, "/v2/repository/models/digits/load", timeout=60)[0]   # with that worker
            except OSError as exc:
                outcome = type(exc).__name__
            assert time.monotonic() - t0 < 30, outcome         # not the 600 s load timeout
            deadline = t0 + 30
            while Path(f"/proc/{victim}").exists() and time.monotonic() < deadline:
                time.sleep(0.2)
            assert not Path(f"/proc/{victim}").exists(), srv.log()[-2000:]      # killed by the heartbeat in 30 s
            assert "stopped answering" in srv.log(), srv.log()[-2000:]
        finally:
            if Path(f"/proc/{victim}").exists():
                os.kill(victim, signal.SIGKILL)
        deadline = time.time() + 60
        while len(_listeners(srv.http_port) - {srv.proc.pid}) < 2 and time.time() < deadline:
            time.sleep(0.2)
        assert survivor in _listeners(srv.http_port)
        answers = [_infer(srv.http)[0] for _ in range(12)]
        assert set(answers) == {200}, answers
        assert post_json(srv.http, "/v2/repository/models/digits/load")[0] == 200   # the lock was released
