"""The dynamic batcher with variable shapes: only requests whose shapes agree past the batch axis share an execution
(as Triton does without ragged batching), so concurrent requests of several shapes to a ``-1`` model are each
answered, and the model keeps serving."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import onnx
import pytest
import tritonclient.http as thttp
from onnx import TensorProto, helper

from tests.server.conftest import ServerProcess

pytestmark = pytest.mark.subprocess


def _variable_identity(repo, name: str, onnx_type: int, v2: str) -> None:
    graph = helper.make_graph([helper.make_node("Identity", ["INPUT0"], ["OUTPUT0"])], name,
                              [helper.make_tensor_value_info("INPUT0", onnx_type, ["b", "n"])],
                              [helper.make_tensor_value_info("OUTPUT0", onnx_type, ["b", "n"])])
    (repo / name / "1").mkdir(parents=True)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8),
              str(repo / name / "1" / "model.onnx"))
    (repo / name / "config.pbtxt").write_text(
        f'name: "{name}"\nplatform: "onnxruntime_onnx"\nmax_batch_size: 8\n'
        f'input [{{ name: "INPUT0" data_type: TYPE_{v2} dims: [-1] }}]\n'
        f'output [{{ name: "OUTPUT0" data_type: TYPE_{v2} dims: [-1] }}]\n'
        f'dynamic_batching {{ max_queue_delay_microseconds: 50000 }}\n')


@pytest.mark.parametrize("kind", ["FP32", "BYTES"])
def test_concurrent_requests_of_mixed_shapes_are_each_answered(tmp_path, kind):
    onnx_type = TensorProto.FLOAT if kind == "FP32" else TensorProto.STRING
    _variable_identity(tmp_path, "var", onnx_type, "STRING" if kind == "BYTES" else kind)

    def data(n: int, i: int) -> np.ndarray:
        values = np.arange(n, dtype=np.float32)[None] + 100 * i
        return values if kind == "FP32" else values.astype(str).astype(object)

    with ServerProcess(tmp_path, "--allow-unverified") as srv:
        def call(i: int) -> tuple[np.ndarray, np.ndarray]:
            client = thttp.InferenceServerClient(srv.http, network_timeout=20)
            try:
                x = data(1 + i % 4, i)
                inp = thttp.InferInput("INPUT0", list(x.shape), kind)
                inp.set_data_from_numpy(x)
                return x, client.infer("var", [inp]).as_numpy("OUTPUT0")
            finally:
                client.close()

        with ThreadPoolExecutor(16) as pool:        # 4 shapes, 32 requests, within one batching window
            for x, got in pool.map(call, range(32)):
                got = got if kind == "FP32" else got.astype(str).astype(object)
                assert got.shape == x.shape and (got == x).all()
        x, got = call(5)                             # and the model still serves afterwards
        assert got.shape == x.shape
