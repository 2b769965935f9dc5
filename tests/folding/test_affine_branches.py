"""Per-channel affine folding (frozen BN as Mul/Add), constant folding, and re-parameterised branches merged
into one Conv (RepVGG / MobileOne / ACNet): exact, reported, verified, localised, served."""
from __future__ import annotations

import json
import shutil
from collections import Counter
from functools import partial
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from folding.onnx_passes import fold_onnx
from folding.source import ort_session
from foldserve.entry import read_fold_report
from tests.conftest import run_cli
from tests.folding.helpers import assert_close_to_scale, export_onnx, scale_layer_weights, torch64
from tests.zoo import FrozenBatchNorm2d, FrozenNet, RepNet, frozen_net, rep_net

HW = 32


def _export(model: torch.nn.Module, *, constant_folding: bool = False, example: torch.Tensor | None = None,
            opset: int = 17) -> onnx.ModelProto:
    x = torch.randn(2, 3, HW, HW) if example is None else example
    return export_onnx(model, x, opset=opset, constant_folding=constant_folding)


def _run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    sess = ort_session(model.SerializeToString(), "disable", "cpu")
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


_assert_close_to_scale = partial(assert_close_to_scale, rel=1e-5)
_torch64 = torch64


def _ops(model: onnx.ModelProto) -> Counter:
    return Counter(n.op_type for n in model.graph.node)


X = np.random.default_rng(0).normal(size=(3, 3, HW, HW)).astype(np.float32)


@pytest.mark.parametrize("constant_folding", [False, True])
def test_frozen_bn_mul_add_folds_into_every_layer(constant_folding):
    """Conv, grouped Conv and grouped ConvTranspose followed by FrozenBatchNorm2d: no per-channel Mul/Add left,
    the output equals torch's; without the exporter's constant folding the scale is a constant subgraph first."""
    model = frozen_net()
    folded, report = fold_onnx(_export(model, constant_folding=constant_folding))
    ops = _ops(folded)
    assert ops["Mul"] == ops["Add"] == ops["Sub"] == 0, ops
    assert len(report.affines) == FrozenNet.frozen and not report.affines_skipped
    assert report.affine_before == 2 * FrozenNet.frozen and report.affine_after == 0
    assert {a.producer_type for a in report.affines} == {"Conv", "ConvTranspose"}
    assert all(a.bn_type == "Mul+Add" and a.direction == "backward" for a in report.affines)
    assert (report.constants_folded > 0) == (not constant_folding)
    _assert_close_to_scale(_run(folded, X), _torch64(model, X))


def _conv_then_const(op: str, const: np.ndarray, *, pads: int = 1, before: bool = False, group: int = 1,
                     const_first: bool = False) -> onnx.ModelProto:
    """x -> Conv(8 -> 8, 3x3) -> op(const), or x -> op(const) -> Conv with ``before``; ``op(const, t)`` with
    ``const_first``."""
    rng = np.random.default_rng(1)
    w = numpy_helper.from_array(rng.normal(size=(8, 8 // group, 3, 3)).astype(np.float32), "W")
    b = numpy_helper.from_array(rng.normal(size=8).astype(np.float32), "B")
    c = numpy_helper.from_array(const.astype(np.float32), "C")
    conv_in, op_in = ("t", "x") if before else ("x", "t")
    nodes = [helper.make_node("Conv", [conv_in, "W", "B"], ["t" if not before else "y"], name="conv",
                              pads=[pads] * 4, group=group),
             helper.make_node(op, ["C", op_in] if const_first else [op_in, "C"], ["y" if not before else "t"],
                              name="affine")]
    if before:
        nodes.reverse()
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 8, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [w, b, c])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


XS = np.random.default_rng(2).normal(size=(2, 8, 8, 8)).astype(np.float32)


def test_a_constant_that_broadcasts_on_another_axis_is_left_with_the_reason():
    """A (C,) constant after an NCHW Conv multiplies along the width, not the channels: folding it into the
    conv's output channels would be wrong (what onnxslim does); it is left, named, and the output is kept."""
    model = _conv_then_const("Mul", np.linspace(0.5, 2.0, 8))
    folded, report = fold_onnx(model)
    assert not report.affines and len(report.affines_skipped) == 1
    assert "broadcasts on axis [3]" in report.affines_skipped[0].reason
    assert report.affine_before == report.affine_after == 1
    np.testing.assert_array_equal(_run(folded, XS), _run(model, XS))


@pytest.mark.parametrize("op,const,group,const_first", [
    ("Mul", np.linspace(0.5, 2.0, 8).reshape(8, 1, 1), 1, False),
    ("Div", np.linspace(0.5, 2.0, 8).reshape(1, 8, 1, 1), 1, False),
    ("Add", np.linspace(-1, 1, 8).reshape(8, 1, 1), 4, False),  # ORT#12498: ConvAddFusion was wrong with groups
    ("Sub", np.linspace(-1, 1, 8).reshape(8, 1, 1), 2, False),
    ("Mul", np.array(0.25), 1, False),                           # a scalar is per channel too
    ("Mul", np.linspace(0.5, 2.0, 8).reshape(8, 1, 1), 1, True),  # gamma * x (a layer scale written so)
    ("Sub", np.linspace(-1, 1, 8).reshape(8, 1, 1), 2, True),   # c - x
    ("Add", np.linspace(-1, 1, 8).reshape(1, 8, 1, 1), 1, True),
])
def test_per_channel_mul_add_sub_div_fold_backward_group_aware(op, const, group, const_first):
    model = _conv_then_const(op, const, group=group, const_first=const_first)
    folded, report = fold_onnx(model)
    assert [n.op_type for n in folded.graph.node] == ["Conv"], report.affines_skipped
    assert report.affines[0].into == "conv" and report.affines[0].bn_type == op
    _assert_close_to_scale(_run(folded, XS), _run(model, XS).astype(np.float64))


def test_forward_fold_is_exact_or_left_at_padded_borders():
    """Before a Conv: a pure scale folds forward even into a padded Conv (a scaled zero is zero); a shift does
    not (the padded border would see 0 instead of the shift) and is left with that reason; without padding
    it folds."""
    scale = _conv_then_const("Mul", np.linspace(0.5, 2, 8).reshape(8, 1, 1), before=True)
    folded, report = fold_onnx(scale)
    assert [n.op_type for n in folded.graph.node] == ["Conv"] and report.affines[0].direction == "forward"
    _assert_close_to_scale(_run(folded, XS), _run(scale, XS).astype(np.float64))

    shift = _conv_then_const("Sub", np.linspace(-1, 1, 8).reshape(8, 1, 1), before=True)
    folded, report = fold_onnx(shift)
    assert not report.affines and "zero-pads its input" in report.affines_skipped[0].reason
    unpadded = _conv_then_const("Sub", np.linspace(-1, 1, 8).reshape(8, 1, 1), before=True, pads=0)
    folded, report = fold_onnx(unpadded)
    assert [n.op_type for n in folded.graph.node] == ["Conv"]
    _assert_close_to_scale(_run(folded, XS), _run(unpadded, XS).astype(np.float64))


def test_repvgg_mobileone_acnet_branches_merge_into_the_deploy_form():
    model = rep_net()
    reference = _export(model)
    folded, report = fold_onnx(reference)
    ops = _ops(folded)
    assert ops["BatchNormalization"] == 0 and ops["Add"] == 0 and ops["Conv"] == RepNet.deploy_convs, ops
    assert report.conv_before == _ops(reference)["Conv"] and report.conv_after == RepNet.deploy_convs
    assert len(report.merges) == RepNet.deploy_convs and not report.merges_skipped and not report.skipped
    kinds = [" ".join(m.branches) for m in report.merges]
    assert any("3x3" in k and "1x1" in k and "(identity)" in k for k in kinds)       # RepVGG / MobileOne
    assert any("1x3" in k and "3x1" in k for k in kinds)                              # ACNet
    assert any("(identity) subtracted" in k and "scaled per channel" in k for k in kinds)  # RepMixer
    _assert_close_to_scale(_run(folded, X), _torch64(model, X))


def _two_branches(pads_b: list[int], stride: int = 1, identity: bool = False) -> onnx.ModelProto:
    rng = np.random.default_rng(3)
    inits = [numpy_helper.from_array(rng.normal(size=(8, 8, 3, 3)).astype(np.float32), "Wa"),
             numpy_helper.from_array(rng.normal(size=(8, 8, 3, 3)).astype(np.float32), "Wb")]
    nodes = [helper.make_node("Conv", ["x", "Wa"], ["a"], name="a", pads=[1, 1, 1, 1], strides=[stride] * 2),
             helper.make_node("Conv", ["x", "Wb"], ["b"], name="b", pads=pads_b, strides=[stride] * 2),
             helper.make_node("Add", ["a", "b"], ["s"], name="sum")]
    out = "s"
    if identity:
        nodes.append(helper.make_node("Add", ["s", "x"], ["y"], name="sum2"))
        out = "y"
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 8, 8, 8])],
                              [helper.make_tensor_value_info(out, TensorProto.FLOAT, None)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def test_branches_that_do_not_line_up_are_left_with_the_reason():
    """3x3 with pads 1 + 3x3 with pads (0, 0, 2, 2): the same output shape, shifted by one pixel."""
    model = _two_branches([0, 0, 2, 2])
    folded, report = fold_onnx(model)
    assert not report.merges and "padding does not line the branches up" in report.merges_skipped[0].reason
    np.testing.assert_array_equal(_run(folded, XS), _run(model, XS))
    exact = _two_branches([1, 1, 1, 1], identity=True)
    folded, report = fold_onnx(exact)
    assert [n.op_type for n in folded.graph.node] == ["Conv"] and len(report.merges[0].branches) == 3
    _assert_close_to_scale(_run(folded, XS), _run(exact, XS).astype(np.float64))


# --- end to end: fold -> verified entry -> served ----------------------------------------------------------

@pytest.fixture(scope="module")
def rep_repo(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("rep")
    models = {"rep_onnx": rep_net(), "frozen_pt2": frozen_net(), "rep_pt2": rep_net()}
    repo = tmp / "repo"
    for name, m in models.items():
        x = torch.randn(2, 3, HW, HW)
        if name.endswith("pt2"):
            src = tmp / f"{name}.pt2"
            ep = torch.export.export(m, (x,), dynamic_shapes=({0: torch.export.Dim("batch", max=1024)},))
            torch.export.save(ep, str(src))
        else:
            src = tmp / f"{name}.onnx"
            onnx.save(_export(m), str(src))
        proc = run_cli("fold", str(src), "--repository", str(repo), "--name", name, "--batch-sizes", "1,4")
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert "merged" in proc.stdout or "Mul+Add" in proc.stdout
    return {"repo": repo, "models": models}


def test_entries_are_verified_and_served_over_grpc_like_torch(rep_repo):
    import tritonclient.grpc as tgrpc

    from tests.server.conftest import ServerProcess

    for name in rep_repo["models"]:
        vdir = rep_repo["repo"] / name / "1"
        assert json.loads((vdir / "verification.json").read_text())["passed"]
        ops = _ops(onnx.load(str(vdir / "model.onnx")))
        assert ops["BatchNormalization"] == ops["Mul"] == 0, (name, ops)
        if name.startswith("rep"):
            assert ops["Conv"] == RepNet.deploy_convs
    x = np.random.default_rng(4).normal(size=(5, 3, HW, HW)).astype(np.float32)
    with ServerProcess(rep_repo["repo"]) as srv:
        client = tgrpc.InferenceServerClient(srv.grpc)
        for name, model in rep_repo["models"].items():
            meta = client.get_model_metadata(name, as_json=True)
            inp = tgrpc.InferInput(meta["inputs"][0]["name"], list(x.shape), "FP32")
            inp.set_data_from_numpy(x)
            out = meta["outputs"][0]["name"]
            served = client.infer(name, [inp], outputs=[tgrpc.InferRequestedOutput(out)]).as_numpy(out)
            _assert_close_to_scale(served, _torch64(model, x), rel=1e-4)
        client.close()


def test_a_bad_merge_is_caught_and_localised(rep_repo, tmp_path):
    """Perturb one merged Conv in the served file: verification fails and names that merge."""
    from folding.verify import VerifyOptions, verify_entry

    vdir = tmp_path / "rep_pt2" / "1"
    shutil.copytree(rep_repo["repo"] / "rep_pt2" / "1", vdir)
    target = read_fold_report(vdir).onnx.merges[3]
    scale_layer_weights(vdir / "model.onnx", target.into)
    report = verify_entry(vdir, VerifyOptions(batch_sizes=(2,), write=False))
    assert not report.passed and report.candidates["unfolded_torch"].passed
    assert report.localization.first_failing_layer == target.into
    assert report.localization.first_failing_bn == target.sum


def test_fold_report_of_version_1_still_reads(tmp_path: Path):
    """Entries folded before affine folds and merges existed (format 1) load unchanged."""
    from foldserve.records import EntryFoldReport, read_record

    f = tmp_path / "fold_report.json"
    f.write_text(json.dumps({"format_version": 1, "onnx": {"folded": [], "skipped": [], "bn_before": 2}}))
    report = read_record(EntryFoldReport, f)
    assert report.onnx.bn_before == 2 and report.onnx.merges == [] and report.onnx.affines == []


def test_a_sum_started_from_zero_still_merges():
    """timm's MobileOne computes ``0 + identity(x) + conv(x)``: the ``+ 0`` goes first, then the branches merge."""
    rng = np.random.default_rng(5)
    c = 8
    inits = [numpy_helper.from_array(rng.normal(size=(c, 1, 3, 3)).astype(np.float32), "W"),
             numpy_helper.from_array(np.array(0.0, np.float32), "zero"),
             *(numpy_helper.from_array(v.astype(np.float32), n) for n, v in (
                 ("g", rng.uniform(0.5, 1.5, c)), ("b", rng.normal(size=c)), ("m", rng.normal(size=c)),
                 ("v", rng.uniform(0.2, 2, c))))]
    nodes = [helper.make_node("BatchNormalization", ["x", "g", "b", "m", "v"], ["id"], name="identity"),
             helper.make_node("Add", ["zero", "id"], ["start"], name="start"),
             helper.make_node("Conv", ["x", "W"], ["conv"], name="dw", pads=[1] * 4, group=c),
             helper.make_node("Add", ["start", "conv"], ["y"], name="sum")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", c, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    folded, report = fold_onnx(model)
    assert [n.op_type for n in folded.graph.node] == ["Conv"] and report.constants_folded == 1
    assert sorted(report.merges[0].branches) == ["BatchNormalization 'identity' (identity)", "Conv 'dw' 3x3"]
    _assert_close_to_scale(_run(folded, XS), _run(model, XS).astype(np.float64))


def _rep_mixer(scale: np.ndarray) -> onnx.ModelProto:
    """``x + scale * (dw(x) - norm(x))`` (FastViT's RepMixer after the mixer's BN has folded)."""
    rng = np.random.default_rng(6)
    c = 8
    inits = [numpy_helper.from_array(rng.normal(size=(c, 1, 3, 3)).astype(np.float32), "W"),
             numpy_helper.from_array(rng.normal(size=c).astype(np.float32), "B"),
             numpy_helper.from_array(scale.astype(np.float32), "scale"),
             *(numpy_helper.from_array(v.astype(np.float32), n) for n, v in (
                 ("g", rng.uniform(0.5, 1.5, c)), ("b", rng.normal(size=c)), ("m", rng.normal(size=c)),
                 ("v", rng.uniform(0.2, 2, c))))]
    nodes = [helper.make_node("Conv", ["x", "W", "B"], ["mix"], name="dw", pads=[1] * 4, group=c),
             helper.make_node("BatchNormalization", ["x", "g", "b", "m", "v"], ["norm"], name="norm"),
             helper.make_node("Sub", ["mix", "norm"], ["diff"], name="diff"),
             helper.make_node("Mul", ["scale", "diff"], ["scaled"], name="layer_scale"),
             helper.make_node("Add", ["x", "scaled"], ["y"], name="residual")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", c, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


@pytest.mark.parametrize("shape", [(8, 1, 1), (1, 8, 1, 1), ()], ids=["CHW", "NCHW", "scalar"])
def test_a_rep_mixer_merges_with_its_signs_and_scale(shape):
    """Sub negates its right side and a per-channel (or scalar) Mul scales what it reads: one Conv remains."""
    scale = np.random.default_rng(7).uniform(-2, 2, size=shape)
    model = _rep_mixer(scale)
    folded, report = fold_onnx(model)
    assert [n.op_type for n in folded.graph.node] == ["Conv"], [n.op_type for n in folded.graph.node]
    assert report.merges[0].sum == "residual" and len(report.merges[0].branches) == 3
    assert {i.name for i in folded.graph.initializer} == set(folded.graph.node[0].input[1:])   # scale dropped
    _assert_close_to_scale(_run(folded, XS), _run(model, XS).astype(np.float64))


def test_a_scale_on_another_axis_stays_outside_the_merge():
    """A (W,) constant broadcasts on the width axis: it is no per-channel coefficient, so only ``dw(x) -
    norm(x)`` under it merges; the Mul and the residual Add stay, and the output is unchanged."""
    model = _rep_mixer(np.random.default_rng(8).uniform(0.5, 1.5, size=8))
    folded, report = fold_onnx(model)
    assert [n.op_type for n in folded.graph.node] == ["Conv", "Mul", "Add"]
    assert report.merges[0].sum == "diff" and report.merges[0].branches[1].endswith("(identity) subtracted")
    _assert_close_to_scale(_run(folded, XS), _run(model, XS).astype(np.float64))


def gelu_half(model: onnx.ModelProto) -> str:
    """The name of the ``* 0.5`` that ends the (only) GELU: the Mul whose output the second Conv reads."""
    second = [n for n in model.graph.node if n.op_type == "Conv"][1]
    return next(n.name for n in model.graph.node if n.op_type == "Mul" and n.output[0] == second.input[0])


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_the_half_that_ends_a_gelu_stays_so_onnxruntime_fuses_it(approximate, tmp_path):
    """Folding GELU's trailing ``* 0.5`` into the next Conv is exact but breaks onnxruntime's fusion of the pattern
    into one Gelu kernel (timm's FastViT-T8 ran 1.3x slower for it): it is left, with the reason; any other scale
    still folds, the 0.5 of torch's tanh form too (no pattern onnxruntime fuses)."""
    import onnxruntime as ort

    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.GELU(approximate=approximate),
                                torch.nn.Conv2d(8, 8, 3, padding=1), torch.nn.ReLU(),
                                torch.nn.Conv2d(8, 8, 1), FrozenBatchNorm2d(8)).eval()
    folded, report = fold_onnx(_export(model))
    kept = [s.bn for s in report.affines_skipped if "ends a GELU" in s.reason]
    assert folded.graph.node[-1].op_type == "Conv"                  # the frozen BN still folds
    so = ort.SessionOptions()
    so.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(folded.SerializeToString(), so, providers=["CPUExecutionProvider"])
    fused = _ops(onnx.load(str(tmp_path / "optimized.onnx")))["Gelu"]
    if approximate == "none":       # the x / sqrt 2 inside is no site either (it could never fold): one line
        assert kept == [gelu_half(folded)] == [s.bn for s in report.affines_skipped] and fused == 1
    else:
        assert not kept and fused == 0 and any(a.bn.endswith("Mul_5") for a in report.affines)   # c * x folds too
    _assert_close_to_scale(_run(folded, X), _torch64(model, X))


def test_the_scale_and_shift_that_end_a_layer_norm_stay_so_onnxruntime_fuses_it(tmp_path):
    """Before opset 17 a LayerNorm is exported as primitives ending in ``* gamma + beta``; on (N, C) features
    that broadcasts on the channel axis and could fold into the next Gemm, but onnxruntime then no longer fuses
    the seven nodes into one LayerNormalization: it is left, with the reason."""
    import onnxruntime as ort

    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.LayerNorm(32), torch.nn.Linear(32, 8)).eval()
    folded, report = fold_onnx(_export(model, example=torch.randn(4, 16), opset=13))
    assert not report.affines and len(report.affines_skipped) == 1
    assert "ends a LayerNorm" in report.affines_skipped[0].reason
    so = ort.SessionOptions()
    so.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(folded.SerializeToString(), so, providers=["CPUExecutionProvider"])
    assert _ops(onnx.load(str(tmp_path / "optimized.onnx")))["LayerNormalization"] == 1
    x = np.random.default_rng(9).normal(size=(5, 16)).astype(np.float32)
    _assert_close_to_scale(_run(folded, x), _torch64(model, x))


class _TokenScale(torch.nn.Module):
    """A layer scale on (N, L, C) tokens: ``x + gamma * linear(x)`` (DeiT-III, CaiT, DINOv2), ``gamma`` per
    feature (the last axis); ``per_token``: a (L, 1) constant instead, which is no per-feature scale; ``before``:
    the affine map before the Linear (``linear(x * s + t)``)."""

    def __init__(self, bias: bool = True, per_token: bool = False, before: bool = False) -> None:
        super().__init__()
        rng = np.random.default_rng(21)
        self.fc = torch.nn.Linear(8, 8, bias=bias)
        self.before = before
        shape = (5, 1) if per_token else (8,)
        self.register_buffer("gamma", torch.from_numpy(rng.uniform(0.5, 1.5, size=shape)).float())
        self.register_buffer("beta", torch.from_numpy(rng.uniform(-1, 1, size=(8,))).float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.before:
            return self.fc(x * self.gamma + self.beta)
        return x + self.fc(x) * self.gamma


TOKENS = np.random.default_rng(22).normal(size=(3, 5, 8)).astype(np.float32)


@pytest.mark.parametrize("bias", [True, False])
def test_a_layer_scale_on_tokens_folds_into_the_linear_before_it(bias):
    """A Linear on (N, L, C) tokens is a MatMul (+ its bias Add) whose features are the last axis, at any rank:
    a constant that broadcasts there alone folds into its columns, backward."""
    model = _TokenScale(bias).eval()
    folded, report = fold_onnx(_export(model, example=torch.from_numpy(TOKENS)))
    assert _ops(folded)["Mul"] == 0, _ops(folded)
    assert [(a.producer_type, a.direction) for a in report.affines] == [("MatMul", "backward")]
    _assert_close_to_scale(_run(folded, TOKENS), _torch64(model, TOKENS))


def test_an_affine_map_on_tokens_folds_forward_into_the_linear_after_it():
    model = _TokenScale(before=True).eval()
    folded, report = fold_onnx(_export(model, example=torch.from_numpy(TOKENS)))
    assert _ops(folded)["Mul"] == 0, _ops(folded)
    assert [(a.producer_type, a.direction) for a in report.affines] == [("MatMul", "forward")]
    _assert_close_to_scale(_run(folded, TOKENS), _torch64(model, TOKENS))


def test_a_per_token_constant_after_a_linear_is_left_with_the_reason():
    model = _TokenScale(per_token=True).eval()
    folded, report = fold_onnx(_export(model, example=torch.from_numpy(TOKENS)))
    assert not report.affines and _ops(folded)["Mul"] == 1
    assert "not on the channel axis 2 alone" in report.affines_skipped[0].reason, report.affines_skipped
    _assert_close_to_scale(_run(folded, TOKENS), _torch64(model, TOKENS))
