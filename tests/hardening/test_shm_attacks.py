"""System shared memory under attack (the third outside review, items 1, 2 and 8): a FIFO as a region's key, an
object truncated after registration, and registrations without bound. Each one froze or killed a worker before."""
from __future__ import annotations

import os
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.utils.shared_memory as tritonshm
from tritonclient.grpc import service_pb2 as tpb
from tritonclient.grpc import service_pb2_grpc as tpb_grpc

from tests.hardening.conftest import post_json
from tests.server.conftest import ServerProcess, digits_batch

pytestmark = [pytest.mark.hardening, pytest.mark.subprocess]


def _get(http: str, path: str, timeout: float = 10) -> int:
    try:
        with urllib.request.urlopen(f"http://{http}{path}", timeout=timeout) as r:
            return r.status
    except urllib.error.HTTPError as exc:
        return exc.code


def _healthy(srv) -> None:
    """Fresh connections on both transports answer at once."""
    assert _get(srv.http, "/v2/health/ready", timeout=5) == 200
    with grpc.insecure_channel(srv.grpc) as ch:
        assert tpb_grpc.GRPCInferenceServiceStub(ch).ServerLive(tpb.ServerLiveRequest(), timeout=5).live


def _shm_infer(http: str, region: str, x: np.ndarray) -> tuple[int, str]:
    return post_json(http, "/v2/models/digits/infer", {"inputs": [{
        "name": "input", "shape": list(x.shape), "datatype": "FP32",
        "parameters": {"shared_memory_region": region, "shared_memory_byte_size": x.nbytes}}]})


@pytest.fixture
def shm_server(hardening_repo):
    with ServerProcess(hardening_repo, "--max-shm-regions", "8") as srv:
        yield srv


@pytest.fixture
def fifo():
    path = Path("/dev/shm") / f"foldserve_fifo_{uuid.uuid4().hex[:8]}"
    os.mkfifo(path)
    yield path
    path.unlink()


def test_a_fifo_as_key_is_refused_at_once_on_both_transports(shm_server, fifo):
    """Opening a FIFO for reading blocks until a writer comes: the event loop (health included) froze."""
    t0 = time.monotonic()
    code, body = post_json(shm_server.http, "/v2/systemsharedmemory/region/f/register",
                       {"key": fifo.name, "offset": 0, "byte_size": 16})
    assert code == 400 and "FIFO" in body, body
    with grpc.insecure_channel(shm_server.grpc) as ch, pytest.raises(grpc.RpcError) as err:
        tpb_grpc.GRPCInferenceServiceStub(ch).SystemSharedMemoryRegister(
            tpb.SystemSharedMemoryRegisterRequest(name="g", key=fifo.name, offset=0, byte_size=16), timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "FIFO" in err.value.details()
    assert time.monotonic() - t0 < 5
    _healthy(shm_server)


def _truncated_region(http: str, x: np.ndarray) -> tuple[str, object]:
    tag = uuid.uuid4().hex[:8]
    name, key = f"r_{tag}", f"/foldserve_trunc_{tag}"
    handle = tritonshm.create_shared_memory_region(name, key, x.nbytes)
    tritonshm.set_shared_memory_region(handle, [x])
    code, body = post_json(http, f"/v2/systemsharedmemory/region/{name}/register",
                       {"key": key, "offset": 0, "byte_size": x.nbytes})
    assert code == 200, body
    os.truncate(f"/dev/shm{key}", 0)             # the client shrinks its object behind the server's back
    return name, handle


def test_a_region_truncated_after_registration_is_a_400_not_a_sigbus(shm_server):
    x = digits_batch(1)
    name, handle = _truncated_region(shm_server.http, x)
    try:
        code, body = _shm_infer(shm_server.http, name, x)
        assert code == 400 and name in body and "smaller than when it was registered" in body, body
        assert shm_server.proc.poll() is None, shm_server.log()[-2000:]
        _healthy(shm_server)
    finally:
        tritonshm.destroy_shared_memory_region(handle)


def test_three_rounds_of_truncation_leave_both_workers_serving(hardening_repo):
    """With two workers, 3 rounds of register / truncate / infer killed 6 workers and the supervisor gave up."""
    with ServerProcess(hardening_repo, "--workers", "2") as srv:
        pids = set(srv.info["pids"])
        handles = []
        try:
            for _ in range(3):
                x = digits_batch(1)
                name, handle = _truncated_region(srv.http, x)
                handles.append(handle)
                codes = {_shm_infer(srv.http, name, x)[0] for _ in range(4)}   # fresh connections: both workers
                assert codes == {400}, codes
            assert srv.proc.poll() is None and all(Path(f"/proc/{p}").exists() for p in pids), srv.log()[-2000:]
            assert "died" not in srv.log()
            _healthy(srv)
        finally:
            for h in handles:
                tritonshm.destroy_shared_memory_region(h)


def test_regions_are_bounded_and_one_object_holds_one_descriptor(shm_server):
    x = digits_batch(1)
    tag = uuid.uuid4().hex[:8]
    key = f"/foldserve_many_{tag}"
    handle = tritonshm.create_shared_memory_region("many", key, x.nbytes)
    try:
        for i in range(8):
            code, body = post_json(shm_server.http, f"/v2/systemsharedmemory/region/n{i}/register",
                               {"key": key, "offset": 0, "byte_size": x.nbytes})
            assert code == 200, body
        fds = [p for p in Path(f"/proc/{shm_server.proc.pid}/fd").iterdir()
               if os.path.realpath(p) == f"/dev/shm{key}"]
        assert len(fds) == 1, fds                     # eight regions, one descriptor
        code, body = post_json(shm_server.http, "/v2/systemsharedmemory/region/n8/register",
                           {"key": key, "offset": 0, "byte_size": x.nbytes})
        assert code == 429 and "--max-shm-regions" in body, body
        with grpc.insecure_channel(shm_server.grpc) as ch, pytest.raises(grpc.RpcError) as err:
            tpb_grpc.GRPCInferenceServiceStub(ch).SystemSharedMemoryRegister(
                tpb.SystemSharedMemoryRegisterRequest(name="n9", key=key, offset=0, byte_size=x.nbytes), timeout=10)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        _healthy(shm_server)
        assert post_json(shm_server.http, "/v2/systemsharedmemory/unregister", {})[0] == 200
        assert not [p for p in Path(f"/proc/{shm_server.proc.pid}/fd").iterdir()
                    if os.path.realpath(p) == f"/dev/shm{key}"]
    finally:
        tritonshm.destroy_shared_memory_region(handle)


def test_shared_memory_references_are_checked_before_a_byte_is_read(shm_server):
    """One 1 KB request naming a sparse 256 MB region 8 times (or once, with a byte size its shape does not need)
    made the server read every reference first: +2 GB of RSS for a 400. Each reference is checked first now."""
    from tests.hardening.conftest import rss_mb

    tag = uuid.uuid4().hex[:8]
    name, key, size = f"big_{tag}", f"/foldserve_sparse_{tag}", 256 * 1024 * 1024
    path = Path("/dev/shm") / key[1:]
    with open(path, "wb") as f:
        f.truncate(size)                          # sparse: costs the client nothing
    try:
        code, body = post_json(shm_server.http, f"/v2/systemsharedmemory/region/{name}/register",
                               {"key": key, "offset": 0, "byte_size": size})
        assert code == 200, body
        before = rss_mb(shm_server.proc.pid)
        ref = {"shared_memory_region": name, "shared_memory_byte_size": size}
        eight = {"inputs": [{"name": "input", "shape": [1, 1, 8, 8], "datatype": "FP32", "parameters": ref}] * 8}
        code, body = post_json(shm_server.http, "/v2/models/digits/infer", eight)
        assert code == 400 and "given twice" in body, body
        assert rss_mb(shm_server.proc.pid) - before < 64, "the server read the regions"
        code, body = post_json(shm_server.http, "/v2/models/digits/infer", {"inputs": eight["inputs"][:1]})
        assert code == 400 and "input byte size mismatch for input 'input' for model 'digits'" in body, body
        assert f"Expected 256, got {size}" in body
        assert rss_mb(shm_server.proc.pid) - before < 64, "the server read the regions"
        _healthy(shm_server)
    finally:
        post_json(shm_server.http, f"/v2/systemsharedmemory/region/{name}/unregister", {})
        path.unlink()
