"""Fixtures for folding tests: non-trivial BN statistics and the one tolerance check."""
from __future__ import annotations

import io
import warnings

import numpy as np
import onnx
import torch
from torch import nn

from folding.tolerances import LAYER_FP32, Tolerance, compare


def randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random means, variances far from 1 (log-uniform 1e-2..1e2), and one channel with var ~ 1e-7."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
            c = m.num_features
            m.running_mean.copy_(torch.rand(c, generator=g) * 4 - 2)
            m.running_var.copy_(10 ** (torch.rand(c, generator=g) * 4 - 2))
            m.running_var[0] = 1e-7
            if m.affine:
                m.weight.data.copy_(torch.rand(c, generator=g) * 1.5 + 0.25)
                m.bias.data.copy_(torch.rand(c, generator=g) * 2 - 1)
    return model


def assert_close(actual, expected, tol: Tolerance = LAYER_FP32) -> None:
    a = actual.detach().numpy() if isinstance(actual, torch.Tensor) else np.asarray(actual)
    e = expected.detach().numpy() if isinstance(expected, torch.Tensor) else np.asarray(expected)
    c = compare(a, e, tol)
    assert c.passed, f"folded output differs: {c}"


def state_snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_unchanged(model: nn.Module, snapshot: dict[str, torch.Tensor]) -> None:
    now = model.state_dict()
    assert now.keys() == snapshot.keys()
    for k, v in snapshot.items():
        assert torch.equal(now[k], v), f"input model was mutated at {k}"


def torch64(model: nn.Module, x: np.ndarray) -> np.ndarray:
    """A module's output in float64 (a copy of it runs, so the model is not changed)."""
    import copy

    with torch.no_grad():
        return copy.deepcopy(model).double()(torch.from_numpy(x).double()).numpy()


def assert_close_to_scale(served: np.ndarray, truth: np.ndarray, rel: float = 1e-4) -> None:
    scale = float(np.abs(truth).max())
    err = float(np.abs(served - truth).max())
    assert err <= rel * scale, f"served differs from torch's unfolded output by {err:.3g} (scale {scale:.3g})"


def scale_layer_weights(model_path, layer: str, factor: float = 1.05) -> None:
    """Multiply the weight of node ``layer`` in the ONNX file by ``factor`` (a broken fold, for the verifier)."""
    import onnx
    from onnx import numpy_helper

    m = onnx.load(str(model_path))
    node = next(n for n in m.graph.node if n.name == layer)
    t = next(i for i in m.graph.initializer if i.name == node.input[1])
    t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t) * factor, t.name))
    onnx.save(m, str(model_path))


def export_onnx(model: nn.Module, example: torch.Tensor, *, opset: int = 17,
                constant_folding: bool = False) -> onnx.ModelProto:
    """``model`` through torch's TorchScript exporter, BN kept unless ``constant_folding``: input ``x``,
    output ``y``, the batch axis dynamic."""
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (example,), buf, dynamo=False, opset_version=opset,
                          do_constant_folding=constant_folding, input_names=["x"], output_names=["y"],
                          dynamic_axes={"x": {0: "b"}, "y": {0: "b"}})
    return onnx.load_from_string(buf.getvalue())
