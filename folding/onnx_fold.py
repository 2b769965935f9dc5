"""Fold BatchNormalization nodes of any ONNX graph into the producer before them.

Patterns (producer -> BatchNormalization), the row of ``PRODUCERS`` says where the output channel is:

* Conv (weight axis 0), ConvTranspose (axis 1, group-aware);
* Gemm (alpha, beta, transA, transB; C of shape (M,), (1, M) or scalar, or none);
* MatMul with a 2-D constant weight, optionally followed by Add of a constant bias (output rank 2).

Preconditions: weights and BN parameters are initializers; the producer's output has exactly one
consumer (the BN) and is not a graph output; BN runs in inference mode (training_mode=0, is_test=1 in
opset < 7, spatial=1); the BN's extra training outputs are unused. An initializer that other nodes also
read is never modified: the folded weights get a new initializer. All arithmetic is in float64 and cast
once to the initializer's dtype (float32, float16, bfloat16, float64).

The folded producer takes over the BN's output name, so graph outputs and downstream names are kept.
"""
from __future__ import annotations

import copy
import logging
from collections import Counter
from typing import Callable

import numpy as np
import onnx
from onnx import helper, numpy_helper

from foldserve.errors import FoldError
from folding.fold_math import BNParams, fold_backward, fold_forward, overflow_warning
from folding.report import FoldedPair, FoldReport, SkippedBN

logger = logging.getLogger(__name__)



def _attr(node: onnx.NodeProto, name: str, default):
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _set_attr(node: onnx.NodeProto, name: str, value) -> None:
    for i, a in enumerate(node.attribute):
        if a.name == name:
            del node.attribute[i]
            break
    node.attribute.append(helper.make_attribute(name, value))


def _input_uses(nodes) -> Counter:
    """How often each tensor name is read, subgraphs (If/Loop/Scan bodies) included."""
    used: Counter = Counter()
    for n in nodes:
        for i in n.input:
            if i:
                used[i] += 1
        for a in n.attribute:
            for sub in ([a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)):
                used.update(_input_uses(sub.node))
    return used


class _Graph:
    """Indexes over one graph: initializers, producers, consumer counts (subgraphs included)."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self.model = model
        self.g = model.graph
        self.inits = {t.name: t for t in self.g.initializer}
        self.producer = {o: n for n in self.g.node for o in n.output if o}
        self.graph_outputs = {o.name for o in self.g.output}
        self.uses = _input_uses(self.g.node)
        self.ranks = self._infer_ranks()
        self.used_names = set(self.inits) | set(self.producer) | {i.name for i in self.g.input}
        self.used_names |= {n.name for n in self.g.node}

    def _infer_ranks(self) -> dict[str, int]:
        try:
            inferred = onnx.shape_inference.infer_shapes(self.model, strict_mode=False)
        except Exception:  # shape inference is a help, not a requirement
            return {}
        ranks = {}
        for vi in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output):
            t = vi.type.tensor_type
            if t.HasField("shape"):
                ranks[vi.name] = len(t.shape.dim)
        return ranks

    def array(self, name: str, depth: int = 0) -> np.ndarray | None:
        """The constant value of tensor ``name``: an initializer, a Constant, or Identity/Transpose of one."""
        t = self.inits.get(name)
        if t is not None:
            return numpy_helper.to_array(t)
        p = self.producer.get(name)
        if p is None or depth > 8:
            return None
        if p.op_type == "Constant":
            value = _attr(p, "value", None)
            return None if value is None else numpy_helper.to_array(value)
        if p.op_type == "Identity":
            return self.array(p.input[0], depth + 1)
        if p.op_type == "Transpose":
            a = self.array(p.input[0], depth + 1)
            return None if a is None else a.transpose(_attr(p, "perm", None) or list(range(a.ndim))[::-1])
        return None

    def fresh(self, base: str) -> str:
        name, k = base, 0
        while name in self.used_names:
            k += 1
            name = f"{base}_{k}"
        self.used_names.add(name)
        return name

    def write(self, name: str, values: np.ndarray, like: str | None, node: onnx.NodeProto, slot: int) -> None:
        """Store folded values for ``node.input[slot]``, in the dtype of ``like`` (or of ``name``)."""
        ref = self.array(like or name) if (like or name) else None
        arr = values.astype(ref.dtype) if ref is not None else values.astype(np.float32)
        if name and name in self.inits and self.uses[name] <= 1:
            new = numpy_helper.from_array(arr, name)
            self.inits[name].CopyFrom(new)
            return
        new_name = self.fresh(f"{node.name or node.op_type}_folded_{'W' if slot == 1 else 'B'}")
        self.g.initializer.append(numpy_helper.from_array(arr, new_name))
        self.inits[new_name] = self.g.initializer[-1]
        if name:
            self.uses[name] -= 1
        self.uses[new_name] += 1
        while len(node.input) <= slot:
            node.input.append("")
        node.input[slot] = new_name


def _remove_dead_constants(model: onnx.ModelProto) -> None:
    """Drop Identity/Transpose/Constant nodes whose outputs nobody reads any more."""
    pure = {"Identity", "Transpose", "Constant"}
    outputs = {o.name for o in model.graph.output}
    while True:
        used = _input_uses(model.graph.node)
        dead = [n for n in model.graph.node
                if n.op_type in pure and not any(used[o] or o in outputs for o in n.output)]
        if not dead:
            return
        for n in dead:
            model.graph.node.remove(n)


# --- per-producer rules: return (reason or None), apply --------------------------------------------

def _conv_like(out_axis: int) -> Callable:
    def rule(gr: _Graph, prod: onnx.NodeProto, bn: BNParams, apply: bool):
        w_name = prod.input[1] if len(prod.input) > 1 else ""
        b_name = prod.input[2] if len(prod.input) > 2 else ""
        w = gr.array(w_name)
        if w is None:
            return f"{prod.op_type} weight {w_name!r} is not an initializer"
        if b_name and gr.array(b_name) is None:
            return f"{prod.op_type} bias {b_name!r} is not an initializer"
        groups = int(_attr(prod, "group", 1))
        try:
            w2, b2 = fold_backward(w.astype(np.float64), None if not b_name else gr.array(b_name).astype(np.float64),
                                   bn, out_axis, groups)
        except ValueError as exc:
            return f"{prod.op_type} weight does not match BN: {exc}"
        if apply:
            gr.write(w_name, w2, w_name, prod, 1)
            gr.write(b_name, b2, w_name, prod, 2)
        return None, (w2, b2)
    return rule


def _gemm(gr: _Graph, prod: onnx.NodeProto, bn: BNParams, apply: bool):
    b_name = prod.input[1]
    c_name = prod.input[2] if len(prod.input) > 2 else ""
    w = gr.array(b_name)
    if w is None or w.ndim != 2:
        return f"Gemm weight {b_name!r} is not a 2-D initializer"
    trans_b = int(_attr(prod, "transB", 0))
    alpha, beta = float(_attr(prod, "alpha", 1.0)), float(_attr(prod, "beta", 1.0))
    m = w.shape[0] if trans_b else w.shape[1]
    if m != bn.mean.size:
        return f"Gemm has {m} outputs, BN normalises {bn.mean.size}"
    c = np.zeros(m)
    if c_name:
        carr = gr.array(c_name)
        if carr is None:
            return f"Gemm C {c_name!r} is not an initializer"
        if carr.size not in (1, m) or (carr.ndim == 2 and carr.shape[0] != 1):
            return f"Gemm C of shape {list(carr.shape)} is not a per-output bias"
        c = np.broadcast_to(carr.astype(np.float64).reshape(-1), (m,)) * beta
    w64 = w.astype(np.float64)
    w2, b2 = fold_backward(w64 if trans_b else w64.T, c, bn, 0)
    w2 = w2 if trans_b else w2.T
    if apply:
        gr.write(b_name, w2, b_name, prod, 1)
        gr.write(c_name, b2, b_name, prod, 2)
        _set_attr(prod, "beta", 1.0)
    return None, (w2 * alpha, b2)


def _matmul(gr: _Graph, prod: onnx.NodeProto, bn: BNParams, apply: bool, add: onnx.NodeProto | None = None):
    w_name = prod.input[1]
    w = gr.array(w_name)
    if w is None or w.ndim != 2:
        return f"MatMul weight {w_name!r} is not a 2-D initializer"
    if w.shape[1] != bn.mean.size:
        return f"MatMul has {w.shape[1]} outputs, BN normalises {bn.mean.size}"
    bias = np.zeros(w.shape[1])
    if add is not None:
        other = add.input[1] if add.input[0] == prod.output[0] else add.input[0]
        barr = gr.array(other)
        if barr is None or barr.size != w.shape[1]:
            return "Add after MatMul does not add a per-output constant bias"
        bias = barr.astype(np.float64).reshape(-1)
    w2, b2 = fold_backward(w.astype(np.float64).T, bias, bn, 0)
    w2 = w2.T
    if apply:
        gr.write(w_name, w2, w_name, prod, 1)
        if add is not None:
            slot = 1 if add.input[0] == prod.output[0] else 0
            other = add.input[slot]
            gr.write(other, b2.reshape(gr.array(other).shape), w_name, add, slot)
    return None, (w2, b2)


PRODUCERS: dict[str, Callable] = {
    "Conv": _conv_like(0),
    "ConvTranspose": _conv_like(1),
    "Gemm": _gemm,
    "MatMul": _matmul,
}


def _bn_reason(gr: _Graph, bn: onnx.NodeProto, opset: int) -> str | None:
    if len(bn.input) < 5:
        return "BatchNormalization with fewer than 5 inputs"
    for name in bn.input[1:5]:
        value = gr.array(name)
        if value is None:
            return f"BN parameter {name!r} is not a constant (it may change at run time)"
        if value.dtype.kind != "f" and "bfloat16" not in str(value.dtype):
            return f"BN parameter {name!r} is not a floating-point tensor"
    if int(_attr(bn, "training_mode", 0)) != 0:
        return "training_mode=1: BN uses batch statistics"
    if opset < 7 and int(_attr(bn, "is_test", 0)) == 0:
        return "is_test=0 (opset < 7): BN runs in training mode"
    if opset < 9 and int(_attr(bn, "spatial", 1)) == 0:
        return "spatial=0: per-activation statistics, not per-channel"
    if any(o for o in bn.output[1:]):
        if any(gr.uses[o] or o in gr.graph_outputs for o in bn.output[1:] if o):
            return "BN's training outputs (running mean/var) are used"
    return None


def _backward_reason(gr: _Graph, bn: onnx.NodeProto) -> tuple[str | None, onnx.NodeProto | None, onnx.NodeProto | None]:
    """(reason, producer, add): why ``bn`` cannot fold into its producer, or the producer (and MatMul's Add)."""
    prod = gr.producer.get(bn.input[0])
    add = None
    if prod is not None and prod.op_type == "Add":
        mm = next((gr.producer[i] for i in prod.input if i in gr.producer and gr.producer[i].op_type == "MatMul"),
                  None)
        if mm is not None and gr.uses[mm.output[0]] == 1 and mm.output[0] not in gr.graph_outputs:
            add, prod = prod, mm
    if prod is None:
        return f"input {bn.input[0]!r} is a graph input, not a producer output", None, None
    if prod.op_type not in PRODUCERS:
        kind = " (a nonlinearity)" if prod.op_type in NONLINEAR else ""
        return f"input comes from {prod.op_type} {prod.name!r}{kind}, which cannot absorb a BN", None, None
    if gr.uses[bn.input[0]] != 1 or bn.input[0] in gr.graph_outputs:
        return f"producer output {bn.input[0]!r} is also used elsewhere", None, None
    if prod.op_type == "MatMul" and gr.ranks.get(bn.input[0]) != 2:
        return f"MatMul output rank is {gr.ranks.get(bn.input[0], 'unknown')}, need 2 for a per-feature BN", None, None
    return None, prod, add


NONLINEAR = {"Relu", "Clip", "LeakyRelu", "PRelu", "Elu", "Selu", "Sigmoid", "Tanh", "HardSigmoid", "HardSwish",
             "Softplus", "Gelu", "Mish"}


def _consumer(gr: _Graph, bn: onnx.NodeProto) -> tuple[str | None, onnx.NodeProto | None]:
    out = bn.output[0]
    users = [n for n in gr.g.node if out in n.input]
    if out in gr.graph_outputs:
        return "no exact forward target: BN output is a graph output", None
    if len(users) != 1 or gr.uses[out] != 1:
        return f"no exact forward target: BN output is used by {gr.uses[out]} inputs", None
    c = users[0]
    if c.op_type not in ("Conv", "Gemm", "MatMul") or c.input[0] != out or out in c.input[1:]:
        return f"no exact forward target: next is {c.op_type} {c.name!r}", None
    if c.op_type == "Conv":
        pads = _attr(c, "pads", None) or []
        auto = _attr(c, "auto_pad", b"NOTSET")
        auto = auto.decode() if isinstance(auto, bytes) else auto
        if any(pads) or auto in ("SAME_UPPER", "SAME_LOWER"):
            return (f"no exact forward target: Conv {c.name!r} zero-pads its input (pads={list(pads)}, "
                    f"auto_pad={auto}), so a forward fold is not exact at the borders"), None
    if c.op_type == "Gemm" and int(_attr(c, "transA", 0)):
        return f"no exact forward target: Gemm {c.name!r} has transA=1", None
    if c.op_type in ("Gemm", "MatMul") and gr.ranks.get(out) != 2:
        return f"no exact forward target: {c.op_type} input rank is {gr.ranks.get(out, 'unknown')}, need 2", None
    return None, c


def _fold_forward(gr: _Graph, bn: onnx.NodeProto, c: onnx.NodeProto, params: BNParams, apply: bool):
    """Fold ``bn`` into its consumer ``c``; returns a reason string or (None, (W', b'))."""
    w_name = c.input[1]
    w = gr.array(w_name)
    if w is None:
        return f"no exact forward target: {c.op_type} weight {w_name!r} is not a constant"
    b_name = c.input[2] if len(c.input) > 2 else ""
    if c.op_type == "Conv":
        if b_name and gr.array(b_name) is None:
            return f"no exact forward target: Conv bias {b_name!r} is not a constant"
        bias = gr.array(b_name).astype(np.float64) if b_name else None
        try:
            w2, b2 = fold_forward(w.astype(np.float64), bias, params, int(_attr(c, "group", 1)))
        except ValueError as exc:
            return f"no exact forward target: {exc}"
        if apply:
            gr.write(w_name, w2, w_name, c, 1)
            gr.write(b_name, b2, w_name, c, 2)
    else:
        if w.ndim != 2:
            return f"no exact forward target: {c.op_type} weight is not 2-D"
        trans_b = c.op_type == "Gemm" and int(_attr(c, "transB", 0))
        alpha = float(_attr(c, "alpha", 1.0)) if c.op_type == "Gemm" else 1.0
        beta = float(_attr(c, "beta", 1.0)) if c.op_type == "Gemm" else 1.0
        w_om = (w.astype(np.float64) if trans_b else w.astype(np.float64).T) * alpha  # (out, in)
        bias = None
        if b_name:
            carr = gr.array(b_name)
            if carr is None or carr.size not in (1, w_om.shape[0]) or (carr.ndim == 2 and carr.shape[0] != 1):
                return f"no exact forward target: Gemm C {b_name!r} is not a constant per-output bias"
            bias = np.broadcast_to(carr.astype(np.float64).reshape(-1), (w_om.shape[0],)) * beta
        try:
            w2, b2 = fold_forward(w_om, bias, params)
        except ValueError as exc:
            return f"no exact forward target: {exc}"
        if apply:
            gr.write(w_name, w2 if trans_b else w2.T, w_name, c, 1)
            if c.op_type == "Gemm":
                gr.write(b_name, b2, w_name, c, 2)
                _set_attr(c, "alpha", 1.0)
                _set_attr(c, "beta", 1.0)
    return None, (w2, b2)


def fold_onnx(model: onnx.ModelProto) -> tuple[onnx.ModelProto, FoldReport]:
    """Return ``(folded, report)``: a new ModelProto with every foldable BatchNormalization folded.

    Backward folds (into the producer) come first; a BN that cannot fold backwards is folded forwards
    into a following Conv without padding, Gemm or MatMul when that is exact.
    """
    if not isinstance(model, onnx.ModelProto):
        raise FoldError(f"fold_onnx takes an onnx.ModelProto, got {type(model).__name__}")
    out = copy.deepcopy(model)
    opset = next((o.version for o in out.opset_import if o.domain in ("", "ai.onnx")), 0)
    gr = _Graph(out)
    report = FoldReport()
    report.bn_before = sum(n.op_type == "BatchNormalization" for n in out.graph.node)
    report.nodes_before = len(out.graph.node)
    report.params_before = sum(int(np.prod(t.dims)) for t in out.graph.initializer)
    removed_inputs: list[str] = []

    for bn in list(out.graph.node):
        if bn.op_type != "BatchNormalization":
            continue
        name = bn.name or bn.output[0]
        reason = _bn_reason(gr, bn, opset)
        if reason is not None:
            report.skipped.append(SkippedBN(name, reason))
            continue
        scale, bias, mean, var = (gr.array(n).astype(np.float64) for n in bn.input[1:5])
        params = BNParams.create(mean, var, scale, bias, float(_attr(bn, "epsilon", 1e-5)))
        back, prod, add = _backward_reason(gr, bn)
        if back is None:
            rule = PRODUCERS[prod.op_type]
            extra = (add,) if prod.op_type == "MatMul" else ()
            check = rule(gr, prod, params, False, *extra)
            if isinstance(check, str):
                back = check
        if back is None:
            result = rule(gr, prod, params, True, *extra)
            _take_over_output(out, gr, bn, prod, add, result[1][1])
            report.folded.append(FoldedPair(name, prod.name or prod.output[0], "backward", prod.op_type,
                                            "BatchNormalization", bn.output[0]))
            target = prod.name or prod.op_type
        else:
            fwd, cons = _consumer(gr, bn)
            if fwd is None:
                check = _fold_forward(gr, bn, cons, params, False)
                fwd = check if isinstance(check, str) else None
            if fwd is not None:
                report.skipped.append(SkippedBN(name, f"cannot fold backwards ({back}); {fwd}"))
                continue
            result = _fold_forward(gr, bn, cons, params, True)
            cons.input[0] = bn.input[0]
            report.folded.append(FoldedPair(name, cons.name or cons.output[0], "forward", cons.op_type,
                                            "BatchNormalization", cons.output[0]))
            target = cons.name or cons.op_type
        report.warnings += params.lint(name) + overflow_warning(target, *result[1])
        removed_inputs += list(bn.input[1:5])
        out.graph.node.remove(bn)
        for i in bn.input:
            gr.uses[i] -= 1

    _remove_dead_constants(out)
    _drop_unused_initializers(out, removed_inputs)
    report.bn_after = sum(n.op_type == "BatchNormalization" for n in out.graph.node)
    report.nodes_after = len(out.graph.node)
    report.params_after = sum(int(np.prod(t.dims)) for t in out.graph.initializer)
    logger.info("fold_onnx: %s", report.summary())
    return out, report


def _take_over_output(out: onnx.ModelProto, gr: _Graph, bn: onnx.NodeProto, prod: onnx.NodeProto,
                      add: onnx.NodeProto | None, folded_bias: np.ndarray) -> None:
    """The last node of the producer chain takes over the BN's output name."""
    last = add if add is not None else prod
    if prod.op_type == "MatMul" and add is None:
        # MatMul has no bias input: append an Add with the folded bias
        base = prod.name or "MatMul"
        bias_name, mm_out = gr.fresh(f"{base}_folded_B"), gr.fresh(f"{base}_out")
        out.graph.initializer.append(numpy_helper.from_array(
            folded_bias.astype(gr.array(prod.input[1]).dtype), bias_name))
        prod.output[0] = mm_out
        idx = list(out.graph.node).index(prod)
        out.graph.node.insert(idx + 1, helper.make_node("Add", [mm_out, bias_name], [bn.output[0]],
                                                        name=gr.fresh(f"{base}_bias")))
        return
    last.output[0] = bn.output[0]


def _drop_unused_initializers(model: onnx.ModelProto, candidates: list[str]) -> None:
    graph_inputs = {i.name for i in model.graph.input}
    used = _input_uses(model.graph.node)
    outputs = {o.name for o in model.graph.output}
    keep = [t for t in model.graph.initializer
            if used[t.name] or t.name in outputs or t.name in graph_inputs and t.name not in candidates]
    dead = {t.name for t in model.graph.initializer} - {t.name for t in keep}
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)
    if dead:
        kept_inputs = [i for i in model.graph.input if i.name not in dead]
        del model.graph.input[:]
        model.graph.input.extend(kept_inputs)
