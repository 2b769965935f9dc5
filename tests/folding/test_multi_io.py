"""Models with several inputs and outputs, end to end: fold (ONNX, .pt2 returning a dict, TorchScript returning
a tuple), verification of every output, config.pbtxt, gRPC serving, ``foldserve infer --input`` and live
``verify --server``; and two held-out torchvision models: a segmentation net with an auxiliary head (.pt2) and
a detection backbone with frozen BN and five feature maps (ONNX)."""
from __future__ import annotations

import copy
import json
import shutil
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from foldserve.entry import read_fold_report
from foldserve.model_config import read_config
from tests.conftest import run_cli
from tests.folding.helpers import assert_close_to_scale, scale_layer_weights
from tests.zoo import library, randomize_bn, two_tower

HW = 16
FEATURES = 6


class _TupleTower(torch.nn.Module):
    """The two-tower net returning a tuple (TorchScript and ONNX exports take tuples)."""

    def __init__(self, m: torch.nn.Module) -> None:
        super().__init__()
        self.m = m

    def forward(self, image: torch.Tensor, vector: torch.Tensor):
        out = self.m(image, vector)
        return out["scores"], out["embedding"]


def _args(n: int = 2, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, HW, HW, generator=g), torch.randn(n, FEATURES, generator=g)


def _truth(model: torch.nn.Module, image: np.ndarray, vector: np.ndarray) -> dict[str, np.ndarray]:
    with torch.no_grad():
        out = copy.deepcopy(model).double()(torch.from_numpy(image).double(), torch.from_numpy(vector).double())
    return {k: v.numpy() for k, v in out.items()}


@pytest.fixture(scope="module")
def tower_repo(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("towers")
    model = two_tower()
    tup = _TupleTower(model).eval()
    args = _args()
    batch = torch.export.Dim("batch", max=1024)
    torch.export.save(torch.export.export(model, args, dynamic_shapes=({0: batch}, {0: batch})), str(tmp / "tt.pt2"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(tup, args, str(tmp / "tt.onnx"), dynamo=False, do_constant_folding=False, opset_version=17,
                          input_names=["image", "vector"], output_names=["scores", "embedding"],
                          dynamic_axes={k: {0: "b"} for k in ("image", "vector", "scores", "embedding")})
        torch.jit.save(torch.jit.trace(tup, args), str(tmp / "tt.pt"))
    rng = np.random.default_rng(1)
    data = tmp / "samples.npz"
    np.savez(data, image=rng.normal(size=(24, 3, HW, HW)).astype(np.float32),
             vector=rng.normal(size=(24, FEATURES)).astype(np.float32), y=rng.integers(0, 5, 24))
    repo = tmp / "repo"
    folds = {"tt_pt2": [str(tmp / "tt.pt2"), "--data", str(data), "--accuracy-output", "scores"],
             "tt_onnx": [str(tmp / "tt.onnx")],
             "tt_ts": [str(tmp / "tt.pt"), "--input-shape", f"image:3,{HW},{HW}", "--input-shape", f"vector:{FEATURES}",
                       "--output-name", "scores,embedding"]}
    out = {}
    for name, argv in folds.items():
        proc = run_cli("fold", *argv, "--repository", str(repo), "--name", name, "--batch-sizes", "1,5")
        assert proc.returncode == 0, proc.stdout + proc.stderr
        out[name] = proc.stdout
    return {"repo": repo, "model": model, "tmp": tmp, "data": data, "stdout": out}


@pytest.mark.parametrize("name", ["tt_pt2", "tt_onnx", "tt_ts"])
def test_every_input_and_output_is_recorded_verified_and_configured(tower_repo, name):
    vdir = tower_repo["repo"] / name / "1"
    source = json.loads((vdir / "source.json").read_text())
    assert [i["name"] for i in source["inputs"]] == ["image", "vector"]
    assert [i["shape"] for i in source["inputs"]] == [[3, HW, HW], [FEATURES]]
    assert source["outputs"] == ["scores", "embedding"] and source["batch"] is None
    report = json.loads((vdir / "verification.json").read_text())
    assert report["passed"], report["failure"]
    served = report["candidates"]["served_onnx"]["inputs"]
    assert {"random_b5/scores", "random_b5/embedding"} <= set(served)
    assert {"random_b5/image", "random_b5/vector"} <= set(report["inputs"])
    assert all(v["passed"] for v in report["batch_invariance"].values())
    assert report["fold"]["bn_after"] == 0 and report["fold"]["folded"] == 3
    config = read_config(tower_repo["repo"] / name)
    assert [i.name for i in config.input] == ["image", "vector"]
    assert [o.name for o in config.output] == ["scores", "embedding"]
    assert config.max_batch_size > 0 and config.HasField("dynamic_batching")


def test_data_with_one_array_per_input_gives_accuracy_on_the_named_output(tower_repo):
    report = json.loads((tower_repo["repo"] / "tt_pt2" / "1" / "verification.json").read_text())
    assert "validation/scores" in report["candidates"]["served_onnx"]["inputs"]
    assert set(report["accuracy"]) >= {"served_onnx", "reference_float64"}
    assert report["candidates"]["served_onnx"]["top1_agreement"] == 1.0


def test_every_output_is_served_over_grpc_like_torch_and_verified_live(tower_repo, tmp_path):
    import tritonclient.grpc as tgrpc

    from tests.server.conftest import ServerProcess

    rng = np.random.default_rng(7)
    image = rng.normal(size=(4, 3, HW, HW)).astype(np.float32)
    vector = rng.normal(size=(4, FEATURES)).astype(np.float32)
    truth = _truth(tower_repo["model"], image, vector)
    np.save(tmp_path / "image.npy", image)
    np.save(tmp_path / "vector.npy", vector)
    with ServerProcess(tower_repo["repo"]) as srv:
        client = tgrpc.InferenceServerClient(srv.grpc)
        for name in ("tt_pt2", "tt_onnx", "tt_ts"):
            inputs = []
            for n, a in (("image", image), ("vector", vector)):
                inputs.append(tgrpc.InferInput(n, list(a.shape), "FP32"))
                inputs[-1].set_data_from_numpy(a)
            result = client.infer(name, inputs, outputs=[tgrpc.InferRequestedOutput(o) for o in truth])
            for out_name, want in truth.items():
                assert_close_to_scale(result.as_numpy(out_name), want)
        client.close()
        proc = run_cli("infer", "--url", srv.grpc, "--model", "tt_pt2", "--input", f"image={tmp_path / 'image.npy'}",
                       "--input", f"vector={tmp_path / 'vector.npy'}")
        assert proc.returncode == 0, proc.stderr
        assert "scores: shape [4, 5]" in proc.stdout and "embedding: shape [4, 4]" in proc.stdout
        proc = run_cli("infer", "--url", srv.grpc, "--model", "tt_pt2", str(tmp_path / "image.npy"))
        assert proc.returncode == 2 and "--input NAME=FILE" in proc.stderr
        live = run_cli("verify", "--server", srv.grpc, str(tower_repo["repo"] / "tt_pt2" / "1"), "--batch-sizes", "1,3")
        assert live.returncode == 0 and "random_b3/embedding" in live.stdout, live.stdout + live.stderr


def test_a_broken_output_is_caught_and_localised(tower_repo, tmp_path):

    from folding.verify import VerifyOptions, verify_entry

    vdir = tmp_path / "tt_onnx" / "1"
    shutil.copytree(tower_repo["repo"] / "tt_onnx" / "1", vdir)
    folds = read_fold_report(vdir).onnx.folded
    target = next(f for f in folds if f.producer_type == "Gemm")       # the vector tower
    scale_layer_weights(vdir / "model.onnx", target.into)
    report = verify_entry(vdir, VerifyOptions(batch_sizes=(2,), write=False))
    assert not report.passed
    assert report.localization.first_failing_layer == target.into


@pytest.mark.parametrize("argv,expected", [
    (["--input-shape", f"3,{HW},{HW}"], "--input-shape without a name, but the model has inputs"),
    (["--input-shape", f"photo:3,{HW},{HW}"], "names input 'photo'"),
    (["--output-name", "a,b,c"], "the model has 2 output(s)"),
    (["--precision", "int8"], "calibrates models with one input"),
    (["--accuracy-output", "nope"], "--accuracy-output 'nope'"),
])
def test_what_several_inputs_need_is_one_line_and_exit_2(tower_repo, tmp_path, argv, expected):
    src = tower_repo["tmp"] / ("tt.pt" if "--input-shape" in argv else "tt.onnx")
    proc = run_cli("fold", str(src), "--repository", str(tmp_path / "r"), "--name", "x", *argv)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert expected in proc.stderr and "Traceback" not in proc.stderr


def test_inputs_that_disagree_on_the_batch_axis_are_refused(tower_repo, tmp_path):
    m = onnx.load(str(tower_repo["tmp"] / "tt.onnx"))
    m.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 2      # image fixed at 2, vector dynamic
    onnx.save(m, str(tmp_path / "mixed.onnx"))
    proc = run_cli("fold", str(tmp_path / "mixed.onnx"), "--repository", str(tmp_path / "r"))
    assert proc.returncode == 2 and "disagree on the batch axis" in proc.stderr


# --- held-out models from torchvision ---------------------------------------------------------------------

def _ops(path: Path) -> Counter:
    return Counter(n.op_type for n in onnx.load(str(path)).graph.node)


def test_torchvision_segmentation_with_aux_head_and_frozen_bn_fpn_backbone(tmp_path):
    """fcn_resnet50(aux_loss=True) as .pt2 (a dict {out, aux}) and resnet_fpn_backbone (FrozenBatchNorm2d, five
    feature maps) as ONNX without the exporter's constant folding: verified entries with no BatchNormalization
    and no Mul left, one Conv per Conv2d, every output served over gRPC within 1e-4 of torch."""
    import tritonclient.grpc as tgrpc

    from tests.server.conftest import ServerProcess

    tv = library("torchvision")
    from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
    from torchvision.ops import FrozenBatchNorm2d

    size = 64
    seg = randomize_bn(tv.models.segmentation.fcn_resnet50(weights=None, weights_backbone=None, aux_loss=True,
                                                           num_classes=5))
    fpn = resnet_fpn_backbone(backbone_name="resnet18", weights=None, trainable_layers=0).eval()
    g = torch.Generator().manual_seed(3)
    for mod in fpn.modules():
        if isinstance(mod, FrozenBatchNorm2d):
            n = mod.weight.numel()
            mod.weight.copy_(torch.rand(n, generator=g) + 0.5)
            mod.bias.copy_(torch.randn(n, generator=g) * 0.2)
            mod.running_mean.copy_(torch.randn(n, generator=g) * 0.5)
            mod.running_var.copy_(torch.rand(n, generator=g) + 0.25)
    x = torch.randn(2, 3, size, size)
    torch.export.save(torch.export.export(seg, (x,), dynamic_shapes=({0: torch.export.Dim("batch", max=64)},)),
                      str(tmp_path / "seg.pt2"))
    fpn_names = ["p2", "p3", "p4", "p5", "pool"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(fpn, (x,), str(tmp_path / "fpn.onnx"), dynamo=False, do_constant_folding=False,
                          opset_version=17, input_names=["images"], output_names=fpn_names,
                          dynamic_axes={k: {0: "b"} for k in ("images", *fpn_names)})
    assert _ops(tmp_path / "fpn.onnx")["Mul"] >= 20                      # frozen BN: x * scale + bias
    repo = tmp_path / "repo"
    for src, name in (("seg.pt2", "seg"), ("fpn.onnx", "fpn")):
        proc = run_cli("fold", str(tmp_path / src), "--repository", str(repo), "--name", name, "--batch-sizes", "1,3",
                       timeout=600)
        assert proc.returncode == 0, proc.stdout + proc.stderr
    for name, model in (("seg", seg), ("fpn", fpn)):
        ops = _ops(repo / name / "1" / "model.onnx")
        assert ops["BatchNormalization"] == 0 and ops["Mul"] == 0, (name, ops)
        assert ops["Conv"] == sum(isinstance(m, torch.nn.Conv2d) for m in model.modules()), (name, ops)
    assert json.loads((repo / "seg" / "1" / "source.json").read_text())["outputs"] == ["out", "aux"]
    fpn_report = read_fold_report(repo / "fpn" / "1").onnx
    assert len(fpn_report.affines) == 20 and fpn_report.constants_folded > 0
    xs = np.random.default_rng(5).normal(size=(3, 3, size, size)).astype(np.float32)
    with torch.no_grad():
        truths = {"seg": {k: v.numpy() for k, v in copy.deepcopy(seg).double()(torch.from_numpy(xs).double()).items()},
                  "fpn": dict(zip(fpn_names, (v.numpy() for v in copy.deepcopy(fpn).double()(
                      torch.from_numpy(xs).double()).values()), strict=True))}
    with ServerProcess(repo) as srv:
        client = tgrpc.InferenceServerClient(srv.grpc)
        for name, truth in truths.items():
            in_name = client.get_model_metadata(name, as_json=True)["inputs"][0]["name"]
            inp = tgrpc.InferInput(in_name, list(xs.shape), "FP32")
            inp.set_data_from_numpy(xs)
            result = client.infer(name, [inp], outputs=[tgrpc.InferRequestedOutput(o) for o in truth])
            for out_name, want in truth.items():
                assert_close_to_scale(result.as_numpy(out_name), want)
        client.close()


def test_tritons_simple_int32_add_sub_model_folds_with_data_and_serves(tmp_path):
    """Triton's `simple` example model (INPUT0, INPUT1 INT32 [-1, 16] -> OUTPUT0 sum, OUTPUT1 difference), the
    one tritonclient's examples call: integer inputs verify on --data (one array per input) and serve."""
    import tritonclient.grpc as tgrpc
    import tritonclient.http as thttp
    from onnx import TensorProto, helper

    from tests.server.conftest import ServerProcess

    vi = [helper.make_tensor_value_info(n, TensorProto.INT32, ["b", 16])
          for n in ("INPUT0", "INPUT1", "OUTPUT0", "OUTPUT1")]
    graph = helper.make_graph([helper.make_node("Add", ["INPUT0", "INPUT1"], ["OUTPUT0"]),
                               helper.make_node("Sub", ["INPUT0", "INPUT1"], ["OUTPUT1"])], "simple", vi[:2], vi[2:])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8),
              str(tmp_path / "simple.onnx"))
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "simple.npz", INPUT0=rng.integers(-99, 99, (8, 16)).astype(np.int32),
             INPUT1=rng.integers(-99, 99, (8, 16)).astype(np.int32))
    proc = run_cli("fold", str(tmp_path / "simple.onnx"), "--repository", str(tmp_path / "repo"), "--name", "simple",
                   "--data", str(tmp_path / "simple.npz"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    a = np.arange(16, dtype=np.int32)[None]
    b = np.ones((1, 16), dtype=np.int32)
    with ServerProcess(tmp_path / "repo") as srv:
        for mod, address in ((tgrpc, srv.grpc), (thttp, srv.http)):
            client = mod.InferenceServerClient(address)
            inputs = [mod.InferInput("INPUT0", [1, 16], "INT32"), mod.InferInput("INPUT1", [1, 16], "INT32")]
            inputs[0].set_data_from_numpy(a)
            inputs[1].set_data_from_numpy(b)
            result = client.infer("simple", inputs)
            np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), a + b)
            np.testing.assert_array_equal(result.as_numpy("OUTPUT1"), a - b)
            client.close()


def test_a_string_model_verifies_exactly_on_data(tmp_path):
    """BYTES (string) tensors: no random draws; --data's strings verify, element for element."""
    from onnx import TensorProto, helper

    from folding.verify import VerifyOptions, verify_entry

    graph = helper.make_graph([helper.make_node("Identity", ["text"], ["same"])], "s",
                              [helper.make_tensor_value_info("text", TensorProto.STRING, ["b", 3])],
                              [helper.make_tensor_value_info("same", TensorProto.STRING, ["b", 3])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8),
              str(tmp_path / "s.onnx"))
    np.savez(tmp_path / "s.npz", x=np.array([["a", "bé", "c"]] * 5))
    proc = run_cli("fold", str(tmp_path / "s.onnx"), "--repository", str(tmp_path / "repo"), "--data",
                   str(tmp_path / "s.npz"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = verify_entry(tmp_path / "repo" / "s" / "1", VerifyOptions(write=False))
    assert report.passed and list(report.candidates["served_onnx"].inputs) == ["validation"]
    assert report.source.kind == "onnx" and report.candidates["served_onnx"].max_abs == 0
