"""Server fixtures: a real repository entry and the server as a real process on free ports.

The test process talks to the server with tritonclient. It never imports our generated stubs
(foldserve.protocol): both define proto package ``inference`` and cannot live in one process.
"""
from __future__ import annotations

import shutil

import numpy as np
import pytest

from bench.loadgen import free_port  # noqa: F401  (tests import it from here)
from bench.process import FoldserveProcess

#: ``foldserve serve`` on free ports, as a real process; a context manager (shared with the benchmark)
ServerProcess = FoldserveProcess


@pytest.fixture(scope="module")
def server(repository, tmp_path_factory):
    repo = tmp_path_factory.mktemp("served")
    shutil.copytree(repository / "digits", repo / "digits")
    shutil.copytree(repository / "digits", repo / "digits_b")
    cfg = (repo / "digits_b" / "config.pbtxt")
    cfg.write_text(cfg.read_text().replace('name: "digits"', 'name: "digits_b"'))
    with ServerProcess(repo, "--repository-api") as srv:
        srv.repo = repo
        yield srv


@pytest.fixture(scope="session")
def reference_session(repository):
    import onnxruntime as ort

    return ort.InferenceSession(str(repository / "digits" / "1" / "model.onnx"), providers=["CPUExecutionProvider"])


def digits_batch(n: int, seed: int = 0) -> np.ndarray:
    return (np.random.default_rng(seed).random((n, 1, 8, 8)) * 16).astype(np.float32)


def identity_entry(repo, name: str, datatype: str, dims: str, batching: str = "") -> None:
    """A Triton-style entry (no fold, no verification: serve it with --allow-unverified): ``OUTPUT0 = INPUT0`` of
    ``datatype`` (a config type without ``TYPE_``: FP32, STRING) and ``dims`` (e.g. "-1"), max_batch_size 8, and
    ``batching`` appended to its config (e.g. a dynamic_batching block)."""
    import onnx
    from onnx import TensorProto, helper

    onnx_type = TensorProto.STRING if datatype == "STRING" else getattr(TensorProto, {"FP32": "FLOAT"}[datatype])
    graph = helper.make_graph([helper.make_node("Identity", ["INPUT0"], ["OUTPUT0"])], name,
                              [helper.make_tensor_value_info("INPUT0", onnx_type, ["b", "n"])],
                              [helper.make_tensor_value_info("OUTPUT0", onnx_type, ["b", "n"])])
    (repo / name / "1").mkdir(parents=True)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8),
              str(repo / name / "1" / "model.onnx"))
    (repo / name / "config.pbtxt").write_text(
        f'name: "{name}"\nplatform: "onnxruntime_onnx"\nmax_batch_size: 8\n'
        f'input [{{ name: "INPUT0" data_type: TYPE_{datatype} dims: [{dims}] }}]\n'
        f'output [{{ name: "OUTPUT0" data_type: TYPE_{datatype} dims: [{dims}] }}]\n{batching}')
