"""Every v2 endpoint through both transports with Triton's own clients: the answers agree, because the data
plane decides semantics once (unknown vs not ready, what "all statistics" covers) and the transports only
translate. Includes the literal route /v2/models/stats (statistics of all models) over HTTP."""
from __future__ import annotations

import numpy as np
import pytest
import tritonclient.grpc as tgrpc
import tritonclient.http as thttp
from tritonclient.utils import InferenceServerException

from tests.server.conftest import digits_batch

pytestmark = pytest.mark.subprocess


@pytest.fixture(scope="module")
def clients(server):
    g = tgrpc.InferenceServerClient(server.grpc)
    h = thttp.InferenceServerClient(server.http)
    yield g, h
    g.close()
    h.close()


def _error(fn) -> str:
    with pytest.raises(InferenceServerException) as exc:
        fn()
    return exc.value.message()


def test_health_and_server_metadata_agree(clients):
    g, h = clients
    assert g.is_server_live() is h.is_server_live() is True
    assert g.is_server_ready() is h.is_server_ready() is True
    gm, hm = g.get_server_metadata(as_json=True), h.get_server_metadata()
    assert gm["name"] == hm["name"] == "foldserve" and gm["version"] == hm["version"]
    assert gm["extensions"] == hm["extensions"] and "statistics" in hm["extensions"]


def test_model_readiness_agrees_for_ready_unknown_and_malformed(clients):
    g, h = clients
    assert g.is_model_ready("digits") is h.is_model_ready("digits") is True
    assert g.is_model_ready("digits", "1") is h.is_model_ready("digits", "1") is True
    assert g.is_model_ready("nope") is h.is_model_ready("nope") is False
    assert g.is_model_ready("digits", "7") is h.is_model_ready("digits", "7") is False


def test_model_metadata_and_config_agree(clients):
    g, h = clients
    gm, hm = g.get_model_metadata("digits", as_json=True), h.get_model_metadata("digits")
    for key in ("name", "versions", "platform"):
        assert gm[key] == hm[key], key
    for side in ("inputs", "outputs"):
        assert [(t["name"], t["datatype"], [int(d) for d in t["shape"]]) for t in gm[side]] == \
               [(t["name"], t["datatype"], t["shape"]) for t in hm[side]]
    gc, hc = g.get_model_config("digits", as_json=True)["config"], h.get_model_config("digits")
    assert gc["name"] == hc["name"] == "digits"
    assert int(gc["max_batch_size"]) == hc["max_batch_size"] == 64
    assert [i["name"] for i in gc["input"]] == [i["name"] for i in hc["input"]] == ["input"]
    assert gc["parameters"]["foldserve_verified"] == hc["parameters"]["foldserve_verified"]


def test_unknown_model_errors_agree(clients):
    g, h = clients
    for call in ("get_model_metadata", "get_model_config", "get_inference_statistics"):
        gm, hm = _error(lambda: getattr(g, call)("nope")), _error(lambda: getattr(h, call)("nope"))
        assert gm == hm and "Request for unknown model: 'nope' is not found" in gm, (call, gm, hm)


def test_statistics_of_all_models_and_of_one_agree(clients):
    g, h = clients
    x = digits_batch(2)
    gi = tgrpc.InferInput("input", list(x.shape), "FP32")
    gi.set_data_from_numpy(x)
    g.infer("digits", [gi])
    gs = g.get_inference_statistics(as_json=True)["model_stats"]
    hs = h.get_inference_statistics()["model_stats"]  # GET /v2/models/stats: the literal route
    assert {(s["name"], s["version"]) for s in gs} == {(s["name"], s["version"]) for s in hs} \
        >= {("digits", "1"), ("digits_b", "1")}
    one_g = g.get_inference_statistics("digits", as_json=True)["model_stats"]
    one_h = h.get_inference_statistics("digits")["model_stats"]
    assert [s["name"] for s in one_g] == [s["name"] for s in one_h] == ["digits"]
    assert int(one_g[0]["inference_count"]) >= 2 and one_h[0]["inference_count"] >= 2


def test_repository_index_load_unload_agree(clients):
    g, h = clients

    def index(client, **kw):
        rows = client.get_model_repository_index(**kw)
        rows = rows["models"] if isinstance(rows, dict) else rows
        return sorted((r["name"], r.get("version", ""), r.get("state", "")) for r in rows)

    assert index(g, as_json=True) == index(h)
    g.unload_model("digits_b")
    assert g.is_model_ready("digits_b") is h.is_model_ready("digits_b") is False
    assert index(g, as_json=True) == index(h)
    h.load_model("digits_b")
    assert g.is_model_ready("digits_b") is h.is_model_ready("digits_b") is True


def test_inference_agrees(clients):
    g, h = clients
    x = digits_batch(3, seed=5)
    gi = tgrpc.InferInput("input", list(x.shape), "FP32")
    gi.set_data_from_numpy(x)
    hi = thttp.InferInput("input", list(x.shape), "FP32")
    hi.set_data_from_numpy(x, binary_data=True)
    np.testing.assert_array_equal(g.infer("digits", [gi]).as_numpy("output"), h.infer("digits", [hi]).as_numpy("output"))
    bad = tgrpc.InferInput("input", [1, 1, 8, 7], "FP32")
    bad.set_data_from_numpy(np.zeros((1, 1, 8, 7), np.float32))
    hbad = thttp.InferInput("input", [1, 1, 8, 7], "FP32")
    hbad.set_data_from_numpy(np.zeros((1, 1, 8, 7), np.float32))
    assert _error(lambda: g.infer("digits", [bad])) == _error(lambda: h.infer("digits", [hbad]))


def test_log_settings_and_cuda_shared_memory_agree(clients):
    g, h = clients
    gs = {k: next(iter(v.values())) for k, v in g.get_log_settings(as_json=True)["settings"].items()}
    assert gs == h.get_log_settings()
    assert _error(lambda: g.update_log_settings({"nope": 1})) == _error(lambda: h.update_log_settings({"nope": 1}))
    assert list(g.get_cuda_shared_memory_status().regions) == h.get_cuda_shared_memory_status() == []
    assert _error(lambda: g.get_cuda_shared_memory_status("r")) == _error(lambda: h.get_cuda_shared_memory_status("r"))
