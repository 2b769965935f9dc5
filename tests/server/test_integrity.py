"""A verification counts for the bytes it verified: weights edited on disk are never served as verified."""
from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import pytest
import tritonclient.grpc as tgrpc
from onnx import numpy_helper
from tritonclient.utils import InferenceServerException

from tests.server.conftest import ServerProcess, digits_batch

MODEL = "digits"


def _perturb(path, every: int = 7, factor: float = -3.0) -> None:
    """Every 7th value of every float initializer times -3 (the attack's edit); the file stays valid ONNX."""
    m = onnx.load(str(path))
    for t in m.graph.initializer:
        a = numpy_helper.to_array(t).copy()
        if a.dtype == np.float32 and a.size:
            a.reshape(-1)[::every] *= factor
            t.CopyFrom(numpy_helper.from_array(a, t.name))
    onnx.save(m, str(path))


def _infer(c, x):
    inp = tgrpc.InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    return c.infer(MODEL, [inp]).as_numpy("output")


def test_verification_records_the_sha256_of_every_file_it_covered(repository):
    from foldserve.entry import entry_digests

    vdir = repository / MODEL / "1"
    report = json.loads((vdir / "verification.json").read_text())
    assert report["files"] == entry_digests(vdir)
    assert {"model.onnx", "reference.onnx", "source.pt", "source.json"} <= set(report["files"])


def test_perturbed_weights_are_refused_and_the_old_version_keeps_serving(repository, tmp_path):
    repo = tmp_path / "repo"
    shutil.copytree(repository / MODEL, repo / MODEL)
    srv = ServerProcess(repo, "--repository-api")
    x = digits_batch(4)
    try:
        c = tgrpc.InferenceServerClient(srv.grpc)
        before = _infer(c, x)
        _perturb(repo / MODEL / "1" / "model.onnx")
        with pytest.raises(InferenceServerException):
            c.load_model(MODEL)
        assert c.is_model_ready(MODEL)                       # the verified bytes loaded earlier still serve
        np.testing.assert_array_equal(_infer(c, x), before)
        index = {m["name"]: m for m in c.get_model_repository_index(as_json=True)["models"]}
        assert "model.onnx changed since verification" in index[MODEL]["reason"]
        meta = c.get_model_config(MODEL, as_json=True)["config"]["parameters"]
        assert meta["foldserve_verified"]["string_value"] == "true"
    finally:
        srv.stop()
    with ServerProcess(repo) as srv:                                # a fresh start does not serve them either
        c = tgrpc.InferenceServerClient(srv.grpc)
        assert not c.is_model_ready(MODEL)
        index = c.get_model_repository_index(as_json=True)["models"]
        assert "changed since verification" in index[0]["reason"]


def test_a_failing_reverification_never_replaces_a_passing_report(repository, tmp_path):
    from folding.verify import VerifyOptions, verify_entry

    vdir = tmp_path / MODEL / "1"
    shutil.copytree(repository / MODEL / "1", vdir)
    passing = (vdir / "verification.json").read_text()
    report = verify_entry(vdir, VerifyOptions(batch_sizes=(2,), rtol=0.0, atol=0.0))     # impossible tolerance
    assert not report.passed and report.written == "verification.failed.json" and report.kept
    assert (vdir / "verification.json").read_text() == passing
    assert not json.loads((vdir / "verification.failed.json").read_text())["passed"]
    report = verify_entry(vdir, VerifyOptions(batch_sizes=(2,)))
    assert report.passed and report.written == "verification.json"
    assert not (vdir / "verification.failed.json").exists()
