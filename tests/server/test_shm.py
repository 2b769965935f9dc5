"""Triton's system shared-memory extension, driven by tritonclient unchanged, on both transports: inputs
read from registered regions, outputs written into them, the error cases, and nothing left behind (no
mapping in the server after unregister, nothing of ours in /dev/shm)."""
from __future__ import annotations

import os
import uuid
from pathlib import Path

import numpy as np
import pytest

from tests.server.conftest import ServerProcess, digits_batch

tritonshm = pytest.importorskip("tritonclient.utils.shared_memory")
grpcclient = pytest.importorskip("tritonclient.grpc")
httpclient = pytest.importorskip("tritonclient.http")
from tritonclient.utils import InferenceServerException  # noqa: E402

OUT_BYTES = 10 * 4


def _client(transport: str, server):
    return (grpcclient.InferenceServerClient(server.grpc) if transport == "grpc"
            else httpclient.InferenceServerClient(server.http))


def _mod(transport: str):
    return grpcclient if transport == "grpc" else httpclient


class Regions:
    """Regions made by the client library (as a user would), destroyed at the end."""

    def __init__(self) -> None:
        self.handles = []

    def make(self, size: int) -> tuple[str, str, object]:
        tag = uuid.uuid4().hex[:10]
        name, key = f"region_{tag}", f"/foldserve_test_{tag}"
        self.handles.append(tritonshm.create_shared_memory_region(name, key, size))
        return name, key, self.handles[-1]

    def close(self) -> None:
        for h in self.handles:
            tritonshm.destroy_shared_memory_region(h)


@pytest.fixture
def regions():
    r = Regions()
    yield r
    r.close()


def _infer_shm(transport, client, model, x, in_region, out_region, in_offset=0, out_offset=0, out_size=OUT_BYTES):
    mod = _mod(transport)
    inp = mod.InferInput("input", list(x.shape), "FP32")
    inp.set_shared_memory(in_region, x.nbytes, offset=in_offset)
    out = mod.InferRequestedOutput("output", **({} if transport == "grpc" else {"binary_data": True}))
    out.set_shared_memory(out_region, out_size, offset=out_offset)
    return client.infer(model, [inp], outputs=[out])


def _maps(pid: int, key: str) -> bool:
    """The server holds the object: an open descriptor of it (or a mapping of it)."""
    target = f"/dev/shm/{key.lstrip('/')}"
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            if os.readlink(fd) == target:
                return True
        except OSError:
            continue
    return key.lstrip("/") in Path(f"/proc/{pid}/maps").read_text()


@pytest.mark.parametrize("transport", ["grpc", "http"])
def test_round_trip_in_and_out_of_shared_memory(server, reference_session, regions, transport):
    """tritonclient's own shared-memory helpers: the input is read from one region at an offset, the output
    written into another at an offset; the answer equals onnxruntime's on the same file."""
    client = _client(transport, server)
    x = digits_batch(1, seed=3)
    in_name, in_key, in_h = regions.make(64 + x.nbytes)
    out_name, out_key, out_h = regions.make(128 + OUT_BYTES)
    tritonshm.set_shared_memory_region(in_h, [x], offset=64)
    client.register_system_shared_memory(in_name, in_key, 64 + x.nbytes)
    client.register_system_shared_memory(out_name, out_key, 128 + OUT_BYTES)
    try:
        status = client.get_system_shared_memory_status()
        names = ([r for r in status.regions] if transport == "grpc" else [r["name"] for r in status])
        assert in_name in names and out_name in names
        result = _infer_shm(transport, client, "digits", x, in_name, out_name, in_offset=64, out_offset=128)
        got = result.get_output("output")
        shape = list(got.shape) if transport == "grpc" else got["shape"]
        assert shape == [1, 10]
        y = tritonshm.get_contents_as_numpy(out_h, np.float32, shape, offset=128)
        want = reference_session.run(None, {"input": x})[0]
        np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)
        # the same region serves the next request with new contents (no stale copy)
        x2 = digits_batch(1, seed=4)
        tritonshm.set_shared_memory_region(in_h, [x2], offset=64)
        _infer_shm(transport, client, "digits", x2, in_name, out_name, in_offset=64, out_offset=128)
        y2 = tritonshm.get_contents_as_numpy(out_h, np.float32, shape, offset=128)
        np.testing.assert_allclose(y2, reference_session.run(None, {"input": x2})[0], rtol=1e-5, atol=1e-5)
        assert _maps(server.proc.pid, in_key) and _maps(server.proc.pid, out_key)
    finally:
        client.unregister_system_shared_memory(in_name)
        client.unregister_system_shared_memory(out_name)
    # unregistered: the server holds neither object any more (no descriptor, no mapping)
    assert not _maps(server.proc.pid, in_key) and not _maps(server.proc.pid, out_key)
    status = client.get_system_shared_memory_status()
    assert len(status.regions if transport == "grpc" else status) == 0


@pytest.mark.parametrize("transport", ["grpc", "http"])
def test_shared_memory_errors_name_the_region(server, regions, transport):
    client = _client(transport, server)
    x = digits_batch(1)
    name, key, h = regions.make(x.nbytes)
    tritonshm.set_shared_memory_region(h, [x])

    def fails(call, *words, code=None):
        with pytest.raises(InferenceServerException) as info:
            call()
        text = str(info.value)
        for w in words:
            assert w in text, text
        if code is not None:
            assert code in str(info.value.status()), info.value.status()
        return text

    bad = "INVALID_ARGUMENT" if transport == "grpc" else "400"
    fails(lambda: client.register_system_shared_memory("nokey", "/foldserve_no_such_key", 64), "foldserve_no_such_key",
          code=bad)
    fails(lambda: client.register_system_shared_memory("big", key, x.nbytes + 1), key, "runs past the end", code=bad)
    fails(lambda: client.register_system_shared_memory("off", key, 4, offset=x.nbytes), key, code=bad)
    fails(lambda: client.register_system_shared_memory("trav", "/../etc/passwd", 4), "not valid", code=bad)
    client.register_system_shared_memory(name, key, x.nbytes)
    try:
        fails(lambda: client.register_system_shared_memory(name, key, x.nbytes), name, "already in manager")
        mod = _mod(transport)
        # an unknown region
        inp = mod.InferInput("input", [1, 1, 8, 8], "FP32")
        inp.set_shared_memory("never_registered", x.nbytes)
        fails(lambda: client.infer("digits", [inp]), "never_registered", "not registered", code=bad)
        # offset past the end of the region
        inp = mod.InferInput("input", [1, 1, 8, 8], "FP32")
        inp.set_shared_memory(name, x.nbytes, offset=16)
        fails(lambda: client.infer("digits", [inp]), name, "Invalid offset + byte size for shared memory region", code=bad)
        # a byte size that is not the input's
        inp = mod.InferInput("input", [1, 1, 8, 8], "FP32")
        inp.set_shared_memory(name, x.nbytes - 4)
        fails(lambda: client.infer("digits", [inp]), "'input'", "bytes", code=bad)
        # an output region too small for the result
        inp = mod.InferInput("input", [1, 1, 8, 8], "FP32")
        inp.set_shared_memory(name, x.nbytes)
        out = mod.InferRequestedOutput("output")
        out.set_shared_memory(name, 8)
        fails(lambda: client.infer("digits", [inp], outputs=[out]), "'output'", "do not fit", code=bad)
        # a status query for an unknown region
        fails(lambda: client.get_system_shared_memory_status("never_registered"), "never_registered", code=bad)
        # CUDA shared memory: nothing is registered, and registering is refused plainly
        fails(lambda: client.register_cuda_shared_memory("r", b"\0" * 64, 0, 64),
              "CUDA shared memory is not supported")
    finally:
        client.unregister_system_shared_memory()   # all
    assert not _maps(server.proc.pid, key)


def test_nothing_left_in_dev_shm_after_exit(repository, tmp_path, regions):
    """The server creates nothing in /dev/shm and leaves no mapping: after it exits and the client destroys
    its regions, /dev/shm is as before."""
    before = set(os.listdir("/dev/shm"))
    srv = ServerProcess(repository)
    try:
        client = grpcclient.InferenceServerClient(srv.grpc)
        x = digits_batch(2)
        name, key, h = regions.make(x.nbytes)
        out_name, out_key, _ = regions.make(2 * OUT_BYTES)
        tritonshm.set_shared_memory_region(h, [x])
        client.register_system_shared_memory(name, key, x.nbytes)
        client.register_system_shared_memory(out_name, out_key, 2 * OUT_BYTES)
        _infer_shm("grpc", client, "digits", x, name, out_name, out_size=2 * OUT_BYTES)   # left registered
    finally:
        assert srv.stop() == 0
    regions.close()
    regions.handles = []
    assert set(os.listdir("/dev/shm")) - before == set()
