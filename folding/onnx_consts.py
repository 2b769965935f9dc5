"""Constant folding, a pass of its own that runs before the BN / affine / branch passes.

A frozen BatchNorm exported without the exporter's constant folding computes its per-channel scale at run
time from initializers (``Reshape`` the weight, ``Add`` eps to the variance, ``Sqrt``, ``Reciprocal`` or
``Pow(-0.5)``, ``Mul``, ``Sub``); the affine pass can only fold a scale that is a constant. This pass
evaluates every node whose inputs are all constants and whose operator is in :data:`EVALUATORS`, in float64
for floating tensors, and writes each value that a remaining node (or a graph output) reads as one new
initializer, cast once to the tensor's declared type. Nodes it does not know are left alone; so is anything
whose value would exceed :data:`MAX_ELEMENTS` (an ``Expand`` to a huge zero tensor is cheaper computed).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from folding.onnx_graph import attr

MAX_ELEMENTS = 1 << 22


@dataclass
class Value:
    """A constant: its value (float64 for floating tensors, until written) and its declared numpy dtype."""

    array: np.ndarray
    dtype: np.dtype

    @classmethod
    def of(cls, a: np.ndarray) -> Value:
        a = np.asarray(a)
        return cls(a.astype(np.float64) if a.dtype.kind == "f" else a, a.dtype)

    def final(self) -> np.ndarray:
        return np.asarray(self.array).astype(self.dtype)


def _axes(node: onnx.NodeProto, args: list[Value]) -> list[int] | None:
    """Squeeze / Unsqueeze axes: an attribute before opset 13, the second input after."""
    if len(args) > 1:
        return [int(v) for v in args[1].array.reshape(-1)]
    axes = attr(node, "axes", None)
    return None if axes is None else [int(v) for v in axes]


def _binary(fn: Callable[[np.ndarray, np.ndarray], np.ndarray]) -> Callable:
    def run(node: onnx.NodeProto, args: list[Value]) -> Value | None:
        a, b = args
        if a.dtype != b.dtype:
            return None
        if a.dtype.kind in "iu" and fn is np.divide:
            return Value(np.trunc(a.array / b.array).astype(a.dtype), a.dtype)
        return Value(fn(a.array, b.array), a.dtype)
    return run


def _unary(fn: Callable[[np.ndarray], np.ndarray]) -> Callable:
    def run(node: onnx.NodeProto, args: list[Value]) -> Value | None:
        (a,) = args
        if a.dtype.kind != "f":
            return None
        return Value(fn(a.array), a.dtype)
    return run


def _reshape(node: onnx.NodeProto, args: list[Value]) -> Value | None:
    a, shape = args
    dims = [int(d) for d in shape.array.reshape(-1)]
    if not int(attr(node, "allowzero", 0)):
        dims = [a.array.shape[i] if d == 0 else d for i, d in enumerate(dims)]
    return Value(a.array.reshape(dims), a.dtype)


def _unsqueeze(node: onnx.NodeProto, args: list[Value]) -> Value | None:
    axes = _axes(node, args)
    if axes is None:
        return None
    rank = args[0].array.ndim + len(axes)
    return Value(np.expand_dims(args[0].array, tuple(a % rank for a in axes)), args[0].dtype)


def _squeeze(node: onnx.NodeProto, args: list[Value]) -> Value | None:
    axes = _axes(node, args)
    a = args[0].array
    return Value(np.squeeze(a) if axes is None else np.squeeze(a, tuple(x % a.ndim for x in axes)), args[0].dtype)


def _cast(node: onnx.NodeProto, args: list[Value]) -> Value | None:
    to = helper.tensor_dtype_to_np_dtype(int(attr(node, "to", 0)))
    (a,) = args
    if to.kind == "f":
        return Value(a.array.astype(np.float64), np.dtype(to))
    if to.kind in "iub":
        return Value(a.array.astype(to), np.dtype(to))
    return None


def _transpose(node: onnx.NodeProto, args: list[Value]) -> Value | None:
    perm = attr(node, "perm", None)
    return Value(np.transpose(args[0].array, perm), args[0].dtype)


def _concat(node: onnx.NodeProto, args: list[Value]) -> Value | None:
    if len({a.dtype for a in args}) != 1:
        return None
    return Value(np.concatenate([a.array for a in args], axis=int(attr(node, "axis", 0))), args[0].dtype)


def _expand(node: onnx.NodeProto, args: list[Value]) -> Value | None:
    a, shape = args
    target = np.broadcast_shapes(a.array.shape, tuple(int(d) for d in shape.array.reshape(-1)))
    return Value(np.broadcast_to(a.array, target).copy(), a.dtype)


def _pow(node: onnx.NodeProto, args: list[Value]) -> Value | None:
    a, b = args
    if a.dtype.kind != "f":
        return None
    return Value(np.power(a.array, b.array.astype(np.float64)), a.dtype)


#: operator -> evaluator(node, constant inputs) -> Value, or None to leave the node alone
EVALUATORS: dict[str, Callable[[onnx.NodeProto, list[Value]], Value | None]] = {
    "Add": _binary(np.add), "Sub": _binary(np.subtract), "Mul": _binary(np.multiply), "Div": _binary(np.divide),
    "Pow": _pow, "Sqrt": _unary(np.sqrt), "Reciprocal": _unary(np.reciprocal), "Neg": _unary(np.negative),
    "Reshape": _reshape, "Unsqueeze": _unsqueeze, "Squeeze": _squeeze, "Cast": _cast, "Transpose": _transpose,
    "Concat": _concat, "Expand": _expand, "Identity": lambda node, args: args[0],
}


def _constant_node(node: onnx.NodeProto) -> np.ndarray | None:
    value = attr(node, "value", None)
    return None if value is None else numpy_helper.to_array(value)


def _with_subgraph_nodes(nodes: list[onnx.NodeProto]) -> list[onnx.NodeProto]:
    """``nodes`` and every node of their subgraphs (If / Loop / Scan bodies), which may read outer names."""
    out = []
    for n in nodes:
        out.append(n)
        for a in n.attribute:
            for sub in ([a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)):
                out += _with_subgraph_nodes(list(sub.node))
    return out


def fold_constants(model: onnx.ModelProto) -> int:
    """Evaluate constant subgraphs of ``model`` in place; returns how many nodes were folded away."""
    g = model.graph
    overridable = {i.name for i in g.input}      # an initializer that is also a graph input can be fed
    known: dict[str, Value] = {t.name: Value.of(numpy_helper.to_array(t)) for t in g.initializer
                               if t.name not in overridable}
    outputs = {o.name for o in g.output}         # a graph output stays computed by a node
    folded: list[onnx.NodeProto] = []
    for node in g.node:
        if node.op_type == "Constant" and not node.domain:
            value = _constant_node(node)
            if value is not None:
                known[node.output[0]] = Value.of(value)
            continue
        evaluate = EVALUATORS.get(node.op_type) if node.domain in ("", "ai.onnx") else None
        if evaluate is None or len(node.output) != 1 or not node.input:
            continue
        if "" in node.input or not all(i in known for i in node.input) or node.output[0] in outputs:
            continue
        try:
            with np.errstate(all="ignore"):       # inf / nan are what onnxruntime would compute too
                result = evaluate(node, [known[i] for i in node.input])
        except (ValueError, TypeError, IndexError):   # an ill-formed constant subgraph: onnxruntime reports it
            result = None
        if result is None or result.array.size > MAX_ELEMENTS:
            continue
        known[node.output[0]] = result
        folded.append(node)
    if not folded:
        return 0
    gone = {id(n) for n in folded}
    remaining = [n for n in g.node if id(n) not in gone]
    # an Identity of an initializer is the exporter sharing one weight under two names: its readers read the
    # initializer itself, so the weight stays one tensor (a copy would grow the model)
    stored = {t.name for t in g.initializer if t.name not in overridable}
    alias: dict[str, str] = {}
    for n in folded:
        if n.op_type == "Identity":
            root = alias.get(n.input[0], n.input[0])
            if root in stored:
                alias[n.output[0]] = root
    read: set[str] = set()
    for n in _with_subgraph_nodes(remaining):
        n.input[:] = [alias.get(i, i) for i in n.input]
        read.update(n.input)
    for n in folded:
        out = n.output[0]
        if out in read and out not in alias:
            g.initializer.append(numpy_helper.from_array(known[out].final(), out))
    del g.node[:]
    g.node.extend(remaining)
    return len(folded)


def drop_neutral(model: onnx.ModelProto) -> int:
    """Remove ``x + 0``, ``x - 0``, ``x * 1`` and ``x / 1`` with a one-element constant that cannot change the
    shape (timm's MobileOne blocks start their sum from ``0 + identity``, which hides the sum of branches);
    returns how many nodes were removed. Readers of the removed output read ``x`` instead; a graph output
    is kept."""
    g = model.graph
    try:
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
        ranks = {vi.name: len(vi.type.tensor_type.shape.dim) for vi in [*inferred.graph.value_info, *g.input]
                 if vi.type.tensor_type.HasField("shape")}
    except Exception:  # shape inference is a help: without it only rank-0 constants qualify
        ranks = {}
    consts: dict[str, np.ndarray] = {t.name: numpy_helper.to_array(t) for t in g.initializer
                                     if t.name not in {i.name for i in g.input}}
    for n in g.node:
        if n.op_type == "Constant" and _constant_node(n) is not None:
            consts[n.output[0]] = _constant_node(n)  # type: ignore[assignment]
    outputs = {o.name for o in g.output}
    neutral = {"Add": 0.0, "Sub": 0.0, "Mul": 1.0, "Div": 1.0}
    rename: dict[str, str] = {}
    gone: list[onnx.NodeProto] = []
    for n in g.node:
        if n.op_type not in neutral or n.domain not in ("", "ai.onnx") or len(n.input) != 2:
            continue
        positions = (1,) if n.op_type in ("Sub", "Div") else (1, 0)
        for k in positions:
            c, data = consts.get(n.input[k]), n.input[1 - k]
            if c is None or data in consts or c.size != 1 or n.output[0] in outputs:
                continue
            if not (c.ndim == 0 or c.ndim <= ranks.get(data, -1)) or float(c.reshape(-1)[0]) != neutral[n.op_type]:
                continue
            rename[n.output[0]] = rename.get(data, data)
            gone.append(n)
            break
    if not gone:
        return 0
    for n in g.node:
        for i, name in enumerate(n.input):
            if name in rename:
                n.input[i] = rename[name]
    ids = {id(n) for n in gone}
    kept = [n for n in g.node if id(n) not in ids]
    del g.node[:]
    g.node.extend(kept)
    return len(gone)
