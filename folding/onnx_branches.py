"""Structural re-parameterisation: parallel branches over one tensor, summed by Add, become one Conv.

RepVGG (3x3 conv+BN, 1x1 conv+BN, identity BN), MobileOne (k over-parameterised kxk conv+BN branches, a 1x1
"scale" branch, an identity BN; depthwise and pointwise) and ACNet (3x3 + 1x3 + 3x1) are trained with
branches and deployed as one Conv per block. After the BN pass has folded each branch's BN into its Conv,
a sum (a tree of Adds, each Add output read once) whose every leaf is computed from the same tensor X is
one of:

* ``Conv(X)`` with constant weights: its kernel, zero-padded (centred) to the largest kernel of the sum;
* ``BatchNormalization(X)`` (an identity through a BN): a Dirac kernel per group scaled by the BN's s, and
  its shift t as bias;
* ``X`` itself: a Dirac kernel.

The merge is exact when every Conv has the same group, stride and dilation, and padding lines every branch
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
from folding.onnx_fold import OnnxFoldPass, _attr, _set_attr
from folding.rules import Skip
from foldserve.records import MergedBranches, SkippedMerge


@dataclass
class Branch:
    kind: str                          # "conv", "bn" (identity through a BN) or "identity"
    tensor: str                        # the leaf tensor of the sum
    source: str                        # X, the tensor the branch reads
    node: onnx.NodeProto | None = None
    weight: np.ndarray | None = None   # conv: float64 weight; bn: None
    bias: np.ndarray | None = None
    bn: BNParams | None = None

    def describe(self) -> str:
        if self.kind == "conv":
            assert self.node is not None and self.weight is not None
            return f"Conv {self.node.name or self.node.output[0]!r} {'x'.join(map(str, self.weight.shape[2:]))}"
        if self.kind == "bn":
            assert self.node is not None
            return f"BatchNormalization {self.node.name or self.node.output[0]!r} (identity)"
        return "identity"


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


class BranchPass(OnnxFoldPass):
    """Indexes of one graph plus the sums that merge; BN checks come from the BN pass."""

    def sums(self) -> list[tuple[onnx.NodeProto, list[onnx.NodeProto], list[str]]]:
        """Every top Add of a tree of Adds: (top, its Adds, its leaf tensors)."""
        adds = [n for n in self.g.node if n.op_type == "Add" and n.domain in ("", "ai.onnx") and len(n.input) == 2
                and all(self.array(i) is None for i in n.input)]
        add_ids = {id(n) for n in adds}
        self.inner = {id(n) for n in adds if self._sole_reader_is_add(n.output[0], add_ids)}
        return [(top, *self.subtree(top)) for top in adds if id(top) not in self.inner]

    def subtree(self, top: onnx.NodeProto) -> tuple[list[onnx.NodeProto], list[str]]:
        """The Adds under ``top`` (itself first) and the leaves they sum, left to right."""
        tree, leaves, stack = [top], [], list(top.input)[::-1]
        while stack:
            t = stack.pop()
            p = self.producer.get(t)
            if p is not None and id(p) in self.inner:
                tree.append(p)
                stack.extend(list(p.input)[::-1])
            else:
                leaves.append(t)
        return tree, leaves

    def _sole_reader_is_add(self, tensor: str, add_ids: set[int]) -> bool:
        if tensor in self.graph_outputs or self.uses[tensor] != 1:
            return False
        reader = next((n for n in self.g.node if tensor in n.input), None)
        return reader is not None and id(reader) in add_ids

    def branch(self, leaf: str) -> Branch:
        p = self.producer.get(leaf)
        private = p is not None and self.uses[leaf] == 1 and leaf not in self.graph_outputs
        if private and p.op_type == "Conv" and len(p.input) > 1 and self.array(p.input[1]) is not None:
            b = p.input[2] if len(p.input) > 2 and p.input[2] else ""
            bias = self.array(b) if b else None
            if not b or bias is not None:
                w = self.array(p.input[1]).astype(np.float64)
                return Branch("conv", leaf, p.input[0], p, w,
                              np.zeros(w.shape[0]) if bias is None else bias.astype(np.float64).reshape(-1))
        if private and p.op_type == "BatchNormalization":
            params = self.check_bn(p)
            if isinstance(params, BNParams):
                return Branch("bn", leaf, p.input[0], p, bn=params)
        return Branch("identity", leaf, leaf)


def _conv_attrs(node: onnx.NodeProto, spatial: int) -> tuple[int, list[int], list[int], list[int], str]:
    auto = _attr(node, "auto_pad", b"NOTSET")
    auto = auto.decode() if isinstance(auto, bytes) else auto
    pads = list(_attr(node, "pads", None) or [0] * (2 * spatial))
    return (int(_attr(node, "group", 1)), list(_attr(node, "strides", None) or [1] * spatial),
            list(_attr(node, "dilations", None) or [1] * spatial), pads, auto)


def match(p: BranchPass, top: onnx.NodeProto, adds: list[onnx.NodeProto], leaves: list[str]) -> Merge | Skip | None:
    """A Merge, a Skip (a sum of branches over one tensor that cannot merge exactly), or None (not a sum of
    parallel branches at all)."""
    branches = [p.branch(t) for t in leaves]
    sources = {b.source for b in branches}
    convs = [b for b in branches if b.kind == "conv"]
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
    identities = [b for b in branches if b.kind != "conv"]
    if identities:
        reason = _identity_reason(convs[0], kernel, pads, dilations)
        if reason:
            return Skip(reason)
    summed = _sum_branches(branches, convs[0].weight.shape[:2], kernel)  # type: ignore[union-attr]
    if isinstance(summed, Skip):
        return summed
    into = max(convs, key=lambda c: int(np.prod(c.weight.shape[2:])))  # type: ignore[union-attr]
    return Merge(top, adds, branches, into.node, summed[0], summed[1], pads)  # type: ignore[arg-type]


def _check_convs(convs: list[Branch]) -> tuple[list[int], list[int], list[int]] | Skip:
    """(merged kernel, merged pads, dilations) when every Conv lines up on one output grid, else a Skip."""
    first = convs[0]
    spatial = first.weight.ndim - 2  # type: ignore[union-attr]
    group, strides, dilations, _, _ = _conv_attrs(first.node, spatial)  # type: ignore[arg-type]
    for c in convs:
        if c.weight.ndim - 2 != spatial:  # type: ignore[union-attr]
            return Skip(f"{c.describe()} has a kernel of another rank")
        g, st, d, _, auto = _conv_attrs(c.node, spatial)  # type: ignore[arg-type]
        if (g, st, d) != (group, strides, dilations):
            return Skip(f"{c.describe()} has group={g}, strides={st}, dilations={d}; {first.describe()} has "
                        f"group={group}, strides={strides}, dilations={dilations}")
        if auto not in ("NOTSET", "VALID"):
            return Skip(f"{c.describe()} uses auto_pad={auto}: give explicit pads to merge it")
        if c.weight.shape[:2] != first.weight.shape[:2]:  # type: ignore[union-attr]
            return Skip(f"{c.describe()} has weight shape {list(c.weight.shape)}, {first.describe()} "  # type: ignore[union-attr]
                        f"{list(first.weight.shape)}")
    kernel = [max(c.weight.shape[2 + a] for c in convs) for a in range(spatial)]  # type: ignore[union-attr]
    merged: list[int] | None = None
    for c in convs:
        k = c.weight.shape[2:]  # type: ignore[union-attr]
        if any((kernel[a] - k[a]) % 2 for a in range(spatial)):
            return Skip(f"{c.describe()} cannot be centred in a {'x'.join(map(str, kernel))} kernel")
        pads = _conv_attrs(c.node, spatial)[3]  # type: ignore[arg-type]
        shift = [dilations[a] * (kernel[a] - k[a]) // 2 for a in range(spatial)]
        aligned = [pads[a] + shift[a] for a in range(spatial)] + [pads[spatial + a] + shift[a] for a in range(spatial)]
        if merged is None:
            merged = aligned
        elif aligned != merged:
            return Skip(f"padding does not line the branches up: {c.describe()} with pads {pads} would need pads "
                        f"{merged} minus its centring offset {shift}")
    assert merged is not None
    return kernel, merged, dilations


def _identity_reason(conv: Branch, kernel: list[int], pads: list[int], dilations: list[int]) -> str | None:
    spatial = len(kernel)
    group, strides, *_ = _conv_attrs(conv.node, spatial)  # type: ignore[arg-type]
    cout, cin_g = conv.weight.shape[:2]  # type: ignore[union-attr]
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
    """The merged weight and bias in float64: kernels centred in ``kernel``, identities as Dirac kernels."""
    cout, cin_g = shape
    spatial = len(kernel)
    weight = np.zeros((cout, cin_g, *kernel))
    bias = np.zeros(cout)
    centre = tuple((k - 1) // 2 for k in kernel)
    for b in branches:
        if b.kind == "conv":
            k = b.weight.shape[2:]  # type: ignore[union-attr]
            window = tuple(slice((kernel[a] - k[a]) // 2, (kernel[a] - k[a]) // 2 + k[a]) for a in range(spatial))
            weight[(slice(None), slice(None), *window)] += b.weight
            bias += b.bias  # type: ignore[arg-type]
            continue
        scale, shift = (b.bn.scale, b.bn.shift) if b.bn is not None else (np.ones(cout), np.zeros(cout))
        if scale.size != cout:
            return Skip(f"{b.describe()} normalises {scale.size} channels, the Convs give {cout}")
        for o in range(cout):
            weight[(o, o % cin_g, *centre)] += scale[o]
        bias += shift
    return weight, bias


def apply(p: BranchPass, m: Merge) -> None:
    """Rewrite: the chosen Conv computes the sum; the other branch nodes and the Adds go."""
    dtype = p.array(m.into.input[1]).dtype
    base = m.into.name or m.into.op_type
    w_name, b_name = p.fresh(f"{base}_merged_W"), p.fresh(f"{base}_merged_B")
    p.g.initializer.extend([numpy_helper.from_array(m.weight.astype(dtype), w_name),
                            numpy_helper.from_array(m.bias.astype(dtype), b_name)])
    for b in m.branches:
        if b.node is not None:
            m.removed += [i for i in b.node.input[1:] if i]
    while len(m.into.input) < 3:
        m.into.input.append("")
    m.into.input[1], m.into.input[2] = w_name, b_name
    _set_attr(m.into, "pads", m.pads)
    _set_attr(m.into, "kernel_shape", list(m.weight.shape[2:]))
    for i, a in enumerate(m.into.attribute):
        if a.name == "auto_pad":
            del m.into.attribute[i]
            break
    m.into.output[0] = m.top.output[0]
    p.producer[m.top.output[0]] = m.into
    for node in [*(b.node for b in m.branches if b.node is not None and b.node is not m.into), *m.adds]:
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
