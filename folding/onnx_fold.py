"""The BN pass: fold BatchNormalization nodes of any ONNX graph into the layer next to them (the whole
pipeline, with constant folding, affine maps and branch merges, is :func:`folding.onnx_passes.fold_onnx`).

Patterns (producer -> BatchNormalization): the rows of ``OnnxFoldPass.RULES`` (at the end of this module),
one rule per producer type, each knowing where the output channel is:

* Conv (weight axis 0), ConvTranspose (axis 1, group-aware);
* Concat of convolutions on the channel axis: each slice of the BN into the Conv / ConvTranspose that made it
  (MixNet's MixConv), when each is read by the Concat alone;
* Gemm (alpha, beta, transA, transB; C of shape (M,), (1, M) or scalar, or none);
* MatMul with a 2-D constant weight, optionally followed by Add of a constant bias (output rank 2), or of any
  rank when a Flatten / Reshape to rank 2 that keeps its last axis stands between it and a BatchNorm1d
  (LeViT's ``bn(linear(x).flatten(0, 1))``): the BN's channels are then the MatMul's output features.

Preconditions: weights and BN parameters are initializers; the producer's output has exactly one
consumer (the BN) and is not a graph output; BN runs in inference mode (training_mode=0, is_test=1 in
opset < 7, spatial=1); the BN's extra training outputs are unused. An initializer that other nodes also
read is never modified: the folded weights get a new initializer. All arithmetic is in float64 and cast
once to the initializer's dtype (float32, float16, bfloat16, float64).

The folded producer takes over the BN's output name, so graph outputs and downstream names are kept.
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import ClassVar, Generic, Protocol, TypeVar

import numpy as np
import onnx
from onnx import helper, numpy_helper

from folding.fold_math import BNParams, fold_backward, fold_forward
from folding.onnx_graph import GraphIndex, attr, set_attr
from folding.rules import BACKWARD, FORWARD, NONLINEARITIES, Plan, Rule, Skip

logger = logging.getLogger(__name__)



# --- the pass: BNs, their checks and neighbours --------------------------------------------------------

class Site(Protocol):
    """What the rules fold: a BatchNormalization node, or a chain of affine nodes read as one
    (:class:`folding.onnx_affine.AffineSite`): ``input[0]`` is its data, ``output[0]`` its result."""

    @property
    def input(self) -> Sequence[str]: ...

    @property
    def output(self) -> Sequence[str]: ...


S = TypeVar("S", bound=Site)


class LayerFoldPass(GraphIndex, Generic[S]):
    """The ONNX side of :mod:`folding.rules` over one kind of site (``S``): the layers next to a site, and what
    stops a fold. A subclass says what its sites are (``batchnorms``, ``bn_name``, ``bn_type``, ``check_bn``,
    ``remove_bn``); the BN pass and the affine pass are the two, and neither inherits the other."""

    RULES: ClassVar[dict[str, dict[str, Rule]]]      # the table at the end of this module

    def __init__(self, model: onnx.ModelProto) -> None:
        super().__init__(model)
        self.opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
        self.removed_inputs: list[str] = []

    def batchnorms(self) -> list[S]:
        raise NotImplementedError

    def bn_name(self, bn: S) -> str:
        raise NotImplementedError

    def bn_type(self, bn: S) -> str:
        raise NotImplementedError

    def check_bn(self, bn: S) -> BNParams | Skip:
        raise NotImplementedError

    def remove_bn(self, bn: S) -> None:
        raise NotImplementedError

    def features_last(self, bn: S) -> bool:
        """Whether ``bn`` works on its data's last axis (a MatMul's features, at any rank) instead of axis 1. A
        BatchNormalization never does; the affine pass's sites next to a MatMul do."""
        return False

    def pads_ok_forward(self, params: BNParams) -> bool:
        """Whether a forward fold into a zero-padded Conv is exact (only for a map without shift; kept off for BN
        so that both BN passes make the same choice)."""
        return False

    def neighbour(self, bn: S, direction: str):
        return self._producer(bn) if direction == BACKWARD else self._consumer(bn)

    def _producer(self, bn: S):
        prod = self.producer.get(bn.input[0])
        add = through = None
        if prod is not None and self._keeps_last_axis(prod) and self._linear_before(prod.input[0]):
            through, prod = prod, self.producer[prod.input[0]]
        if prod is not None and prod.op_type == "Add":
            mm = self._matmul_into(prod)
            if mm is not None and self.uses[mm.output[0]] == 1 and mm.output[0] not in self.graph_outputs:
                add, prod = prod, mm
        if prod is None:
            return Skip(f"input {bn.input[0]!r} is a graph input, not a producer output")
        if prod.op_type in self.RULES[BACKWARD] and (self.uses[bn.input[0]] != 1 or bn.input[0] in self.graph_outputs):
            return Skip(f"producer output {bn.input[0]!r} is also used elsewhere")
        return (prod, add, through), prod.op_type

    def _keeps_last_axis(self, node: onnx.NodeProto) -> bool:
        """A node that puts its input's last axis where a BN reads its channels (axis 1), values unchanged, and is
        the only reader of its input's values: a Flatten or Reshape to rank 2 whose rows are the last-axis vectors
        (LeViT's ``linear(x).flatten(0, 1)``), or a Transpose whose ``perm[1]`` is the last axis (a Linear on
        (N, L, C) read by a BatchNorm1d as (N, C, L))."""
        if node.op_type not in ("Flatten", "Reshape", "Transpose") or node.domain not in ("", "ai.onnx"):
            return False
        if node.input[0] in self.graph_outputs:
            return False
        if node.op_type == "Transpose":
            rank = self.ranks.get(node.input[0])
            perm = list(attr(node, "perm", None) or ())
            if rank is None or rank < 2 or len(perm) != rank or perm[1] != rank - 1:
                return False
        else:
            src, out = self.dims.get(node.input[0]), self.dims.get(node.output[0])
            if src is None or out is None or len(src) < 2 or len(out) != 2 or src[-1] is None or out[-1] != src[-1]:
                return False
            if node.op_type == "Flatten" and int(attr(node, "axis", 1)) % len(src) != len(src) - 1:
                return False
        # a Shape of the layer's output reads no value (LeViT's ``reshape_as(x)``): folding cannot change it
        return sum(i == node.input[0] for n in self.g.node if n.op_type != "Shape" for i in n.input) == 1

    def _matmul_into(self, add: onnx.NodeProto) -> onnx.NodeProto | None:
        """The MatMul whose output ``add`` reads (a Linear layer and its bias), if any."""
        return next((self.producer[i] for i in add.input if i in self.producer and
                     self.producer[i].op_type == "MatMul"), None)

    def _linear_before(self, tensor: str) -> bool:
        """``tensor`` is computed by a MatMul, or by an Add of its output (the layer and its bias)."""
        p = self.producer.get(tensor)
        if p is not None and p.op_type == "Add":
            p = self._matmul_into(p)
        return p is not None and p.op_type == "MatMul"

    def _consumer(self, bn: S):
        out = bn.output[0]
        if out in self.graph_outputs:
            return Skip("no exact forward target: BN output is a graph output")
        users = [n for n in self.g.node if out in n.input]
        if len(users) != 1 or self.uses[out] != 1:
            return Skip(f"no exact forward target: BN output is used by {self.uses[out]} inputs")
        c = users[0]
        if c.op_type in self.RULES[FORWARD] and (c.input[0] != out or out in c.input[1:]):
            return Skip(f"no exact forward target: {c.op_type} {c.name!r} reads the BN output as a weight")
        return c, c.op_type

    def cannot_absorb(self, node, direction: str) -> str:
        if direction == BACKWARD:
            prod = node[0]
            kind = " (a nonlinearity)" if prod.op_type in NONLINEARITIES else ""
            return f"input comes from {prod.op_type} {prod.name!r}{kind}, which cannot absorb a BN"
        return f"no exact forward target: next is {node.op_type} {node.name!r}"



class OnnxFoldPass(LayerFoldPass[onnx.NodeProto]):
    """The BN pass: BatchNormalization nodes as the sites of the rules."""

    def batchnorms(self) -> list[onnx.NodeProto]:
        return [n for n in self.g.node if n.op_type == "BatchNormalization"]

    def bn_name(self, bn: onnx.NodeProto) -> str:
        return bn.name or bn.output[0]

    def bn_type(self, bn: onnx.NodeProto) -> str:
        return "BatchNormalization"

    def check_bn(self, bn: onnx.NodeProto) -> BNParams | Skip:
        return batchnorm_params(self, bn, self.opset)

    def remove_bn(self, bn: onnx.NodeProto) -> None:
        self.removed_inputs += list(bn.input[1:5])
        self.g.node.remove(bn)
        for i in bn.input:
            self.uses[i] -= 1


def batchnorm_params(index: GraphIndex, bn: onnx.NodeProto, opset: int) -> BNParams | Skip:
    """A BatchNormalization node's parameters (float64), or why it cannot fold (training mode, an input that is
    not a constant, ...): what every pass that meets a BN reads."""
    reason = _bn_reason(index, bn, opset)
    if reason is not None:
        return Skip(reason)
    scale, bias, mean, var = (index.array(n).astype(np.float64) for n in bn.input[1:5])
    return BNParams.create(mean, var, scale, bias, float(attr(bn, "epsilon", 1e-5)))


# --- rules: match (checks + float64 arithmetic) -> Plan | Skip ------------------------------------------

def _plan(p: LayerFoldPass, bn, node, direction: str, w2, b2, writes: list, attrs: list = (), **site) -> Plan:
    name = node.name or node.output[0]
    return Plan(p.bn_name(bn), name, direction, node.op_type, p.bn_type(bn), w2, b2,
                site={"bn": bn, "node": node, "writes": writes, "attrs": list(attrs), **site},
                tensor=bn.output[0] if direction == BACKWARD else node.output[0])


def _conv_constants(p: LayerFoldPass, conv, prefix: str):
    """(weight name, bias name, W, b) of a Conv/ConvTranspose in float64 (b None without a bias), or a Skip
    whose reason starts with ``prefix``."""
    w_name = conv.input[1] if len(conv.input) > 1 else ""
    b_name = conv.input[2] if len(conv.input) > 2 else ""
    w = p.array(w_name)
    if w is None:
        return Skip(f"{prefix}{conv.op_type} weight {w_name!r} is not a constant")
    if b_name and p.array(b_name) is None:
        return Skip(f"{prefix}{conv.op_type} bias {b_name!r} is not a constant")
    return w_name, b_name, w.astype(np.float64), p.array(b_name).astype(np.float64) if b_name else None


def _match_conv(out_axis: int) -> Callable:
    def match(p: LayerFoldPass, bn, node, params: BNParams) -> Plan | Skip:
        prod = node[0]
        found = _conv_constants(p, prod, "")
        if isinstance(found, Skip):
            return found
        w_name, b_name, w, bias = found
        try:
            w2, b2 = fold_backward(w, bias, params, out_axis, int(attr(prod, "group", 1)))
        except ValueError as exc:
            return Skip(f"{prod.op_type} weight does not match BN: {exc}")
        return _plan(p, bn, prod, BACKWARD, w2, b2, [(w_name, w2, w_name, prod, 1), (b_name, b2, w_name, prod, 2)])
    return match


def _match_concat(p: LayerFoldPass, bn, node, params: BNParams) -> Plan | Skip:
    """A BN after ``Concat(conv_a(x), conv_b(x), ...)`` on the channel axis (MixNet's MixConv, CSP necks, any
    grouped-branch design): each channel slice of the BN folds into the convolution that produced it, exactly,
    when every Concat input is a Conv / ConvTranspose output read by nothing else."""
    cat = node[0]
    if p.features_last(bn):
        return Skip(f"the constants are per feature on the last axis; Concat {cat.name!r} joins channels on axis 1")
    rank, axis = p.ranks.get(cat.output[0]), int(attr(cat, "axis", 1))
    if rank is None or axis % rank != 1:
        return Skip(f"Concat {cat.name!r} joins on axis {axis}, not on the channel axis 1")
    writes: list = []
    weights, biases, into, off = [], [], [], 0
    for t in cat.input:
        prod = p.producer.get(t)
        if prod is None or prod.op_type not in ("Conv", "ConvTranspose"):
            what = "a graph input" if prod is None else f"{prod.op_type} {prod.name!r}"
            return Skip(f"Concat {cat.name!r} input {t!r} comes from {what}, not a convolution")
        if p.uses[t] != 1 or t in p.graph_outputs:
            return Skip(f"Concat {cat.name!r} input {t!r} is also used elsewhere")
        found = _conv_constants(p, prod, f"Concat {cat.name!r} input: ")
        if isinstance(found, Skip):
            return found
        w_name, b_name, w, bias = found
        group, out_axis = int(attr(prod, "group", 1)), 0 if prod.op_type == "Conv" else 1
        channels = w.shape[0] if out_axis == 0 else w.shape[1] * group
        part = slice(off, off + channels)
        off += channels
        if off > params.mean.size:
            break
        sub = BNParams(params.mean[part], params.var[part], params.gamma[part], params.beta[part], params.eps)
        try:
            w2, b2 = fold_backward(w, bias, sub, out_axis, group)
        except ValueError as exc:
            return Skip(f"{prod.op_type} {prod.name!r} weight does not match its slice of the BN: {exc}")
        writes += [(w_name, w2, w_name, prod, 1), (b_name, b2, w_name, prod, 2)]
        weights.append(w2.ravel())
        biases.append(b2)
        into.append(prod.name or prod.output[0])
    if off != params.mean.size:
        return Skip(f"Concat {cat.name!r} joins {off} channels, the BN normalises {params.mean.size}")
    plan = _plan(p, bn, cat, BACKWARD, np.concatenate(weights), np.concatenate(biases), writes)
    plan.target = f"{cat.name or cat.output[0]} [{', '.join(into)}]"
    return plan


def _apply_concat(p: LayerFoldPass, plan: Plan) -> None:
    _write_all(p, plan)
    plan.site["node"].output[0] = plan.site["bn"].output[0]       # the Concat now gives the BN's output
    p.remove_bn(plan.site["bn"])


def _per_output_bias(p: LayerFoldPass, c_name: str, m: int, scale: float) -> np.ndarray | Skip:
    if not c_name:
        return np.zeros(m)
    carr = p.array(c_name)
    if carr is None:
        return Skip(f"Gemm C {c_name!r} is not an initializer")
    if carr.size not in (1, m) or (carr.ndim == 2 and carr.shape[0] != 1):
        return Skip(f"Gemm C of shape {list(carr.shape)} is not a per-output bias")
    return np.broadcast_to(carr.astype(np.float64).reshape(-1), (m,)) * scale


def _match_gemm(p: LayerFoldPass, bn, node, params: BNParams) -> Plan | Skip:
    prod = node[0]
    b_name = prod.input[1]
    c_name = prod.input[2] if len(prod.input) > 2 else ""
    w = p.array(b_name)
    if w is None or w.ndim != 2:
        return Skip(f"Gemm weight {b_name!r} is not a 2-D initializer")
    trans_b = int(attr(prod, "transB", 0))
    alpha, beta = float(attr(prod, "alpha", 1.0)), float(attr(prod, "beta", 1.0))
    m = w.shape[0] if trans_b else w.shape[1]
    if m != params.mean.size:
        return Skip(f"Gemm has {m} outputs, BN normalises {params.mean.size}")
    c = _per_output_bias(p, c_name, m, beta)
    if isinstance(c, Skip):
        return c
    w64 = w.astype(np.float64)
    w2, b2 = fold_backward(w64 if trans_b else w64.T, c, params, 0)
    w2 = w2 if trans_b else w2.T
    return _plan(p, bn, prod, BACKWARD, w2 * alpha, b2, [(b_name, w2, b_name, prod, 1), (c_name, b2, b_name, prod, 2)],
                 [(prod, "beta", 1.0)])


def _match_matmul(p: LayerFoldPass, bn, node, params: BNParams) -> Plan | Skip:
    prod, add, through = node
    if p.ranks.get(bn.input[0]) != 2 and (through is None or through.op_type != "Transpose") \
            and not p.features_last(bn):
        return Skip(f"MatMul output rank is {p.ranks.get(bn.input[0], 'unknown')}, need 2 for a per-feature BN "
                    "(or a Transpose that puts its last axis on axis 1)")
    w_name = prod.input[1]
    w = p.array(w_name)
    if w is None or w.ndim != 2:
        return Skip(f"MatMul weight {w_name!r} is not a 2-D initializer")
    if w.shape[1] != params.mean.size:
        return Skip(f"MatMul has {w.shape[1]} outputs, BN normalises {params.mean.size}")
    bias = np.zeros(w.shape[1])
    writes: list = []
    if add is not None:
        slot = 1 if add.input[0] == prod.output[0] else 0
        barr = p.array(add.input[slot])
        if barr is None or barr.size != w.shape[1]:
            return Skip("Add after MatMul does not add a per-output constant bias")
        bias = barr.astype(np.float64).reshape(-1)
    w2, b2 = fold_backward(w.astype(np.float64).T, bias, params, 0)
    writes.append((w_name, w2.T, w_name, prod, 1))
    if add is not None:
        writes.append((add.input[slot], b2.reshape(barr.shape), w_name, add, slot))
    return _plan(p, bn, prod, BACKWARD, w2, b2, writes, add=add, through=through)


def _match_forward_conv(p: LayerFoldPass, bn, c, params: BNParams) -> Plan | Skip:
    if p.features_last(bn) and p.ranks.get(bn.output[0]) != 2:
        return Skip(f"no exact forward target: the constants are per feature on the last axis, {c.op_type} "
                    f"{c.name!r} reads channels on axis 1")
    pads = attr(c, "pads", None) or []
    auto = attr(c, "auto_pad", b"NOTSET")
    auto = auto.decode() if isinstance(auto, bytes) else auto
    if (any(pads) or auto in ("SAME_UPPER", "SAME_LOWER")) and not p.pads_ok_forward(params):
        return Skip(f"no exact forward target: Conv {c.name!r} zero-pads its input (pads={list(pads)}, "
                    f"auto_pad={auto}), so a forward fold is not exact at the borders")
    found = _conv_constants(p, c, "no exact forward target: ")
    if isinstance(found, Skip):
        return found
    w_name, b_name, w, bias = found
    try:
        w2, b2 = fold_forward(w, bias, params, int(attr(c, "group", 1)))
    except ValueError as exc:
        return Skip(f"no exact forward target: {exc}")
    return _plan(p, bn, c, FORWARD, w2, b2, [(w_name, w2, w_name, c, 1), (b_name, b2, w_name, c, 2)])


def _match_forward_linear(p: LayerFoldPass, bn, c, params: BNParams) -> Plan | Skip:
    """Gemm or MatMul reading the BN output as its (N, C) data input."""
    if c.op_type == "Gemm" and int(attr(c, "transA", 0)):
        return Skip(f"no exact forward target: Gemm {c.name!r} has transA=1")
    if p.ranks.get(bn.output[0]) != 2 and not (c.op_type == "MatMul" and p.features_last(bn)):
        return Skip(f"no exact forward target: {c.op_type} input rank is {p.ranks.get(bn.output[0], 'unknown')}, "
                    f"need 2")
    w_name = c.input[1]
    w = p.array(w_name)
    if w is None or w.ndim != 2:
        return Skip(f"no exact forward target: {c.op_type} weight {w_name!r} is not a 2-D constant")
    gemm = c.op_type == "Gemm"
    trans_b = gemm and int(attr(c, "transB", 0))
    alpha, beta = (float(attr(c, "alpha", 1.0)), float(attr(c, "beta", 1.0))) if gemm else (1.0, 1.0)
    w_om = (w.astype(np.float64) if trans_b else w.astype(np.float64).T) * alpha  # (out, in)
    b_name = c.input[2] if gemm and len(c.input) > 2 else ""
    bias = _per_output_bias(p, b_name, w_om.shape[0], beta) if b_name else None
    if isinstance(bias, Skip):
        return Skip(f"no exact forward target: {bias.reason}")
    add = None if gemm else _bias_add_after(p, c, w_om.shape[0])
    if add is not None:
        add, slot, barr = add
        bias = barr.astype(np.float64).reshape(-1)
    try:
        w2, b2 = fold_forward(w_om, bias, params)
    except ValueError as exc:
        return Skip(f"no exact forward target: {exc}")
    writes = [(w_name, w2 if trans_b else w2.T, w_name, c, 1)]
    attrs = []
    if gemm:
        writes.append((b_name, b2, w_name, c, 2))
        attrs = [(c, "alpha", 1.0), (c, "beta", 1.0)]
    elif add is not None:
        writes.append((add.input[slot], b2.reshape(barr.shape), w_name, add, slot))
    elif np.any(b2):
        return Skip(f"no exact forward target: MatMul {c.name!r} has no bias to absorb the BN's shift")
    return _plan(p, bn, c, FORWARD, w2, b2, writes, attrs)


def _bias_add_after(p: LayerFoldPass, mm: onnx.NodeProto, out: int) -> tuple[onnx.NodeProto, int, np.ndarray] | None:
    """The Add that is a MatMul's bias (its only reader, a constant of ``out`` values on the last axis), as
    (node, constant slot, constant), or None."""
    y = mm.output[0]
    if p.uses[y] != 1 or y in p.graph_outputs:
        return None
    add = next((n for n in p.g.node if y in n.input), None)
    if add is None or add.op_type != "Add" or len(add.input) != 2:
        return None
    slot = 1 if add.input[0] == y else 0
    barr = p.array(add.input[slot])
    if barr is None or barr.size != out or (barr.ndim and barr.shape[-1] != out):
        return None
    return add, slot, barr


# --- rules: apply (rewrite, never re-check) ---------------------------------------------------------------

def _write_all(p: LayerFoldPass, plan: Plan) -> None:
    for name, values, like, node, slot in plan.site["writes"]:
        p.write(name, values, like, node, slot)
    for node, name, value in plan.site["attrs"]:
        set_attr(node, name, value)


def _apply_backward(p: LayerFoldPass, plan: Plan) -> None:
    _write_all(p, plan)
    _take_over_output(p.model, p, plan.site["bn"], plan.site["node"], plan.site.get("add"), plan.bias,
                      plan.site.get("through"))
    p.remove_bn(plan.site["bn"])


def _apply_forward(p: LayerFoldPass, plan: Plan) -> None:
    _write_all(p, plan)
    bn = plan.site["bn"]
    plan.site["node"].input[0] = bn.input[0]
    p.remove_bn(bn)


LayerFoldPass.RULES = {
    BACKWARD: {"Conv": Rule(_match_conv(0), _apply_backward), "ConvTranspose": Rule(_match_conv(1), _apply_backward),
               "Gemm": Rule(_match_gemm, _apply_backward), "MatMul": Rule(_match_matmul, _apply_backward),
               "Concat": Rule(_match_concat, _apply_concat)},
    FORWARD: {"Conv": Rule(_match_forward_conv, _apply_forward), "Gemm": Rule(_match_forward_linear, _apply_forward),
              "MatMul": Rule(_match_forward_linear, _apply_forward)},
}


def _bn_reason(gr: GraphIndex, bn: onnx.NodeProto, opset: int) -> str | None:
    if len(bn.input) < 5:
        return "BatchNormalization with fewer than 5 inputs"
    for name in bn.input[1:5]:
        value = gr.array(name)
        if value is None:
            return f"BN parameter {name!r} is not a constant (it may change at run time)"
        if value.dtype.kind != "f" and "bfloat16" not in str(value.dtype):
            return f"BN parameter {name!r} is not a floating-point tensor"
    if int(attr(bn, "training_mode", 0)) != 0:
        return "training_mode=1: BN uses batch statistics"
    if opset < 7 and int(attr(bn, "is_test", 0)) == 0:
        return "is_test=0 (opset < 7): BN runs in training mode"
    if opset < 9 and int(attr(bn, "spatial", 1)) == 0:
        return "spatial=0: per-activation statistics, not per-channel"
    if any(gr.uses[o] or o in gr.graph_outputs for o in bn.output[1:] if o):
        return "BN's training outputs (running mean/var) are used"
    return None


def _take_over_output(out: onnx.ModelProto, gr: GraphIndex, bn: onnx.NodeProto, prod: onnx.NodeProto,
                      add: onnx.NodeProto | None, folded_bias: np.ndarray,
                      through: onnx.NodeProto | None = None) -> None:
    """The last node of the producer chain (the Flatten / Reshape looked through, if any) takes over the BN's
    output name."""
    last = through if through is not None else add if add is not None else prod
    if prod.op_type == "MatMul" and add is None:
        # MatMul has no bias input: append an Add with the folded bias (on the last axis, before any reshape)
        base = prod.name or "MatMul"
        bias_name, mm_out = gr.fresh(f"{base}_folded_B"), gr.fresh(f"{base}_out")
        out.graph.initializer.append(numpy_helper.from_array(
            folded_bias.astype(gr.array(prod.input[1]).dtype), bias_name))
        biased = prod.output[0] if through is not None else bn.output[0]
        prod.output[0] = mm_out
        idx = list(out.graph.node).index(prod)
        out.graph.node.insert(idx + 1, helper.make_node("Add", [mm_out, bias_name], [biased],
                                                        name=gr.fresh(f"{base}_bias")))
        if through is None:
            return
    last.output[0] = bn.output[0]
