"""Fold per-channel affine maps (constant Mul / Add / Sub / Div) into the layer next to them.

A frozen BatchNorm (torchvision's ``FrozenBatchNorm2d``, DETR, every torchvision detection backbone) computes
``x * scale + bias`` and is exported as ``Conv -> Mul -> Add`` with per-channel constants; a layer scale, a
fixed normalisation or a ``x / 2`` is the same map. A maximal chain of such nodes is one *affine site*
``y = s * x + t`` (s, t per channel, composed in float64) and folds exactly like a BN with mean 0, var 1,
eps 0 (``s / sqrt(1) = s`` exactly), through the same rules as BatchNormalization: backward into the
producer (Conv, ConvTranspose group-aware, Gemm, MatMul + bias), forward into the consumer.

The check that makes this exact, and that onnxslim and onnxruntime's ConvAddFusion got wrong: every
constant must broadcast on the channel axis (axis 1 of the data, the output channel of every rule's
layer; the last axis, at any rank, next to a MatMul, whose features it is: a layer scale on (N, L, C)
tokens) and nowhere else. A ``(C,)`` constant next to an NCHW Conv broadcasts on the *width* axis, so it is
reported as left with that reason. A site that only scales (t = 0) may fold forward into a zero-padded
Conv, since a scaled zero is still zero.

Sites are the chains next to a layer with a constant weight; other Mul / Add nodes are not this pass's
business and are not reported. Two are left on purpose, with the reason, because onnxruntime fuses the
pattern they end into one kernel, which folding them into the next layer would prevent:

* the ``* 0.5`` that ends a GELU (``x * (1 + erf(x / sqrt 2)) * 0.5``, as torch exports it): five
  elementwise passes over the tensor instead of one (timm's FastViT-T8: 16 of 17 GELUs are fused when the
  0.5 stays);
* the ``* gamma + beta`` that ends a LayerNorm exported as primitives (``(x - mean) / sqrt(var + eps)``,
  opset < 17) on (N, C) features: seven nodes instead of one LayerNormalization.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx

from folding.fold_math import BNParams
from folding.onnx_fold import LayerFoldPass
from folding.rules import Skip

STEP_OPS = ("Mul", "Add", "Sub", "Div")
LAYERS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
CHANNEL_AXIS = 1


@dataclass
class Step:
    """One node of a chain: ``op`` with constant ``const`` (float64); ``reverse`` for ``c - x``."""

    node: onnx.NodeProto
    op: str
    const: np.ndarray
    const_name: str
    reverse: bool = False
    data: str = ""                     # the non-constant input (either side: ``c * x`` as well as ``x * c``)


@dataclass
class AffineSite:
    """A chain of steps read as one node by the BN rules (``input[0]`` in, ``output[0]`` out)."""

    steps: list[Step]
    features_last: bool = False        # next to a MatMul: its channels are the data's last axis, at any rank
    input: list[str] = field(default_factory=list)
    output: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.input = [self.steps[0].data, *(s.const_name for s in self.steps)]
        self.output = [self.steps[-1].node.output[0]]

    @property
    def name(self) -> str:
        return self.steps[0].node.name or self.steps[0].node.output[0]

    @property
    def op_type(self) -> str:
        return "+".join(s.op for s in self.steps)


class OnnxAffinePass(LayerFoldPass[AffineSite]):
    """The BN rules over affine sites instead of BatchNormalization nodes."""

    def __init__(self, model: onnx.ModelProto) -> None:
        super().__init__(model)
        self.gelu_tails: set[int] = set()      # GELU's 0.5: a site of its own, left with the reason
        self.gelu_inner: set[int] = set()      # its x / sqrt 2: no site (it could never fold, and is the GELU's)
        self.kept: dict[int, str] = {}         # first steps of sites left on purpose: why
        for n in self.g.node:
            inner = self._gelu_inner(n)
            if inner is not None:
                self.gelu_tails.add(id(n))
                self.gelu_inner.add(id(inner))
                self.kept[id(n)] = "ends a GELU: onnxruntime fuses the pattern into one Gelu"
            elif self._ends_layer_norm(n):
                self.kept[id(n)] = "ends a LayerNorm: onnxruntime fuses the pattern into one LayerNormalization"
        self.sites = self._find_sites()

    # --- discovery ----------------------------------------------------------------------------------------

    def _step(self, node: onnx.NodeProto, data: str | None = None) -> Step | None:
        """``node`` as a step over a non-constant tensor (``data`` when given), or None."""
        if node.op_type not in STEP_OPS or node.domain not in ("", "ai.onnx") or len(node.input) != 2:
            return None
        consts = [self.array(i) for i in node.input]
        for k in (0, 1):
            other = node.input[1 - k]
            c = consts[k]
            if c is None or consts[1 - k] is not None or (data is not None and other != data):
                continue
            if c.dtype.kind != "f":
                return None
            if k == 0 and node.op_type == "Div":       # c / x is not affine
                return None
            reverse = k == 0 and node.op_type == "Sub"
            return Step(node, node.op_type, c.astype(np.float64), node.input[k], reverse=reverse, data=other)
        return None

    def _gelu_inner(self, node: onnx.NodeProto) -> onnx.NodeProto | None:
        """When ``node`` is the ``* 0.5`` (or ``/ 2``) ending ``x * (1 + erf(x / c))``: the ``x / c`` (or
        ``x * c``) node. (torch's tanh form is no pattern onnxruntime fuses: its cube is ``x * x * x``, not
        ``Pow``; it folds like any scale.)"""
        step = self._step(node)
        if step is None or step.const.size != 1 or step.reverse:
            return None
        half = float(step.const.reshape(-1)[0])
        if not ((step.op == "Mul" and abs(half - 0.5) < 1e-6) or (step.op == "Div" and abs(half - 2) < 1e-6)):
            return None
        body = self.producer.get(step.data)
        if body is None or body.op_type != "Mul" or len(body.input) != 2:
            return None
        for x, other in (body.input, body.input[::-1]):
            one_plus = self.producer.get(other)
            if one_plus is None or one_plus.op_type != "Add" or len(one_plus.input) != 2:
                continue
            consts = [self.array(i) for i in one_plus.input]
            if not any(c is not None and c.size == 1 and abs(float(c.reshape(-1)[0]) - 1) < 1e-6 for c in consts):
                continue
            curve = next((self.producer.get(i) for i, c in zip(one_plus.input, consts, strict=True) if c is None),
                         None)
            inner = self.producer.get(curve.input[0]) if curve is not None and curve.op_type == "Erf" else None
            if inner is not None and inner.op_type in ("Div", "Mul") and x in inner.input:
                return inner
        return None

    def _ends_layer_norm(self, node: onnx.NodeProto) -> bool:
        """``node`` is the ``* gamma`` after ``(x - ReduceMean(x)) / d``."""
        step = self._step(node)
        div = self.producer.get(step.data) if step is not None and step.op == "Mul" else None
        if div is None or div.op_type != "Div" or len(div.input) != 2:
            return False
        centred = self.producer.get(div.input[0])
        if centred is None or centred.op_type != "Sub" or len(centred.input) != 2:
            return False
        mean = self.producer.get(centred.input[1])
        return mean is not None and mean.op_type == "ReduceMean" and mean.input[0] == centred.input[0]

    def _single_consumer(self, tensor: str) -> onnx.NodeProto | None:
        if tensor in self.graph_outputs or self.uses[tensor] != 1:
            return None
        return next((n for n in self.g.node if tensor in n.input), None)

    def _is_layer(self, node: onnx.NodeProto | None) -> bool:
        if node is None or node.op_type not in LAYERS:
            return False
        return len(node.input) > 1 and self.array(node.input[1]) is not None

    def _find_sites(self) -> list[AffineSite]:
        taken: set[int] = set()
        sites = []
        for node in self.g.node:
            if id(node) in taken or id(node) in self.gelu_inner:
                continue
            first = self._step(node)
            if first is None:
                continue
            data = first.data
            producer = self.producer.get(data)
            if node.op_type == "Add" and producer is not None and producer.op_type == "MatMul":
                continue                              # MatMul + bias is the layer itself
            steps = [first]
            while id(node) not in self.gelu_tails:
                nxt = self._single_consumer(steps[-1].node.output[0])
                step = None if nxt is None else self._step(nxt, steps[-1].node.output[0])
                if step is None:
                    break
                steps.append(step)
            taken.update(id(s.node) for s in steps)
            consumer = self._single_consumer(steps[-1].node.output[0])
            linear = self._linear_layer(producer)         # MatMul, or the Add of its bias
            if linear is not None or self._is_layer(producer) or self._is_layer(consumer):
                reads = consumer is not None and consumer.input[0] == steps[-1].node.output[0]
                last = linear is not None or (not self._is_layer(producer) and reads
                                              and consumer is not None and consumer.op_type == "MatMul")
                sites.append(AffineSite(steps, features_last=last))
        return sites

    def _linear_layer(self, node: onnx.NodeProto | None) -> onnx.NodeProto | None:
        """The MatMul with a constant weight that computes ``node``'s output (itself, or through its bias Add)."""
        if node is not None and node.op_type == "Add":
            node = self._matmul_into(node)
        return node if node is not None and node.op_type == "MatMul" and self._is_layer(node) else None

    # --- the FoldPass interface -----------------------------------------------------------------------------

    def batchnorms(self) -> list[AffineSite]:
        return list(self.sites)

    def bn_name(self, bn: AffineSite) -> str:
        return bn.name

    def bn_type(self, bn: AffineSite) -> str:
        return bn.op_type

    def step_count(self) -> int:
        return sum(len(s.steps) for s in self.sites)

    def check_bn(self, bn: AffineSite) -> BNParams | Skip:
        why = self.kept.get(id(bn.steps[0].node))
        if why:
            return Skip(f"{bn.steps[0].op} {bn.name!r} {why} kernel, which folding it would prevent")
        data = bn.input[0]
        dims = self.dims.get(data)
        if dims is None:
            if any(s.const.size > 1 for s in bn.steps):
                return Skip(f"the rank of {data!r} is unknown, so it cannot be checked that the constants "
                            f"broadcast on the channel axis")
        axis = len(dims) - 1 if bn.features_last and dims else CHANNEL_AXIS
        channels = dims[axis] if dims is not None and len(dims) > axis else None
        for s in bn.steps:
            reason = channel_broadcast_reason(s, dims, axis)
            if reason:
                return Skip(reason)
            size = s.const.size
            if size > 1:
                if channels is not None and size != channels:
                    return Skip(f"{s.op} {s.node.name!r}: constant has {size} values, the data has {channels} channels")
                channels = size
        if channels is None:
            return Skip(f"the channel count of {data!r} is unknown")
        scale, shift = np.ones(channels), np.zeros(channels)
        for s in bn.steps:
            c = np.broadcast_to(s.const.reshape(-1), (channels,))
            if s.op == "Mul":
                scale, shift = scale * c, shift * c
            elif s.op == "Div":
                scale, shift = scale / c, shift / c
            elif s.op == "Add":
                shift = shift + c
            elif s.reverse:                            # c - y
                scale, shift = -scale, c - shift
            else:
                shift = shift - c
        return BNParams.create(np.zeros(channels), np.ones(channels), scale, shift, 0.0)

    def pads_ok_forward(self, params: BNParams) -> bool:
        return not np.any(params.shift)

    def features_last(self, bn: AffineSite) -> bool:
        return bn.features_last

    def remove_bn(self, bn: AffineSite) -> None:
        self.removed_inputs += [s.const_name for s in bn.steps]
        for s in bn.steps:
            self.g.node.remove(s.node)
            for i in s.node.input:
                self.uses[i] -= 1


def channel_broadcast_reason(step: Step, dims: list[int | None] | None, axis: int = CHANNEL_AXIS) -> str | None:
    """Why ``step``'s constant does not broadcast on the channel axis (``axis``) only (None when it does)."""
    shape = list(step.const.shape)
    if step.const.size == 1:
        return None if dims is None or len(shape) <= len(dims) else (
            f"{step.op} {step.node.name!r}: constant of shape {shape} has a higher rank than the data")
    assert dims is not None
    if len(shape) > len(dims):
        return f"{step.op} {step.node.name!r}: constant of shape {shape} has a higher rank than the data ({len(dims)})"
    aligned = [1] * (len(dims) - len(shape)) + shape
    axes = [a for a, d in enumerate(aligned) if d != 1]
    if axes != [axis]:
        return (f"{step.op} {step.node.name!r}: constant of shape {shape} broadcasts on axis {axes} of a rank-"
                f"{len(dims)} tensor, not on the channel axis {axis} alone")
    return None
