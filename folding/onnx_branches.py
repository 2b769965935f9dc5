"""Structural re-parameterisation: parallel branches over one tensor, summed by Add, become one Conv.

RepVGG (3x3 conv+BN, 1x1 conv+BN, identity BN), MobileOne (k over-parameterised kxk conv+BN branches, a 1x1
"scale" branch, an identity BN; depthwise and pointwise), ACNet (3x3 + 1x3 + 3x1) and FastViT's RepMixer
(``x + layer_scale * (mixer(x) - norm(x))``, a MobileOne block minus an identity BN, scaled per channel) are
trained with branches and deployed as one Conv per block. After the BN pass has folded each branch's BN into
its Conv, a *linear combination* (a tree of Add and Sub nodes, and Mul nodes by a constant that broadcasts on
the channel axis, each node's output read once) whose top is an Add or a Sub gives each leaf a per-channel
coefficient (Sub negates its right side, a Mul multiplies by its constant); when every leaf is computed from
the same tensor X, each is one of:

* ``Conv(X)`` with constant weights: its kernel, zero-padded (centred) to the largest kernel of the sum;
* ``BatchNormalization(X)`` (an identity through a BN): a Dirac kernel per group scaled by the BN's s, and
  its shift t as bias;
* ``X`` itself: a Dirac kernel.

Each leaf enters the sum times its coefficient (a Conv's kernel and bias, a Dirac kernel's value and a BN's
shift). The merge is exact when every Conv has the same group, stride and dilation, and padding lines every branch
up on the same output grid: for a kernel k inside the merged K (K - k even), the branch's pads plus
``dilation * (K - k) / 2`` are the merged Conv's pads, on both sides of every axis; an identity needs stride
1, as many output channels as input channels, and the merged pads equal to ``dilation * (K - 1) / 2``.
Anything else is left with the reason. Weights are summed in float64 and cast once.

Shaped like the fold rules: :func:`match` returns a :class:`Merge` plan or a ``Skip``, :func:`apply` rewrites
and never re-checks. The largest Conv takes over the sum's output name, so every name downstream is kept.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import numpy_helper

from folding.fold_math import BNParams
from folding.onnx_affine import CHANNEL_AXIS, Step, channel_broadcast_reason
from folding.onnx_fold import batchnorm_params
from folding.onnx_graph import GraphIndex, attr, set_attr
from folding.rules import Skip
from foldserve.records import MergedBranches, SkippedMerge


@dataclass
class Leaf:
    tensor: str
    coef: np.ndarray                   # per channel (or one value), float64


@dataclass(kw_only=True)
class Branch:
    """A leaf of the sum that is X itself (an identity); :class:`ConvBranch` and :class:`BnBranch` are the others."""

    tensor: str                        # the leaf tensor of the sum
    source: str                        # X, the tensor the branch reads
    coef: np.ndarray = field(default_factory=lambda: np.ones(1))   # per channel (or one value), float64

    def what(self) -> str:
        return "identity"

    def describe(self) -> str:
        text = self.what()
        if np.all(self.coef == 1):
            return text
        if np.all(self.coef == -1):
            return f"{text} subtracted"
        return f"{text} {'subtracted, ' if np.all(self.coef < 0) else ''}scaled per channel"


@dataclass(kw_only=True)
class ConvBranch(Branch):
    """``Conv(X)`` with constant weights (float64)."""

    node: onnx.NodeProto
    weight: np.ndarray
    bias: np.ndarray

    def what(self) -> str:
        return f"Conv {self.node.name or self.node.output[0]!r} {'x'.join(map(str, self.weight.shape[2:]))}"


@dataclass(kw_only=True)
class BnBranch(Branch):
    """``BatchNormalization(X)``: an identity through a BN."""

    node: onnx.NodeProto
    bn: BNParams

    def what(self) -> str:
        return f"BatchNormalization {self.node.name or self.node.output[0]!r} (identity)"


@dataclass
class Merge:
    top: onnx.NodeProto
    adds: list[onnx.NodeProto]
    branches: list[Branch]
    into: onnx.NodeProto               # the Conv that computes the sum afterwards
    weight: np.ndarray                 # merged, float64
    bias: np.ndarray
    pads: list[int]
    removed: list[str] = field(default_factory=list)


class BranchPass(GraphIndex):
    """The sums of one graph that merge, over its index; a BN branch's parameters are read as the BN pass reads
    them (:func:`folding.onnx_fold.batchnorm_params`)."""

    def __init__(self, model: onnx.ModelProto) -> None:
        super().__init__(model)
        self.opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)

    def sums(self) -> list[tuple[onnx.NodeProto, list[onnx.NodeProto], list[Leaf]]]:
        """Every top Add / Sub of a linear combination: (top, its nodes, its leaves)."""
        self.scales = {id(n): c for n in self.g.node if (c := self._channel_scale(n)) is not None}
        combine = [n for n in self.g.node if id(n) in self.scales or (
            n.op_type in ("Add", "Sub") and n.domain in ("", "ai.onnx") and len(n.input) == 2
            and all(self.array(i) is None for i in n.input))]
        in_tree = {id(n) for n in combine}
        readers: dict[str, list[onnx.NodeProto]] = {}
        for n in self.g.node:
            for i in n.input:
                readers.setdefault(i, []).append(n)
        # inner: read only by a node of a tree whose top is an Add or a Sub (nodes are in topological order, so
        # a reader is decided before what it reads)
        self.inner: set[int] = set()
        for n in reversed(combine):
            out = n.output[0]
            sole = readers.get(out, [])
            if out in self.graph_outputs or self.uses[out] != 1 or len(sole) != 1 or id(sole[0]) not in in_tree:
                continue
            if sole[0].op_type != "Mul" or id(sole[0]) in self.inner:
                self.inner.add(id(n))
        return [(top, *self.subtree(top)) for top in combine
                if top.op_type != "Mul" and id(top) not in self.inner]

    def subtree(self, top: onnx.NodeProto) -> tuple[list[onnx.NodeProto], list[Leaf]]:
        """The nodes of the combination under ``top`` (itself first) and its leaves with their coefficients,
        left to right."""
        tree, leaves, stack = [top], [], self._terms(top, np.ones(1))[::-1]
        while stack:
            t, coef = stack.pop()
            p = self.producer.get(t)
            if p is not None and id(p) in self.inner:
                tree.append(p)
                stack.extend(self._terms(p, coef)[::-1])
            else:
                leaves.append(Leaf(t, coef))
        return tree, leaves

    def _terms(self, node: onnx.NodeProto, coef: np.ndarray) -> list[tuple[str, np.ndarray]]:
        if id(node) in self.scales:     # its size is 1 or the data's channel count, as every coefficient's above it
            return [(next(i for i in node.input if self.array(i) is None), coef * self.scales[id(node)])]
        return [(node.input[0], coef), (node.input[1], -coef if node.op_type == "Sub" else coef)]

    def _channel_scale(self, node: onnx.NodeProto) -> np.ndarray | None:
        """A Mul of a tensor by a float constant that broadcasts on the channel axis alone, as many values as the
        tensor has channels (or one value): the constant, flat, in float64."""
        if node.op_type != "Mul" or node.domain not in ("", "ai.onnx") or len(node.input) != 2:
            return None
        consts = [self.array(i) for i in node.input]
        if sum(c is not None for c in consts) != 1:
            return None
        k = 0 if consts[0] is not None else 1
        c = consts[k]
        assert c is not None
        dims = self.dims.get(node.input[1 - k])
        if c.dtype.kind != "f" or (c.size > 1 and (dims is None or len(dims) <= CHANNEL_AXIS
                                                    or dims[CHANNEL_AXIS] != c.size)):
            return None
        if channel_broadcast_reason(Step(node, "Mul", c, node.input[k]), dims):
            return None
        return c.astype(np.float64).reshape(-1)

    def branch(self, leaf: Leaf) -> Branch:
        b = self._branch(leaf.tensor)
        b.coef = leaf.coef
        return b

    def _branch(self, leaf: str) -> Branch:
        p = self.producer.get(leaf)
        private = p is not None and self.uses[leaf] == 1 and leaf not in self.graph_outputs
        if private and p.op_type == "Conv" and len(p.input) > 1 and self.array(p.input[1]) is not None:
            b = p.input[2] if len(p.input) > 2 and p.input[2] else ""
            bias = self.array(b) if b else None
            if not b or bias is not None:
                w = self.array(p.input[1]).astype(np.float64)
                return ConvBranch(tensor=leaf, source=p.input[0], node=p, weight=w,
                                  bias=np.zeros(w.shape[0]) if bias is None else bias.astype(np.float64).reshape(-1))
        if private and p.op_type == "BatchNormalization":
            params = batchnorm_params(self, p, self.opset)
            if isinstance(params, BNParams):
                return BnBranch(tensor=leaf, source=p.input[0], node=p, bn=params)
        return Branch(tensor=leaf, source=leaf)


def _conv_attrs(node: onnx.NodeProto, spatial: int) -> tuple[int, list[int], list[int], list[int], str]:
    auto = attr(node, "auto_pad", b"NOTSET")
    auto = auto.decode() if isinstance(auto, bytes) else auto
    pads = list(attr(node, "pads", None) or [0] * (2 * spatial))
    return (int(attr(node, "group", 1)), list(attr(node, "strides", None) or [1] * spatial),
            list(attr(node, "dilations", None) or [1] * spatial), pads, auto)


def match(p: BranchPass, top: onnx.NodeProto, adds: list[onnx.NodeProto], leaves: list[Leaf]) -> Merge | Skip | None:
    """A Merge, a Skip (a sum of branches over one tensor that cannot merge exactly), or None (not a sum of
    parallel branches at all)."""
    branches = [p.branch(t) for t in leaves]
    sources = {b.source for b in branches}
    convs = [b for b in branches if isinstance(b, ConvBranch)]
    if not convs:
        return None
    if len(sources) != 1:
        by_source = {s: sum(b.source == s for b in branches) for s in sources}
        shared = [s for s, n in by_source.items() if n > 1 and any(c.source == s for c in convs)]
        if not shared:
            return None
        return Skip(f"the sum also adds tensors that are not computed from {shared[0]!r}")
    layout = _check_convs(convs)
    if isinstance(layout, Skip):
        return layout
    kernel, pads, dilations = layout
    identities = [b for b in branches if not isinstance(b, ConvBranch)]
    if identities:
        reason = _identity_reason(convs[0], kernel, pads, dilations)
        if reason:
            return Skip(reason)
    summed = _sum_branches(branches, convs[0].weight.shape[:2], kernel)
    if isinstance(summed, Skip):
        return summed
    into = max(convs, key=lambda c: int(np.prod(c.weight.shape[2:])))
    return Merge(top, adds, branches, into.node, summed[0], summed[1], pads)


def _check_convs(convs: list[ConvBranch]) -> tuple[list[int], list[int], list[int]] | Skip:
    """(merged kernel, merged pads, dilations) when every Conv lines up on one output grid, else a Skip."""
    first = convs[0]
    spatial = first.weight.ndim - 2
    group, strides, dilations, _, _ = _conv_attrs(first.node, spatial)
    for c in convs:
        if c.weight.ndim - 2 != spatial:
            return Skip(f"{c.describe()} has a kernel of another rank")
        g, st, d, _, auto = _conv_attrs(c.node, spatial)
        if (g, st, d) != (group, strides, dilations):
            return Skip(f"{c.describe()} has group={g}, strides={st}, dilations={d}; {first.describe()} has "
                        f"group={group}, strides={strides}, dilations={dilations}")
        if auto not in ("NOTSET", "VALID"):
            return Skip(f"{c.describe()} uses auto_pad={auto}: give explicit pads to merge it")
        if c.weight.shape[:2] != first.weight.shape[:2]:
            return Skip(f"{c.describe()} has weight shape {list(c.weight.shape)}, {first.describe()} "
                        f"{list(first.weight.shape)}")
    kernel = [max(c.weight.shape[2 + a] for c in convs) for a in range(spatial)]
    merged: list[int] | None = None
    for c in convs:
        k = c.weight.shape[2:]
        if any((kernel[a] - k[a]) % 2 for a in range(spatial)):
            return Skip(f"{c.describe()} cannot be centred in a {'x'.join(map(str, kernel))} kernel")
        pads = _conv_attrs(c.node, spatial)[3]
        shift = [dilations[a] * (kernel[a] - k[a]) // 2 for a in range(spatial)]
        aligned = [pads[a] + shift[a] for a in range(spatial)] + [pads[spatial + a] + shift[a] for a in range(spatial)]
        if merged is None:
            merged = aligned
        elif aligned != merged:
            return Skip(f"padding does not line the branches up: {c.describe()} with pads {pads} would need pads "
                        f"{merged} minus its centring offset {shift}")
    assert merged is not None
    return kernel, merged, dilations


def _identity_reason(conv: ConvBranch, kernel: list[int], pads: list[int], dilations: list[int]) -> str | None:
    spatial = len(kernel)
    group, strides, *_ = _conv_attrs(conv.node, spatial)
    cout, cin_g = conv.weight.shape[:2]
    centre = [dilations[a] * (kernel[a] - 1) // 2 for a in range(spatial)]
    if any(s != 1 for s in strides):
        return f"an identity branch needs stride 1, the Convs have strides {strides}"
    if pads != centre + centre or any((k - 1) % 2 for k in kernel):
        return f"an identity branch needs the merged pads {centre + centre}, the Convs give {pads}"
    if cin_g * group != cout:
        return f"an identity branch needs as many output as input channels: the Convs map {cin_g * group} -> {cout}"
    return None


def _sum_branches(branches: list[Branch], shape: tuple[int, ...], kernel: list[int]
                  ) -> tuple[np.ndarray, np.ndarray] | Skip:
    """The merged weight and bias in float64: kernels centred in ``kernel``, identities as Dirac kernels, each
    branch times its coefficient."""
    cout, cin_g = shape
    spatial = len(kernel)
    weight = np.zeros((cout, cin_g, *kernel))
    bias = np.zeros(cout)
    centre = tuple((k - 1) // 2 for k in kernel)
    for b in branches:
        if b.coef.size not in (1, cout):
            return Skip(f"{b.describe()} is scaled on {b.coef.size} channels, the Convs give {cout}")
        coef = np.broadcast_to(b.coef, (cout,))
        if isinstance(b, ConvBranch):
            k = b.weight.shape[2:]
            window = tuple(slice((kernel[a] - k[a]) // 2, (kernel[a] - k[a]) // 2 + k[a]) for a in range(spatial))
            weight[(slice(None), slice(None), *window)] += b.weight * coef.reshape(-1, *[1] * (1 + spatial))
            bias += b.bias * coef
            continue
        scale, shift = (b.bn.scale, b.bn.shift) if isinstance(b, BnBranch) else (np.ones(cout), np.zeros(cout))
        if scale.size != cout:
            return Skip(f"{b.describe()} normalises {scale.size} channels, the Convs give {cout}")
        for o in range(cout):
            weight[(o, o % cin_g, *centre)] += scale[o] * coef[o]
        bias += shift * coef
    return weight, bias


def apply(p: BranchPass, m: Merge) -> None:
    """Rewrite: the chosen Conv computes the sum; the other branch nodes and the Adds go."""
    dtype = p.array(m.into.input[1]).dtype
    base = m.into.name or m.into.op_type
    w_name, b_name = p.fresh(f"{base}_merged_W"), p.fresh(f"{base}_merged_B")
    p.g.initializer.extend([numpy_helper.from_array(m.weight.astype(dtype), w_name),
                            numpy_helper.from_array(m.bias.astype(dtype), b_name)])
    for b in m.branches:
        if isinstance(b, (ConvBranch, BnBranch)):
            m.removed += [i for i in b.node.input[1:] if i]
    m.removed += [i for n in m.adds if n.op_type == "Mul" for i in n.input if p.array(i) is not None]
    while len(m.into.input) < 3:
        m.into.input.append("")
    m.into.input[1], m.into.input[2] = w_name, b_name
    set_attr(m.into, "pads", m.pads)
    set_attr(m.into, "kernel_shape", list(m.weight.shape[2:]))
    for i, a in enumerate(m.into.attribute):
        if a.name == "auto_pad":
            del m.into.attribute[i]
            break
    m.into.output[0] = m.top.output[0]
    p.producer[m.top.output[0]] = m.into
    for node in [*(b.node for b in m.branches if isinstance(b, (ConvBranch, BnBranch)) and b.node is not m.into),
                 *m.adds]:
        p.g.node.remove(node)


def merge_branches(model: onnx.ModelProto) -> tuple[list[MergedBranches], list[SkippedMerge], list[str]]:
    """Merge every sum of parallel branches in ``model`` (in place): (merged, left with reasons, initializers
    that may now be unused). A sum that also adds other tensors (a residual around a re-parameterised block,
    as in RepGhost) merges the largest part of it that is a sum over one tensor."""
    p = BranchPass(model)
    merged, skipped, removed = [], [], []
    for top, adds, leaves in p.sums():
        plan = match(p, top, adds, leaves)
        if isinstance(plan, Skip):
            parts = [m for m in (match(p, a, *p.subtree(a)) for a in _largest_first(p, adds[1:]))
                     if isinstance(m, Merge)]
            chosen = _disjoint(parts)
            if chosen:
                plans: list[Merge | Skip | None] = list(chosen)
            else:
                skipped.append(SkippedMerge(top.name or top.output[0], plan.reason))
                continue
        else:
            plans = [plan]
        for m in plans:
            if isinstance(m, Merge):
                apply(p, m)
                removed += m.removed
                merged.append(MergedBranches(m.into.name or m.into.output[0], m.top.name or m.top.output[0],
                                             [b.describe() for b in m.branches], m.top.output[0]))
    return merged, skipped, removed


def _largest_first(p: BranchPass, adds: list[onnx.NodeProto]) -> list[onnx.NodeProto]:
    return sorted(adds, key=lambda a: -len(p.subtree(a)[1]))


def _disjoint(plans: list[Merge]) -> list[Merge]:
    """The plans, largest first, without those whose Adds another chosen plan already covers."""
    chosen: list[Merge] = []
    taken: set[int] = set()
    for m in plans:
        ids = {id(a) for a in m.adds}
        if not ids & taken:
            chosen.append(m)
            taken |= ids
    return chosen
