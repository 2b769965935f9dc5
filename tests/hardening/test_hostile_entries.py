"""Item 9 of the third review: entries that cost more to load than they look. An 8.4 KB model whose ConstantOfShape
makes a [20000, 20000] tensor loaded and kept +1.6 GB; a config with max_batch_size 2^31-1 and a warm-up batch of
16,000,000 reached 6.4 GB before the machine stopped it. Each is refused with the reason in the index, and the
server stays small."""
from __future__ import annotations

import json
import urllib.request

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from tests.hardening.conftest import _write_model, rss_mb
from tests.server.conftest import ServerProcess

pytestmark = [pytest.mark.hardening, pytest.mark.subprocess]


def _constant_bomb() -> onnx.ModelProto:
    """y = x + ConstantOfShape([20000, 20000])[0, 0]: a few hundred bytes on disk, 1.6 GB once folded."""
    shape = numpy_helper.from_array(np.array([20000, 20000], np.int64), "shape")
    zero = numpy_helper.from_array(np.array([0], np.int64), "zero")
    one = numpy_helper.from_array(np.array([1], np.int64), "one")
    nodes = [helper.make_node("ConstantOfShape", ["shape"], ["big"],
                              value=numpy_helper.from_array(np.array([1.0], np.float32))),
             helper.make_node("Slice", ["big", "zero", "one", "zero"], ["row"]),
             helper.make_node("Slice", ["row", "zero", "one", "one"], ["cell"]),
             helper.make_node("Add", ["x", "cell"], ["y"])]
    g = helper.make_graph(nodes, "bomb", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 1])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 1])], [shape, zero, one])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m


def _copy(n: int | str = 4) -> onnx.ModelProto:
    g = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "copy",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", n])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", n])])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m


def _index(srv) -> dict[str, dict]:
    with urllib.request.urlopen(f"http://{srv.http}/v2/repository/index", data=b"{}", timeout=10) as r:
        return {m["name"]: m for m in json.loads(r.read())}


def test_hostile_entries_are_refused_with_the_reason_and_cost_nothing(tmp_path):
    repo = tmp_path / "repo"
    _write_model(repo, "bomb", _constant_bomb(),
                 'name: "bomb"\nplatform: "onnxruntime_onnx"\nmax_batch_size: 8\n'
                 'input [ { name: "x" data_type: TYPE_FP32 dims: [ 1 ] } ]\n'
                 'output [ { name: "y" data_type: TYPE_FP32 dims: [ 1 ] } ]\n')
    _write_model(repo, "huge_batch", _copy(),
                 'name: "huge_batch"\nplatform: "onnxruntime_onnx"\nmax_batch_size: 2147483647\n'
                 'input [ { name: "x" data_type: TYPE_FP32 dims: [ 4 ] } ]\n'
                 'output [ { name: "y" data_type: TYPE_FP32 dims: [ 4 ] } ]\n')
    _write_model(repo, "huge_warmup", _copy("m"),            # variable dims: only the warm-up says how big
                 'name: "huge_warmup"\nplatform: "onnxruntime_onnx"\nmax_batch_size: 16000000\n'
                 'input [ { name: "x" data_type: TYPE_FP32 dims: [ -1 ] } ]\n'
                 'output [ { name: "y" data_type: TYPE_FP32 dims: [ -1 ] } ]\n'
                 'model_warmup [ { name: "w" batch_size: 16000000 inputs { key: "x" value: '
                 '{ data_type: TYPE_FP32 dims: [ 4 ] zero_data: true } } } ]\n')
    _write_model(repo, "fine", _copy(),
                 'name: "fine"\nplatform: "onnxruntime_onnx"\nmax_batch_size: 8\n'
                 'input [ { name: "x" data_type: TYPE_FP32 dims: [ 4 ] } ]\n'
                 'output [ { name: "y" data_type: TYPE_FP32 dims: [ 4 ] } ]\n')
    with ServerProcess(repo, "--max-elements", str(1 << 24)) as srv:
        index = _index(srv)
        assert index["fine"]["state"] == "READY"                     # a sound model beside them still serves
        reasons = {name: index[name]["reason"] for name in ("bomb", "huge_batch", "huge_warmup")}
        assert all(index[name]["state"] != "READY" for name in reasons), index
        assert "would take" in reasons["bomb"] and "--max-model-memory-mb" in reasons["bomb"], reasons
        assert "max_batch_size 2147483647" in reasons["huge_batch"], reasons
        assert "model_warmup 'w'" in reasons["huge_warmup"] and "64000000 elements" in reasons["huge_warmup"], reasons
        assert rss_mb(srv.proc.pid) < 800, f"the server holds {rss_mb(srv.proc.pid):.0f} MB"


def test_oversized_files_are_refused_before_they_are_read(tmp_path):
    """A 2.2 GB sparse model.onnx and a 100 MB labels.txt were read whole before any size check."""
    repo = tmp_path / "repo"
    config = ('name: "NAME"\nplatform: "onnxruntime_onnx"\nmax_batch_size: 8\n'
              'input [ { name: "x" data_type: TYPE_FP32 dims: [ 4 ] } ]\n'
              'output [ { name: "y" data_type: TYPE_FP32 dims: [ 4 ] } ]\n')
    _write_model(repo, "sparse_model", _copy(), config.replace("NAME", "sparse_model"))
    with open(repo / "sparse_model" / "1" / "model.onnx", "r+b") as f:
        f.truncate(2200 << 20)                  # sparse: no disk, no memory until someone reads it
    _write_model(repo, "many_labels", _copy(), config.replace("NAME", "many_labels"))
    with open(repo / "many_labels" / "labels.txt", "wb") as f:
        f.truncate(100 << 20)
    _write_model(repo, "fine", _copy(), config.replace("NAME", "fine"))
    with ServerProcess(repo) as srv:
        index = _index(srv)
        assert index["fine"]["state"] == "READY"
        assert "model.onnx is 2200 MB" in index["sparse_model"]["reason"], index["sparse_model"]
        assert "labels.txt is 104857600 bytes" in index["many_labels"]["reason"], index["many_labels"]
        assert rss_mb(srv.proc.pid) < 800, f"the server holds {rss_mb(srv.proc.pid):.0f} MB"
