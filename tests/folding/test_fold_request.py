"""A fold request is checked once, before any work, and answers in its caller's terms: a Python caller of
``build_entry`` reads the field it set (``FoldRequest.max_batch_size``), the command line reads the flag."""
from __future__ import annotations

import onnx
import pytest
from onnx import TensorProto, helper

from folding.export import FoldRequest, build_entry
from folding.kinds import OnnxKind
from folding.programs import Options
from foldserve.errors import ConfigError
from tests.conftest import run_cli


@pytest.fixture
def model_file(tmp_path):
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])])
    path = tmp_path / "relu.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), str(path))
    return path


@pytest.mark.parametrize(("request_args", "field", "words"), [
    ({"max_batch_size": 0}, "FoldRequest.max_batch_size", "must be >= 1, got 0"),
    ({"precision": "int4"}, "FoldRequest.precision", "choose one of"),
    ({"options": Options(data="missing.npz")}, "Options.data", "no such file"),
    ({"options": Options(calibration_data="missing.npz")}, "Options.calibration_data", "no such file"),
    ({"version": 0, "name": "m"}, "FoldRequest.version", "must be >= 1"),
])
def test_a_python_caller_reads_the_field_it_set(model_file, tmp_path, request_args, field, words):
    request = FoldRequest(model_file, tmp_path / "repo", **request_args)
    with pytest.raises(ConfigError, match=words) as e:
        request.check()
    assert e.value.fields[0] == field and "--" not in str(e.value)
    with pytest.raises(ConfigError, match=words):                    # build_entry checks the same way, first
        build_entry(request)
    assert not (tmp_path / "repo").exists()                          # before any work


def test_the_check_names_the_kind_and_the_version_it_will_write(model_file, tmp_path):
    checked = FoldRequest(model_file, tmp_path / "repo", name="m").check()
    assert isinstance(checked.kind, OnnxKind) and checked.version == 1 and checked.path == model_file
    assert FoldRequest(model_file, tmp_path / "repo").check().version is None      # known once the model names it


def test_the_command_line_reads_the_flag(model_file, tmp_path):
    proc = run_cli("fold", str(model_file), "--repository", str(tmp_path / "repo"), "--max-batch-size", "0")
    assert proc.returncode == 2 and "--max-batch-size must be >= 1, got 0" in proc.stderr, proc.stderr
    assert "FoldRequest" not in proc.stderr
