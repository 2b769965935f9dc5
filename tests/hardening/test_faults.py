"""Faults and access control: cancellations and deadlines, run-time model errors, broken model files,
path traversal, TLS / mutual TLS, default bind address."""
from __future__ import annotations

import asyncio
import http.client
import json
import shutil
import ssl
import subprocess
import time
import urllib.error
import urllib.request

import grpc
import numpy as np
import onnx
import pytest
import tritonclient.grpc as tgrpc
from tritonclient.grpc import service_pb2 as tpb
from tritonclient.utils import InferenceServerException

from tests.hardening.conftest import gauges, rss_mb
from tests.server.conftest import ServerProcess, digits_batch

pytestmark = [pytest.mark.hardening, pytest.mark.subprocess]
METHOD = "/inference.GRPCInferenceService/ModelInfer"


def _ginput(x, name="input"):
    i = tgrpc.InferInput(name, list(x.shape), "FP32")
    i.set_data_from_numpy(x)
    return i


def test_cancelled_and_timed_out_requests_leave_nothing_behind(hserver):
    x = digits_batch(32)
    req = tpb.ModelInferRequest(model_name="digits")
    req.inputs.add(name="input", datatype="FP32", shape=list(x.shape))
    req.raw_input_contents.append(x.tobytes())
    payload = req.SerializeToString()
    baseline = rss_mb(hserver.proc.pid)

    async def storm():
        results = {"deadline": 0, "cancelled": 0, "ok": 0}
        async with grpc.aio.insecure_channel(hserver.grpc) as ch:
            call = ch.unary_unary(METHOD, request_serializer=None, response_deserializer=None)

            async def with_deadline():
                try:
                    await call(payload, timeout=0.002)
                    results["ok"] += 1
                except grpc.aio.AioRpcError as exc:
                    assert exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED, exc
                    results["deadline"] += 1

            async def cancelled():
                c = call(payload, timeout=30)
                await asyncio.sleep(0.001)
                c.cancel()
                try:
                    await c
                    results["ok"] += 1
                except asyncio.CancelledError:
                    results["cancelled"] += 1
                except grpc.aio.AioRpcError as exc:
                    assert exc.code() == grpc.StatusCode.CANCELLED
                    results["cancelled"] += 1

            for _ in range(4):
                await asyncio.gather(*([with_deadline() for _ in range(100)] + [cancelled() for _ in range(100)]))
        return results

    results = asyncio.run(storm())
    assert results["deadline"] + results["cancelled"] > 100, results
    deadline = time.time() + 10
    while time.time() < deadline:
        g = gauges(hserver)
        if all(v == 0 for v in g.values()):
            break
        time.sleep(0.1)
    assert all(v == 0 for v in g.values()), f"queue or in-flight did not return to 0: {g}"
    assert rss_mb(hserver.proc.pid) - baseline < 100
    # and the server still answers
    tgrpc.InferenceServerClient(hserver.grpc).infer("digits", [_ginput(digits_batch(2))])


def test_onnxruntime_error_fails_only_that_request(hserver):
    c = tgrpc.InferenceServerClient(hserver.grpc)
    ok = np.ones((2, 4), np.float32)
    assert c.infer("odd", [_ginput(ok, "x")]).as_numpy("y").shape == (1, 8)
    with pytest.raises(InferenceServerException) as info:
        c.infer("odd", [_ginput(np.ones((3, 4), np.float32), "x")])
    assert info.value.status() == "StatusCode.INTERNAL"
    assert info.value.message() == "internal error (see the server log)"  # no internals leak to clients
    assert "Reshape" in hserver.log()  # the detail is in the log
    status, body = _post(hserver, "/v2/models/odd/infer",
                         {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4], "data": [1, 2, 3, 4]}]})
    assert status == 500 and json.loads(body) == {"error": "internal error (see the server log)"}
    assert c.infer("odd", [_ginput(ok, "x")]).as_numpy("y").shape == (1, 8)
    assert c.infer("digits", [_ginput(digits_batch(1))]).as_numpy("output").shape == (1, 10)


def _post(srv, path, doc):
    conn = http.client.HTTPConnection(*srv.http.split(":"), timeout=10)
    conn.request("POST", path, body=json.dumps(doc), headers={"Content-Type": "application/json"})
    r = conn.getresponse()
    return r.status, r.read()


def test_path_traversal_in_model_names_is_refused(hserver):
    c = tgrpc.InferenceServerClient(hserver.grpc)
    for name in ("..", "../digits", "/etc/passwd", "a/b", ".hidden"):
        with pytest.raises(InferenceServerException) as info:
            c.infer(name, [_ginput(digits_batch(1))])
        assert info.value.status() == "StatusCode.INVALID_ARGUMENT", (name, info.value)
        with pytest.raises(InferenceServerException) as info:
            c.load_model(name)
        assert info.value.status() == "StatusCode.INVALID_ARGUMENT", (name, info.value)
    for path in ("/v2/models/%2E%2E/ready", "/v2/models/..%2Fdigits/ready", "/v2/models/.hidden/config"):
        conn = http.client.HTTPConnection(*hserver.http.split(":"), timeout=10)
        conn.request("GET", path)
        r = conn.getresponse()
        assert r.status in (400, 404), (path, r.status)
        assert "error" in json.loads(r.read())
    status, _ = _post(hserver, "/v2/repository/models/..%2F..%2Ftmp/load", {})
    assert status in (400, 404)
    with pytest.raises(InferenceServerException) as info:
        c.infer("digits", [_ginput(digits_batch(1))], model_version="../1")
    assert info.value.status() == "StatusCode.INVALID_ARGUMENT"


def test_broken_model_files_make_only_that_model_unavailable(hardening_repo, tmp_path):
    repo = tmp_path / "repo"
    shutil.copytree(hardening_repo / "digits", repo / "digits")
    shutil.copytree(hardening_repo / "digits", repo / "missing")
    (repo / "missing" / "1" / "model.onnx").unlink()
    shutil.copytree(hardening_repo / "digits", repo / "corrupt")
    (repo / "corrupt" / "1" / "model.onnx").write_bytes(b"\x08\x07" + b"garbage" * 50)
    shutil.copytree(hardening_repo / "digits", repo / "external")
    model = onnx.load(str(repo / "external" / "1" / "model.onnx"))
    t = model.graph.initializer[0]
    t.data_location = onnx.TensorProto.EXTERNAL
    t.ClearField("raw_data")
    t.external_data.add(key="location", value="../../../../etc/passwd")
    onnx.save(model, str(repo / "external" / "1" / "model.onnx"))
    for name in ("missing", "corrupt", "external"):
        cfg = repo / name / "config.pbtxt"
        cfg.write_text(cfg.read_text().replace('name: "digits"', f'name: "{name}"'))
    with ServerProcess(repo) as srv:
        c = tgrpc.InferenceServerClient(srv.grpc)
        # strict readiness (Triton's): the server is not ready while models it was to serve failed, but only the
        # broken ones are unavailable; the sound one is ready and serves
        assert not c.is_server_ready() and c.is_model_ready("digits")
        index = {m["name"]: m for m in c.get_model_repository_index(as_json=True)["models"]}
        assert "model.onnx is missing" in index["missing"]["reason"]
        assert "not a valid ONNX model" in index["corrupt"]["reason"]
        assert "outside the model folder" in index["external"]["reason"]
        for name in ("missing", "corrupt", "external"):
            assert index[name]["state"] == "UNAVAILABLE" and not c.is_model_ready(name)
        c.infer("digits", [_ginput(digits_batch(1))])


def _openssl(*args, cwd):
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    d = tmp_path_factory.mktemp("certs")
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
             "-subj", "/CN=foldserve-test-ca", cwd=d)
    for who in ("server", "client"):
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{who}.key", "-out", f"{who}.csr",
                 "-subj", f"/CN={'localhost' if who == 'server' else 'client'}", cwd=d)
        (d / f"{who}.ext").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
        _openssl("x509", "-req", "-in", f"{who}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
                 "-out", f"{who}.pem", "-days", "2", "-extfile", f"{who}.ext", cwd=d)
    return d


def test_tls_and_mutual_tls(hardening_repo, tmp_path, certs):
    repo = tmp_path / "repo"
    shutil.copytree(hardening_repo / "digits", repo / "digits")
    ca = (certs / "ca.pem").read_bytes()
    with ServerProcess(repo, "--tls-cert", str(certs / "server.pem"), "--tls-key", str(certs / "server.key")) as srv:
        assert srv.info["http"].startswith("https://")
        c = tgrpc.InferenceServerClient(srv.grpc, ssl=True, root_certificates=str(certs / "ca.pem"))
        assert c.is_model_ready("digits")
        c.infer("digits", [_ginput(digits_batch(1))])
        with pytest.raises(InferenceServerException):  # plaintext against a TLS port
            tgrpc.InferenceServerClient(srv.grpc).is_server_live()
        ctx = ssl.create_default_context(cadata=ca.decode())
        with urllib.request.urlopen(f"https://{srv.http}/v2/health/ready", context=ctx, timeout=10) as r:
            assert r.status == 200
    with ServerProcess(repo, "--tls-cert", str(certs / "server.pem"), "--tls-key", str(certs / "server.key"),
                        "--tls-ca", str(certs / "ca.pem")) as srv:
        with_cert = tgrpc.InferenceServerClient(srv.grpc, ssl=True, root_certificates=str(certs / "ca.pem"),
                                                private_key=str(certs / "client.key"),
                                                certificate_chain=str(certs / "client.pem"))
        assert with_cert.is_server_ready()
        without = tgrpc.InferenceServerClient(srv.grpc, ssl=True, root_certificates=str(certs / "ca.pem"))
        with pytest.raises(InferenceServerException):
            without.is_server_ready()
        ctx = ssl.create_default_context(cadata=ca.decode())
        with pytest.raises((ssl.SSLError, urllib.error.URLError, ConnectionError)):
            urllib.request.urlopen(f"https://{srv.http}/v2/health/ready", context=ctx, timeout=10).read()
        ctx.load_cert_chain(str(certs / "client.pem"), str(certs / "client.key"))
        with urllib.request.urlopen(f"https://{srv.http}/v2/health/ready", context=ctx, timeout=10) as r:
            assert r.status == 200


def test_binds_loopback_by_default(hserver):
    from server.settings import Settings

    assert Settings().host == "127.0.0.1"
    assert hserver.info["grpc"].startswith("127.0.0.1:") and "//127.0.0.1:" in hserver.info["http"]


def test_the_supervisor_kills_a_hung_worker_never_a_working_one_and_one_per_round(tmp_path):
    """The heartbeat's decision, on real processes that do not answer its pings: one that uses the CPU all the
    while (a worker busy on a burst or a large request) is left to finish; stopped ones (SIGSTOP: hung) are killed,
    at most one per round. Before, every worker that missed 3 pings was killed, and a burst once took both down."""
    import os
    import signal
    import sys

    from server.settings import Settings
    from server.supervisor import MISSES, Supervisor

    sup = Supervisor(Settings(workers="3", http_port=0, grpc_port=0))
    procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]),               # working
             subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"]),   # hung (stopped below)
             subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])]
    try:
        for slot, proc in zip(sup.slots, procs, strict=True):
            slot.proc = proc
            sup.run.ready(slot.index).write_text(json.dumps({"pid": proc.pid}))   # joined: pinged from now on
        os.kill(procs[1].pid, signal.SIGSTOP)
        os.kill(procs[2].pid, signal.SIGSTOP)
        killed = []
        for _ in range(MISSES + 2):
            time.sleep(0.5)
            killed.append(sup.heartbeat_round())
        assert all(len(k) <= 1 for k in killed), killed                     # never more than one per round
        assert sorted(i for k in killed for i in k) == [1, 2], killed          # both hung ones, in turn
        assert procs[0].poll() is None                                          # the working one is left
    finally:
        sup.stopping = True
        for proc in procs:
            proc.kill()
            proc.wait()
        shutil.rmtree(sup.run.root, ignore_errors=True)
