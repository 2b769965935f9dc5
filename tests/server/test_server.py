"""The server as a real process, driven by Triton's own clients (tritonclient.grpc / tritonclient.http)."""
from __future__ import annotations

import concurrent.futures as cf
import json
import shutil
import signal
import threading
import time
import urllib.request

import grpc
import numpy as np
import pytest
import tritonclient.grpc as tgrpc
import tritonclient.http as thttp
from tritonclient.grpc import service_pb2 as tpb
from tritonclient.grpc import service_pb2_grpc as tpb_grpc
from tritonclient.utils import InferenceServerException

from tests.conftest import run_cli
from tests.server.conftest import ServerProcess, digits_batch

pytestmark = pytest.mark.subprocess

MODEL = "digits"


@pytest.fixture(scope="module")
def gclient(server):
    return tgrpc.InferenceServerClient(server.grpc)


@pytest.fixture(scope="module")
def hclient(server):
    return thttp.InferenceServerClient(server.http, concurrency=4)


@pytest.fixture(scope="module")
def raw_stub(server):
    return tpb_grpc.GRPCInferenceServiceStub(grpc.insecure_channel(server.grpc))


def _ginput(x, name="input", dtype="FP32"):
    i = tgrpc.InferInput(name, list(x.shape), dtype)
    i.set_data_from_numpy(x)
    return i


def _hinput(x, binary=True, name="input", dtype="FP32"):
    i = thttp.InferInput(name, list(x.shape), dtype)
    i.set_data_from_numpy(x, binary_data=binary)
    return i


def _http(server, method, path, body=None, headers=None):
    req = urllib.request.Request(f"http://{server.http}{path}", data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, r.read(), dict(r.headers)
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read(), dict(exc.headers)


# --- health, metadata, config, statistics ------------------------------------------------------------

def test_health_and_metadata(gclient, hclient):
    assert gclient.is_server_live() and gclient.is_server_ready() and gclient.is_model_ready(MODEL)
    assert hclient.is_server_live() and hclient.is_server_ready() and hclient.is_model_ready(MODEL)
    meta = gclient.get_server_metadata(as_json=True)
    assert meta["name"] == "foldserve" and "binary_tensor_data" in meta["extensions"]
    m = gclient.get_model_metadata(MODEL, as_json=True)
    assert m["inputs"][0] == {"name": "input", "datatype": "FP32", "shape": ["-1", "1", "8", "8"]}
    hm = hclient.get_model_metadata(MODEL)
    assert hm["outputs"][0]["shape"] == [-1, 10] and hm["versions"] == ["1"]
    assert hm["parameters"]["verification"]["passed"] is True


def test_model_config_as_triton_clients_read_it(gclient, hclient):
    cfg = gclient.get_model_config(MODEL, as_json=True)["config"]
    assert cfg["max_batch_size"] == 64 and cfg["platform"] == "onnxruntime_onnx"
    assert cfg["input"][0]["data_type"] == "TYPE_FP32" and cfg["input"][0]["dims"] == ["1", "8", "8"]
    assert "dynamic_batching" in cfg
    assert cfg["parameters"]["foldserve_verified"]["string_value"] == "true"
    verification = json.loads(cfg["parameters"]["foldserve_verification"]["string_value"])
    assert verification["passed"] and verification["max_abs_error"] < 1e-3
    hcfg = hclient.get_model_config(MODEL)
    assert hcfg["output"][0]["dims"] == ["10"] or hcfg["output"][0]["dims"] == [10]


def test_infer_grpc_and_http_json_and_binary_match_local_onnxruntime(server, gclient, hclient, reference_session):
    x = digits_batch(5, seed=1)
    expected = reference_session.run(None, {"input": x})[0]
    g = gclient.infer(MODEL, [_ginput(x)], request_id="abc")
    np.testing.assert_allclose(g.as_numpy("output"), expected, rtol=1e-5, atol=1e-5)
    assert g.get_response().id == "abc"
    hb = hclient.infer(MODEL, [_hinput(x, True)])  # binary in, binary out (tritonclient's default)
    np.testing.assert_allclose(hb.as_numpy("output"), expected, rtol=1e-5, atol=1e-5)
    hj = hclient.infer(MODEL, [_hinput(x, False)], outputs=[thttp.InferRequestedOutput("output", binary_data=False)])
    np.testing.assert_allclose(hj.as_numpy("output"), expected, rtol=1e-5, atol=1e-5)
    # plain JSON as curl would send it
    body = json.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": [5, 1, 8, 8],
                                   "data": x.tolist()}]}).encode()
    status, payload, _ = _http(server, "POST", f"/v2/models/{MODEL}/infer", body,
                               {"Content-Type": "application/json"})
    assert status == 200
    doc = json.loads(payload)
    np.testing.assert_allclose(np.array(doc["outputs"][0]["data"]).reshape(5, 10), expected, rtol=1e-5, atol=1e-5)


def test_classification_extension(gclient, reference_session):
    x = digits_batch(2, seed=2)
    expected = reference_session.run(None, {"input": x})[0]
    r = gclient.infer(MODEL, [_ginput(x)], outputs=[tgrpc.InferRequestedOutput("output", class_count=3)])
    top = r.as_numpy("output")
    assert top.shape == (2, 3)
    for row, exp in zip(top, expected, strict=False):
        score, idx, label = row[0].decode().split(":")
        assert int(idx) == int(exp.argmax()) and label == str(exp.argmax())


def test_statistics_and_metrics(gclient, hclient, server):
    before = gclient.get_inference_statistics(MODEL, as_json=True)["model_stats"][0]
    gclient.infer(MODEL, [_ginput(digits_batch(4))])
    after = gclient.get_inference_statistics(MODEL, as_json=True)["model_stats"][0]
    assert int(after["inference_count"]) == int(before.get("inference_count", 0)) + 4
    assert int(after["inference_stats"]["success"]["count"]) >= 1
    hs = hclient.get_inference_statistics(MODEL)
    assert hs["model_stats"][0]["name"] == MODEL
    status, text, _ = _http(server, "GET", "/metrics")
    text = text.decode()
    assert status == 200
    from tests.conftest import metric_value

    assert metric_value(text, "foldserve_requests_total", model=MODEL, protocol="grpc", code="OK") >= 1
    assert metric_value(text, "foldserve_request_duration_seconds_count", model=MODEL, protocol="grpc") >= 1
    assert metric_value(text, "foldserve_batch_size_count", model=f"{MODEL}:1") >= 1
    assert metric_value(text, "foldserve_queue_duration_seconds_count", model=f"{MODEL}:1") >= 1
    status, doc, _ = _http(server, "GET", "/openapi.json")
    paths = json.loads(doc)["paths"]
    assert "/v2/models/{model}/infer" in paths and "/v2/repository/index" in paths


def test_grpc_health_and_reflection(server):
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    ch = grpc.insecure_channel(server.grpc)
    resp = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
    assert resp.status == health_pb2.HealthCheckResponse.SERVING
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    stub = reflection_pb2_grpc.ServerReflectionStub(ch)
    reply = next(iter(stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                                                timeout=10)))
    names = {s.name for s in reply.list_services_response.service}
    assert "inference.GRPCInferenceService" in names and "grpc.health.v1.Health" in names


# --- errors ----------------------------------------------------------------------------------------

def _grpc_error(fn) -> InferenceServerException:
    with pytest.raises(InferenceServerException) as info:
        fn()
    return info.value


def test_grpc_error_cases(gclient, raw_stub):
    x = digits_batch(2)
    e = _grpc_error(lambda: gclient.infer("nope", [_ginput(x)]))
    assert e.status() == "StatusCode.NOT_FOUND" and "Request for unknown model: 'nope' is not found" in e.message()
    e = _grpc_error(lambda: gclient.infer(MODEL, [_ginput(x)], model_version="7"))
    assert e.status() == "StatusCode.NOT_FOUND" and "Request for unknown model: 'digits' version 7 is not found" in e.message()
    e = _grpc_error(lambda: gclient.infer(MODEL, [_ginput(x, name="image")]))
    assert e.status() == "StatusCode.INVALID_ARGUMENT" and "unknown input 'image'" in e.message()
    e = _grpc_error(lambda: gclient.infer(MODEL, [_ginput(x.astype(np.float64), dtype="FP64")]))
    assert "datatype FP64, expected FP32" in e.message()
    e = _grpc_error(lambda: gclient.infer(MODEL, [_ginput(np.zeros((2, 8, 8), np.float32))]))
    assert "expected rank 4" in e.message()
    e = _grpc_error(lambda: gclient.infer(MODEL, [_ginput(np.zeros((2, 1, 8, 7), np.float32))]))
    assert "dimension 3 is 7, expected 8" in e.message()
    e = _grpc_error(lambda: gclient.infer(MODEL, [_ginput(np.zeros((65, 1, 8, 8), np.float32))]))
    assert "exceeds the model's max_batch_size 64" in e.message()

    def raw(shape, payloads, n_inputs=1):
        req = tpb.ModelInferRequest(model_name=MODEL)
        for _ in range(n_inputs):
            req.inputs.add(name="input", datatype="FP32", shape=shape)
        req.raw_input_contents.extend(payloads)
        with pytest.raises(grpc.RpcError) as info:
            raw_stub.ModelInfer(req, timeout=10)
        return info.value

    err = raw([2, 1, 8, 8], [b"\0" * 100])
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "input byte size mismatch for input 'input' for model 'digits'. Expected 512, got 100" in err.details()
    err = raw([2, 1, 8, 8], [b"\0" * 512, b"\0" * 512])
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "raw_input_contents has 2 entries for 1 inputs" in err.details()
    err = raw([2**62, 2**62, 8, 8], [b"\0" * 8])  # a shape product far beyond int64: no allocation, clear error
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    err = raw([-1, 1, 8, 8], [b""])
    assert "negative dimension" in err.details()
    # typed contents with the wrong element count
    req = tpb.ModelInferRequest(model_name=MODEL)
    t = req.inputs.add(name="input", datatype="FP32", shape=[1, 1, 8, 8])
    t.contents.fp32_contents.extend([1.0] * 10)
    with pytest.raises(grpc.RpcError) as info:
        raw_stub.ModelInfer(req, timeout=10)
    assert "10 elements of data, shape [1, 1, 8, 8] needs 64" in info.value.details()


def test_http_error_cases(server):
    url = f"/v2/models/{MODEL}/infer"
    status, body, _ = _http(server, "POST", url, b"{not json", {"Content-Type": "application/json"})
    assert status == 400 and "not valid JSON" in json.loads(body)["error"]
    status, body, _ = _http(server, "POST", "/v2/models/nope/infer", b'{"inputs": []}')
    assert status == 404 and "unknown model" in json.loads(body)["error"]
    doc = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 1, 8, 8], "data": [1.0] * 63}]}
    status, body, _ = _http(server, "POST", url, json.dumps(doc).encode())
    assert status == 400 and "63 elements of data" in json.loads(body)["error"]
    header = json.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 1, 8, 8],
                                     "parameters": {"binary_data_size": 256}}]}).encode()
    status, body, _ = _http(server, "POST", url, header + b"\0" * 100,
                            {"Inference-Header-Content-Length": str(len(header))})
    assert status == 400 and "runs past" in json.loads(body)["error"]
    status, body, _ = _http(server, "POST", url, header + b"\0" * 256,
                            {"Inference-Header-Content-Length": str(len(header) + 999)})
    assert status == 400 and "outside the body" in json.loads(body)["error"]
    status, body, _ = _http(server, "GET", "/v2/models/..%2F..%2Fetc/ready")
    assert status in (400, 404)
    status, _, _ = _http(server, "GET", "/v2/models/nope/ready")
    assert status == 404


# --- batching and concurrency ------------------------------------------------------------------------

def test_32_concurrent_clients_each_get_their_own_answer(server, reference_session, gclient):
    before = gclient.get_inference_statistics(MODEL, as_json=True)["model_stats"][0]
    inputs = [digits_batch(1 + i % 3, seed=100 + i) for i in range(32 * 4)]
    expected = [reference_session.run(None, {"input": x})[0] for x in inputs]
    clients = [tgrpc.InferenceServerClient(server.grpc) for _ in range(32)]

    def call(i):
        return clients[i % 32].infer(MODEL, [_ginput(inputs[i])]).as_numpy("output")

    with cf.ThreadPoolExecutor(32) as pool:
        results = list(pool.map(call, range(len(inputs))))
    for got, exp in zip(results, expected, strict=False):
        np.testing.assert_allclose(got, exp, rtol=1e-5, atol=1e-5)
    after = gclient.get_inference_statistics(MODEL, as_json=True)["model_stats"][0]
    requests = int(after["inference_stats"]["success"]["count"]) - int(before["inference_stats"]["success"]["count"])
    executions = int(after["execution_count"]) - int(before["execution_count"])
    assert requests == len(inputs)
    assert executions < requests, "dynamic batching merged no requests"


def test_reload_and_unload_while_requests_flow(server, gclient):
    stop = threading.Event()
    failures: list[str] = []
    done = [0]

    def traffic(model):
        c = tgrpc.InferenceServerClient(server.grpc)
        x = digits_batch(2)
        while not stop.is_set():
            try:
                c.infer(model, [_ginput(x)])
                done[0] += 1
            except InferenceServerException as exc:
                failures.append(str(exc))

    threads = [threading.Thread(target=traffic, args=(MODEL,)) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        time.sleep(0.3)
        for _ in range(3):
            gclient.load_model(MODEL)            # reload under traffic
            gclient.unload_model("digits_b")     # another model comes and goes
            assert not gclient.is_model_ready("digits_b")
            gclient.load_model("digits_b")
            assert gclient.is_model_ready("digits_b")
        time.sleep(0.3)
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert not failures, failures[:3]
    assert done[0] > 20


def test_failed_load_keeps_previous_version_serving_and_index_has_reason(server, gclient):
    model_dir = server.repo / "digits_b"
    good = (model_dir / "1" / "model.onnx").read_bytes()
    try:
        (model_dir / "1" / "model.onnx").write_bytes(b"garbage, not an onnx file")
        with pytest.raises(InferenceServerException) as info:
            gclient.load_model("digits_b")
        assert "not a valid ONNX model" in info.value.message()
        assert gclient.is_model_ready("digits_b")  # the old version keeps serving
        gclient.infer("digits_b", [_ginput(digits_batch(1))])
        index = {m["name"]: m for m in gclient.get_model_repository_index(as_json=True)["models"]}
        assert index["digits_b"]["state"] == "READY"
        # a model whose only version is broken is not ready, with the reason in the index
        shutil.copytree(model_dir, server.repo / "broken")
        cfg = server.repo / "broken" / "config.pbtxt"
        cfg.write_text(cfg.read_text().replace('name: "digits_b"', 'name: "broken"'))
        with pytest.raises(InferenceServerException):
            gclient.load_model("broken")
        index = {m["name"]: m for m in gclient.get_model_repository_index(as_json=True)["models"]}
        assert index["broken"]["state"] == "UNAVAILABLE" and "not a valid ONNX model" in index["broken"]["reason"]
        assert gclient.is_model_ready(MODEL)
    finally:
        (model_dir / "1" / "model.onnx").write_bytes(good)


def test_unverified_version_is_not_served(repository, tmp_path):
    repo = tmp_path / "repo"
    shutil.copytree(repository / "digits", repo / "digits")
    report = json.loads((repo / "digits" / "1" / "verification.json").read_text())
    report["passed"] = False
    report["failure"] = "tampered"
    (repo / "digits" / "1" / "verification.json").write_text(json.dumps(report))
    with ServerProcess(repo) as srv:
        c = tgrpc.InferenceServerClient(srv.grpc)
        assert not c.is_model_ready(MODEL)
        index = c.get_model_repository_index(as_json=True)["models"]
        assert "verification did not pass (tampered)" in index[0]["reason"]
    with ServerProcess(repo, "--allow-unverified") as srv:
        assert tgrpc.InferenceServerClient(srv.grpc).is_model_ready(MODEL)


def test_repository_api_is_off_by_default_and_token_protected(repository, tmp_path):
    repo = tmp_path / "repo"
    shutil.copytree(repository / "digits", repo / "digits")
    with ServerProcess(repo) as srv:
        c = tgrpc.InferenceServerClient(srv.grpc)
        e = _grpc_error(lambda: c.load_model(MODEL))
        assert e.status() == "StatusCode.PERMISSION_DENIED"
    with ServerProcess(repo, "--repository-api", "--admin-token", "s3cret", "--auth-token", "t0k") as srv:
        c = tgrpc.InferenceServerClient(srv.grpc)
        assert _grpc_error(lambda: c.load_model(MODEL)).status() == "StatusCode.UNAUTHENTICATED"
        c.load_model(MODEL, headers={"authorization": "Bearer s3cret"})
        assert _grpc_error(lambda: c.infer(MODEL, [_ginput(digits_batch(1))])).status() == "StatusCode.UNAUTHENTICATED"
        c.infer(MODEL, [_ginput(digits_batch(1))], headers={"authorization": "Bearer t0k"})
        status, _, _ = _http(srv, "POST", f"/v2/models/{MODEL}/infer", b"{}")
        assert status == 401
        # with a token, only health is public: metadata, config, statistics, index, /metrics and /docs need it
        assert c.is_server_live() and c.is_server_ready() and c.is_model_ready(MODEL)
        for call in (c.get_server_metadata, lambda: c.get_model_metadata(MODEL), lambda: c.get_model_config(MODEL),
                     c.get_inference_statistics, c.get_model_repository_index):
            assert _grpc_error(call).status() == "StatusCode.UNAUTHENTICATED"
        assert c.get_model_metadata(MODEL, headers={"authorization": "Bearer t0k"}).name == MODEL
        for path in ("/v2/health/live", "/v2/health/ready", f"/v2/models/{MODEL}/ready"):
            assert _http(srv, "GET", path)[0] == 200, path
        for method, path in (("GET", "/v2"), ("GET", f"/v2/models/{MODEL}"), ("GET", f"/v2/models/{MODEL}/config"),
                             ("GET", "/v2/models/stats"), ("POST", "/v2/repository/index"), ("GET", "/metrics"),
                             ("GET", "/docs"), ("GET", "/openapi.json")):
            assert _http(srv, method, path, b"" if method == "POST" else None)[0] == 401, path
            assert _http(srv, method, path, b"" if method == "POST" else None,
                         {"authorization": "Bearer t0k"})[0] == 200, path
        # two authorization headers (REST used the first, gRPC the last): refused on both transports
        import http.client

        conn = http.client.HTTPConnection(srv.http, timeout=10)
        conn.putrequest("GET", f"/v2/models/{MODEL}")
        conn.putheader("authorization", "Bearer t0k")
        conn.putheader("authorization", "Bearer wrong")
        conn.endheaders()
        r = conn.getresponse()
        assert r.status == 401 and b"2 authorization headers" in r.read()
        conn.close()
        with grpc.insecure_channel(srv.grpc) as ch:
            stub = tpb_grpc.GRPCInferenceServiceStub(ch)
            with pytest.raises(grpc.RpcError) as e:
                stub.ServerMetadata(tpb.ServerMetadataRequest(), metadata=[("authorization", "Bearer wrong"),
                                                                           ("authorization", "Bearer t0k")])
            assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED and "2 authorization" in e.value.details()
    with ServerProcess(repo, "--auth-token", "t0k", "--public-metadata") as srv:
        c = tgrpc.InferenceServerClient(srv.grpc)
        assert c.get_model_metadata(MODEL).name == MODEL and _http(srv, "GET", "/metrics")[0] == 200
        assert _grpc_error(lambda: c.infer(MODEL, [_ginput(digits_batch(1))])).status() == "StatusCode.UNAUTHENTICATED"


@pytest.mark.parametrize("flags,expected", [
    (["--auth-token", ""], "--auth-token is empty"),
    (["--repository-api", "--auth-token", "t0k"], "no --admin-token"),
    (["--tls-ca", "ca.pem"], "--tls-ca (require client certificates) needs --tls-cert"),
    (["--repository-api", "--host", "0.0.0.0"], "--repository-api without --admin-token on 0.0.0.0"),
], ids=["empty-token", "open-repository-api", "ca-without-cert", "open-admin-on-the-network"])
def test_settings_that_would_fail_open_are_refused_at_start(repository, flags, expected):
    proc = run_cli("serve", "--repository", str(repository), "--http-port", "0", "--grpc-port", "0", *flags,
                   timeout=60)
    assert proc.returncode == 2 and expected in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


# --- shutdown, CLI, live verification -----------------------------------------------------------------

def test_sigterm_finishes_in_flight_requests_and_exits_cleanly(repository, tmp_path):
    """Requests that are really in flight when SIGTERM lands (held in the batch queue for 1.5 s) complete OK,
    the server waits for them, refuses new ones, and exits 0."""
    from tests.conftest import metric_value

    repo = tmp_path / "repo"
    shutil.copytree(repository / "digits", repo / "digits")
    srv = ServerProcess(repo, "--grace-period-s", "10", "--max-queue-delay-us", "1500000")
    c = tgrpc.InferenceServerClient(srv.grpc)
    results, errors = [], []

    def call():
        try:
            results.append(c.infer(MODEL, [_ginput(digits_batch(1))]).as_numpy("output"))
        except InferenceServerException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=call) for _ in range(4)]
    for t in threads:
        t.start()
    deadline = time.time() + 5
    while time.time() < deadline:
        _, text, _ = _http(srv, "GET", "/metrics")
        if metric_value(text.decode(), "foldserve_inflight_requests") == 4:
            break
        time.sleep(0.05)
    assert metric_value(text.decode(), "foldserve_inflight_requests") == 4, "the requests were not in flight"
    t0 = time.perf_counter()
    srv.proc.send_signal(signal.SIGTERM)
    time.sleep(0.2)
    with pytest.raises(InferenceServerException) as late:
        c.infer(MODEL, [_ginput(digits_batch(1))])
    assert "UNAVAILABLE" in late.value.status()
    for t in threads:
        t.join(30)
    code = srv.proc.wait(30)
    waited = time.perf_counter() - t0
    assert code == 0, srv.log()[-2000:]
    assert not errors, [e.message() for e in errors]
    assert len(results) == 4 and all(r.shape == (1, 10) for r in results)
    assert waited > 0.8, f"exited {waited:.2f} s after SIGTERM: it did not wait for the queued requests"
    assert "shutting down" in srv.log()


def test_infer_cli_grpc_and_http(server):
    np.save(server.repo / "x.npy", digits_batch(2, seed=9))
    for url in (server.grpc, f"http://{server.http}"):
        proc = run_cli("infer", "--url", url, "--model", MODEL, str(server.repo / "x.npy"), "--top", "2")
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.count("class") == 4 and "sample 1:" in proc.stdout
    from PIL import Image

    Image.fromarray((digits_batch(1, seed=4)[0, 0] * 255 / 16).astype(np.uint8)).resize((32, 32)).save(server.repo / "d.png")
    proc = run_cli("infer", "--url", server.grpc, "--model", MODEL, str(server.repo / "d.png"), "--scale", "0.0627")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("class") == 3 and "sample 0:" in proc.stdout
    proc = run_cli("infer", "--url", server.grpc, "--model", "nope", str(server.repo / "x.npy"))
    assert proc.returncode == 2 and "Request for unknown model: 'nope' is not found" in proc.stderr and len(proc.stderr.splitlines()) == 1


def test_live_verification_against_the_running_server(server):
    proc = run_cli("verify", "--server", server.grpc, "--model", MODEL, str(server.repo / MODEL / "1"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "PASSED" in proc.stdout and "validation" in proc.stdout


@pytest.mark.gpu
def test_cuda_provider_serves_the_same_answers(repository, tmp_path, reference_session):
    import ctypes

    try:
        ctypes.CDLL("libcuda.so.1")
    except OSError:
        pytest.skip("no CUDA driver on this machine")
    repo = tmp_path / "repo"
    shutil.copytree(repository / "digits", repo / "digits")
    with ServerProcess(repo, "--provider", "cuda") as srv:
        c = tgrpc.InferenceServerClient(srv.grpc)
        params = c.get_model_config(MODEL, as_json=True)["config"]["parameters"]
        assert params["foldserve_provider"]["string_value"] == "CUDAExecutionProvider"
        x = digits_batch(8)
        np.testing.assert_allclose(c.infer(MODEL, [_ginput(x)]).as_numpy("output"),
                                   reference_session.run(None, {"input": x})[0], rtol=1e-3, atol=1e-3)


def test_model_stream_infer(server, reference_session):
    import queue as _queue

    results: _queue.Queue = _queue.Queue()
    c = tgrpc.InferenceServerClient(server.grpc)
    c.start_stream(callback=lambda result, error: results.put((result, error)))
    try:
        xs = [digits_batch(1 + i % 2, seed=50 + i) for i in range(5)]
        for i, x in enumerate(xs):
            c.async_stream_infer(MODEL, [_ginput(x)], request_id=str(i))
        c.async_stream_infer("nope", [_ginput(xs[0])], request_id="bad")
        got = {}
        for _ in range(6):
            result, error = results.get(timeout=30)
            if error is not None:
                got["bad"] = error
            else:
                got[result.get_response().id] = result.as_numpy("output")
    finally:
        c.stop_stream()
    for i, x in enumerate(xs):
        np.testing.assert_allclose(got[str(i)], reference_session.run(None, {"input": x})[0], rtol=1e-5, atol=1e-5)
    assert "Request for unknown model: 'nope' is not found" in str(got["bad"])


def test_docs_page_works_offline(server):
    """Swagger UI's page and assets come from the server itself, not a CDN (blank page offline)."""
    status, html, _ = _http(server, "GET", "/docs")
    assert status == 200
    html = html.decode()
    assert "/docs-assets/swagger-ui-bundle.js" in html and "cdn.jsdelivr" not in html and "unpkg" not in html
    status, js, _ = _http(server, "GET", "/docs-assets/swagger-ui-bundle.js")
    assert status == 200 and len(js) > 100_000
    status, css, _ = _http(server, "GET", "/docs-assets/swagger-ui.css")
    assert status == 200 and len(css) > 10_000


def test_infer_prints_probabilities_and_the_raw_scores_on_request(server):
    """A classifier's answer is printed as probabilities (the softmax of its logits, every class counted), and as
    the model's raw scores with --raw; they agree with the output tensor itself."""
    np.save(server.repo / "p.npy", digits_batch(1, seed=5))
    proc = run_cli("infer", "--url", server.grpc, "--model", MODEL, str(server.repo / "p.npy"), "--top", "10")
    raw = run_cli("infer", "--url", server.grpc, "--model", MODEL, str(server.repo / "p.npy"), "--top", "10", "--raw")
    out = run_cli("infer", "--url", server.grpc, "--model", MODEL, str(server.repo / "p.npy"),
                  "--out", str(server.repo / "logits.npy"))
    assert proc.returncode == raw.returncode == out.returncode == 0, proc.stderr + raw.stderr + out.stderr
    logits = np.load(server.repo / "logits.npy")[0].astype(np.float64)
    softmax = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()

    def table(text: str, word: str) -> dict[int, float]:
        rows = [ln.split() for ln in text.splitlines() if f" {word} " in ln]
        return {int(r[r.index("class") + 1]): float(r[r.index(word) + 1]) for r in rows}

    probs, scores = table(proc.stdout, "probability"), table(raw.stdout, "score")
    assert len(probs) == len(scores) == 10 and abs(sum(probs.values()) - 1) < 1e-3
    assert all(abs(probs[c] - softmax[c]) < 1e-4 and abs(scores[c] - logits[c]) < 1e-3 * abs(logits).max()
               for c in range(10))


def test_infer_piped_into_head_exits_when_the_reader_goes_away(server):
    """`foldserve infer ... 2>&1 | head -1` hung forever: the closed pipe raised in print, and the interpreter's
    teardown then waited on the open gRPC channel."""
    import fcntl
    import subprocess

    from tests.conftest import BIN, ROOT

    F_SETPIPE_SZ = 1031             # Linux's fcntl: the pipe's capacity
    np.save(server.repo / "many.npy", digits_batch(64, seed=1))
    proc = subprocess.Popen([str(BIN / "foldserve"), "infer", "--url", server.grpc, "--model", MODEL,
                             str(server.repo / "many.npy"), "--top", "10"], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    fcntl.fcntl(proc.stdout.fileno(), F_SETPIPE_SZ, 4096)   # its ~40 KB of output can no longer fit in the pipe
    assert proc.stdout.readline().startswith(b"sample 0:")
    proc.stdout.close()                                  # what `head -1` does after its line
    assert proc.wait(timeout=60) == 141
