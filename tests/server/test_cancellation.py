"""Cancellation on both transports (Triton added it in 23.10): a request whose client goes away while it is
queued (delay batching with a 2 s window holds it) is dropped before it executes and counted as CANCELED;
a request that stays executes."""
from __future__ import annotations

import json
import shutil
import socket
import time
import urllib.request

import grpc
import pytest
from tritonclient.grpc import service_pb2 as tpb
from tritonclient.grpc import service_pb2_grpc as tpb_grpc

from tests.conftest import metric_samples
from tests.server.conftest import ServerProcess, digits_batch

pytestmark = pytest.mark.subprocess
WINDOW_US = 2_000_000


def _stats(http: str) -> dict:
    with urllib.request.urlopen(f"http://{http}/v2/models/digits/stats", timeout=10) as r:
        return json.loads(r.read())["model_stats"][0]


def _canceled(http: str) -> float:
    with urllib.request.urlopen(f"http://{http}/metrics", timeout=10) as r:
        samples = metric_samples(r.read().decode())
    return sum(v for n, lab, v in samples if n == "nv_inference_request_failure_total" and lab.get("reason") ==
               "CANCELED")


def _grpc_request():
    x = digits_batch(1)
    req = tpb.ModelInferRequest(model_name="digits", raw_input_contents=[x.tobytes()])
    req.inputs.add(name="input", datatype="FP32", shape=list(x.shape))
    return req


@pytest.fixture
def slow_window(repository, tmp_path):
    repo = tmp_path / "repo"
    shutil.copytree(repository / "digits", repo / "digits")
    with ServerProcess(repo, "--max-queue-delay-us", str(WINDOW_US)) as srv:
        yield srv


def test_a_rest_client_that_disconnects_while_queued_is_never_executed(slow_window):
    x = digits_batch(1)
    body = json.dumps({"inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32",
                                   "data": x.ravel().tolist()}]}).encode()
    s = socket.create_connection(("127.0.0.1", slow_window.http_port))
    s.sendall(b"POST /v2/models/digits/infer HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
              b"content-length: %d\r\n\r\n" % len(body) + body)
    time.sleep(0.3)                                        # queued: the batch window is 2 s
    s.close()
    time.sleep(WINDOW_US / 1e6 + 0.5)                      # past the window: the batch would have run by now
    stats = _stats(slow_window.http)
    assert int(stats["execution_count"]) == 0, stats       # the model never ran for it
    assert int(stats["inference_stats"]["fail"]["count"]) == 1 and _canceled(slow_window.http) == 1


def test_a_grpc_call_cancelled_while_queued_is_never_executed(slow_window):
    with grpc.insecure_channel(slow_window.grpc) as ch:
        stub = tpb_grpc.GRPCInferenceServiceStub(ch)
        future = stub.ModelInfer.future(_grpc_request(), timeout=30)
        time.sleep(0.3)
        assert future.cancel()
        time.sleep(WINDOW_US / 1e6 + 0.5)
        stats = _stats(slow_window.http)
        assert int(stats["execution_count"]) == 0, stats
        assert _canceled(slow_window.http) == 1
        # a call that stays is executed once the window ends: the counting above could fail
        assert stub.ModelInfer(_grpc_request(), timeout=30).outputs
    assert int(_stats(slow_window.http)["execution_count"]) == 1
