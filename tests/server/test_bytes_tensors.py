"""BYTES (string) tensors as model inputs and outputs (onnxruntime's tensor(string)), served as Triton serves them:
JSON strings, the binary extension's 4-byte length prefixes, gRPC raw and typed contents, system shared memory,
raw binary requests; bytes that are not UTF-8 travel where the transport carries them (JSON cannot)."""
from __future__ import annotations

import http.client
import json

import numpy as np
import pytest
import tritonclient.grpc as tgrpc
import tritonclient.http as thttp
import tritonclient.utils.shared_memory as shm
from tritonclient.utils import InferenceServerException, serialize_byte_tensor, serialized_byte_size

from tests.server.conftest import ServerProcess, identity_entry

pytestmark = pytest.mark.subprocess


def _identity(repo, name: str, dims: str) -> None:
    identity_entry(repo, name, "STRING", dims, "dynamic_batching { }\n")


@pytest.fixture(scope="module")
def bytes_server(tmp_path_factory):
    repo = tmp_path_factory.mktemp("strings")
    _identity(repo, "strings", "-1")
    _identity(repo, "one_string", "1")
    with ServerProcess(repo, "--allow-unverified") as srv:    # Triton-style entries: no fold, no verification
        yield srv


WORDS = np.array([["héllo", "", "wörld", "x" * 300]], dtype=object)


def test_strings_round_trip_on_every_encoding(bytes_server):
    for mod, address, binary in ((thttp, bytes_server.http, False), (thttp, bytes_server.http, True),
                                 (tgrpc, bytes_server.grpc, None)):
        client = mod.InferenceServerClient(address)
        inp = mod.InferInput("INPUT0", list(WORDS.shape), "BYTES")
        if binary is None:
            inp.set_data_from_numpy(WORDS)
            out = mod.InferRequestedOutput("OUTPUT0")
        else:
            inp.set_data_from_numpy(WORDS, binary_data=binary)
            out = mod.InferRequestedOutput("OUTPUT0", binary_data=binary)
        got = client.infer("strings", [inp], outputs=[out]).as_numpy("OUTPUT0")
        assert [x.decode() if isinstance(x, bytes) else x for x in got.reshape(-1)] == list(WORDS.reshape(-1)), \
            (mod.__name__, binary)
        client.close()


def test_strings_through_system_shared_memory(bytes_server):
    client = tgrpc.InferenceServerClient(bytes_server.grpc)
    data = serialize_byte_tensor(WORDS)
    size = serialized_byte_size(data)
    ins = shm.create_shared_memory_region("in", "/fs_bytes_in", size)
    outs = shm.create_shared_memory_region("out", "/fs_bytes_out", size)
    try:
        shm.set_shared_memory_region(ins, [data])
        client.register_system_shared_memory("in", "/fs_bytes_in", size)
        client.register_system_shared_memory("out", "/fs_bytes_out", size)
        inp = tgrpc.InferInput("INPUT0", list(WORDS.shape), "BYTES")
        inp.set_shared_memory("in", size)
        out = tgrpc.InferRequestedOutput("OUTPUT0")
        out.set_shared_memory("out", size)
        result = client.infer("strings", [inp], outputs=[out])
        meta = result.get_output("OUTPUT0")
        got = shm.get_contents_as_numpy(outs, np.object_, list(meta.shape))
        assert [x.decode() for x in got.reshape(-1)] == list(WORDS.reshape(-1))
    finally:
        client.unregister_system_shared_memory()
        shm.destroy_shared_memory_region(ins)
        shm.destroy_shared_memory_region(outs)
        client.close()


def _post(address: str, path: str, body: bytes, headers: dict[str, str]) -> tuple[int, dict[str, str], bytes]:
    host, port = address.rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        conn.request("POST", path, body=body, headers=headers)
        r = conn.getresponse()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
    finally:
        conn.close()


def test_raw_binary_requests_and_bad_bytes_are_answered_as_triton_does(bytes_server):
    status, headers, payload = _post(bytes_server.http, "/v2/models/one_string/infer", b"427",
                                     {"Inference-Header-Content-Length": "0"})
    assert status == 200, payload
    n = int(headers["inference-header-content-length"])
    assert payload[n:] == (3).to_bytes(4, "little") + b"427"              # Triton's length prefix
    status, _, payload = _post(bytes_server.http, "/v2/models/strings/infer", b"427",
                               {"Inference-Header-Content-Length": "0"})
    assert status == 400 and b"For BYTE datatype raw input 'INPUT0', the model must have input shape [1]" in payload
    raw = (2).to_bytes(4, "little") + b"\xff\xfe"      # not UTF-8: the model carries it, a JSON answer cannot
    header = json.dumps({"inputs": [{"name": "INPUT0", "shape": [1, 1], "datatype": "BYTES",
                                     "parameters": {"binary_data_size": len(raw)}}]}).encode()
    status, _, payload = _post(bytes_server.http, "/v2/models/strings/infer", header + raw,
                               {"Inference-Header-Content-Length": str(len(header))})
    assert status == 400 and b"element 0 is not UTF-8 text, which JSON cannot carry" in payload
    short = (9).to_bytes(4, "little") + b"abc"                               # claims more than it has
    header = json.dumps({"inputs": [{"name": "INPUT0", "shape": [1, 1], "datatype": "BYTES",
                                     "parameters": {"binary_data_size": len(short)}}]}).encode()
    status, _, payload = _post(bytes_server.http, "/v2/models/strings/infer", header + short,
                               {"Inference-Header-Content-Length": str(len(header))})
    assert status == 400 and b"element 0 claims 9 bytes" in payload
    client = thttp.InferenceServerClient(bytes_server.http)
    inp = thttp.InferInput("INPUT0", [1, 2], "BYTES")
    inp.set_data_from_numpy(np.array([["a", "b"]], dtype=object), binary_data=False)
    with pytest.raises(InferenceServerException, match="classification needs numeric scores"):
        client.infer("strings", [inp], outputs=[thttp.InferRequestedOutput("OUTPUT0", class_count=1)])
    client.close()
