"""OpenTelemetry tracing, configured by OTEL_* variables: an OTLP/HTTP receiver (a real HTTP server in this test,
decoding the protobuf export requests) gets one ModelInfer span per traced request, child of the trace context
the client sent (REST header and gRPC metadata alike), with Triton's TIMESTAMPS as events; Triton's trace extension
turns it off and on at run time, per model too. Off by default."""
from __future__ import annotations

import http.server
import json
import secrets
import threading
import time
import urllib.error
import urllib.request

import pytest
import tritonclient.grpc as tgrpc
import tritonclient.http as thttp
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from tritonclient.utils import InferenceServerException

from tests.server.conftest import ServerProcess, digits_batch, free_port

pytestmark = pytest.mark.subprocess


class Receiver:
    """An OTLP/HTTP traces endpoint: every span it is sent, by trace id."""

    def __init__(self) -> None:
        self.spans: list = []
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["content-length"]))
                req = ExportTraceServiceRequest()
                req.ParseFromString(body)
                for rs in req.resource_spans:
                    for ss in rs.scope_spans:
                        receiver.spans.extend(ss.spans)
                self.send_response(200)
                self.send_header("content-type", "application/x-protobuf")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.port = free_port()
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def trace(self, trace_id: str, want: int = 1, timeout: float = 10) -> list:
        deadline = time.time() + timeout
        while time.time() < deadline:
            found = [s for s in self.spans if s.trace_id.hex() == trace_id]
            if len(found) >= want:
                return found
            time.sleep(0.05)
        return [s for s in self.spans if s.trace_id.hex() == trace_id]


@pytest.fixture(scope="module")
def traced(repository, tmp_path_factory):
    import shutil

    repo = tmp_path_factory.mktemp("traced")
    shutil.copytree(repository / "digits", repo / "digits")
    receiver = Receiver()
    env = {"OTEL_TRACES_EXPORTER": "otlp", "OTEL_SERVICE_NAME": "foldserve-test",
           "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": f"http://127.0.0.1:{receiver.port}/v1/traces",
           "OTEL_BSP_SCHEDULE_DELAY": "50"}
    with ServerProcess(repo, env=env) as srv:
        yield srv, receiver
    receiver.server.shutdown()


def _traceparent() -> tuple[str, str, str]:
    trace_id, parent = secrets.token_hex(16), secrets.token_hex(8)
    return trace_id, parent, f"00-{trace_id}-{parent}-01"


def _infer(mod, address: str, headers: dict[str, str]) -> None:
    client = mod.InferenceServerClient(address)
    x = digits_batch(2)
    inp = mod.InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    client.infer("digits", [inp], headers=headers)
    client.close()


def test_a_span_per_request_carries_the_clients_trace_id_on_both_transports(traced):
    srv, receiver = traced
    for mod, address, protocol in ((thttp, srv.http, "http"), (tgrpc, srv.grpc, "grpc")):
        trace_id, parent, header = _traceparent()
        _infer(mod, address, {"traceparent": header})
        (root,) = receiver.trace(trace_id, want=1)
        assert root.name == "ModelInfer" and root.parent_span_id.hex() == parent
        attrs = {a.key: (a.value.string_value or a.value.int_value) for a in root.attributes}
        assert attrs["model.name"] == "digits" and attrs["rpc.system"] == protocol
        assert attrs["inference.batch_size"] == 2 and attrs["inference.compute_infer_ns"] > 0
        events = [(e.name, e.time_unix_nano) for e in root.events]
        assert [n for n, _ in events] == ["QUEUE_START", "COMPUTE_START", "COMPUTE_INPUT_END", "COMPUTE_OUTPUT_START",
                                          "COMPUTE_END"], events
        times = [t for _, t in events]
        assert root.start_time_unix_nano <= times[0] and times == sorted(times) and times[-1] <= root.end_time_unix_nano


def test_triton_trace_settings_turn_it_off_and_on_per_model(traced):
    srv, receiver = traced
    h = thttp.InferenceServerClient(srv.http)
    g = tgrpc.InferenceServerClient(srv.grpc)
    try:
        assert h.get_trace_settings()["trace_level"] == ["TIMESTAMPS"]
        assert h.update_trace_settings(settings={"trace_level": ["OFF"]})["trace_level"] == ["OFF"]
        trace_id, _, header = _traceparent()
        _infer(thttp, srv.http, {"traceparent": header})
        time.sleep(0.5)
        assert receiver.trace(trace_id, timeout=0.5) == []                 # off: nothing exported
        # on for this model only, one request in 1
        got = g.update_trace_settings("digits", {"trace_level": ["TIMESTAMPS"], "trace_rate": "1"}, as_json=True)
        assert got["settings"]["trace_level"]["value"] == ["TIMESTAMPS"]
        trace_id, _, header = _traceparent()
        _infer(tgrpc, srv.grpc, {"traceparent": header})
        assert len(receiver.trace(trace_id, want=1)) == 1
        # the model's own settings cleared: the global ones (off) again
        assert h.update_trace_settings("digits", {"trace_level": None})["trace_level"] == ["OFF"]
        with pytest.raises(InferenceServerException, match="trace setting 'trace_rate' must be an integer >= 1"):
            h.update_trace_settings(settings={"trace_rate": "0"})
        with pytest.raises(InferenceServerException, match="unknown trace setting 'trace_colour'"):
            g.update_trace_settings(settings={"trace_colour": ["red"]})
    finally:
        h.update_trace_settings(settings={"trace_level": ["TIMESTAMPS"]})
        h.close()
        g.close()


def test_tracing_is_off_without_an_exporter_and_cannot_be_turned_on(server):
    h = thttp.InferenceServerClient(server.http)
    try:
        assert h.get_trace_settings()["trace_level"] == ["OFF"]
        assert h.get_trace_settings()["trace_mode"] == "opentelemetry"
        with pytest.raises(InferenceServerException, match="OTEL_TRACES_EXPORTER"):
            h.update_trace_settings(settings={"trace_level": ["TIMESTAMPS"]})
    finally:
        h.close()
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(f"http://{server.http}/v2/models/nope/trace/setting", timeout=10)
    assert e.value.code == 404


def test_sigterm_is_not_held_by_a_collector_that_never_answers(repository, tmp_path):
    """An OTLP collector that accepts connections and never answers held SIGTERM for 33 s (the exporter's timeout
    and retries); the buffered spans get a bounded time now, then the server exits."""
    import shutil
    import socket

    shutil.copytree(repository / "digits", tmp_path / "digits")
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(16)                           # the kernel accepts; nobody ever reads or answers
    env = {"OTEL_TRACES_EXPORTER": "otlp", "OTEL_BSP_SCHEDULE_DELAY": "60000",     # spans stay buffered
           "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": f"http://127.0.0.1:{silent.getsockname()[1]}/v1/traces"}
    try:
        srv = ServerProcess(tmp_path, "--grace-period-s", "2", env=env)
        _infer(thttp, srv.http, {})
        t0 = time.monotonic()
        assert srv.stop(timeout=60) == 0
        took = time.monotonic() - t0
        assert took < 15, f"SIGTERM took {took:.1f} s"
        assert "did not finish within 2.0 s" in srv.log()
    finally:
        silent.close()


def test_trace_settings_are_set_and_cleared_field_by_field_as_triton_does(traced):
    """Triton's rules (qa/L0_trace): a model's field it does not set follows the global one; null clears a field,
    a model's to the global value, a global one to the value the server started with (not the last one set)."""
    srv, _ = traced
    h = thttp.InferenceServerClient(srv.http)
    start = h.get_trace_settings()
    try:
        h.update_trace_settings("digits", {"trace_rate": "12", "log_frequency": "34"})
        h.update_trace_settings(settings={"trace_rate": "56", "trace_count": "78", "trace_level": ["OFF"]})
        cleared = h.update_trace_settings(settings={"trace_rate": None, "trace_count": None})
        assert (cleared["trace_rate"], cleared["trace_count"], cleared["trace_level"]) == \
            (start["trace_rate"], start["trace_count"], ["OFF"])
        model = h.get_trace_settings("digits")
        assert (model["trace_rate"], model["log_frequency"], model["trace_level"], model["trace_count"]) == \
            ("12", "34", ["OFF"], start["trace_count"])
        model = h.update_trace_settings("digits", {"trace_rate": None, "trace_level": None})
        assert (model["trace_rate"], model["log_frequency"], model["trace_level"]) == (start["trace_rate"], "34", ["OFF"])
        with pytest.raises(InferenceServerException, match="trace file location can not be updated through network"):
            h.update_trace_settings("digits", {"trace_file": "model.log"})
        with pytest.raises(InferenceServerException, match="Request for unknown model : does-not-exist"):
            h.get_trace_settings("does-not-exist")
    finally:
        h.update_trace_settings("digits", {k: None for k in ("trace_level", "trace_rate", "trace_count",
                                                            "log_frequency")})
        h.update_trace_settings(settings={"trace_level": None})
        h.close()
    assert thttp.InferenceServerClient(srv.http).get_trace_settings() == start


def test_the_tensors_level_records_each_input_and_output_bounded(traced):
    srv, receiver = traced
    h = thttp.InferenceServerClient(srv.http)
    try:
        assert h.update_trace_settings(settings={"trace_level": ["TIMESTAMPS", "TENSORS"]})["trace_level"] == \
            ["TIMESTAMPS", "TENSORS"]
        trace_id, _, header = _traceparent()
        _infer(thttp, srv.http, {"traceparent": header})
        (span,) = receiver.trace(trace_id, want=1)
    finally:
        h.update_trace_settings(settings={"trace_level": None})
        h.close()
    tensors = {e.name: {a.key: a.value for a in e.attributes} for e in span.events if e.name.startswith("TENSOR_")}
    assert set(tensors) == {"TENSOR_INPUT", "TENSOR_OUTPUT"}
    x = tensors["TENSOR_INPUT"]
    assert x["tensor.name"].string_value == "input" and x["tensor.datatype"].string_value == "FP32"
    assert [v.int_value for v in x["tensor.shape"].array_value.values] == [2, 1, 8, 8]
    data = json.loads(x["tensor.data"].string_value)
    assert data == pytest.approx(digits_batch(2).reshape(-1)[:16].tolist()) and x["tensor.truncated"].bool_value
    assert tensors["TENSOR_OUTPUT"]["tensor.name"].string_value == "output"
