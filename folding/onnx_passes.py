"""The ONNX fold, pass by pass: what ``fold`` serves is ``fold_onnx(reference)``.

1. constant folding (:mod:`folding.onnx_consts`): constant subgraphs become initializers, so a frozen BN
   exported without the exporter's constant folding has a constant per-channel scale; ``x + 0`` and ``x * 1``
   go;
2. BatchNormalization (:mod:`folding.onnx_fold`): into the producer, else forward into the consumer;
3. affine maps (:mod:`folding.onnx_affine`): per-channel constant Mul / Add / Sub / Div, by the same rules;
4. branch merges (:mod:`folding.onnx_branches`): sums of parallel Conv / BN-identity / identity branches over
   one tensor become one Conv.

Passes 2-4 repeat until a round changes nothing (a merge or a fold can give another pass a new neighbour);
the report's folded lists add up over the rounds, its lists of what was left are the last round's.
"""
from __future__ import annotations

import copy
import logging

import numpy as np
import onnx

from folding.onnx_affine import OnnxAffinePass
from folding.onnx_branches import merge_branches
from folding.onnx_consts import drop_neutral, fold_constants
from folding.onnx_fold import OnnxFoldPass, _drop_unused_initializers, _remove_dead_constants
from folding.rules import run_pass
from foldserve.errors import FoldError
from foldserve.records import FoldReport

logger = logging.getLogger(__name__)

MAX_ROUNDS = 4


def _count(model: onnx.ModelProto, op: str) -> int:
    return sum(n.op_type == op for n in model.graph.node)


def _params(model: onnx.ModelProto) -> int:
    return sum(int(np.prod(t.dims)) for t in model.graph.initializer)


def fold_onnx(model: onnx.ModelProto) -> tuple[onnx.ModelProto, FoldReport]:
    """Return ``(folded, report)``: a new ModelProto with every foldable BN and affine map folded and every
    mergeable sum of branches merged."""
    if not isinstance(model, onnx.ModelProto):
        raise FoldError(f"fold_onnx takes an onnx.ModelProto, got {type(model).__name__}")
    out = copy.deepcopy(model)
    report = FoldReport(bn_before=_count(out, "BatchNormalization"), nodes_before=len(out.graph.node),
                        params_before=_params(out), conv_before=_count(out, "Conv"))
    report.constants_folded = fold_constants(out) + drop_neutral(out)
    for round_ in range(MAX_ROUNDS):
        bn = OnnxFoldPass(out)
        bn_report = run_pass(bn, FoldReport())
        affine = OnnxAffinePass(out)
        if round_ == 0:
            report.affine_before = affine.step_count()
        affine_report = run_pass(affine, FoldReport())
        merged, merges_skipped, removed = merge_branches(out)
        report.folded += bn_report.folded
        report.affines += affine_report.folded
        report.merges += merged
        report.warnings += bn_report.warnings + affine_report.warnings
        report.skipped, report.affines_skipped, report.merges_skipped = (bn_report.skipped, affine_report.skipped,
                                                                         merges_skipped)
        _remove_dead_constants(out)
        _drop_unused_initializers(out, bn.removed_inputs + affine.removed_inputs + removed)
        if not (bn_report.folded or affine_report.folded or merged):
            break
    report.affine_after = OnnxAffinePass(out).step_count() if report.affine_before else 0
    report.bn_after = _count(out, "BatchNormalization")
    report.nodes_after = len(out.graph.node)
    report.params_after = _params(out)
    report.conv_after = _count(out, "Conv")
    logger.info("fold_onnx: %s", report.summary())
    return out, report
