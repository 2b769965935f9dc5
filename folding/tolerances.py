"""Numerical tolerances, in one place, and the one comparison every check uses.

An output passes when ``max|actual - expected| <= rtol * max|expected| + atol``: the error is measured
against the scale of the output (logits of size 10 and of size 0.01 are judged alike), with an absolute
floor for outputs that are all near zero. ``max_rel`` reports ``|a - e| / max(|e|, rel_floor * max|e|)``
so that near-zero elements do not dominate it.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from foldserve.records import ComparisonRecord


@dataclass(frozen=True)
class Tolerance:
    rtol: float            # relative to max |expected|
    atol: float            # absolute floor
    rel_floor: float = 1e-3  # max_rel divides by at least rel_floor * max|expected|


# Float32 folds differ from float64 ground truth by rounding that grows with depth and with channels of
# tiny running_var (their scale is ~1/sqrt(eps)); 1e-4 of the output scale is ~100x fp32 epsilon for a
# single layer and still catches a 1% error in one channel.
TOLERANCES: dict[str, Tolerance] = {
    "float64": Tolerance(1e-9, 1e-12),
    "float32": Tolerance(1e-4, 1e-5),
    "float16": Tolerance(1e-2, 1e-3),
    "bfloat16": Tolerance(5e-2, 1e-2),
}
# For one folded layer against its unfolded float32 original (tests of each pattern).
LAYER_FP32 = Tolerance(1e-5, 1e-6)

# The noise floor. Some models are ill-conditioned in float32 (MixNet's mixed kernels, channels of tiny variance):
# the unfolded model itself, run in float32 (torch's program, or reference.onnx under the server's graph
# optimisations), moves further from the truth than TOLERANCES allow. A folded candidate is then judged against that
# floor: it passes an output when its error is within the tolerance or within NOISE_MARGIN times the largest error
# the unfolded model shows on its own on any sample the verifier draws (so a fold may add no more than the float32
# model's own noise, with this margin). A site of the fold is judged the same way against the unfolded graph's own
# movement there.
NOISE_MARGIN = 2.0
# An output the unfolded model moves by more than this fraction of its scale between two of its own float32 runs (or
# whose shape or integer values change between them) is unstable: a discrete choice (NMS, top-k, argmax) flips on
# near ties. It is reported, not judged; the fold is then judged by its sites and its stable outputs.
UNSTABLE_REL = 0.05


@dataclass(frozen=True)
class PrecisionGate:
    """What a reduced-precision served model must keep, measured against the float64 truth.

    Classification: top-1 agreement on the real samples (on the random inputs when there are none) of at
    least ``min_top1``, and an accuracy drop of at most ``max_accuracy_drop`` points where labels exist.
    Other tasks: every output within ``tolerance``. ``layer_jump`` (relative to the layer's output scale) is
    where localisation calls a layer's error a jump."""

    tolerance: Tolerance
    min_top1: float
    max_accuracy_drop: float
    layer_jump: float


PRECISION_GATES: dict[str, PrecisionGate] = {
    "fp16": PrecisionGate(TOLERANCES["float16"], min_top1=0.99, max_accuracy_drop=1.0, layer_jump=2e-2),
    "int8": PrecisionGate(Tolerance(0.1, 1e-2), min_top1=0.90, max_accuracy_drop=1.0, layer_jump=0.25),
}


def tolerance_for(dtype: str, rtol: float | None = None, atol: float | None = None) -> Tolerance:
    tol = TOLERANCES.get(str(dtype).replace("torch.", ""), TOLERANCES["float32"])
    if rtol is not None:
        tol = replace(tol, rtol=rtol)
    if atol is not None:
        tol = replace(tol, atol=atol)
    return tol


#: one comparison of a candidate with the truth: the ground's record, as verification.json writes it
Comparison = ComparisonRecord


def exact(expected: Any) -> bool:
    """Whether an output is compared element for element: strings (BYTES), integers (labels, counts, indices)
    and booleans."""
    return np.asarray(expected).dtype.kind in "OUSiub"


def compare(actual: Any, expected: Any, tol: Tolerance, floor: float = 0.0) -> Comparison:
    """Compare two arrays (any float dtype) in float64; NaN where the reference is finite fails. Strings (BYTES
    tensors), integers and booleans must be equal element for element (max_abs counts the elements that differ).
    ``floor``: the noise floor (an absolute error the unfolded model shows on its own, times the margin); the
    bound is the larger of it and the tolerance's."""
    if np.asarray(actual).shape != np.asarray(expected).shape:
        raise ValueError(f"shape mismatch: {np.asarray(actual).shape} vs {np.asarray(expected).shape}")
    if exact(expected):
        a, e = np.asarray(actual), np.asarray(expected)
        if e.dtype.kind in "OUS":
            a, e = a.astype(str), e.astype(str)
        wrong = a != e
        worst = np.unravel_index(int(np.argmax(wrong)), wrong.shape) if wrong.size else ()
        return Comparison(max_abs=float(wrong.sum()), max_rel=float(wrong.mean()) if wrong.size else 0.0,
                          mean_abs=float(wrong.mean()) if wrong.size else 0.0, worst_index=[int(i) for i in worst],
                          frac_over=float(wrong.mean()) if wrong.size else 0.0, bound=0.0,
                          passed=not wrong.any(), n=int(e.size))
    a = np.asarray(actual, dtype=np.float64)
    e = np.asarray(expected, dtype=np.float64)
    if e.size == 0:
        return Comparison(0.0, 0.0, 0.0, [], 0.0, tol.atol, True, 0)
    diff = np.abs(a - e)
    diff = np.where(np.isnan(diff) & ~np.isnan(e), np.inf, np.nan_to_num(diff, nan=0.0))
    scale = float(np.nanmax(np.abs(e))) if np.isfinite(e).any() else 0.0
    bound = max(tol.rtol * scale + tol.atol, floor)
    rel = diff / np.maximum(np.abs(e), max(tol.rel_floor * scale, 1e-30))
    worst = np.unravel_index(int(np.argmax(diff)), diff.shape)
    max_abs = float(diff.max())
    return Comparison(max_abs=max_abs, max_rel=float(np.nanmax(rel)), mean_abs=float(diff.mean()),
                      worst_index=[int(i) for i in worst], frac_over=float((diff > bound).mean()),
                      bound=bound, passed=bool(max_abs <= bound), n=int(e.size),
                      floor=floor if floor > tol.rtol * scale + tol.atol else None)
