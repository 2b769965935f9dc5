"""Fold BatchNorm layers of a PyTorch model into their neighbours, exactly, with torch.fx.

Layering (as torch/nn/utils/fusion.py and onnx-optimizer's fuse_bn_into_conv):

1. arithmetic in :mod:`folding.fold_math` (float64, cast once);
2. preconditions: each returns ``None`` when a fold is allowed, else the reason it is not;
3. patterns as data: ``BACKWARD`` and ``FORWARD`` map a module type to its weight layout, so a new
   pattern is one row;
4. the rewrite works on a copy by default and returns it with a :class:`FoldReport`.

A BN that cannot be folded is left in place and reported in ``FoldReport.skipped``: the result is always
exact, never silently changed.
"""
from __future__ import annotations

import copy
import logging
import operator
from collections import Counter
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
from torch import fx, nn
from torch.nn.modules.batchnorm import _BatchNorm

from foldserve.errors import FoldError
from folding.fold_math import BNParams, fold_backward, fold_forward, overflow_warning
from folding.report import FoldedPair, FoldReport, SkippedBN

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Layout:
    """Where a module's output (backward fold) or input (forward fold) channels are in its weight."""

    out_axis: int            # 0: (C_out, ...) ; 1: (C_in, C_out/groups, ...) for ConvTranspose
    linear: bool = False     # nn.Linear: only rank-2 activations map channels to features


BACKWARD: dict[type, Layout] = {
    nn.Conv1d: Layout(0), nn.Conv2d: Layout(0), nn.Conv3d: Layout(0),
    nn.ConvTranspose1d: Layout(1), nn.ConvTranspose2d: Layout(1), nn.ConvTranspose3d: Layout(1),
    nn.Linear: Layout(0, linear=True),
}
FORWARD: dict[type, Layout] = {
    nn.Conv1d: Layout(0), nn.Conv2d: Layout(0), nn.Conv3d: Layout(0),
    nn.Linear: Layout(0, linear=True),
}
NONLINEAR = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.SELU, nn.GELU, nn.SiLU, nn.Sigmoid,
             nn.Tanh, nn.Hardswish, nn.Hardsigmoid, nn.Mish, nn.Softplus)
NONLINEAR_FUNCS = {torch.relu, torch.nn.functional.relu, torch.nn.functional.relu6, torch.sigmoid,
                   torch.tanh, torch.nn.functional.silu, torch.nn.functional.gelu, torch.nn.functional.hardswish}


def _layout(table: dict[type, Layout], module: nn.Module) -> Layout | None:
    return table.get(type(module))


def _describe(gm: fx.GraphModule, node: Any) -> str:
    if not isinstance(node, fx.Node):
        return f"a constant ({node!r})"
    if node.op == "placeholder":
        return f"the model input {node.target!r}"
    if node.op == "call_module":
        mod = gm.get_submodule(node.target)
        kind = " (a nonlinearity)" if isinstance(mod, NONLINEAR) else ""
        return f"{type(mod).__name__} {node.target!r}{kind}"
    if node.op == "call_function":
        name = getattr(node.target, "__name__", str(node.target))
        kind = " (a nonlinearity)" if node.target in NONLINEAR_FUNCS else ""
        if node.target in (operator.add, torch.add):
            kind = " (a sum of branches)"
        return f"function {name}{kind}"
    return f"{node.op} {node.target}"


def _set_submodule(gm: fx.GraphModule, target: str, module: nn.Module) -> None:
    parent_name, _, name = target.rpartition(".")
    parent = gm.get_submodule(parent_name) if parent_name else gm
    setattr(parent, name, module)


def _bn_params(bn: _BatchNorm) -> BNParams:
    def np64(t):
        return None if t is None else t.detach().cpu().to(torch.float64).numpy()
    return BNParams.create(np64(bn.running_mean), np64(bn.running_var), np64(bn.weight), np64(bn.bias), bn.eps)


def _with_weights(module: nn.Module, w: np.ndarray, b: np.ndarray) -> nn.Module:
    """A copy of ``module`` with new weight and bias, cast once to the module's dtype and device."""
    new = copy.deepcopy(module)
    ref = module.weight
    new.weight = nn.Parameter(torch.from_numpy(w).to(dtype=ref.dtype, device=ref.device),
                              requires_grad=ref.requires_grad)
    new.bias = nn.Parameter(torch.from_numpy(b).to(dtype=ref.dtype, device=ref.device),
                            requires_grad=ref.requires_grad)
    return new


def _rank(node: fx.Node) -> int | None:
    meta = node.meta.get("tensor_meta")
    return len(meta.shape) if meta is not None and hasattr(meta, "shape") else None


class _Folder:
    def __init__(self, gm: fx.GraphModule, shapes_known: bool) -> None:
        self.gm = gm
        self.shapes_known = shapes_known
        self.calls = Counter(n.target for n in gm.graph.nodes if n.op == "call_module")
        self.report = FoldReport()

    # --- preconditions ---------------------------------------------------------------------------

    def bn_reason(self, node: fx.Node, bn: _BatchNorm) -> str | None:
        if not bn.track_running_stats or bn.running_mean is None or bn.running_var is None:
            return "track_running_stats=False: this BN normalises with batch statistics at inference"
        if self.calls[node.target] > 1:
            return f"BN module {node.target!r} is called {self.calls[node.target]} times (shared module)"
        if len(node.args) != 1 or node.kwargs:
            return "BN called with extra arguments"
        return None

    def backward_reason(self, bn_node: fx.Node, bn: _BatchNorm) -> str | None:
        src = bn_node.args[0]
        if not isinstance(src, fx.Node) or src.op != "call_module":
            return f"input comes from {_describe(self.gm, src)}, not a conv/linear"
        prod = self.gm.get_submodule(src.target)
        layout = _layout(BACKWARD, prod)
        if layout is None:
            return f"input comes from {_describe(self.gm, src)}, which cannot absorb a BN"
        if len(src.users) != 1:
            others = [u.name for u in src.users if u is not bn_node]
            return f"producer {src.target!r} output is also used by {others}"
        if self.calls[src.target] != 1:
            return f"producer {src.target!r} is called {self.calls[src.target]} times (shared module)"
        if len(src.args) != 1 or src.kwargs:
            return f"producer {src.target!r} called with extra arguments"
        if layout.linear:
            if prod.out_features != bn.num_features:
                return f"Linear {src.target!r} has {prod.out_features} outputs, BN normalises {bn.num_features}"
            if not isinstance(bn, nn.BatchNorm1d) and type(bn).__name__ not in ("SyncBatchNorm", "CPUSyncBatchNorm"):
                return f"Linear followed by {type(bn).__name__}: channel axis is not the feature axis"
            if self.shapes_known and _rank(bn_node) != 2:
                return f"Linear output has rank {_rank(bn_node)}: BN's channel axis is not the Linear's feature axis"
        return None

    def forward_reason(self, bn_node: fx.Node, bn: _BatchNorm) -> str | None:
        users = list(bn_node.users)
        if len(users) != 1:
            return f"no exact forward target: BN output is used by {len(users)} nodes"
        c = users[0]
        if c.op != "call_module":
            return f"no exact forward target: next is {_describe(self.gm, c)}"
        cons = self.gm.get_submodule(c.target)
        layout = _layout(FORWARD, cons)
        if layout is None:
            return f"no exact forward target: next is {_describe(self.gm, c)}"
        if self.calls[c.target] != 1:
            return f"no exact forward target: consumer {c.target!r} is called {self.calls[c.target]} times"
        if len(c.args) != 1 or c.args[0] is not bn_node or c.kwargs:
            return f"no exact forward target: consumer {c.target!r} takes other arguments"
        if layout.linear:
            if cons.in_features != bn.num_features or not isinstance(bn, nn.BatchNorm1d):
                return f"no exact forward target: Linear {c.target!r} reads {cons.in_features} features, not BN's channels"
            if self.shapes_known and _rank(bn_node) != 2:
                return f"no exact forward target: BN output has rank {_rank(bn_node)}, Linear reads the last axis"
        else:
            pad = cons.padding
            if isinstance(pad, str):
                zero = pad == "valid" or all(k == 1 for k in cons.kernel_size)
            else:
                zero = all(p == 0 for p in pad)
            if not zero:
                return (f"no exact forward target: {type(cons).__name__} {c.target!r} zero-pads its input "
                        f"(padding={pad}), so a forward fold is not exact at the borders")
        return None

    # --- rewrites ------------------------------------------------------------------------------

    def fold_backward(self, bn_node: fx.Node, bn: _BatchNorm) -> None:
        src = bn_node.args[0]
        prod = self.gm.get_submodule(src.target)
        layout = _layout(BACKWARD, prod)
        params = _bn_params(bn)
        w = prod.weight.detach().cpu().to(torch.float64).numpy()
        b = None if prod.bias is None else prod.bias.detach().cpu().to(torch.float64).numpy()
        w2, b2 = fold_backward(w, b, params, layout.out_axis, getattr(prod, "groups", 1))
        self.report.warnings += params.lint(bn_node.target) + overflow_warning(src.target, w2, b2)
        _set_submodule(self.gm, src.target, _with_weights(prod, w2, b2))
        bn_node.replace_all_uses_with(src)
        self.gm.graph.erase_node(bn_node)
        self.report.folded.append(FoldedPair(bn_node.target, src.target, "backward", type(prod).__name__,
                                             type(bn).__name__))

    def fold_forward(self, bn_node: fx.Node, bn: _BatchNorm) -> None:
        c = next(iter(bn_node.users))
        cons = self.gm.get_submodule(c.target)
        params = _bn_params(bn)
        w = cons.weight.detach().cpu().to(torch.float64).numpy()
        b = None if cons.bias is None else cons.bias.detach().cpu().to(torch.float64).numpy()
        w2, b2 = fold_forward(w, b, params, getattr(cons, "groups", 1))
        self.report.warnings += params.lint(bn_node.target) + overflow_warning(c.target, w2, b2)
        _set_submodule(self.gm, c.target, _with_weights(cons, w2, b2))
        c.replace_input_with(bn_node, bn_node.args[0])
        self.gm.graph.erase_node(bn_node)
        self.report.folded.append(FoldedPair(bn_node.target, c.target, "forward", type(cons).__name__,
                                             type(bn).__name__))

    def drop_eval_identities(self) -> None:
        """Dropout and Identity are no-ops in eval mode; removing them exposes BN -> Linear pairs."""
        for node in list(self.gm.graph.nodes):
            if node.op == "call_module" and isinstance(self.gm.get_submodule(node.target),
                                                       (nn.Identity, nn.modules.dropout._DropoutNd)):
                if len(node.args) == 1 and isinstance(node.args[0], fx.Node) and not node.kwargs:
                    node.replace_all_uses_with(node.args[0])
                    self.gm.graph.erase_node(node)
                    self.calls[node.target] -= 1

    def run(self) -> None:
        self.drop_eval_identities()
        for node in list(self.gm.graph.nodes):
            if node.op != "call_module":
                continue
            bn = self.gm.get_submodule(node.target)
            if not isinstance(bn, _BatchNorm):
                continue
            reason = self.bn_reason(node, bn)
            if reason is None:
                back = self.backward_reason(node, bn)
                if back is None:
                    self.fold_backward(node, bn)
                    continue
                fwd = self.forward_reason(node, bn)
                if fwd is None:
                    self.fold_forward(node, bn)
                    continue
                reason = f"cannot fold backwards ({back}); {fwd}"
            self.report.skipped.append(SkippedBN(node.target, reason))


def _count(module: nn.Module) -> tuple[int, int]:
    bns = sum(isinstance(m, _BatchNorm) for m in module.modules())
    params = sum(p.numel() for p in module.parameters()) + sum(b.numel() for b in module.buffers())
    return bns, params


def fold_module(model: nn.Module, example_inputs: Sequence[torch.Tensor] | None = None, *,
                inplace: bool = False) -> tuple[fx.GraphModule, FoldReport]:
    """Return ``(folded, report)``: a new module in which every foldable BN is folded.

    ``example_inputs`` (optional) lets the pass check tensor ranks, which makes Linear <-> BatchNorm1d
    folds safe for inputs of any rank; without them a Linear/BN pair is assumed to see (N, C) tensors.
    """
    training = [name or type(model).__name__ for name, m in model.named_modules() if m.training]
    if training:
        raise FoldError(f"the model is in training mode (e.g. {training[0]!r}): BN would use batch statistics. "
                        f"Call model.eval() before folding")
    src = model if inplace else copy.deepcopy(model)
    try:
        gm = fx.symbolic_trace(src)
    except Exception as exc:  # fx raises many types (TraceError, TypeError, NotImplementedError, ...)
        raise FoldError(f"torch.fx cannot trace {type(model).__name__}: {type(exc).__name__}: {exc}. Remove "
                        f"data-dependent control flow from forward(), or export to ONNX and use fold_onnx") from None
    shapes_known = False
    if example_inputs is not None:
        from torch.fx.passes.shape_prop import ShapeProp

        with torch.no_grad():
            ShapeProp(gm).propagate(*example_inputs)
        shapes_known = True
    bn_before, params_before = _count(src)
    nodes_before = len(gm.graph.nodes)
    folder = _Folder(gm, shapes_known)
    with torch.no_grad():
        folder.run()
    gm.graph.eliminate_dead_code()
    gm.graph.lint()
    gm.recompile()
    gm.delete_all_unused_submodules()
    report = folder.report
    report.bn_before, report.params_before, report.nodes_before = bn_before, params_before, nodes_before
    report.bn_after, report.params_after = _count(gm)
    report.nodes_after = len(gm.graph.nodes)
    gm.eval()
    logger.info("fold_module: %s", report.summary())
    return gm, report
