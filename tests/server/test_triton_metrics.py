"""Triton's metric families (nv_inference_*, nv_cpu_*) next to ours, with Triton's names, types, units and
labels, counted right across two worker processes; and the statistics split timed as Triton times it (a batched
execution's compute time attributed to every request in it)."""
from __future__ import annotations

import json
import shutil
import urllib.error
import urllib.request

import numpy as np
import pytest
import tritonclient.grpc as tgrpc

from server.core.stats import GPU_FAMILIES, gpu_sampler
from tests.conftest import metric_samples
from tests.server.conftest import ServerProcess, digits_batch

pytestmark = pytest.mark.subprocess
LABELS = {"model": "digits", "version": "1"}


def _post(http: str, doc: dict) -> int:
    req = urllib.request.Request(f"http://{http}/v2/models/digits/infer", data=json.dumps(doc).encode(),
                                 method="POST", headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status
    except urllib.error.HTTPError as exc:
        return exc.code


def _counter(samples, name: str, **labels: str) -> float:
    """A counter Triton exposes as ``name`` (prometheus_client's parser names its samples ``name_total``)."""
    return _value(samples, f"{name}_total", **labels)


def _value(samples, name: str, **labels: str) -> float:
    found = [v for n, lab, v in samples if n == name and all(lab.get(k) == w for k, w in labels.items())]
    assert len(found) == 1, (name, labels, [s for s in samples if s[0] == name])
    return found[0]


def test_triton_metric_families_count_every_request_across_two_workers(repository, tmp_path):
    repo = tmp_path / "repo"
    shutil.copytree(repository / "digits", repo / "digits")
    with ServerProcess(repo, "--workers", "2") as srv:
        for i in range(20):                              # fresh connections: both workers take some
            x = digits_batch(1, seed=i)
            assert _post(srv.http, {"inputs": [{"name": "input", "shape": [1, 1, 8, 8], "datatype": "FP32",
                                                "data": x.ravel().tolist()}]}) == 200
        client = tgrpc.InferenceServerClient(srv.grpc)
        for i in range(10):
            inp = tgrpc.InferInput("input", [3, 1, 8, 8], "FP32")
            inp.set_data_from_numpy(digits_batch(3, seed=100 + i))
            client.infer("digits", [inp])
        for _ in range(5):                               # a wrong shape: a failure, reason OTHER
            assert _post(srv.http, {"inputs": [{"name": "input", "shape": [1, 2, 8, 8], "datatype": "FP32",
                                                "data": [0.0] * 128}]}) == 400
        with urllib.request.urlopen(f"http://{srv.http}/metrics", timeout=30) as r:
            text = r.read().decode()
        stats = client.get_inference_statistics("digits", as_json=True)["model_stats"][0]
    samples = metric_samples(text)
    for family in ("nv_inference_request_success", "nv_inference_request_failure", "nv_inference_count",
                   "nv_inference_exec_count", "nv_inference_request_duration_us", "nv_inference_queue_duration_us",
                   "nv_inference_compute_input_duration_us", "nv_inference_compute_infer_duration_us",
                   "nv_inference_compute_output_duration_us"):
        assert f"# TYPE {family} counter" in text and f"{family}_total" not in text, family
    assert "# TYPE nv_inference_pending_request_count gauge" in text
    assert _counter(samples, "nv_inference_request_success", **LABELS) == 30
    assert _counter(samples, "nv_inference_count", **LABELS) == 20 + 10 * 3          # a batch of n counts n
    assert 1 <= _counter(samples, "nv_inference_exec_count", **LABELS) <= 30
    assert _counter(samples, "nv_inference_request_failure", reason="OTHER", **LABELS) == 5
    duration = _counter(samples, "nv_inference_request_duration_us", **LABELS)
    assert duration >= _counter(samples, "nv_inference_queue_duration_us", **LABELS) >= 0 and duration > 0
    assert duration >= _counter(samples, "nv_inference_compute_infer_duration_us", **LABELS) > 0
    assert _value(samples, "nv_inference_pending_request_count", **LABELS) == 0
    total, used = (_value(samples, n) for n in ("nv_cpu_memory_total_bytes", "nv_cpu_memory_used_bytes"))
    assert total > used > 0 and 0.0 <= _value(samples, "nv_cpu_utilization") <= 1.0
    if not gpu_sampler()():          # no GPU families where NVML sees no GPU (test_gpu_families checks them)
        assert "nv_gpu_" not in text and "nv_energy_consumption" not in text
    # the statistics extension agrees, and counts compute per request (Triton), not per execution
    infer = stats["inference_stats"]
    assert int(infer["success"]["count"]) == 30 and int(infer["fail"]["count"]) == 5
    assert int(infer["compute_infer"]["count"]) == 30 >= int(stats["execution_count"])
    assert np.isclose(int(infer["compute_infer"]["ns"]) / 1000,
                      _counter(samples, "nv_inference_compute_infer_duration_us", **LABELS), rtol=0.05, atol=100)


@pytest.mark.gpu
def test_gpu_families_with_triton_names_per_gpu(repository, tmp_path):
    """Where NVML sees a GPU: every Triton GPU family, one sample per GPU labelled gpu_uuid, sane values."""
    if not gpu_sampler()():
        pytest.skip("NVML sees no GPU on this machine")
    repo = tmp_path / "repo"
    shutil.copytree(repository / "digits", repo / "digits")
    with ServerProcess(repo) as srv, urllib.request.urlopen(f"http://{srv.http}/metrics", timeout=30) as r:
        text = r.read().decode()
    samples = metric_samples(text)
    uuids = {lab["gpu_uuid"] for n, lab, _ in samples if n == "nv_gpu_memory_total_bytes"}
    assert uuids and all(u.startswith(("GPU-", "MIG-")) for u in uuids)
    for name, _, kind, _ in GPU_FAMILIES:
        if name in ("nv_gpu_power_usage", "nv_gpu_power_limit", "nv_energy_consumption") and name not in text:
            continue                                       # a GPU may not report power (NVML: not supported)
        assert f"# TYPE {name} {kind}" in text, name
    for u in uuids:
        total = _value(samples, "nv_gpu_memory_total_bytes", gpu_uuid=u)
        assert total >= _value(samples, "nv_gpu_memory_used_bytes", gpu_uuid=u) >= 0 and total > 2**30
        assert 0.0 <= _value(samples, "nv_gpu_utilization", gpu_uuid=u) <= 1.0


def test_every_failure_reason_exists_at_zero_once_a_model_loads(repository, tmp_path):
    """Triton creates nv_inference_request_failure at 0 for each reason as a model loads, so a rate() alert sees 0,
    not "no data", before the first failure."""
    repo = tmp_path / "repo"
    shutil.copytree(repository / "digits", repo / "digits")
    with ServerProcess(repo) as srv:
        with urllib.request.urlopen(f"http://{srv.http}/metrics", timeout=10) as r:
            samples = metric_samples(r.read().decode())
    failures = {s[1]["reason"]: s[2] for s in samples
                if s[0] == "nv_inference_request_failure_total" and s[1].get("model") == "digits"}
    assert failures == {"REJECTED": 0.0, "CANCELED": 0.0, "BACKEND": 0.0, "OTHER": 0.0}
    assert any(s[0] == "nv_inference_request_success_total" and s[1].get("model") == "digits" and s[2] == 0
               for s in samples)
