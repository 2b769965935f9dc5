"""``foldserve serve --workers 2``: two serving processes on the same ports, supervised, acting as one
server (readiness, repository API, statistics, metrics, shared-memory registrations).

Requests go over fresh connections (urllib opens one per call), so the kernel spreads them over both
workers; 40 of them all landing on one worker has probability 2^-39.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import threading
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import metric_value
from tests.server.conftest import ServerProcess, digits_batch

FRESH = 40


def _post(base: str, path: str, body: dict | None = None, timeout: float = 60) -> tuple[int, dict | str]:
    data = json.dumps(body).encode() if body is not None else b""
    req = urllib.request.Request(f"http://{base}{path}", data=data, method="POST",
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            raw = r.read()
            return r.status, (json.loads(raw) if raw else "")
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def _get(base: str, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://{base}{path}", timeout=30) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def _infer(base: str, model: str = "digits", x: np.ndarray | None = None) -> tuple[int, dict | str]:
    x = digits_batch(1) if x is None else x
    return _post(base, f"/v2/models/{model}/infer", {"inputs": [
        {"name": "input", "datatype": "FP32", "shape": list(x.shape), "data": x.reshape(-1).tolist()}]})


def _listeners(port: int) -> set[int]:
    """Pids with a listening TCP socket on ``port`` (from /proc: no ss/netstat needed)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            f = line.split()
            if int(f[1].split(":")[1], 16) == port and f[3] == "0A":
                inodes.add(f[9])
    pids = set()
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            links = {os.readlink(fd) for fd in (d / "fd").iterdir()}
        except OSError:
            continue
        if any(f"socket:[{i}]" in links for i in inodes):
            pids.add(int(d.name))
    return pids


@pytest.fixture
def cluster_repo(repository, tmp_path):
    repo = tmp_path / "repo"
    shutil.copytree(repository / "digits", repo / "digits")
    shutil.copytree(repository / "digits", repo / "digits_b")
    cfg = repo / "digits_b" / "config.pbtxt"
    cfg.write_text(cfg.read_text().replace('name: "digits"', 'name: "digits_b"'))
    return repo


@pytest.fixture
def cluster(cluster_repo):
    srv = ServerProcess(cluster_repo, "--workers", "2", "--repository-api")
    srv.repo = cluster_repo
    yield srv
    srv.stop()


def test_two_workers_share_both_ports_and_act_as_one(cluster):
    pids = cluster.info["pids"]
    assert cluster.info["workers"] == 2 and len(set(pids)) == 2 and cluster.proc.pid not in pids
    assert _listeners(cluster.http_port) == set(pids)
    assert _listeners(cluster.grpc_port) == set(pids)
    # the supervisor itself imports neither grpc nor onnxruntime
    maps = Path(f"/proc/{cluster.proc.pid}/maps").read_text()
    assert "onnxruntime" not in maps and "cygrpc" not in maps
    assert all(_get(cluster.http, "/v2/health/ready")[0] == 200 for _ in range(10))
    for _ in range(FRESH):
        assert _infer(cluster.http)[0] == 200
    # statistics and metrics are summed over the workers, whichever one answers
    for _ in range(4):
        _, body = _get(cluster.http, "/v2/models/digits/stats")
        assert json.loads(body)["model_stats"][0]["inference_count"] == FRESH
        _, text = _get(cluster.http, "/metrics")
        assert metric_value(text, "foldserve_requests_total", model="digits", protocol="http", code="OK") == FRESH


def test_a_killed_worker_is_replaced_and_clients_retrying_are_served(cluster):
    stop = threading.Event()
    outcomes: list[int] = []

    def client() -> None:
        while not stop.is_set():
            for attempt in range(20):   # a client that retries on a new connection
                try:
                    code, _ = _infer(cluster.http)
                except OSError:
                    time.sleep(0.05)
                    continue
                outcomes.append(code)
                break
            else:
                outcomes.append(-1)

    threads = [threading.Thread(target=client) for _ in range(3)]
    for t in threads:
        t.start()
    time.sleep(1.0)
    victim = cluster.info["pids"][1]
    os.kill(victim, signal.SIGKILL)
    deadline = time.time() + 60
    replaced = None
    while time.time() < deadline and replaced is None:
        pids = _listeners(cluster.http_port)
        new = pids - set(cluster.info["pids"])
        if len(pids) == 2 and new:
            replaced = new.pop()
        time.sleep(0.2)
    time.sleep(1.0)
    stop.set()
    for t in threads:
        t.join(30)
    assert replaced is not None, cluster.log()[-2000:]
    assert "died (signal 9)" in cluster.log()
    assert outcomes and set(outcomes) == {200}, sorted(set(outcomes))
    assert _listeners(cluster.grpc_port) == {cluster.info["pids"][0], replaced}
    # the replacement serves and counts in the statistics like the others
    for _ in range(FRESH):
        assert _infer(cluster.http)[0] == 200


def test_repository_api_reaches_every_worker_under_traffic(cluster):
    stop = threading.Event()
    codes: list[int] = []

    def client() -> None:
        while not stop.is_set():
            codes.append(_infer(cluster.http)[0])

    threads = [threading.Thread(target=client) for _ in range(3)]
    for t in threads:
        t.start()
    try:
        for _ in range(3):
            assert _post(cluster.http, "/v2/repository/models/digits/load")[0] == 200
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    assert len(codes) > 20 and set(codes) == {200}, sorted(set(codes))
    # unload: every worker stops serving it; load: every worker serves it again
    assert _post(cluster.http, "/v2/repository/models/digits_b/unload")[0] == 200
    assert {_infer(cluster.http, "digits_b")[0] for _ in range(FRESH)} <= {503, 404}
    assert _post(cluster.http, "/v2/repository/models/digits_b/load")[0] == 200
    assert {_infer(cluster.http, "digits_b")[0] for _ in range(FRESH)} == {200}


def test_a_load_that_fails_in_any_worker_leaves_the_old_version_everywhere(cluster):
    v2 = cluster.repo / "digits" / "2"
    shutil.copytree(cluster.repo / "digits" / "1", v2)
    data = (v2 / "model.onnx").read_bytes()
    (v2 / "model.onnx").write_bytes(data[: len(data) // 2])     # truncated: fails in every worker
    code, body = _post(cluster.http, "/v2/repository/models/digits/load")
    assert code == 503 and "failed to load" in str(body), body
    versions = {_infer(cluster.http)[1]["model_version"] for _ in range(FRESH)}
    assert versions == {"1"}
    _, index = _post(cluster.http, "/v2/repository/index")
    assert any("reload failed" in m["reason"] for m in index if m["name"] == "digits"), index
    # repaired: the reload reaches both workers, and every connection now gets version 2
    (v2 / "model.onnx").write_bytes(data)
    assert _post(cluster.http, "/v2/repository/models/digits/load")[0] == 200
    assert {_infer(cluster.http)[1]["model_version"] for _ in range(FRESH)} == {"2"}


def test_shared_memory_registrations_are_one_across_workers(cluster):
    shm = pytest.importorskip("tritonclient.utils.shared_memory")
    x = digits_batch(1, seed=5)
    tag = uuid.uuid4().hex[:8]
    handle = shm.create_shared_memory_region("in", f"/foldserve_w_{tag}", x.nbytes)
    try:
        shm.set_shared_memory_region(handle, [x])
        code, _ = _post(cluster.http, f"/v2/systemsharedmemory/region/in_{tag}/register",
                        {"key": f"/foldserve_w_{tag}", "offset": 0, "byte_size": x.nbytes})
        assert code == 200
        body = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 1, 8, 8], "parameters": {
            "shared_memory_region": f"in_{tag}", "shared_memory_byte_size": x.nbytes}}]}
        results = [_post(cluster.http, "/v2/models/digits/infer", body) for _ in range(FRESH)]
        assert {c for c, _ in results} == {200}
        assert len({tuple(np.round(r["outputs"][0]["data"], 5)) for _, r in results}) == 1
        for _ in range(10):
            _, status = _get(cluster.http, "/v2/systemsharedmemory/status")
            assert [r["name"] for r in json.loads(status)] == [f"in_{tag}"]
        assert _post(cluster.http, f"/v2/systemsharedmemory/region/in_{tag}/unregister")[0] == 200
        codes = {_post(cluster.http, "/v2/models/digits/infer", body)[0] for _ in range(FRESH)}
        assert codes == {400}
        for pid in cluster.info["pids"]:
            assert f"foldserve_w_{tag}" not in Path(f"/proc/{pid}/maps").read_text()
    finally:
        shm.destroy_shared_memory_region(handle)


def test_sigterm_drains_every_worker_and_workers_that_keep_dying_never_take_the_server_down(cluster_repo):
    srv = ServerProcess(cluster_repo, "--workers", "2")
    pids = srv.info["pids"]
    assert srv.stop() == 0
    time.sleep(0.5)
    assert not any(Path(f"/proc/{p}").exists() for p in pids)

    # more deaths than the supervisor tolerates in a minute: it reports itself not ready and keeps replacing
    # them (no client can take the server down by killing workers), instead of exiting
    with ServerProcess(cluster_repo, "--workers", "2") as srv:
        killed: set[int] = set()
        deadline = time.time() + 60
        while len(killed) < 7 and time.time() < deadline:
            for pid in _listeners(srv.http_port) - {srv.proc.pid} - killed:
                os.kill(pid, signal.SIGKILL)
                killed.add(pid)
            time.sleep(0.1)
        assert len(killed) >= 7, killed
        assert srv.proc.poll() is None, srv.log()[-2000:]
        deadline, ready, served = time.time() + 60, None, None
        while time.time() < deadline and (ready is None or served is None):
            try:
                ready, served = _get(srv.http, "/v2/health/ready")[0], _infer(srv.http)[0]
            except OSError:              # no replacement listening yet (back-off)
                time.sleep(0.5)
        assert (ready, served) == (503, 200), srv.log()[-2000:]
        assert "workers keep dying" in srv.log() and srv.proc.poll() is None


def test_worker_count_from_flag_environment_and_auto(tmp_path):
    from server.settings import Settings
    from tests.conftest import run_cli

    assert Settings(workers="auto").worker_count() == max(1, (os.cpu_count() or 1) // 2)
    os.environ["FOLDSERVE_WORKERS"] = "3"
    try:
        assert Settings().worker_count() == 3
    finally:
        del os.environ["FOLDSERVE_WORKERS"]
    for bad in ("0", "two", "-1"):
        r = run_cli("serve", "--repository", str(tmp_path), "--workers", bad)
        assert r.returncode == 2 and "--workers" in r.stderr, r.stderr


def test_event_loop_is_uvloop_by_default_and_asyncio_on_request(cluster_repo):
    for flag, expect in ((), True), (("--event-loop", "asyncio"), False):
        with ServerProcess(cluster_repo, *flag) as srv:
            assert _infer(srv.http)[0] == 200
            assert ("uvloop" in Path(f"/proc/{srv.proc.pid}/maps").read_text()) is expect


def test_a_config_override_reaches_every_worker_and_a_replacement(cluster):
    """load_model(name, config=JSON) is a two-phase load like any other: every worker serves the override, and a
    worker that replaces a killed one starts with it (it is in the cluster state) until the next plain load."""
    import tritonclient.http as thttp

    def batch_limits() -> set[int]:
        seen = set()
        for _ in range(FRESH):
            c = thttp.InferenceServerClient(cluster.http)
            seen.add(c.get_model_config("digits")["max_batch_size"])
            c.close()
        return seen

    h = thttp.InferenceServerClient(cluster.http)
    h.load_model("digits", config=json.dumps({"max_batch_size": 16}))
    assert batch_limits() == {16}
    victim = cluster.info["pids"][1]
    os.kill(victim, signal.SIGKILL)
    deadline = time.time() + 60
    while time.time() < deadline:
        pids = _listeners(cluster.http_port)
        if len(pids) == 2 and pids - set(cluster.info["pids"]):
            break
        time.sleep(0.2)
    time.sleep(1.0)
    assert batch_limits() == {16}
    h.load_model("digits")
    assert batch_limits() == {64}
    h.close()


def test_cluster_operations_never_starve_each_other(cluster):
    """16 clients registering a shared-memory key that does not exist, during admin loads: the loads never answered
    and loads, registrations and settings changes hung for 12+ minutes after (blocking file-lock waits filled the
    thread pool the lock holder needed). A registration the worker refuses takes no lock now, and every wait for
    the cluster is bounded: each call is answered, and the cluster works after."""
    from concurrent.futures import ThreadPoolExecutor

    def register(i: int) -> int:
        return _post(cluster.http, f"/v2/systemsharedmemory/region/r{i}/register",
                     {"key": "/foldserve_no_such_key", "offset": 0, "byte_size": 64}, timeout=90)[0]

    def load(_: int) -> int:
        return _post(cluster.http, "/v2/repository/models/digits_b/load", {}, timeout=90)[0]

    with ThreadPoolExecutor(20) as pool:
        loads = [pool.submit(load, i) for i in range(3)]
        registrations = list(pool.map(register, range(16)))
        statuses = [f.result(timeout=120) for f in loads]
    assert set(registrations) == {400}, registrations
    assert set(statuses) <= {200, 503} and 200 in statuses, statuses     # 503: waited past its bound, said so
    assert _post(cluster.http, "/v2/repository/models/digits/load", {}, timeout=60)[0] == 200
    assert _post(cluster.http, "/v2/logging", {"log_info": True}, timeout=30)[0] == 200
    assert _infer(cluster.http)[0] == 200
