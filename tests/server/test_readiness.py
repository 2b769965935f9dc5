"""Strict readiness (Triton's): the server is ready only while every model it was started to serve (or loaded
since) serves; a model that failed to load keeps /v2/health/ready at 503 with the reason in the index."""
from __future__ import annotations

import json
import shutil
import urllib.error
import urllib.request

import grpc
import pytest
from tritonclient.grpc import service_pb2 as tpb
from tritonclient.grpc import service_pb2_grpc as tpb_grpc

from tests.server.conftest import ServerProcess

pytestmark = pytest.mark.subprocess


def _status(http: str, path: str, data: bytes | None = None) -> tuple[int, bytes]:
    req = urllib.request.Request(f"http://{http}{path}", data=data, method="POST" if data is not None else "GET")
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def _grpc_ready(address: str) -> bool:
    with grpc.insecure_channel(address) as ch:
        return tpb_grpc.GRPCInferenceServiceStub(ch).ServerReady(tpb.ServerReadyRequest(), timeout=10).ready


@pytest.fixture
def one_broken(repository, tmp_path):
    repo = tmp_path / "repo"
    for name in ("digits", "broken"):
        shutil.copytree(repository / "digits", repo / name)
    cfg = repo / "broken" / "config.pbtxt"
    cfg.write_text(cfg.read_text().replace('name: "digits"', 'name: "broken"'))
    (repo / "broken" / "1" / "verification.json").unlink()          # not verified: it cannot load
    return repo


def test_a_model_that_failed_to_load_keeps_the_server_unready(one_broken):
    with ServerProcess(one_broken, "--repository-api") as srv:
        assert _status(srv.http, "/v2/health/ready")[0] == 503 and not _grpc_ready(srv.grpc)
        assert _status(srv.http, "/v2/models/digits/ready")[0] == 200     # the sound model serves meanwhile
        index = {m["name"]: m for m in json.loads(_status(srv.http, "/v2/repository/index", b"{}")[1])}
        assert index["broken"]["state"] == "UNAVAILABLE" and "verification" in index["broken"]["reason"]
        # unloading it (an operator's decision) makes the rest of the server ready
        assert _status(srv.http, "/v2/repository/models/broken/unload", b"")[0] in (200, 404)
        assert _status(srv.http, "/v2/health/ready")[0] == 200 and _grpc_ready(srv.grpc)
        # a failed load of a model the server was not serving does not take it out of rotation
        assert _status(srv.http, "/v2/repository/models/broken/load", b"")[0] != 200
        assert _status(srv.http, "/v2/health/ready")[0] == 200


def test_no_strict_readiness_is_ready_whatever_failed(one_broken):
    with ServerProcess(one_broken, "--no-strict-readiness") as srv:
        assert _status(srv.http, "/v2/health/ready")[0] == 200 and _grpc_ready(srv.grpc)
