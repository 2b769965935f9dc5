"""Training-time networks from timm (RepVGG, MobileOne, RepGhost) fold into their library's deploy form: no BN,
as many Conv nodes as ``timm.utils.reparameterize_model`` gives, outputs equal to torch's in float64."""
from __future__ import annotations

import copy
import io
import warnings
from collections import Counter

import numpy as np
import onnx
import pytest
import torch

from folding.onnx_passes import fold_onnx
from folding.source import ort_session
from tests.zoo import library, randomize_bn

HW = 64


def _export(model: torch.nn.Module, *, constant_folding: bool) -> onnx.ModelProto:
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.randn(1, 3, HW, HW),), buf, dynamo=False, opset_version=17,
                          do_constant_folding=constant_folding, input_names=["x"], output_names=["y"],
                          dynamic_axes={"x": {0: "b"}, "y": {0: "b"}})
    return onnx.load_from_string(buf.getvalue())


@pytest.mark.parametrize("name", ["repvgg_a0", "mobileone_s0", "repghostnet_050"])
def test_timm_training_form_folds_to_the_deploy_form(name):
    timm = library("timm")
    from timm.utils import reparameterize_model

    model = randomize_bn(timm.create_model(name, pretrained=False))
    deploy = _export(reparameterize_model(copy.deepcopy(model)), constant_folding=True)
    folded, report = fold_onnx(_export(model, constant_folding=False))
    ops, deploy_ops = Counter(n.op_type for n in folded.graph.node), Counter(n.op_type for n in deploy.graph.node)
    assert ops["BatchNormalization"] == 0, report.skipped[:3]
    assert ops["Conv"] == deploy_ops["Conv"] and ops["Add"] == deploy_ops["Add"], (ops, deploy_ops)
    assert report.merges and not report.merges_skipped
    x = np.random.default_rng(0).normal(size=(2, 3, HW, HW)).astype(np.float32)
    sess = ort_session(folded.SerializeToString(), "all", "cpu")
    served = sess.run(None, {"x": x})[0]
    with torch.no_grad():
        truth = copy.deepcopy(model).double()(torch.from_numpy(x).double()).numpy()
    err, scale = float(np.abs(served - truth).max()), float(np.abs(truth).max())
    assert err <= 1e-5 * scale, f"{name}: {err:.3g} against scale {scale:.3g}"
