"""Training-time networks from timm (RepVGG, MobileOne, RepGhost, FastViT) fold into their library's deploy form: no BN,
as many Conv nodes as ``timm.utils.reparameterize_model`` gives, outputs equal to torch's in float64; LeViT's
BatchNorm1d after its flattened Linear outputs fold too, and a ViT's layer scales into the Linear before them."""
from __future__ import annotations

import copy
from collections import Counter

import numpy as np
import onnx
import pytest
import torch

from folding.onnx_passes import fold_onnx
from folding.source import ort_session
from tests.folding.helpers import export_onnx
from tests.zoo import library, randomize_bn

HW = 64


def _export(model: torch.nn.Module, *, constant_folding: bool) -> onnx.ModelProto:
    return export_onnx(model, torch.randn(1, 3, HW, HW), constant_folding=constant_folding)


@pytest.mark.parametrize("name", ["repvgg_a0", "mobileone_s0", "repghostnet_050", "fastvit_t8"])
def test_timm_training_form_folds_to_the_deploy_form(name):
    timm = library("timm")
    from timm.utils import reparameterize_model

    model = randomize_bn(timm.create_model(name, pretrained=False))
    deploy = _export(reparameterize_model(copy.deepcopy(model)), constant_folding=True)
    folded, report = fold_onnx(_export(model, constant_folding=False))
    ops, deploy_ops = Counter(n.op_type for n in folded.graph.node), Counter(n.op_type for n in deploy.graph.node)
    assert ops["BatchNormalization"] == 0, report.skipped[:3]
    assert ops["Conv"] == deploy_ops["Conv"] and ops["Add"] == deploy_ops["Add"], (ops, deploy_ops)
    assert ops["Sub"] == deploy_ops["Sub"], (ops, deploy_ops)          # FastViT's RepMixer: mixer(x) - norm(x)
    assert report.merges and not report.merges_skipped
    x = np.random.default_rng(0).normal(size=(2, 3, HW, HW)).astype(np.float32)
    sess = ort_session(folded.SerializeToString(), "all", "cpu")
    served = sess.run(None, {"x": x})[0]
    with torch.no_grad():
        truth = copy.deepcopy(model).double()(torch.from_numpy(x).double()).numpy()
    err, scale = float(np.abs(served - truth).max()), float(np.abs(truth).max())
    assert err <= 1e-5 * scale, f"{name}: {err:.3g} against scale {scale:.3g}"


def test_timm_training_form_pt2_becomes_a_verified_entry_served_like_torch(tmp_path):
    """The acceptance path: timm's MobileOne-S0, RepVGG-A0 and FastViT-T8 saved as .pt2 -> `foldserve fold` -> a
    verified entry with the deploy form's Conv count -> every output over gRPC within 1e-4 of torch's unfolded
    output."""
    import tritonclient.grpc as tgrpc

    from tests.conftest import run_cli
    from tests.server.conftest import ServerProcess

    timm = library("timm")
    from timm.utils import reparameterize_model

    repo = tmp_path / "repo"
    models = {}
    for name in ("mobileone_s0", "repvgg_a0", "fastvit_t8"):
        model = randomize_bn(timm.create_model(name, pretrained=False))
        models[name] = model
        deploy = _export(reparameterize_model(copy.deepcopy(model)), constant_folding=True)
        ep = torch.export.export(model, (torch.randn(2, 3, HW, HW),),
                                 dynamic_shapes=({0: torch.export.Dim("batch", max=64)},))
        torch.export.save(ep, str(tmp_path / f"{name}.pt2"))
        proc = run_cli("fold", str(tmp_path / f"{name}.pt2"), "--repository", str(repo), "--name", name,
                       "--batch-sizes", "1,4", timeout=600)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        served = onnx.load(str(repo / name / "1" / "model.onnx"))
        ops = Counter(n.op_type for n in served.graph.node)
        assert ops["BatchNormalization"] == 0
        deploy_ops = Counter(n.op_type for n in deploy.graph.node)
        assert ops["Conv"] <= deploy_ops["Conv"] and ops["Sub"] <= deploy_ops["Sub"], (ops, deploy_ops)
    x = np.random.default_rng(1).normal(size=(3, 3, HW, HW)).astype(np.float32)
    with ServerProcess(repo) as srv:
        client = tgrpc.InferenceServerClient(srv.grpc)
        for name, model in models.items():
            inp = tgrpc.InferInput("x", list(x.shape), "FP32")
            inp.set_data_from_numpy(x)
            got = client.infer(name, [inp], outputs=[tgrpc.InferRequestedOutput("output")]).as_numpy("output")
            with torch.no_grad():
                truth = copy.deepcopy(model).double()(torch.from_numpy(x).double()).numpy()
            assert float(np.abs(got - truth).max()) <= 1e-4 * float(np.abs(truth).max()), name
        client.close()


def test_timm_levit_folds_every_batchnorm1d():
    """LeViT normalises its Linear layers' tokens with BatchNorm1d after a flatten (46 of its 52 BNs): every one
    folds into its MatMul, and the output equals torch's in float64."""
    timm = library("timm")
    model = randomize_bn(timm.create_model("levit_128s", pretrained=False)).eval()
    folded, report = fold_onnx(export_onnx(model, torch.randn(1, 3, 224, 224)))
    assert report.bn_before == 52 and report.bn_after == 0, report.skipped[:2]
    assert sum(f.producer_type == "MatMul" for f in report.folded) == 46
    x = np.random.default_rng(0).normal(size=(2, 3, 224, 224)).astype(np.float32)
    served = ort_session(folded.SerializeToString(), "all", "cpu").run(None, {"x": x})[0]
    with torch.no_grad():
        truth = copy.deepcopy(model).double()(torch.from_numpy(x).double()).numpy()
    assert float(np.abs(served - truth).max()) <= 1e-5 * float(np.abs(truth).max())


def test_timm_vit_layer_scales_fold_into_their_linear_layers():
    """timm's VisionTransformer with ``init_values`` (DeiT-III, CaiT, DINOv2 train with it) scales every
    attention and MLP output per feature, ``x + gamma * proj(x)`` on (N, L, C) tokens: each gamma folds into its
    projection's MatMul (4 in 2 blocks), the GELUs' 0.5 stay for onnxruntime, the output equals torch's."""
    library("timm")
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    model = VisionTransformer(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2, num_classes=10,
                              init_values=0.5).eval()
    for m in model.modules():
        if hasattr(m, "gamma"):
            m.gamma.data.uniform_(0.5, 1.5)
    exported = export_onnx(model, torch.randn(1, 3, 32, 32))
    folded, report = fold_onnx(exported)
    assert sorted(a.bn.split("/")[-2] for a in report.affines) == ["ls1", "ls1", "ls2", "ls2"]
    assert {a.producer_type for a in report.affines} == {"MatMul"}
    assert all("ends a GELU" in s.reason for s in report.affines_skipped)
    mul = Counter(n.op_type for n in exported.graph.node)["Mul"] - Counter(n.op_type for n in folded.graph.node)["Mul"]
    assert mul == 4
    x = np.random.default_rng(0).normal(size=(2, 3, 32, 32)).astype(np.float32)
    served = ort_session(folded.SerializeToString(), "all", "cpu").run(None, {folded.graph.input[0].name: x})[0]
    with torch.no_grad():
        truth = copy.deepcopy(model).double()(torch.from_numpy(x).double()).numpy()
    assert float(np.abs(served - truth).max()) <= 1e-5 * float(np.abs(truth).max())
