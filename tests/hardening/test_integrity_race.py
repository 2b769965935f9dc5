"""Item 5 of the third review: a writer swapping model.onnx between the verified and perturbed bytes while the
model is reloaded. The loader hashed the file and onnxruntime then opened it again, so 13 of 60 reloads served
perturbed weights as verified. Now the bytes that are hashed are the bytes that are loaded."""
from __future__ import annotations

import json
import os
import shutil
import threading

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from tests.hardening.conftest import FULL, post_json
from tests.server.conftest import ServerProcess, digits_batch

pytestmark = [pytest.mark.hardening, pytest.mark.subprocess]


def test_reloads_while_the_file_is_swapped_never_serve_perturbed_bytes_as_verified(repository, tmp_path):
    import onnxruntime as ort

    repo = tmp_path / "repo"
    shutil.copytree(repository / "digits", repo / "digits")
    model_path = repo / "digits" / "1" / "model.onnx"
    good = model_path.read_bytes()
    m = onnx.load_from_string(good)
    t = max(m.graph.initializer, key=lambda i: int(np.prod(i.dims)))
    t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t) * 1.5, t.name))
    bad = m.SerializeToString()
    x = digits_batch(4)
    expected = ort.InferenceSession(good, providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    perturbed = ort.InferenceSession(bad, providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    assert not np.allclose(expected, perturbed, atol=1e-3)      # the perturbation shows in the answer

    stop = threading.Event()

    def swap() -> None:          # atomic renames, as fast as they go: each reload sees either file
        tmp = repo / "digits" / ".swap"
        while not stop.is_set():
            for data in (bad, good):
                tmp.write_bytes(data)
                os.replace(tmp, model_path)

    body = {"inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}]}
    with ServerProcess(repo, "--repository-api") as srv:
        swapper = threading.Thread(target=swap, daemon=True)
        swapper.start()
        loads = {"ok": 0, "refused": 0}
        try:
            for _ in range(60 if FULL else 30):
                code, text = post_json(srv.http, "/v2/repository/models/digits/load")
                loads["ok" if code == 200 else "refused"] += 1
                code, text = post_json(srv.http, "/v2/models/digits/infer", body)
                assert code == 200, text                       # a refused reload leaves the old version serving
                got = np.asarray(json.loads(text)["outputs"][0]["data"], np.float32).reshape(expected.shape)
                np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
        finally:
            stop.set()
            swapper.join(10)
        model_path.write_bytes(good)
        assert loads["refused"] > 0 and loads["ok"] > 0, loads    # the swaps really raced the reloads
        assert post_json(srv.http, "/v2/repository/models/digits/load")[0] == 200
