"""Triton conformance (issue 25), each behaviour through tritonclient or raw HTTP: CUDA shared-memory calls on a
server that offers none (tritonclient's system-shm examples begin with unregister_cuda_shared_memory()), the same
output requested twice, a manually chunked request body."""
from __future__ import annotations

import http.client
import json

import numpy as np
import pytest
import tritonclient.grpc as tgrpc
import tritonclient.http as thttp
from tritonclient.utils import InferenceServerException

from tests.server.conftest import digits_batch

pytestmark = pytest.mark.subprocess


def test_cuda_shared_memory_lists_nothing_unregisters_and_refuses_register_on_both_transports(server):
    g = tgrpc.InferenceServerClient(server.grpc)
    h = thttp.InferenceServerClient(server.http)
    try:
        g.unregister_cuda_shared_memory()               # all, then one: both succeed with nothing registered
        g.unregister_cuda_shared_memory("region0")
        h.unregister_cuda_shared_memory()
        h.unregister_cuda_shared_memory("region0")
        assert list(g.get_cuda_shared_memory_status().regions) == []
        assert h.get_cuda_shared_memory_status() == []
        for client in (g, h):
            with pytest.raises(InferenceServerException, match="failed to register CUDA shared-memory region") as e:
                client.register_cuda_shared_memory("r", b"\0" * 64, 0, 64)
            assert "system shared memory" in str(e.value)
        with pytest.raises(InferenceServerException, match="'nope' is not registered"):
            g.get_cuda_shared_memory_status("nope")
        # the system shared-memory calls that follow in tritonclient's examples still work
        g.unregister_system_shared_memory()
        assert list(g.get_system_shared_memory_status().regions) == []
    finally:
        g.close()
        h.close()


def _raw_post(address: str, path: str, body: bytes, headers: dict[str, str]) -> tuple[int, dict]:
    host, port = address.rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        conn.putrequest("POST", path)
        for k, v in headers.items():
            conn.putheader(k, v)
        conn.endheaders()
        conn.send(body)
        r = conn.getresponse()
        return r.status, json.loads(r.read() or b"{}")
    finally:
        conn.close()


def _infer_doc(outputs: list[str]) -> dict:
    x = digits_batch(1)
    return {"inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}],
            "outputs": [{"name": o} for o in outputs]}


def test_the_same_output_requested_twice_is_a_400_naming_it(server):
    body = json.dumps(_infer_doc(["output", "output"])).encode()
    status, doc = _raw_post(server.http, "/v2/models/digits/infer", body,
                            {"Content-Type": "application/json", "Content-Length": str(len(body))})
    assert status == 400 and "output 'output' already exists in request" in doc["error"]
    g = tgrpc.InferenceServerClient(server.grpc)
    try:
        x = digits_batch(1)
        inp = tgrpc.InferInput("input", list(x.shape), "FP32")
        inp.set_data_from_numpy(x)
        with pytest.raises(InferenceServerException, match="already exists in request") as e:
            g.infer("digits", [inp], outputs=[tgrpc.InferRequestedOutput("output")] * 2)
        assert e.value.status() == "StatusCode.INVALID_ARGUMENT"
    finally:
        g.close()


def test_a_manually_chunked_body_is_read(server):
    body = json.dumps(_infer_doc(["output"])).encode()
    chunked = b"".join(f"{len(body[i:i + 100]):x}\r\n".encode() + body[i:i + 100] + b"\r\n"
                       for i in range(0, len(body), 100)) + b"0\r\n\r\n"
    status, doc = _raw_post(server.http, "/v2/models/digits/infer", chunked,
                            {"Content-Type": "application/json", "Transfer-Encoding": "chunked"})
    assert status == 200, doc
    assert np.asarray(doc["outputs"][0]["data"]).size == 10


def _raw_infer(address: str, body: bytes) -> tuple[int, dict[str, str], bytes]:
    host, port = address.rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        conn.request("POST", "/v2/models/digits/infer", body=body,
                     headers={"Inference-Header-Content-Length": "0", "Content-Type": "application/octet-stream"})
        r = conn.getresponse()
        return r.status, dict(r.getheaders()), r.read()
    finally:
        conn.close()


def test_a_raw_binary_request_is_the_one_inputs_bytes_and_answers_in_binary(server):
    """Inference-Header-Content-Length: 0: the body is the input's raw bytes (batch 1), every output comes back
    as binary; the answer equals the JSON request's."""
    x = digits_batch(1)
    status, headers, payload = _raw_infer(server.http, x.tobytes())
    assert status == 200, payload[:300]
    n = int({k.lower(): v for k, v in headers.items()}["inference-header-content-length"])
    doc = json.loads(payload[:n])
    out = doc["outputs"][0]
    assert out["shape"] == [1, 10] and out["parameters"]["binary_data_size"] == 40
    raw = np.frombuffer(payload[n:n + 40], dtype=np.float32)
    body = json.dumps(_infer_doc(["output"])).encode()
    status, js = _raw_post(server.http, "/v2/models/digits/infer", body,
                           {"Content-Type": "application/json", "Content-Length": str(len(body))})
    np.testing.assert_allclose(raw, np.asarray(js["outputs"][0]["data"], np.float32), rtol=1e-6)
    status, _, payload = _raw_infer(server.http, x.tobytes()[:-4])
    assert status == 400 and b"does not fill input 'input'" in payload


def test_raw_binary_requests_that_cannot_be_deduced_are_named():
    from foldserve.model_config import TensorSpec
    from server.core.types import ModelSpec
    from server.rest.codec import parse_raw_request

    def spec(inputs: list[TensorSpec]) -> ModelSpec:
        return ModelSpec("m", "onnxruntime_onnx", 8, inputs, [TensorSpec("y", "FP32", (3,))], None, {})

    two = spec([TensorSpec("a", "FP32", (3,)), TensorSpec("b", "FP32", (3,))])
    with pytest.raises(Exception, match=r"Raw request must only have 1 input \(found 1\) to be deduced but got 2"):
        parse_raw_request("m", "", b"\0" * 24, two)
    with pytest.raises(Exception, match="more than one variable-sized dimension"):
        parse_raw_request("m", "", b"\0" * 24, spec([TensorSpec("a", "FP32", (-1, -1))]))
    req = parse_raw_request("m", "", b"\0" * 24, spec([TensorSpec("a", "FP32", (2, -1))]))
    assert req.inputs[0].shape == [1, 2, 3] and req.parameters["binary_data_output"] is True


def test_load_with_a_config_override_applies_it_until_the_next_plain_load(server):
    """Triton's repository extension: load_model(name, config=JSON) (what Model Analyzer does)."""
    h = thttp.InferenceServerClient(server.http)
    g = tgrpc.InferenceServerClient(server.grpc)
    try:
        assert h.get_model_config("digits")["max_batch_size"] == 64
        h.load_model("digits", config=json.dumps({"max_batch_size": 16, "dynamic_batching": {}}))
        assert h.get_model_config("digits")["max_batch_size"] == 16
        assert int(g.get_model_config("digits", as_json=True)["config"]["max_batch_size"]) == 16
        x = digits_batch(20)                                   # past the override's batch limit now
        inp = thttp.InferInput("input", list(x.shape), "FP32")
        inp.set_data_from_numpy(x)
        with pytest.raises(InferenceServerException, match="16"):
            h.infer("digits", [inp])
        h.load_model("digits")                                 # a plain load: config.pbtxt again
        assert h.get_model_config("digits")["max_batch_size"] == 64
        g.load_model("digits", config=json.dumps({"max_batch_size": 8}))
        assert h.get_model_config("digits")["max_batch_size"] == 8
        for bad, words in (('{"max_batch_size": "many"}', "failed to load 'digits': config override is not a "
                                                          "ModelConfig in JSON"),
                           ('{"no_such_field": 1}', "is not a ModelConfig in JSON"),
                           ('{"max_batch_size": 0}', "changes the verified interface"),
                           ('{"input": [{"name": "image", "data_type": "TYPE_FP32", "dims": [1, 8, 8]}]}',
                            "changes the verified interface"),
                           ("not json", "is not a ModelConfig in JSON"),
                           ('{"max_batch_size": 8, "instance_group": [{"count": 20000}]}', "instance_group count 20000 is more than"),
                           ('{"max_batch_size": 8, "dynamic_batching": {"max_queue_delay_microseconds": '
                            '"18446744073709551615"}}', "max_queue_delay_microseconds 18446744073709551615")):
            for client in (h, g):
                with pytest.raises(InferenceServerException, match="failed to load") as e:
                    client.load_model("digits", config=bad)
                assert words in str(e.value), (bad, str(e.value))
            assert h.get_model_config("digits")["max_batch_size"] == 8       # the loaded version keeps serving
        # model files sent with the load: Triton's answer (INTERNAL, "failed to poll from model repository", which
        # its own client example checks), the parameter named after it; the server stays up
        with pytest.raises(InferenceServerException, match="load parameter 'file:1/model.onnx'") as e:
            h.load_model("digits", files={"file:1/model.onnx": b"\0" * 1024})
        assert e.value.status() == "500" and "failed to poll from model repository" in str(e.value)
        with pytest.raises(InferenceServerException, match="failed to poll from model repository") as e:
            g.load_model("digits", config="{}", files={"file:" + "A" * 256: b"a"})
        assert e.value.status() == "StatusCode.INTERNAL" and g.is_server_live()
        with pytest.raises(InferenceServerException, match="failed to load 'wrong_model_name'"):
            g.load_model("wrong_model_name")
    finally:
        h.load_model("digits")
        h.close()
        g.close()


def test_triton_words_for_json_nesting_and_the_element_count_limit(server):
    deep = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 1, 8, 8], "data": [0.0] * 64}],
            "parameters": {"x": {}}}
    node = deep["parameters"]["x"]
    for _ in range(100):
        node["y"] = {}
        node = node["y"]
    body = json.dumps(deep).encode()
    status, doc = _raw_post(server.http, "/v2/models/digits/infer", body,
                            {"Content-Type": "application/json", "Content-Length": str(len(body))})
    assert status == 400 and doc["error"].startswith("JSON nesting depth exceeds maximum allowed limit (100)")
    shallow = json.dumps(_infer_doc(["output"])).encode()          # nested data arrays are fine
    status, _ = _raw_post(server.http, "/v2/models/digits/infer", shallow,
                          {"Content-Type": "application/json", "Content-Length": str(len(shallow))})
    assert status == 200


def test_triton_words_for_the_element_count_limit():
    from foldserve.model_config import TensorSpec
    from server.core.types import InferInput, InferRequest, ModelSpec
    from server.core.validation import validate_request

    spec = ModelSpec("m", "onnxruntime_onnx", 64, [TensorSpec("x", "FP32", (1, 8, 8))],
                     [TensorSpec("y", "FP32", (10,))], None, {})
    req = InferRequest("m", inputs=[InferInput("x", "FP32", [4, 1, 8, 8], raw=b"\0" * 1024)])
    with pytest.raises(Exception, match=r"causes total element count to exceed maximum size of 100 \(256 elements"):
        validate_request(req, spec, max_elements=100)


def test_overflowing_shapes_and_a_non_boolean_ready_get_tritons_400s(server):
    def post(path: str, doc) -> tuple[int, dict]:
        body = (doc if isinstance(doc, bytes) else json.dumps(doc).encode())
        return _raw_post(server.http, path, body, {"Content-Type": "application/json",
                                                   "Content-Length": str(len(body))})

    for shape, words in (([16, 2**60 + 2], "causes total element count to exceed maximum size of"),
                         ([4, 2**60 + 2], "byte size overflow for input 'input'")):
        status, doc = post("/v2/models/digits/infer",
                           {"inputs": [{"name": "input", "shape": shape, "datatype": "FP32", "data": [1.0]}]})
        assert status == 400 and words in doc["error"], doc
    deep = b'{"ready":' + b"[" * 100_000 + b"true" + b"]" * 100_000 + b"}"
    for body in (deep, {"ready": "yes"}):
        status, doc = post("/v2/repository/index", body)
        assert status == 400 and "Invalid value for 'ready': expected a boolean" in doc["error"]
    status, doc = post("/v2/repository/index", {"ready": True})
    assert status == 200 and {m["name"] for m in doc} >= {"digits"}


def test_parameters_of_the_wrong_type_are_refused_not_misread(server):
    """``binary_data_output: "no"`` was read as true (binary output), and a gRPC ``classification`` given as a string
    parameter was silently ignored: each is a 400 / INVALID_ARGUMENT naming the parameter now."""
    import grpc
    from tritonclient.grpc import service_pb2 as tpb
    from tritonclient.grpc import service_pb2_grpc as tpb_grpc

    x = digits_batch(1)
    body = {"inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}]}
    for doc, words in (({**body, "parameters": {"binary_data_output": "no"}}, "parameters.binary_data_output must be bool"),
                       ({**body, "outputs": [{"name": "output", "parameters": {"binary_data": "no"}}]},
                        "output 'output': parameter binary_data must be bool")):
        conn = http.client.HTTPConnection(*server.http.split(":"), timeout=10)
        conn.request("POST", "/v2/models/digits/infer", json.dumps(doc), {"content-type": "application/json"})
        r = conn.getresponse()
        text = r.read().decode()
        conn.close()
        assert r.status == 400 and words in text, (r.status, text)
    req = tpb.ModelInferRequest(model_name="digits")
    t = req.inputs.add(name="input", datatype="FP32", shape=list(x.shape))
    t.contents.fp32_contents.extend(x.ravel().tolist())
    out = req.outputs.add(name="output")
    out.parameters["classification"].string_param = "3"
    with grpc.insecure_channel(server.grpc) as ch, pytest.raises(grpc.RpcError) as e:
        tpb_grpc.GRPCInferenceServiceStub(ch).ModelInfer(req, timeout=10)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "parameter 'classification' must be an int64_param" in e.value.details()


def test_a_json_input_without_its_datatype_names_the_input_and_the_field(server):
    conn = http.client.HTTPConnection(*server.http.split(":"), timeout=10)
    doc = {"inputs": [{"name": "input", "shape": [1, 1, 8, 8], "data": [0.0] * 64}]}
    conn.request("POST", "/v2/models/digits/infer", json.dumps(doc), {"content-type": "application/json"})
    r = conn.getresponse()
    text = r.read().decode()
    conn.close()
    assert r.status == 400 and "input 'input': datatype" in text and "is missing: expected a string" in text, text
    assert "NoneType" not in text
