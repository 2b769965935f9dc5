"""The ONNX fold as one pipeline: what ``fold`` serves is ``fold_onnx(reference)``.

Constant folding first (:mod:`folding.onnx_consts`: constant subgraphs become initializers, so a frozen BN
exported without the exporter's constant folding has a constant per-channel scale; ``x + 0`` and ``x * 1``
go), then the passes of ``PASSES``, in order, in rounds until a round changes nothing (a merge or a fold can
give another pass a new neighbour):

1. BatchNormalization (:mod:`folding.onnx_fold`): into the producer, else forward into the consumer;
2. affine maps (:mod:`folding.onnx_affine`): per-channel constant Mul / Add / Sub / Div, by the same rules;
3. branch merges (:mod:`folding.onnx_branches`): linear combinations of parallel Conv / BN-identity /
   identity branches over one tensor become one Conv.

Each pass implements :class:`Pass` and writes its own section of the report (``FoldReport.sections[name]``):
what it did adds up over the rounds, what it left is the last round's. **A new pass** is its module (a class
with ``name``, ``count`` and ``run``) and its row in ``PASSES``; the report, the terminal and localisation
take every section alike.
"""
from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field
from typing import ClassVar, Protocol

import onnx

from folding.onnx_affine import OnnxAffinePass
from folding.onnx_branches import merge_branches
from folding.onnx_consts import drop_neutral, fold_constants
from folding.onnx_fold import LayerFoldPass, OnnxFoldPass
from folding.onnx_graph import count_ops, drop_unused_initializers, param_count, remove_dead_constants
from folding.rules import run_pass
from foldserve.errors import FoldError
from foldserve.records import AFFINE, BATCHNORM, MERGE, FoldReport, PassSection

logger = logging.getLogger(__name__)

MAX_ROUNDS = 4


@dataclass
class Round:
    """One pass's work in one round: its section of the report, warnings, and initializers it may have freed."""

    section: PassSection
    warnings: list[str] = field(default_factory=list)
    freed: list[str] = field(default_factory=list)


class Pass(Protocol):
    """One pass of the pipeline, over the model in place."""

    name: ClassVar[str]                              # its section of the report

    def count(self, model: onnx.ModelProto) -> int:
        """How many of what it acts on the graph has (the section's ``before`` and ``after``)."""
        ...

    def run(self, model: onnx.ModelProto) -> Round:
        """One round over ``model``: change it in place, say what changed and what was left."""
        ...


def _rules_round(p: LayerFoldPass) -> Round:
    """One round of the BN rules over ``p``'s sites (:func:`folding.rules.run_pass`)."""
    done = Round(PassSection())
    run_pass(p, done.section, done.warnings)
    done.freed = p.removed_inputs
    return done


class BatchNormPass:
    name: ClassVar[str] = BATCHNORM

    def count(self, model: onnx.ModelProto) -> int:
        return count_ops(model, "BatchNormalization")

    def run(self, model: onnx.ModelProto) -> Round:
        return _rules_round(OnnxFoldPass(model))


class AffinePass:
    name: ClassVar[str] = AFFINE

    def count(self, model: onnx.ModelProto) -> int:
        return OnnxAffinePass(model).step_count()

    def run(self, model: onnx.ModelProto) -> Round:
        return _rules_round(OnnxAffinePass(model))


class BranchMergePass:
    name: ClassVar[str] = MERGE

    def count(self, model: onnx.ModelProto) -> int:
        return count_ops(model, "Conv")

    def run(self, model: onnx.ModelProto) -> Round:
        merged, left, freed = merge_branches(model)
        return Round(PassSection(list(merged), list(left)), freed=freed)


PASSES: list[Pass] = [BatchNormPass(), AffinePass(), BranchMergePass()]


def fold_onnx(model: onnx.ModelProto) -> tuple[onnx.ModelProto, FoldReport]:
    """Return ``(folded, report)``: a new ModelProto with every foldable BN and affine map folded and every
    mergeable sum of branches merged."""
    if not isinstance(model, onnx.ModelProto):
        raise FoldError(f"fold_onnx takes an onnx.ModelProto, got {type(model).__name__}")
    out = copy.deepcopy(model)
    report = FoldReport(nodes_before=len(out.graph.node), params_before=param_count(out))
    report.constants_folded = fold_constants(out) + drop_neutral(out)
    for round_ in range(MAX_ROUNDS):
        changed, freed = False, []
        for p in PASSES:
            section = report.section(p.name)
            if round_ == 0:
                section.before = p.count(out)         # as the pass first meets the graph
            done = p.run(out)
            section.done += done.section.done
            section.left = done.section.left
            report.warnings += done.warnings
            freed += done.freed
            changed = changed or bool(done.section.done)
        remove_dead_constants(out)
        drop_unused_initializers(out, freed)
        if not changed:
            break
    for p in PASSES:
        section = report.section(p.name)
        section.after = p.count(out) if section.before else 0
    report.nodes_after = len(out.graph.node)
    report.params_after = param_count(out)
    logger.info("fold_onnx: %s", report.summary())
    return out, report
