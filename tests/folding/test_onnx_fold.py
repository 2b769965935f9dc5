from __future__ import annotations

import io

import ml_dtypes
import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from folding import fold_onnx
from folding.fold_math import BNParams, fold_backward
from folding.tolerances import LAYER_FP32, compare
from folding.verify import ort_session
from tests.folding.helpers import export_onnx, randomize_bn
from trainer.models import build_model, resolve_arch_args

RNG = np.random.default_rng(0)


def bn_arrays(c: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    var = 10 ** rng.uniform(-2, 2, c)
    var[0] = 1e-7
    return (rng.uniform(0.25, 1.75, c), rng.uniform(-1, 1, c), rng.uniform(-2, 2, c), var)


def bn_node(x: str, y: str, c: int, opset: int, eps: float = 1e-5, prefix: str = "bn", seed: int = 0,
            dtype=np.float32):
    scale, bias, mean, var = bn_arrays(c, seed)
    inits = [numpy_helper.from_array(a.astype(dtype), f"{prefix}_{n}")
             for a, n in ((scale, "scale"), (bias, "bias"), (mean, "mean"), (var, "var"))]
    attrs = {"epsilon": eps}
    if opset < 7:
        attrs.update(is_test=1, spatial=1)
    elif opset < 9:
        attrs.update(spatial=1)
    node = helper.make_node("BatchNormalization", [x] + [i.name for i in inits], [y], name=f"{prefix}_node", **attrs)
    return node, inits


def make_model(nodes, inits, inputs, outputs, opset: int = 17) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8 if opset >= 13 else 7
    inferred = onnx.shape_inference.infer_shapes(model)
    for out, inf in zip(model.graph.output, inferred.graph.output, strict=False):
        if not out.type.tensor_type.HasField("shape"):
            out.CopyFrom(inf)
    return model


def run(model: onnx.ModelProto, x: np.ndarray, name: str | None = None) -> np.ndarray:
    sess = ort_session(model.SerializeToString(), "disable", "cpu")
    return sess.run(None, {name or sess.get_inputs()[0].name: x})[0]


def check(model: onnx.ModelProto, x: np.ndarray, folded_count: int, tol=LAYER_FP32):
    before = model.SerializeToString()
    folded, report = fold_onnx(model)
    assert model.SerializeToString() == before, "input model was mutated"
    assert len(report.folded) == folded_count, report
    assert report.bn_before - report.bn_after == folded_count
    onnx.checker.check_model(folded, full_check=True)
    c = compare(run(folded, x), run(model, x), tol)
    assert c.passed, c
    assert [i.name for i in folded.graph.input] == [i.name for i in model.graph.input]
    assert [o.name for o in folded.graph.output] == [o.name for o in model.graph.output]
    return folded, report


def conv_model(kind: str, groups: int, opset: int, bias: bool, dtype=np.float32, rng: np.random.Generator = RNG):
    cin, cout, k = 8, 12, 3
    if kind == "Conv":
        w = rng.normal(size=(cout, cin // groups, k, k))
    else:
        w = rng.normal(size=(cin, cout // groups, k, k))
    inits = [numpy_helper.from_array(w.astype(dtype), "W")]
    ins = ["x", "W"]
    if bias:
        inits.append(numpy_helper.from_array(rng.normal(size=cout).astype(dtype), "B"))
        ins.append("B")
    conv = helper.make_node(kind, ins, ["z"], name="producer", group=groups, pads=[1, 1, 1, 1],
                            **({"strides": [2, 2], "output_padding": [1, 1]} if kind == "ConvTranspose" else {}))
    bn, bn_inits = bn_node("z", "y", cout, opset, dtype=dtype)
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype)) if dtype != ml_dtypes.bfloat16 else TensorProto.BFLOAT16
    return make_model([conv, bn], inits + bn_inits, [helper.make_tensor_value_info("x", elem, [None, cin, 9, 9])],
                      [helper.make_tensor_value_info("y", elem, None)], opset)


@pytest.mark.parametrize("opset", [7, 9, 14, 15, 17])
@pytest.mark.parametrize("kind,groups", [("Conv", 1), ("Conv", 4), ("ConvTranspose", 1), ("ConvTranspose", 2)])
@pytest.mark.parametrize("bias", [True, False])
def test_conv_and_conv_transpose_every_bn_opset(opset, kind, groups, bias):
    folded, report = check(conv_model(kind, groups, opset, bias), RNG.normal(size=(2, 8, 9, 9)).astype(np.float32), 1)
    assert report.folded[0].into == "producer"
    assert [n.name for n in folded.graph.node] == ["producer"]
    assert not any(t.name.startswith("bn_") for t in folded.graph.initializer), "unused BN initializers remain"


def test_bn_opset6_is_test_and_training_mode_are_respected():
    m6 = conv_model("Conv", 1, 6, True)
    folded, report = fold_onnx(m6)
    assert len(report.folded) == 1
    # weights equal the float64 formula cast once
    w = numpy_helper.to_array(m6.graph.initializer[0]).astype(np.float64)
    b = numpy_helper.to_array(m6.graph.initializer[1]).astype(np.float64)
    p = BNParams.create(*(numpy_helper.to_array(t).astype(np.float64) for t in m6.graph.initializer[4:6]),
                        *(numpy_helper.to_array(t).astype(np.float64) for t in m6.graph.initializer[2:4]),
                        float(np.float32(1e-5)))  # ONNX stores epsilon as float32
    w2, b2 = fold_backward(w, b, p)
    got = {t.name: numpy_helper.to_array(t) for t in folded.graph.initializer}
    np.testing.assert_array_equal(got["W"], w2.astype(np.float32))
    np.testing.assert_array_equal(got["B"], b2.astype(np.float32))

    train6 = conv_model("Conv", 1, 6, True)
    for a in train6.graph.node[1].attribute:
        if a.name == "is_test":
            a.i = 0
    assert "is_test=0" in fold_onnx(train6)[1].skipped[0].reason
    train15 = conv_model("Conv", 1, 15, True)
    train15.graph.node[1].attribute.append(helper.make_attribute("training_mode", 1))
    assert "training_mode=1" in fold_onnx(train15)[1].skipped[0].reason


@pytest.mark.parametrize("trans_a,trans_b,alpha,beta,c_shape", [
    (0, 0, 1.0, 1.0, (6,)), (1, 1, 0.5, 2.0, (1, 6)), (0, 1, 1.5, 0.5, None), (1, 0, 1.0, 1.0, (1,)),
])
def test_gemm_bn(trans_a, trans_b, alpha, beta, c_shape):
    k, m = 5, 6
    a_shape = [k, None] if trans_a else [None, k]
    w = RNG.normal(size=(m, k) if trans_b else (k, m)).astype(np.float32)
    inits = [numpy_helper.from_array(w, "W")]
    ins = ["a", "W"]
    if c_shape:
        inits.append(numpy_helper.from_array(RNG.normal(size=c_shape).astype(np.float32), "C"))
        ins.append("C")
    gemm = helper.make_node("Gemm", ins, ["z"], name="gemm", transA=trans_a, transB=trans_b, alpha=alpha, beta=beta)
    bn, bn_inits = bn_node("z", "y", m, 17)
    model = make_model([gemm, bn], inits + bn_inits, [helper.make_tensor_value_info("a", TensorProto.FLOAT, a_shape)],
                       [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    x = RNG.normal(size=(k, 4) if trans_a else (4, k)).astype(np.float32)
    check(model, x, 1) if not trans_a else _check_transposed(model, x)


def _check_transposed(model, x):
    folded, report = fold_onnx(model)
    assert len(report.folded) == 1
    c = compare(run(folded, x), run(model, x), LAYER_FP32)
    assert c.passed, c


@pytest.mark.parametrize("with_add", [True, False])
def test_matmul_add_bn(with_add):
    k, m = 7, 5
    inits = [numpy_helper.from_array(RNG.normal(size=(k, m)).astype(np.float32), "W")]
    nodes = [helper.make_node("MatMul", ["a", "W"], ["mm"], name="matmul")]
    src = "mm"
    if with_add:
        inits.append(numpy_helper.from_array(RNG.normal(size=m).astype(np.float32), "bias"))
        nodes.append(helper.make_node("Add", ["mm", "bias"], ["z"], name="add"))
        src = "z"
    bn, bn_inits = bn_node(src, "y", m, 15)
    model = make_model(nodes + [bn], inits + bn_inits, [helper.make_tensor_value_info("a", TensorProto.FLOAT, [None, k])],
                       [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    x = RNG.normal(size=(6, k)).astype(np.float32)
    folded, report = fold_onnx(model)
    assert len(report.folded) == 1 and report.bn_after == 0
    onnx.checker.check_model(folded, full_check=True)
    assert compare(run(folded, x), run(model, x), LAYER_FP32).passed


def test_matmul_on_rank3_input_is_skipped():
    k, m = 4, 3
    w = numpy_helper.from_array(RNG.normal(size=(k, m)).astype(np.float32), "W")
    mm = helper.make_node("MatMul", ["a", "W"], ["z"], name="matmul")
    bn, bn_inits = bn_node("z", "y", m, 15)
    model = make_model([mm, bn], [w] + bn_inits, [helper.make_tensor_value_info("a", TensorProto.FLOAT, [2, m, k])],
                       [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    _, report = fold_onnx(model)
    assert not report.folded and "rank" in report.skipped[0].reason


class _LinearNorm(torch.nn.Module):
    """LeViT's LinearNorm: ``bn(linear(x).flatten(0, 1)).reshape_as(...)`` on (B, T, C) tokens (``mix``: a
    flatten that mixes tokens into the features, which the BN's channels then are not)."""

    def __init__(self, bias: bool, mix: bool = False) -> None:
        super().__init__()
        self.mix = mix
        self.linear = torch.nn.Linear(6, 5, bias=bias)
        self.bn = torch.nn.BatchNorm1d(5 * 4 if mix else 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.linear(x)
        return self.bn(y.flatten(1) if self.mix else y.flatten(0, 1)).reshape_as(y)


@pytest.mark.parametrize("bias", [False, True])
def test_matmul_bn_through_a_flatten_that_keeps_the_features(bias):
    """The BN1d sees (B*T, C) rows, each one token's features: it folds into the MatMul's columns (a bias Add on
    the last axis is made when the Linear has none); the Shape that ``reshape_as`` reads does not stop it."""
    model = randomize_bn(_LinearNorm(bias)).eval()
    x = np.random.default_rng(11).normal(size=(3, 4, 6)).astype(np.float32)   # RNG's draws stay the other tests
    folded, report = check(_export_tokens(model), x, 1)
    assert len(report.folded) == 1 and report.folded[0].producer_type == "MatMul"
    with torch.no_grad():
        truth = model.double()(torch.from_numpy(x).double()).numpy()
    assert np.abs(run(folded, x) - truth).max() <= 1e-5 * np.abs(truth).max()


def test_a_flatten_that_mixes_tokens_into_the_features_is_not_looked_through():
    model = randomize_bn(_LinearNorm(True, mix=True)).eval()
    folded, report = fold_onnx(_export_tokens(model))
    assert not report.folded and report.bn_after == 1 and "Flatten" in report.skipped[0].reason


class _LinearTransposedNorm(torch.nn.Module):
    """A Linear on (B, T, C) tokens read by a BatchNorm1d as (B, C, T) (speech and point-cloud models), or
    (``other_axis``) a Linear on (B, A, T, C) whose BatchNorm2d after ``transpose(1, 2)`` normalises the T axis,
    which is not the Linear's features."""

    def __init__(self, bias: bool, other_axis: bool = False) -> None:
        super().__init__()
        self.other_axis = other_axis
        self.linear = torch.nn.Linear(6, 5, bias=bias)
        self.bn = torch.nn.BatchNorm2d(4) if other_axis else torch.nn.BatchNorm1d(5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.linear(x).transpose(1, 2)).transpose(1, 2)


@pytest.mark.parametrize("bias", [False, True])
def test_matmul_bn_through_a_transpose_that_puts_the_features_on_axis_1(bias):
    model = randomize_bn(_LinearTransposedNorm(bias)).eval()
    x = np.random.default_rng(12).normal(size=(3, 4, 6)).astype(np.float32)
    folded, report = check(_export_tokens(model), x, 1)
    assert len(report.folded) == 1 and report.folded[0].producer_type == "MatMul"
    assert [n.op_type for n in folded.graph.node].count("Transpose") == 2       # only the BN went
    with torch.no_grad():
        truth = model.double()(torch.from_numpy(x).double()).numpy()
    assert np.abs(run(folded, x) - truth).max() <= 1e-5 * np.abs(truth).max()


def test_a_transpose_that_puts_another_axis_on_axis_1_is_not_looked_through():
    model = randomize_bn(_LinearTransposedNorm(True, other_axis=True)).eval()
    folded, report = fold_onnx(export_onnx(model, torch.randn(2, 3, 4, 6)))
    assert not report.folded and report.bn_after == 1 and "Transpose" in report.skipped[0].reason


def _export_tokens(model: torch.nn.Module) -> onnx.ModelProto:
    return export_onnx(model, torch.randn(3, 4, 6))


def test_preconditions_weights_as_inputs_and_shared_outputs():
    # BN statistics as graph inputs: they may change at run time
    model = conv_model("Conv", 1, 15, True)
    mean_init = next(t for t in model.graph.initializer if t.name == "bn_mean")
    model.graph.initializer.remove(mean_init)
    model.graph.input.append(helper.make_tensor_value_info("bn_mean", TensorProto.FLOAT, [12]))
    assert "not a constant" in fold_onnx(model)[1].skipped[0].reason
    # producer output also a graph output
    model = conv_model("Conv", 1, 15, True)
    model.graph.output.append(helper.make_tensor_value_info("z", TensorProto.FLOAT, None))
    assert "also used elsewhere" in fold_onnx(model)[1].skipped[0].reason


def test_shared_initializer_is_never_changed_under_another_user():
    w = numpy_helper.from_array(RNG.normal(size=(4, 4, 1, 1)).astype(np.float32), "W")
    conv1 = helper.make_node("Conv", ["x", "W"], ["z1"], name="conv1")
    bn1, i1 = bn_node("z1", "y1", 4, 17, prefix="bn1", seed=1)
    conv2 = helper.make_node("Conv", ["x", "W"], ["y2"], name="conv2")  # reads W, no BN
    model = make_model([conv1, bn1, conv2], [w] + i1, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 4, 3, 3])],
                       [helper.make_tensor_value_info("y1", TensorProto.FLOAT, None),
                        helper.make_tensor_value_info("y2", TensorProto.FLOAT, None)])
    folded, report = fold_onnx(model)
    assert len(report.folded) == 1
    inits = {t.name: numpy_helper.to_array(t) for t in folded.graph.initializer}
    np.testing.assert_array_equal(inits["W"], numpy_helper.to_array(w))  # conv2 still reads the original
    assert folded.graph.node[0].input[1] != "W"
    x = RNG.normal(size=(2, 4, 3, 3)).astype(np.float32)
    sess_f, sess_m = (ort_session(m.SerializeToString(), "disable", "cpu") for m in (folded, model))
    for a, b in zip(sess_f.run(None, {"x": x}), sess_m.run(None, {"x": x}), strict=False):
        assert compare(a, b, LAYER_FP32).passed


def test_forward_fold_into_unpadded_conv_and_skip_padded():
    nodes, inits = [], []
    inits.append(numpy_helper.from_array(RNG.normal(size=(6, 3, 3, 3)).astype(np.float32), "W0"))
    nodes.append(helper.make_node("Conv", ["x", "W0"], ["c0"], name="conv0"))
    nodes.append(helper.make_node("Relu", ["c0"], ["r0"], name="relu0"))
    bn, bi = bn_node("r0", "b0", 6, 17, prefix="bnA")
    nodes.append(bn)
    inits += bi
    inits.append(numpy_helper.from_array(RNG.normal(size=(6, 3, 1, 1)).astype(np.float32), "W1"))
    nodes.append(helper.make_node("Conv", ["b0", "W1"], ["c1"], name="conv1", group=2))
    nodes.append(helper.make_node("Relu", ["c1"], ["r1"], name="relu1"))
    bn2, bi2 = bn_node("r1", "b1", 6, 17, prefix="bnB", seed=3)
    nodes.append(bn2)
    inits += bi2
    inits.append(numpy_helper.from_array(RNG.normal(size=(2, 6, 3, 3)).astype(np.float32), "W2"))
    nodes.append(helper.make_node("Conv", ["b1", "W2"], ["y"], name="conv2", pads=[1, 1, 1, 1]))
    model = make_model(nodes, inits, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 3, 9, 9])],
                       [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    folded, report = check(model, RNG.normal(size=(2, 3, 9, 9)).astype(np.float32), 1)
    assert report.folded[0].direction == "forward" and report.folded[0].into == "conv1"
    assert "not exact at the borders" in report.skipped[0].reason


@pytest.mark.parametrize("seed", range(6))
def test_float16_fold_in_float64_costs_less_than_float16_arithmetic(seed):
    """Fold an fp16 graph (in float64, cast once) and run it in fp16 (torch's CPU half kernels, since onnxruntime
    has no fp16 Conv on CPU), against the float64 truth of the unfolded graph. Rounding the folded weights once
    costs about as much as the unfolded graph's own fp16 rounding (1.03-1.43x its mean error over 40 draws), while
    the same fold computed in fp16 arithmetic is 2.5-4.2x worse than ours: the float64 fold is what keeps it close.
    Seeded draws, so the margins do not depend on which tests ran before."""
    rng = np.random.default_rng(100 + seed)
    model16 = conv_model("Conv", 1, 17, True, np.float16, rng=rng)
    folded16, report = fold_onnx(model16)
    assert len(report.folded) == 1
    assert all(t.data_type == TensorProto.FLOAT16 for t in folded16.graph.initializer)
    src = {t.name: torch.from_numpy(numpy_helper.to_array(t).copy()) for t in model16.graph.initializer}
    out = {t.name: torch.from_numpy(numpy_helper.to_array(t).copy()) for t in folded16.graph.initializer}
    x = torch.randn(4, 8, 9, 9, generator=torch.Generator().manual_seed(seed)).half()
    eps = float(np.float32(1e-5))

    def unfolded(dtype):
        p = {k: v.to(dtype) for k, v in src.items()}
        z = torch.nn.functional.conv2d(x.to(dtype), p["W"], p["B"], padding=1)
        return torch.nn.functional.batch_norm(z, p["bn_mean"], p["bn_var"], p["bn_scale"], p["bn_bias"], False, 0.0, eps)

    truth = unfolded(torch.float64)

    def error(y):
        return (y.double() - truth).abs().mean().item()

    unfolded_err = error(unfolded(torch.float16))
    folded_err = error(torch.nn.functional.conv2d(x, out["W"], out["B"], padding=1))
    s16 = src["bn_scale"] / torch.sqrt(src["bn_var"] + torch.tensor(eps, dtype=torch.float16))
    w16 = src["W"] * s16[:, None, None, None]
    b16 = (src["B"] - src["bn_mean"]) * s16 + src["bn_bias"]
    fp16_fold_err = error(torch.nn.functional.conv2d(x, w16, b16, padding=1))
    assert folded_err <= 1.6 * unfolded_err, (folded_err, unfolded_err)
    assert fp16_fold_err >= 2 * folded_err, (fp16_fold_err, folded_err)


def test_bfloat16_graph_folds_in_float64_and_casts_once():
    model = conv_model("Conv", 2, 17, True, ml_dtypes.bfloat16)
    folded, report = fold_onnx(model)
    assert len(report.folded) == 1
    get = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    p = BNParams.create(get["bn_mean"].astype(np.float64), get["bn_var"].astype(np.float64),
                        get["bn_scale"].astype(np.float64), get["bn_bias"].astype(np.float64), float(np.float32(1e-5)))
    w2, b2 = fold_backward(get["W"].astype(np.float64), get["B"].astype(np.float64), p)
    out = {t.name: t for t in folded.graph.initializer}
    assert out["W"].data_type == TensorProto.BFLOAT16
    np.testing.assert_array_equal(numpy_helper.to_array(out["W"]).astype(np.float64),
                                  w2.astype(ml_dtypes.bfloat16).astype(np.float64))
    np.testing.assert_array_equal(numpy_helper.to_array(out["B"]).astype(np.float64),
                                  b2.astype(ml_dtypes.bfloat16).astype(np.float64))


def test_torch_exported_resnet_with_identity_wrapped_constants():
    """torch's exporter without constant folding wraps parameters in Identity nodes; they resolve."""
    model = randomize_bn(build_model("mobilenetv2", resolve_arch_args("mobilenetv2", [1, 8, 8], 10))).eval()
    x = torch.randn(3, 1, 8, 8)
    buf = io.BytesIO()
    torch.onnx.export(model, (x,), buf, dynamo=False, do_constant_folding=False, input_names=["input"],
                      output_names=["output"], opset_version=17)
    exported = onnx.load_from_string(buf.getvalue())
    n_bn = sum(n.op_type == "BatchNormalization" for n in exported.graph.node)
    assert n_bn == 19  # the export kept every BN: our pass does the folding
    folded, report = fold_onnx(exported)
    assert len(report.folded) == n_bn and report.bn_after == 0
    assert not any(n.op_type == "Identity" for n in folded.graph.node)
    c = compare(run(folded, x.numpy(), "input"), run(exported, x.numpy(), "input"), LAYER_FP32)
    assert c.passed, c


def test_bn_before_a_bias_free_matmul_is_never_folded_wrongly():
    """BN (after Relu) -> MatMul with no bias: the BN's shift t would need a bias (t @ W); folding only the
    scale into W silently drops it. The pass must leave such a BN in place (or fold it exactly)."""
    bn, inits = bn_node("r", "b", 4, 17, seed=3)
    w = numpy_helper.from_array(np.random.default_rng(1).standard_normal((4, 3)).astype(np.float32), "W")
    nodes = [helper.make_node("Relu", ["x"], ["r"]), bn, helper.make_node("MatMul", ["b", "W"], ["y"])]
    model = make_model(nodes, inits + [w], [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])],
                       [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    x = np.random.default_rng(2).standard_normal((16, 4)).astype(np.float32)
    folded, report = fold_onnx(model)
    c = compare(run(folded, x), run(model, x), LAYER_FP32)
    assert c.passed, c
    assert not report.folded and "no bias" in report.skipped[0].reason


def test_check_onnx_matches_the_full_checker_without_serialising_the_weights():
    """check_onnx runs onnx.checker on the graph without its large weights and checks their sizes itself: a
    good model passes, a truncated weight and a graph error are refused, as the full checker refuses them."""
    from folding.onnx_io import check_onnx
    from foldserve.errors import FoldError

    w = RNG.normal(size=(64, 32, 3, 3)).astype(np.float32)           # 18,432 values: over the light limit
    conv = helper.make_node("Conv", ["x", "W"], ["y"], name="c", pads=[1, 1, 1, 1])
    model = make_model([conv], [numpy_helper.from_array(w, "W")],
                       [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 32, 8, 8])],
                       [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    check_onnx(model, "served")
    onnx.checker.check_model(model, full_check=True)

    short = onnx.ModelProto()
    short.CopyFrom(model)
    short.graph.initializer[0].raw_data = short.graph.initializer[0].raw_data[:-4]
    with pytest.raises(FoldError, match=r"served ONNX model fails onnx.checker: initializer 'W'.*expected 73728"):
        check_onnx(short, "served")

    bad = onnx.ModelProto()
    bad.CopyFrom(model)
    bad.graph.node[0].input[1] = "nowhere"                        # a weight nobody defines
    with pytest.raises(onnx.checker.ValidationError):
        onnx.checker.check_model(bad, full_check=True)
    with pytest.raises(FoldError, match="reference ONNX model fails onnx.checker"):
        check_onnx(bad, "reference")
