"""Fold BatchNorm layers of a PyTorch model into their neighbours, exactly, with torch.fx.

Layering (as torch/nn/utils/fusion.py and onnx-optimizer's fuse_bn_into_conv):

1. arithmetic in :mod:`folding.fold_math` (float64, cast once);
2. predicate, plan, apply (:mod:`folding.rules`): a rule's ``match`` returns a Plan or a Skip with its
   reason, ``apply`` rewrites; ``TorchFoldPass.RULES`` maps a module type to its rule, so a new pattern is
   one row (its weight layout in ``CONV_LAYOUTS``);
3. the rewrite works on a copy by default and returns it with a :class:`FoldReport`.

A BN that cannot be folded is left in place and reported in ``FoldReport.skipped``: the result is always
exact, never silently changed.
"""
from __future__ import annotations

import copy
import logging
import operator
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import fx, nn
from torch.nn.modules.batchnorm import _BatchNorm

from folding.fold_math import BNParams, fold_backward, fold_forward
from folding.rules import BACKWARD, FORWARD, Plan, Rule, Skip, run_pass
from foldserve.errors import FoldError
from foldserve.records import BATCHNORM, FoldReport

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Layout:
    """Where a module's output (backward fold) or input (forward fold) channels are in its weight."""

    out_axis: int            # 0: (C_out, ...) ; 1: (C_in, C_out/groups, ...) for ConvTranspose
    linear: bool = False     # nn.Linear: only rank-2 activations map channels to features


CONV_LAYOUTS: dict[type, Layout] = {
    nn.Conv1d: Layout(0), nn.Conv2d: Layout(0), nn.Conv3d: Layout(0),
    nn.ConvTranspose1d: Layout(1), nn.ConvTranspose2d: Layout(1), nn.ConvTranspose3d: Layout(1),
    nn.Linear: Layout(0, linear=True),
}
#: module and function types that are elementwise nonlinearities, named as ONNX names them
#: (folding.rules.NONLINEARITIES; tests/folding checks that every name is in that set)
NONLINEAR_MODULES: dict[type, str] = {
    nn.ReLU: "Relu", nn.ReLU6: "Clip", nn.LeakyReLU: "LeakyRelu", nn.PReLU: "PRelu", nn.ELU: "Elu", nn.SELU: "Selu",
    nn.GELU: "Gelu", nn.SiLU: "Silu", nn.Sigmoid: "Sigmoid", nn.Tanh: "Tanh", nn.Hardswish: "HardSwish",
    nn.Hardsigmoid: "HardSigmoid", nn.Mish: "Mish", nn.Softplus: "Softplus",
}
NONLINEAR_FUNCTIONS: dict[Any, str] = {
    torch.relu: "Relu", torch.nn.functional.relu: "Relu", torch.nn.functional.relu6: "Clip",
    torch.sigmoid: "Sigmoid", torch.tanh: "Tanh", torch.nn.functional.silu: "Silu",
    torch.nn.functional.gelu: "Gelu", torch.nn.functional.hardswish: "HardSwish",
}


def _describe(gm: fx.GraphModule, node: Any) -> str:
    if not isinstance(node, fx.Node):
        return f"a constant ({node!r})"
    if node.op == "placeholder":
        return f"the model input {node.target!r}"
    if node.op == "call_module":
        mod = gm.get_submodule(node.target)
        kind = " (a nonlinearity)" if type(mod) in NONLINEAR_MODULES else ""
        return f"{type(mod).__name__} {node.target!r}{kind}"
    if node.op == "call_function":
        name = getattr(node.target, "__name__", str(node.target))
        kind = " (a nonlinearity)" if node.target in NONLINEAR_FUNCTIONS else ""
        if node.target in (operator.add, torch.add):
            kind = " (a sum of branches)"
        return f"function {name}{kind}"
    return f"{node.op} {node.target}"


def _set_submodule(gm: fx.GraphModule, target: str, module: nn.Module) -> None:
    parent_name, _, name = target.rpartition(".")
    parent = gm.get_submodule(parent_name) if parent_name else gm
    setattr(parent, name, module)


def _np64(t: torch.Tensor | None) -> np.ndarray | None:
    return None if t is None else t.detach().cpu().to(torch.float64).numpy()


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


class TorchFoldPass:
    """The torch.fx side of :mod:`folding.rules`: BN modules, their producer and consumer modules."""

    RULES: dict[str, dict[Any, Rule]]

    def __init__(self, gm: fx.GraphModule, shapes_known: bool) -> None:
        self.gm = gm
        self.shapes_known = shapes_known
        self.calls = Counter(n.target for n in gm.graph.nodes if n.op == "call_module")

    def module(self, node: fx.Node) -> nn.Module:
        return self.gm.get_submodule(node.target)

    def batchnorms(self) -> list[fx.Node]:
        return [n for n in self.gm.graph.nodes if n.op == "call_module" and isinstance(self.module(n), _BatchNorm)]

    def bn_name(self, node: fx.Node) -> str:
        return node.target

    def check_bn(self, node: fx.Node) -> BNParams | Skip:
        bn = self.module(node)
        if not bn.track_running_stats or bn.running_mean is None or bn.running_var is None:
            return Skip("track_running_stats=False: this BN normalises with batch statistics at inference")
        if self.calls[node.target] > 1:
            return Skip(f"BN module {node.target!r} is called {self.calls[node.target]} times (shared module)")
        if len(node.args) != 1 or node.kwargs:
            return Skip("BN called with extra arguments")
        return BNParams.create(_np64(bn.running_mean), _np64(bn.running_var), _np64(bn.weight), _np64(bn.bias),
                               bn.eps)

    def neighbour(self, bn_node: fx.Node, direction: str):
        if direction == BACKWARD:
            src = bn_node.args[0]
            if not isinstance(src, fx.Node) or src.op != "call_module":
                return Skip(f"input comes from {_describe(self.gm, src)}, not a conv/linear")
            node = src
        else:
            users = list(bn_node.users)
            if len(users) != 1:
                return Skip(f"no exact forward target: BN output is used by {len(users)} nodes")
            node = users[0]
            if node.op != "call_module":
                return Skip(f"no exact forward target: next is {_describe(self.gm, node)}")
        key = type(self.module(node))
        if key not in self.RULES[direction]:
            return node, key
        if direction == BACKWARD and len(node.users) != 1:
            others = [u.name for u in node.users if u is not bn_node]
            return Skip(f"producer {node.target!r} output is also used by {others}")
        if self.calls[node.target] != 1:
            what = "producer" if direction == BACKWARD else "no exact forward target: consumer"
            return Skip(f"{what} {node.target!r} is called {self.calls[node.target]} times"
                        + (" (shared module)" if direction == BACKWARD else ""))
        if len(node.args) != 1 or node.kwargs or (direction == FORWARD and node.args[0] is not bn_node):
            return Skip(f"producer {node.target!r} called with extra arguments" if direction == BACKWARD else
                        f"no exact forward target: consumer {node.target!r} takes other arguments")
        return node, key

    def cannot_absorb(self, node: fx.Node, direction: str) -> str:
        if direction == BACKWARD:
            return f"input comes from {_describe(self.gm, node)}, which cannot absorb a BN"
        return f"no exact forward target: next is {_describe(self.gm, node)}"


# --- rules: match -> Plan | Skip --------------------------------------------------------------------------

def _plan(p: TorchFoldPass, bn_node: fx.Node, node: fx.Node, direction: str, w2, b2) -> Plan:
    return Plan(bn_node.target, node.target, direction, type(p.module(node)).__name__,
                type(p.module(bn_node)).__name__, w2, b2, site={"bn": bn_node, "node": node})


def _is_bn1d(bn: nn.Module) -> bool:
    return isinstance(bn, nn.BatchNorm1d) or type(bn).__name__ in ("SyncBatchNorm", "CPUSyncBatchNorm")


def _match_backward(p: TorchFoldPass, bn_node: fx.Node, src: fx.Node, params: BNParams) -> Plan | Skip:
    prod, bn = p.module(src), p.module(bn_node)
    layout = CONV_LAYOUTS[type(prod)]
    if layout.linear:
        if prod.out_features != bn.num_features:
            return Skip(f"Linear {src.target!r} has {prod.out_features} outputs, BN normalises {bn.num_features}")
        if not _is_bn1d(bn):
            return Skip(f"Linear followed by {type(bn).__name__}: channel axis is not the feature axis")
        if p.shapes_known and _rank(bn_node) != 2:
            return Skip(f"Linear output has rank {_rank(bn_node)}: BN's channel axis is not the Linear's feature axis")
    w2, b2 = fold_backward(_np64(prod.weight), _np64(prod.bias), params, layout.out_axis, getattr(prod, "groups", 1))
    return _plan(p, bn_node, src, BACKWARD, w2, b2)


def _match_forward(p: TorchFoldPass, bn_node: fx.Node, c: fx.Node, params: BNParams) -> Plan | Skip:
    cons, bn = p.module(c), p.module(bn_node)
    if CONV_LAYOUTS[type(cons)].linear:
        if cons.in_features != bn.num_features or not isinstance(bn, nn.BatchNorm1d):
            return Skip(f"no exact forward target: Linear {c.target!r} reads {cons.in_features} features, not BN's "
                        f"channels")
        if p.shapes_known and _rank(bn_node) != 2:
            return Skip(f"no exact forward target: BN output has rank {_rank(bn_node)}, Linear reads the last axis")
    else:
        pad = cons.padding
        zero = (pad == "valid" or all(k == 1 for k in cons.kernel_size)) if isinstance(pad, str) else \
            all(q == 0 for q in pad)
        if not zero:
            return Skip(f"no exact forward target: {type(cons).__name__} {c.target!r} zero-pads its input "
                        f"(padding={pad}), so a forward fold is not exact at the borders")
    w2, b2 = fold_forward(_np64(cons.weight), _np64(cons.bias), params, getattr(cons, "groups", 1))
    return _plan(p, bn_node, c, FORWARD, w2, b2)


# --- rules: apply -----------------------------------------------------------------------------------------

def _apply_backward(p: TorchFoldPass, plan: Plan) -> None:
    bn_node, src = plan.site["bn"], plan.site["node"]
    _set_submodule(p.gm, src.target, _with_weights(p.module(src), plan.weight, plan.bias))
    bn_node.replace_all_uses_with(src)
    p.gm.graph.erase_node(bn_node)


def _apply_forward(p: TorchFoldPass, plan: Plan) -> None:
    bn_node, c = plan.site["bn"], plan.site["node"]
    _set_submodule(p.gm, c.target, _with_weights(p.module(c), plan.weight, plan.bias))
    c.replace_input_with(bn_node, bn_node.args[0])
    p.gm.graph.erase_node(bn_node)


_BACKWARD_RULE, _FORWARD_RULE = Rule(_match_backward, _apply_backward), Rule(_match_forward, _apply_forward)
TorchFoldPass.RULES = {
    BACKWARD: {t: _BACKWARD_RULE for t in CONV_LAYOUTS},
    FORWARD: {t: _FORWARD_RULE for t in CONV_LAYOUTS if CONV_LAYOUTS[t].out_axis == 0},
}


def _drop_eval_identities(p: TorchFoldPass) -> None:
    """Dropout and Identity are no-ops in eval mode; removing them exposes BN -> Linear pairs."""
    for node in list(p.gm.graph.nodes):
        if node.op == "call_module" and isinstance(p.module(node), (nn.Identity, nn.modules.dropout._DropoutNd)):
            if len(node.args) == 1 and isinstance(node.args[0], fx.Node) and not node.kwargs:
                node.replace_all_uses_with(node.args[0])
                p.gm.graph.erase_node(node)
                p.calls[node.target] -= 1


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
    folder = TorchFoldPass(gm, shapes_known)
    report = FoldReport()
    with torch.no_grad():
        _drop_eval_identities(folder)
        run_pass(folder, report.section(BATCHNORM), report.warnings)
    gm.graph.eliminate_dead_code()
    gm.graph.lint()
    gm.recompile()
    gm.delete_all_unused_submodules()
    report.bn_before, report.params_before, report.nodes_before = bn_before, params_before, nodes_before
    report.bn_after, report.params_after = _count(gm)
    report.nodes_after = len(gm.graph.nodes)
    gm.eval()
    logger.info("fold_module: %s", report.summary())
    return gm, report
