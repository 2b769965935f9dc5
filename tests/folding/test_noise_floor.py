"""The verifier judges a fold against the unfolded model's own float32 noise, compares integer outputs exactly and
reports unstable outputs; the models that folded wrongly or not at all (MixNet's Concat of convolutions, a program
that returns one tensor twice, a whole detector with NMS) fold, verify and serve; a broken fold of each still fails
and is localised; a failed fold is not installed."""
from __future__ import annotations

import copy
import json
import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from folding.onnx_passes import fold_onnx
from folding.source import ort_session
from folding.tolerances import TOLERANCES, compare
from foldserve.entry import read_fold_report
from tests.conftest import run_cli
from tests.folding.helpers import export_onnx, randomize_bn, scale_layer_weights, torch64
from tests.zoo import library
from tests.zoo import randomize_bn as randomize_library_bn  # milder: a deep net stays finite


def _fold(path: Path, repo: Path, name: str, *extra: str):
    proc = run_cli("fold", str(path), "--repository", str(repo), "--name", name, *extra, timeout=600)
    report = repo / name / "1" / "verification.json"
    return proc, (json.loads(report.read_text()) if report.is_file() else None)


# --- integers are compared as integers ------------------------------------------------------------------------

def test_integer_outputs_are_compared_exactly():
    labels = np.array([3, 1, 4, 1, 5], np.int64)
    assert compare(labels, labels.copy(), TOLERANCES["float32"]).passed
    off_by_one = labels.copy()
    off_by_one[2] += 1              # 1 of 5 labels: within 1e-4 of the scale as floats (5 * 1e-4 + 1e-5 < 1 though)
    c = compare(off_by_one, labels, TOLERANCES["float32"])
    assert not c.passed and c.max_abs == 1 and c.worst_index == [2] and c.bound == 0.0
    big = np.array([10**9, 10**9 + 1], np.int64)    # as floats these would be within 1e-4 of their scale
    assert not compare(big[::-1].copy(), big, TOLERANCES["float32"]).passed


# --- BN after a Concat of convolutions --------------------------------------------------------------------------

class MixConv(nn.Module):
    """MixNet's MixConv: channel groups with kernels of different sizes, concatenated, then one BN."""

    def __init__(self, shared: bool = False) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(4, 6, 3, padding=1), nn.Conv2d(4, 10, 5, padding=2, bias=False)
        self.bn, self.head, self.shared = nn.BatchNorm2d(16), nn.Conv2d(16, 3, 1), shared

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.a(x)
        out = self.head(torch.relu(self.bn(torch.cat([a, self.b(x)], 1))))
        return out + a.mean() if self.shared else out      # shared: conv a's output is read elsewhere too


def _mixconv_model(**kw) -> nn.Module:
    torch.manual_seed(0)
    return randomize_bn(MixConv(**kw).eval())


def test_a_bn_after_a_concat_of_convolutions_folds_slice_by_slice():
    model = _mixconv_model()
    folded, report = fold_onnx(export_onnx(model, torch.randn(1, 4, 12, 12)))
    assert report.bn_before == 1 and report.bn_after == 0, report.skipped
    (pair,) = report.folded
    assert pair.producer_type == "Concat" and pair.direction == "backward"
    assert pair.into.count("Conv") == 2, pair.into          # both convolutions it folded into are named
    x = np.random.default_rng(0).normal(size=(3, 4, 12, 12)).astype(np.float32)
    served = ort_session(folded.SerializeToString(), "all", "cpu").run(None, {"x": x})[0]
    truth = torch64(model, x)
    assert float(np.abs(served - truth).max()) <= 1e-5 * float(np.abs(truth).max())


def test_a_concat_input_read_elsewhere_leaves_the_bn_with_the_reason():
    folded, report = fold_onnx(export_onnx(_mixconv_model(shared=True), torch.randn(1, 4, 12, 12)))
    assert report.bn_after == 1
    (skip,) = report.skipped
    assert "also used elsewhere" in skip.reason and "Concat" in skip.reason


# --- a program that returns one tensor twice -------------------------------------------------------------------

class TwiceOut(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8))

    def forward(self, x: torch.Tensor):
        y = self.layer(x)
        return y.mean((2, 3)), y, y


def test_a_program_returning_one_tensor_twice_folds_verifies_and_serves_every_output(tmp_path):
    import tritonclient.grpc as tgrpc

    from tests.server.conftest import ServerProcess

    torch.manual_seed(0)
    model = randomize_bn(TwiceOut().eval())
    ep = torch.export.export(model, (torch.randn(2, 3, 8, 8),),
                             dynamic_shapes=({0: torch.export.Dim("batch", max=64)},))
    torch.export.save(ep, str(tmp_path / "twice.pt2"))
    proc, report = _fold(tmp_path / "twice.pt2", tmp_path / "repo", "twice", "--batch-sizes", "1,4")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    assert report["passed"] and set(report["noise"]["outputs"]) == {"output_0", "output_1", "output_2"}
    # the fold report names the module (layer.1 is the BN of the Sequential), not the exporter's node names
    fold = read_fold_report(tmp_path / "repo" / "twice" / "1")
    assert [(f.bn, f.into) for f in fold.onnx.folded] == [("layer.1/BatchNormalization", "layer.0/Conv")]
    assert "folded   layer.1/BatchNormalization -> layer.0/Conv" in proc.stdout
    x = np.random.default_rng(1).normal(size=(3, 3, 8, 8)).astype(np.float32)
    with torch.no_grad():
        truth = [t.double().numpy() for t in copy.deepcopy(model).double()(torch.from_numpy(x).double())]
    with ServerProcess(tmp_path / "repo") as srv:
        client = tgrpc.InferenceServerClient(srv.grpc)
        inp = tgrpc.InferInput("x", list(x.shape), "FP32")
        inp.set_data_from_numpy(x)
        names = ["output_0", "output_1", "output_2"]
        got = client.infer("twice", [inp], outputs=[tgrpc.InferRequestedOutput(n) for n in names])
        for name, want in zip(names, truth, strict=True):
            out = got.as_numpy(name)
            assert out.shape == want.shape and float(np.abs(out - want).max()) <= 1e-5 * float(np.abs(want).max())
        client.close()


# --- shared initializers stay shared -------------------------------------------------------------------------------

def test_constant_folding_keeps_initializers_the_exporter_shared_through_identity():
    """The TorchScript exporter with constant folding writes a weight that two layers share once, and the second
    name as ``Identity(first)``; folding must not copy it."""
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.random.default_rng(0).normal(size=(4, 4, 1, 1)).astype(np.float32), "w")
    nodes = [helper.make_node("Identity", ["w"], ["w_again"]),
             helper.make_node("Conv", ["x", "w"], ["a"], name="conv_a"),
             helper.make_node("Relu", ["a"], ["r"]),
             helper.make_node("Conv", ["r", "w_again"], ["y"], name="conv_b")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4, 5, 5])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4, 5, 5])], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    folded, report = fold_onnx(model)
    assert report.params_after == report.params_before == 16
    assert [t.name for t in folded.graph.initializer] == ["w"]
    assert [list(n.input) for n in folded.graph.node if n.op_type == "Conv"] == [["x", "w"], ["r", "w"]]


# --- a failed fold is not installed -----------------------------------------------------------------------------

class BatchDependent(nn.Module):
    """Subtracts the batch mean: a sample's answer depends on the others in its batch, which dynamic batching
    would expose; the verifier's batch-invariance check fails it."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.layer(x)
        return y - y.mean(0, keepdim=True)


def test_a_fold_that_fails_verification_leaves_the_repository_as_it_was(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "batchy.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(randomize_bn(BatchDependent().eval()), (torch.randn(2, 3, 6, 6),), str(path), dynamo=False,
                          do_constant_folding=False, input_names=["x"], output_names=["y"],
                          dynamic_axes={"x": {0: "b"}, "y": {0: "b"}})
    repo = tmp_path / "repo"
    proc, _ = _fold(path, repo, "batchy")
    assert proc.returncode == 1 and "batch invariance failed" in proc.stdout
    assert "not installed: the repository is unchanged" in proc.stdout
    assert not (repo / "batchy" / "1").exists() and not (repo / "batchy" / "config.pbtxt").exists()
    kept = repo / "batchy" / ".rejected-1"
    assert json.loads((kept / "verification.json").read_text())["passed"] is False
    # a server started on the repository sees no such model (strict readiness is not held up by it)
    from tests.server.conftest import ServerProcess
    with ServerProcess(repo) as srv:       # strict readiness is the default
        import httpx
        assert httpx.get(f"http://{srv.http}/v2/health/ready", timeout=10).status_code == 200
        assert httpx.get(f"http://{srv.http}/v2/models/batchy/ready", timeout=10).status_code == 404
    # installed on request, and then the server says it is unverified
    proc, report = _fold(path, repo, "batchy", "--install-unverified")
    assert proc.returncode == 1 and "installed unverified" in proc.stdout and report["passed"] is False
    assert not kept.exists()


# --- the noise floor: MixNet-S, and a whole detector with NMS -----------------------------------------------------

@pytest.fixture(scope="module")
def library_entries(tmp_path_factory):
    """timm's MixNet-S and torchvision's SSDlite (whole, NMS inside) with random weights and BN statistics, exported
    as ONNX with BN kept and folded by ``foldserve fold``: (repo, {name: (model, stdout, report)})."""
    from bench.libraries import detection_ops

    tmp = tmp_path_factory.mktemp("noise")
    timm = library("timm")
    torch.manual_seed(0)
    mixnet = randomize_library_bn(timm.create_model("mixnet_s", pretrained=False)).eval()
    detection_ops()
    from torchvision.models.detection import ssdlite320_mobilenet_v3_large

    torch.manual_seed(0)
    ssd = randomize_library_bn(ssdlite320_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=5)).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(mixnet, (torch.randn(1, 3, 224, 224),), str(tmp / "mixnet.onnx"), dynamo=False,
                          do_constant_folding=False, input_names=["x"], output_names=["logits"],
                          dynamic_axes={"x": {0: "b"}, "logits": {0: "b"}})
        torch.onnx.export(ssd, ([torch.rand(3, 320, 320)],), str(tmp / "ssd.onnx"), dynamo=False,
                          do_constant_folding=False, opset_version=17, input_names=["image"],
                          output_names=["boxes", "scores", "labels"])
    repo, out = tmp / "repo", {}
    for name, model in (("mixnet", mixnet), ("ssd", ssd)):
        proc, report = _fold(tmp / f"{name}.onnx", repo, name, *(("--batch-sizes", "1,4", "--max-batch-size", "8") if name == "mixnet" else ()))
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        out[name] = (model, proc.stdout, report)
    return repo, out


def test_mixnet_folds_every_bn_and_verifies_against_its_own_noise(library_entries):
    _, entries = library_entries
    _, stdout, report = entries["mixnet"]
    fold = read_fold_report(library_entries[0] / "mixnet" / "1").onnx
    assert fold.bn_before == 49 and fold.bn_after == 0           # 34 were left behind Concat before
    assert sum(f.producer_type == "Concat" for f in fold.folded) >= 30
    noise = report["noise"]
    assert report["passed"] and noise["margin"] == 2.0 and noise["runs"] == ["reference_onnx_opt", "reference_onnx_ulp"]
    floor = noise["outputs"]["logits"]
    assert floor["set_by"].startswith("reference_onnx_") and not floor["unstable"] and floor["floor"] > 0
    assert "output logits: served max_abs" in stdout and "against the float32 truth" in stdout


def test_a_whole_detector_with_nms_verifies_by_its_sites_and_says_so(library_entries):
    _, entries = library_entries
    _, stdout, report = entries["ssd"]
    noise = report["noise"]
    assert report["passed"] and noise["sites_checked"] and noise["sites_agreed"]
    assert noise["outputs"]["labels"]["unstable"]      # near-tied scores make NMS pick other boxes between runs
    assert all(s["passed"] for s in report["localization"]["sites"]) and len(report["localization"]["sites"]) > 50
    assert "unstable, not judged" in stdout and "every site agrees with the unfolded graph" in stdout
    # the labels are compared as integers: exact comparisons have no tolerance bound
    assert all(v["bound"] == 0.0 for k, v in report["candidates"]["served_onnx"]["inputs"].items()
               if k.endswith("/labels"))


@pytest.mark.parametrize("name", ["mixnet", "ssd"])
def test_a_broken_fold_of_an_ill_conditioned_model_still_fails_and_names_the_site(library_entries, tmp_path, name):
    import shutil

    repo, _ = library_entries
    vdir = tmp_path / "entry"
    shutil.copytree(repo / name / "1", vdir)
    fold = read_fold_report(vdir).onnx.folded
    target = next(f.into for f in fold[3:] if f.producer_type == "Conv")
    scale_layer_weights(vdir / "model.onnx", target, 1.01)          # a 1 % error in one folded layer
    proc = run_cli("--log-level", "ERROR", "verify", str(vdir))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert f"first layer over tolerance: {target}" in proc.stdout


def test_the_ill_conditioned_models_serve_like_torch(library_entries):
    import tritonclient.grpc as tgrpc

    from tests.server.conftest import ServerProcess

    repo, entries = library_entries
    mixnet = entries["mixnet"][0]
    x = np.random.default_rng(3).uniform(0, 1, size=(2, 3, 224, 224)).astype(np.float32)
    image = np.random.default_rng(4).uniform(0, 1, size=(3, 320, 320)).astype(np.float32)
    with ServerProcess(repo) as srv:
        client = tgrpc.InferenceServerClient(srv.grpc)
        inp = tgrpc.InferInput("x", list(x.shape), "FP32")
        inp.set_data_from_numpy(x)
        got = client.infer("mixnet", [inp]).as_numpy("logits")
        truth = torch64(mixnet, x)
        with torch.no_grad():
            own = float(np.abs(mixnet(torch.from_numpy(x)).numpy() - truth).max())   # torch's own float32 error
        # the served fold is no further from the float64 truth than the float32 model itself (with the margin)
        assert float(np.abs(got - truth).max()) <= 2 * max(own, 1e-4 * float(np.abs(truth).max()))
        inp = tgrpc.InferInput("image", list(image.shape), "FP32")
        inp.set_data_from_numpy(image)
        result = client.infer("ssd", [inp])
        boxes, labels = result.as_numpy("boxes"), result.as_numpy("labels")
        assert boxes.ndim == 2 and boxes.shape[1] == 4 and labels.dtype == np.int64 and len(labels) == len(boxes)
        client.close()
    assert onnx.load(str(repo / "ssd" / "1" / "model.onnx")).graph.output[2].name == "labels"
