"""The shape every fold rule has, in both passes (torch.fx in :mod:`folding.torch_fold`, ONNX in
:mod:`folding.onnx_fold`): predicate, plan, apply.

* A pass exposes its BatchNorms, a check of each BN (``BNParams`` or :class:`Skip`), and each BN's
  neighbour in a direction (the producer before it, the consumer after it) or a :class:`Skip`.
* Patterns are data: ``RULES[direction][neighbour type] -> Rule``. ``Rule.match`` checks what is specific
  to that pattern and computes the folded weights (float64) into a :class:`Plan`, or returns a
  :class:`Skip` with the reason. ``Rule.apply(plan)`` rewrites the graph and never re-checks.
* :func:`run_pass` is the one driver: backward first, forward when backward is impossible, a report of
  what was folded and of every BN left in place with its reason.

A new pattern is one row in a pass's table plus its match function.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from folding.fold_math import BNParams, overflow_warning
from foldserve.records import FoldedPair, PassSection, SkippedBN

BACKWARD, FORWARD = "backward", "forward"

#: elementwise nonlinearities, by ONNX op name; the torch pass maps its module and function types onto these
NONLINEARITIES = frozenset({"Relu", "Clip", "LeakyRelu", "PRelu", "Elu", "Selu", "Sigmoid", "Tanh", "HardSigmoid",
                            "HardSwish", "Softplus", "Gelu", "Mish", "Silu"})


@dataclass(frozen=True)
class Skip:
    """Why a BN is not folded (in this direction); not an error, it is reported."""

    reason: str


@dataclass
class Plan:
    """Everything ``apply`` needs to fold one BN, computed by a rule's ``match``."""

    bn: str                    # the BN's name
    target: str                # the producer (backward) or consumer (forward) it folds into
    direction: str
    target_type: str           # Conv2d / Conv / Gemm / Linear ...
    bn_type: str
    weight: np.ndarray         # W' in float64
    bias: np.ndarray           # b' in float64
    site: dict[str, Any] = field(default_factory=dict)   # pass-specific handles: nodes, modules, slots
    tensor: str = ""           # ONNX: the tensor at the fold site (same name in both graphs)
    rule: Rule | None = None


@dataclass(frozen=True)
class Rule:
    """One pattern: ``match(pass, bn, neighbour, params) -> Plan | Skip`` and ``apply(pass, plan)``."""

    match: Callable[[Any, Any, Any, BNParams], Plan | Skip]
    apply: Callable[[Any, Plan], None]


class FoldPass(Protocol):
    RULES: dict[str, dict[Any, Rule]]

    def batchnorms(self) -> Iterable[Any]: ...
    def bn_name(self, bn: Any) -> str: ...
    def check_bn(self, bn: Any) -> BNParams | Skip: ...
    def neighbour(self, bn: Any, direction: str) -> tuple[Any, Any] | Skip: ...
    def cannot_absorb(self, node: Any, direction: str) -> str: ...


def match(p: FoldPass, bn: Any, params: BNParams, direction: str) -> Plan | Skip:
    found = p.neighbour(bn, direction)
    if isinstance(found, Skip):
        return found
    node, key = found
    rule = p.RULES[direction].get(key)
    if rule is None:
        return Skip(p.cannot_absorb(node, direction))
    plan = rule.match(p, bn, node, params)
    if isinstance(plan, Plan):
        plan.rule = rule
    return plan


def run_pass(p: FoldPass, section: PassSection, warnings: list[str]) -> None:
    """Fold every BN the rules allow, backward before forward, into ``section.done``; the rest go to
    ``section.left`` with their reasons, and the BN statistics' and folded weights' warnings to ``warnings``."""
    for bn in list(p.batchnorms()):
        name = p.bn_name(bn)
        params = p.check_bn(bn)
        if isinstance(params, Skip):
            section.left.append(SkippedBN(name, params.reason))
            continue
        plan = match(p, bn, params, BACKWARD)
        if isinstance(plan, Skip):
            forward = match(p, bn, params, FORWARD)
            if isinstance(forward, Skip):
                section.left.append(SkippedBN(name, f"cannot fold backwards ({plan.reason}); {forward.reason}"))
                continue
            plan = forward
        plan.rule.apply(p, plan)  # type: ignore[union-attr]
        section.done.append(FoldedPair(name, plan.target, plan.direction, plan.target_type, plan.bn_type,
                                       plan.tensor))
        warnings += params.lint(name) + overflow_warning(plan.target, plan.weight, plan.bias)
