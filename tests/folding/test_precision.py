"""Precision variants: fp16 and calibrated int8 entries, folded first, gated by the verifier."""
from __future__ import annotations

import json
import warnings

import numpy as np
import onnx
import pytest
import torch

from folding.export import FoldRequest, build_entry
from folding.verify import VerifyOptions
from tests.conftest import run_cli

FAST = VerifyOptions(batch_sizes=(1, 8))


@pytest.fixture(scope="module")
def mlp_run(tmp_path_factory):
    """A second architecture: Linear + BatchNorm1d layers (the digits ResNet is the first)."""
    from trainer.train import TrainConfig, train

    out = tmp_path_factory.mktemp("mlp_run")
    train(TrainConfig(arch="mlp", dataset="digits", out=str(out), epochs=4, progress=False))
    return out


def _ops(path) -> set[str]:
    return {n.op_type for n in onnx.load(str(path)).graph.node}


@pytest.mark.parametrize("precision", ["fp16", "int8"])
@pytest.mark.parametrize("arch", ["resnet", "mlp"])
def test_each_precision_on_two_architectures(digits_run, mlp_run, tmp_path, arch, precision):
    run = digits_run if arch == "resnet" else mlp_run
    result = build_entry(FoldRequest(run / "checkpoint.pt", tmp_path / "repo", "m", 1, precision=precision,
                                     verify_options=FAST))
    report, vdir = result.verification, result.version_dir
    assert report is not None and report.passed, report
    gate = report.precision.gate
    assert report.precision.precision == precision and gate is not None and gate.basis == "validation"
    assert gate.accuracy_drop_points is not None and gate.accuracy_drop_points <= 1.0
    assert gate.top1_agreement is not None and gate.top1_agreement >= 0.9
    record = json.loads((vdir / "precision.json").read_text())
    assert record["precision"] == precision
    assert 'key: "foldserve_precision"' in (tmp_path / "repo" / "m" / "config.pbtxt").read_text()
    model = onnx.load(str(vdir / "model.onnx"))
    # clients need no change: float32 in, float32 out
    assert [i.type.tensor_type.elem_type for i in (*model.graph.input, *model.graph.output)] == [1, 1]
    assert "BatchNormalization" not in _ops(vdir / "model.onnx")
    if precision == "int8":
        assert {"QuantizeLinear", "DequantizeLinear"} <= _ops(vdir / "model.onnx")
        assert record["calibration_method"] == "minmax" and record["calibration_samples"] == 300
        assert "training split" in record["calibration_source"]
    else:
        weights = [t for t in model.graph.initializer if len(t.dims) > 1]
        assert weights and all(t.data_type == onnx.TensorProto.FLOAT16 for t in weights)


def test_a_bad_calibration_fails_int8_verification_and_names_the_layer(digits_run, tmp_path):
    np.savez(tmp_path / "zeros.npz", x=np.zeros((1, 1, 8, 8), np.float32))
    proc = run_cli("fold", str(digits_run / "checkpoint.pt"), "--repository", str(tmp_path / "repo"), "--name", "bad",
                   "--precision", "int8", "--calibration-data", str(tmp_path / "zeros.npz"), "--batch-sizes", "4")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    # a failed fold is not installed: it is kept aside for inspection, invisible to a server
    assert not (tmp_path / "repo" / "bad" / "1").exists() and "not installed" in proc.stdout
    report = json.loads((tmp_path / "repo" / "bad" / ".rejected-1" / "verification.json").read_text())
    assert not report["passed"] and "top-1 agreement" in report["failure"]
    assert report["precision"]["calibration_samples"] == 1
    first = report["localization"]["first_failing_layer"]
    assert first and first in report["failure"] and "first layer whose error jumps" in proc.stdout
    sites = report["localization"]["sites"]
    assert sites[0]["layer"] == first or all(s["passed"] for s in sites[:[s["layer"] for s in sites].index(first)])


def test_fp16_of_a_near_zero_running_variance_does_not_overflow(tmp_path):
    """A channel with running_var ~ 0 and eps 1e-12 scales its folded weights by ~1e6: beyond float16's
    65504. That node stays float32 (reported), the output stays finite and the entry verifies."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8, eps=1e-12),
                                torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                                torch.nn.Linear(8, 4)).eval()
    bn = model[1]
    bn.running_var.uniform_(0.5, 2.0)
    bn.running_var[3] = 1e-12
    bn.running_mean.uniform_(-0.5, 0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.randn(2, 3, 8, 8),), str(tmp_path / "tiny_var.onnx"), dynamo=False,
                          do_constant_folding=False, input_names=["x"], output_names=["y"],
                          dynamic_axes={"x": {0: "b"}, "y": {0: "b"}})
    result = build_entry(FoldRequest(tmp_path / "tiny_var.onnx", tmp_path / "repo", "tiny", 1, precision="fp16",
                                     verify_options=FAST))
    report = result.verification
    assert report is not None
    assert report.precision.kept_float32, "the overflowing layer was not kept in float32"
    assert report.passed, report.failure
    import onnxruntime as ort

    sess = ort.InferenceSession(str(result.version_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    y = sess.run(None, {"x": np.random.default_rng(0).normal(size=(16, 3, 8, 8)).astype(np.float32)})[0]
    assert np.isfinite(y).all()


def test_served_int8_answer_equals_onnxruntime_on_the_same_file(digits_run, tmp_path):
    import onnxruntime as ort
    import tritonclient.grpc as tgrpc

    from tests.server.conftest import ServerProcess, digits_batch

    repo = tmp_path / "repo"
    build_entry(FoldRequest(digits_run / "checkpoint.pt", repo, "d8", 1, precision="int8", verify_options=FAST))
    build_entry(FoldRequest(digits_run / "checkpoint.pt", repo, "d8", 2, verify_options=FAST))                # fp32 beside it
    (repo / "d8" / "config.pbtxt").write_text((repo / "d8" / "config.pbtxt").read_text().replace(
        "latest {\n    num_versions: 1", "all {"))
    x = digits_batch(8)
    expected = ort.InferenceSession(str(repo / "d8" / "1" / "model.onnx"),
                                    providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    with ServerProcess(repo) as srv:
        c = tgrpc.InferenceServerClient(srv.grpc)
        inp = tgrpc.InferInput("input", list(x.shape), "FP32")
        inp.set_data_from_numpy(x)
        got = c.infer("d8", [inp], model_version="1").as_numpy("output")
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)
        params = {v: c.get_model_config("d8", v, as_json=True)["config"]["parameters"] for v in ("1", "2")}
        assert params["1"]["foldserve_precision"]["string_value"] == "int8"
        assert params["2"]["foldserve_precision"]["string_value"] == "fp32"
        import urllib.request

        with urllib.request.urlopen(f"http://{srv.http}/v2/models/d8/versions/1", timeout=10) as r:
            meta = json.loads(r.read())
        assert meta["parameters"]["precision"]["precision"] == "int8"
        assert meta["parameters"]["precision"]["calibration_method"] == "minmax"
        # live verification judges the int8 version by the same gate as the local verifier
        live = run_cli("verify", "--server", srv.grpc, str(repo / "d8" / "1"), "--batch-sizes", "4")
        assert live.returncode == 0 and "precision int8: gate passed" in live.stdout, live.stdout + live.stderr
    assert 'string_value: "mixed"' in (repo / "d8" / "config.pbtxt").read_text()
