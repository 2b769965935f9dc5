"""One ONNX graph, indexed: what every pass of the fold reads (initializers, producers, how often each tensor is
read, inferred dimensions, constant values) and the edits they share (fresh names, folded weights written in the
initializer's dtype, dead constants and initializers dropped). Passes hold a :class:`GraphIndex`; none inherits
another."""
from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from folding.onnx_io import without_weights


def attr(node: onnx.NodeProto, name: str, default: Any) -> Any:
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def set_attr(node: onnx.NodeProto, name: str, value: Any) -> None:
    for i, a in enumerate(node.attribute):
        if a.name == name:
            del node.attribute[i]
            break
    node.attribute.append(helper.make_attribute(name, value))


def input_uses(nodes: Any) -> Counter:
    """How often each tensor name is read, subgraphs (If/Loop/Scan bodies) included."""
    used: Counter = Counter()
    for n in nodes:
        for i in n.input:
            if i:
                used[i] += 1
        for a in n.attribute:
            for sub in ([a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)):
                used.update(input_uses(sub.node))
    return used


class GraphIndex:
    """Indexes over one graph: initializers, producers, consumer counts (subgraphs included), inferred dims."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self.model = model
        self.g = model.graph
        self.inits = {t.name: t for t in self.g.initializer}
        self.producer = {o: n for n in self.g.node for o in n.output if o}
        self.graph_outputs = {o.name for o in self.g.output}
        self.uses = input_uses(self.g.node)
        self.dims: dict[str, list[int | None]] = self._infer_dims()
        self.ranks = {name: len(d) for name, d in self.dims.items()}
        self.used_names = set(self.inits) | set(self.producer) | {i.name for i in self.g.input}
        self.used_names |= {n.name for n in self.g.node}

    def _infer_dims(self) -> dict[str, list[int | None]]:
        """Each tensor's inferred dimensions (None where symbolic); absent where its rank is unknown."""
        try:
            inferred = onnx.shape_inference.infer_shapes(without_weights(self.model), strict_mode=False)
        except Exception:  # shape inference is a help, not a requirement
            return {}
        dims = {}
        for vi in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output):
            t = vi.type.tensor_type
            if t.HasField("shape"):
                dims[vi.name] = [d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim]
        return dims

    def array(self, name: str, depth: int = 0) -> np.ndarray | None:
        """The constant value of tensor ``name``: an initializer, a Constant, or Identity/Transpose of one."""
        t = self.inits.get(name)
        if t is not None:
            return numpy_helper.to_array(t)
        p = self.producer.get(name)
        if p is None or depth > 8:
            return None
        if p.op_type == "Constant":
            value = attr(p, "value", None)
            return None if value is None else numpy_helper.to_array(value)
        if p.op_type == "Identity":
            return self.array(p.input[0], depth + 1)
        if p.op_type == "Transpose":
            a = self.array(p.input[0], depth + 1)
            return None if a is None else a.transpose(attr(p, "perm", None) or list(range(a.ndim))[::-1])
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


def remove_dead_constants(model: onnx.ModelProto) -> None:
    """Drop Identity/Transpose/Constant nodes whose outputs nobody reads any more."""
    pure = {"Identity", "Transpose", "Constant"}
    outputs = {o.name for o in model.graph.output}
    while True:
        used = input_uses(model.graph.node)
        dead = [n for n in model.graph.node
                if n.op_type in pure and not any(used[o] or o in outputs for o in n.output)]
        if not dead:
            return
        for n in dead:
            model.graph.node.remove(n)


def drop_unused_initializers(model: onnx.ModelProto, candidates: list[str]) -> None:
    """Drop initializers nobody reads any more (and their graph-input entries, for ``candidates``: weights a pass
    freed)."""
    graph_inputs = {i.name for i in model.graph.input}
    used = input_uses(model.graph.node)
    outputs = {o.name for o in model.graph.output}
    keep = [t for t in model.graph.initializer
            if used[t.name] or t.name in outputs or (t.name in graph_inputs and t.name not in candidates)]
    dead = {t.name for t in model.graph.initializer} - {t.name for t in keep}
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)
    if dead:
        kept_inputs = [i for i in model.graph.input if i.name not in dead]
        del model.graph.input[:]
        model.graph.input.extend(kept_inputs)


def count_ops(model: onnx.ModelProto, op: str) -> int:
    return sum(n.op_type == op for n in model.graph.node)


def param_count(model: onnx.ModelProto) -> int:
    return sum(int(np.prod(t.dims)) for t in model.graph.initializer)
