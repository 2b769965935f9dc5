"""Verifier: prove that the folded model computes what the unfolded one did, or refuse it.

Ground truth is the unfolded source (:mod:`folding.source`): the trainer's model or the user's torch
program run in float64 (float32 where a program does not run in float64), or, for an ONNX source, the
user's file run by onnxruntime with optimisations off. Against it, on the same inputs:

* ``unfolded_torch``   the source model/program in float32 (the rounding budget a fold may not exceed by much);
* ``folded_torch``     ``fold_module`` of the trainer's model (checkpoints only);
* ``reference_onnx``   ``reference.onnx`` (BN kept) in onnxruntime with optimisations disabled;
* ``served_onnx``      ``model.onnx`` run by the server's own :class:`server.core.runtime.OnnxModel`:
                       the same provider choice, threads, optimisation level and IO binding.

Inputs are random draws in the raw input space (matching the normalisation) at several batch sizes, plus
real samples: the trainer's validation data, or ``--data FILE.npz``. On failure the error is localised:
each fold site's tensor (same name in both graphs) is compared in topological order and the first layer
over tolerance is named. A batch-invariance check catches BNs that use batch statistics (train-mode
exports, ``track_running_stats=False``), which dynamic batching would expose. ``verification.json`` is
written next to the model.
"""
from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from folding.fold_math import FP16_MAX, BNParams
from folding.source import (
    Feed,
    Outputs,
    SourceModel,
    feed_len,
    feed_slice,
    model_input_dtype,
    model_input_dtypes,
    ort_session,
)
from folding.tolerances import (
    NOISE_MARGIN,
    PRECISION_GATES,
    TOLERANCES,
    UNSTABLE_REL,
    Comparison,
    Tolerance,
    compare,
    exact,
    tolerance_for,
)
from foldserve.entry import (
    FOLD_REPORT_FILE,
    MODEL_FILE,
    REFERENCE_FILE,
    VERIFICATION_FAILED_FILE,
    VERIFICATION_FILE,
    entry_digests,
    read_fold_report,
    read_precision,
)
from foldserve.errors import ConfigError
from foldserve.records import (
    CandidateResult,
    ComparisonRecord,
    FoldCounts,
    FoldedPair,
    Localization,
    NoiseFloor,
    PrecisionGateRecord,
    RecordError,
    ToleranceRecord,
    VerificationReport,
    VerifiedPrecision,
    VerifiedSource,
    Worst,
    read_record,
    write_record,
)
from server.core.runtime import OnnxModel

logger = logging.getLogger(__name__)

Run = Callable[[Feed], Outputs]

#: runs of the unfolded model that measure its own float32 noise (the floor); never judged themselves
NOISE_RUNS = ("unfolded_torch", "reference_onnx_opt", "reference_onnx_ulp")


def rounded_otherwise(reference: onnx.ModelProto, seed: int = 0) -> onnx.ModelProto | None:
    """The unfolded graph with every float32 weight moved by up to one unit in the last place, at random: how far
    the model's output moves when it is rounded otherwise, which is what a fold in float64 does to it (each folded
    weight is one rounding of the exact product, and the BN's own rounding of its output, half a unit each for
    its scale and its shift, is gone). Its distance from reference.onnx is the model's sensitivity to float32
    rounding: a MixNet's is 10x a ResNet's. None for a graph past protobuf's 2 GB."""
    from onnx import numpy_helper

    m = copy.deepcopy(reference)
    rng = np.random.default_rng(seed)
    for t in m.graph.initializer:
        if t.data_type != onnx.TensorProto.FLOAT or int(np.prod(t.dims)) < 2:
            continue
        a = numpy_helper.to_array(t).astype(np.float64)
        moved = (a * (1.0 + rng.uniform(-1.0, 1.0, a.shape) * 2.0 ** -23)).astype(np.float32)
        t.CopyFrom(numpy_helper.from_array(moved, t.name))
    return m if m.ByteSize() < 2**31 - 1 else None


@dataclass
class VerifyOptions:
    batch_sizes: tuple[int, ...] = (1, 7, 32)
    seed: int = 0
    rtol: float | None = None
    atol: float | None = None
    provider: str = "auto"            # auto | cpu | cuda: what the server will use
    optimization: str = "all"         # the server's graph optimisation level
    max_validation: int = 512
    max_accuracy_drop: float | None = None   # points; fp16/int8 gate (default: PRECISION_GATES)
    localize: bool = True
    write: bool = True


# --- onnxruntime: always through the server's OnnxModel ---------------------------------------------------

def served_runner(path: Path, opts: VerifyOptions) -> tuple[Run, str]:
    """Run ``model.onnx`` exactly as the server will: its OnnxModel with the server's defaults."""
    model = OnnxModel(path, provider=opts.provider, optimization=opts.optimization)
    names = list(model.output_names)
    return (lambda feed: dict(zip(names, model.run(feed), strict=True))), model.provider


def _run(sess, x: np.ndarray) -> np.ndarray:
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


# --- checks ----------------------------------------------------------------------------------------

def batch_invariance(run: Run, feed: Feed, tol: Tolerance) -> Comparison:
    """Each sample alone vs inside the batch: equal for eval-mode BN, different for batch statistics (the
    worst output of a model with several)."""
    together = run(feed)
    parts = [run(feed_slice(feed, i, i + 1)) for i in range(feed_len(feed))]
    results = [judged_compare(np.concatenate([p[k] for p in parts]), together[k], tol) for k in together]
    return max(results, key=badness)


def badness(c: Comparison) -> tuple[bool, float]:
    """Orders comparisons: failed ones first, then by error relative to the bound."""
    return (not c.passed, c.max_abs / max(c.bound, 1e-30))


def lint_statistics(reference: onnx.ModelProto, served: onnx.ModelProto) -> list[str]:
    """Fragile BN statistics (read from the reference's BatchNormalization nodes) and served weights that are
    not finite or beyond the float16 range."""
    from onnx import numpy_helper

    from folding.onnx_fold import OnnxFoldPass

    warnings: list[str] = []
    p = OnnxFoldPass(reference)
    for bn in p.batchnorms():
        params = p.check_bn(bn)
        if isinstance(params, BNParams):
            warnings += params.lint(p.bn_name(bn))
    for t in served.graph.initializer:
        if t.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE):
            a = numpy_helper.to_array(t)
            if a.size and np.isfinite(a).all() and np.abs(a).max() > FP16_MAX:
                warnings.append(f"initializer {t.name}: values reach {np.abs(a).max():.3g}, beyond the float16 range")
            elif a.size and not np.isfinite(a).all():
                warnings.append(f"initializer {t.name}: contains NaN/Inf")
    return warnings


def _tensors(model: onnx.ModelProto, names: list[str], types: dict[str, int], default: int,
             x: Feed, optimization: str = "disable") -> list[np.ndarray]:
    """The values of inner tensors ``names`` for input ``x``: the model with them as extra outputs (typed from
    ``types``, else ``default``), run with optimisations off (by default) so that none is fused away."""
    m = copy.deepcopy(model)
    known = {o.name for o in m.graph.output}
    m.graph.output.extend(onnx.helper.make_tensor_value_info(n, types.get(n, default), None)
                          for n in names if n not in known)
    sess = ort_session(m.SerializeToString(), optimization, "cpu")
    dtypes = model_input_dtypes(model)
    return sess.run(names, {k: np.ascontiguousarray(v, dtype=dtypes.get(k, v.dtype)) for k, v in x.items()})


def localize(reference: onnx.ModelProto, served: onnx.ModelProto, folded: list[FoldedPair], x: Feed,
             tol: Tolerance, optimization: str = "all") -> list[dict[str, Any]]:
    """Compare each fold site's tensor (same name in both graphs) in the reference's topological order. A site
    passes within the tolerance or within ``NOISE_MARGIN`` times the reference's own movement there under the
    server's graph optimisations (``optimization``): its noise floor."""
    order = {o: i for i, n in enumerate(reference.graph.node) for o in n.output}
    computed = {o for n in served.graph.node for o in n.output}   # a fold site a later merge absorbed is gone
    sites = sorted((s for s in folded if s.tensor in order and s.tensor in computed), key=lambda s: order[s.tensor])
    if not sites:
        return []
    elem = served.graph.input[0].type.tensor_type.elem_type
    names = list(dict.fromkeys(s.tensor for s in sites))
    ref_out = dict(zip(names, _tensors(reference, names, {}, elem, x), strict=True))
    srv_out = dict(zip(names, _tensors(served, names, {}, elem, x), strict=True))
    opt_out = dict(zip(names, _tensors(reference, names, {}, elem, x, optimization), strict=True))
    results = []
    for s in sites:
        ref = np.asarray(ref_out[s.tensor], np.float64)
        floor = float(np.abs(np.asarray(opt_out[s.tensor], np.float64) - ref).max()) if ref.size else 0.0
        c = compare(srv_out[s.tensor], ref, tol, NOISE_MARGIN * floor)
        results.append({"layer": s.into, "bn": s.bn, "direction": s.direction, "tensor": s.tensor, **c.to_json()})
    return results


def localize_layers(reference: onnx.ModelProto, served: onnx.ModelProto, x: Feed,
                    jump: float) -> list[dict[str, Any]]:
    """For fp16/int8: every float tensor both graphs compute (the converters keep tensor names), in the
    reference's order, with its error relative to the tensor's scale; ``passed`` is False from the first
    layer whose error jumps past ``jump``."""
    inferred = onnx.shape_inference.infer_shapes(served)
    served_types = {v.name: v.type.tensor_type.elem_type for v in (*inferred.graph.value_info, *inferred.graph.output)}
    producers = {o: n for n in served.graph.node for o in n.output}
    floats = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE)
    names = [o for n in reference.graph.node if n.op_type not in ("Constant", "Identity") for o in n.output
             if o in producers and served_types.get(o) in floats][:256]
    if not names:
        return []

    ref_out = _tensors(reference, names, {}, onnx.TensorProto.FLOAT, x)
    srv_out = _tensors(served, names, served_types, onnx.TensorProto.FLOAT, x)
    results, jumped = [], False
    for name, r, a in zip(names, ref_out, srv_out, strict=False):
        r64, a64 = np.asarray(r, np.float64), np.asarray(a, np.float64)
        if r64.shape != a64.shape:
            continue
        scale = float(np.abs(r64).max()) if r64.size else 0.0
        err = float(np.abs(a64 - r64).max()) if r64.size else 0.0
        rel = err / scale if scale > 0 else (0.0 if err == 0 else float("inf"))
        jumped = jumped or not rel <= jump
        node = producers[name]
        results.append({"layer": node.name or name, "op": node.op_type, "tensor": name, "max_abs": err,
                        "rel_error": rel, "passed": not jumped})
    return results


def precision_gate(per: dict[str, ComparisonRecord], accuracy: dict[str, float], precision: str, truth_name: str,
                   opts: VerifyOptions, classification: bool, elementwise_passed: bool
                   ) -> tuple[PrecisionGateRecord, str | None]:
    """fp16/int8: judge the served model on top-1 agreement and accuracy drop (classification) instead of
    elementwise tolerances; ``per`` is the served model on each input set. Returns the gate and a failure
    message or None."""
    gate = PRECISION_GATES[precision]
    record = PrecisionGateRecord(ToleranceRecord(gate.tolerance.rtol, gate.tolerance.atol))
    if not classification:
        return record, None if elementwise_passed else f"{precision} outputs differ beyond {gate.tolerance}"
    basis = "validation" if "validation" in per else "random inputs"
    top1 = (per["validation"].top1_agreement if "validation" in per
            else min(v.top1_agreement or 0.0 for v in per.values()))
    top1 = top1 or 0.0
    max_drop = gate.max_accuracy_drop if opts.max_accuracy_drop is None else opts.max_accuracy_drop
    drop = ((accuracy[truth_name] - accuracy["served_onnx"]) * 100
            if truth_name in accuracy and "served_onnx" in accuracy else None)
    record.basis, record.top1_agreement, record.min_top1 = basis, top1, gate.min_top1
    record.accuracy_drop_points, record.max_accuracy_drop_points = drop, max_drop
    failure = None
    if top1 < gate.min_top1:
        failure = f"{precision}: top-1 agreement with the float64 truth {top1:.4f} < {gate.min_top1} ({basis})"
    elif drop is not None and drop > max_drop:
        failure = f"{precision}: accuracy drops {drop:.2f} points (at most {max_drop:g} allowed)"
    return record, failure


def comparison_record(c: Comparison, out: np.ndarray | None = None, expected: np.ndarray | None = None
                      ) -> ComparisonRecord:
    """A comparison as recorded; with ``out`` and ``expected`` (classification) its top-1 agreement too."""
    if out is not None and expected is not None:
        c.top1_agreement = float((out.argmax(1) == expected.argmax(1)).mean())
    return c


# --- the verifier ----------------------------------------------------------------------------------

def _candidates(vdir: Path, source: SourceModel, opts: VerifyOptions, dtypes: dict[str, np.dtype]):
    served, provider = served_runner(vdir / MODEL_FILE, opts)
    unfolded, _ = served_runner(vdir / REFERENCE_FILE, opts)
    candidates: dict[str, Run] = dict(source.candidates())

    def typed(feed: Feed) -> Feed:
        return {k: np.ascontiguousarray(v, dtype=dtypes.get(k, v.dtype)) for k, v in feed.items()}

    candidates["reference_onnx_opt"] = lambda feed: unfolded(typed(feed))
    moved = rounded_otherwise(onnx.load(str(vdir / REFERENCE_FILE)), opts.seed)
    if moved is not None:
        sess = ort_session(moved.SerializeToString(), "disable", "cpu")
        names = [o.name for o in sess.get_outputs()]
        candidates["reference_onnx_ulp"] = lambda feed: dict(zip(names, sess.run(None, typed(feed)), strict=True))
    candidates["served_onnx"] = lambda feed: served(typed(feed))
    return {k: source.fit(run) for k, run in candidates.items()}, provider


def record_key(set_name: str, output: str, outputs: list[str]) -> str:
    """Where one output's comparison on one input set is recorded: the set's name for a one-output model,
    ``set/output`` for each output of a model with several."""
    return set_name if len(outputs) == 1 else f"{set_name}/{output}"


def prefix_pairs(sets: dict[str, tuple[Feed, np.ndarray | None]]) -> dict[str, str]:
    """Each input set whose samples are the first rows of a larger set -> the largest such set (the random sets
    of a batched source are one draw: ``random_b1`` and ``random_b7`` are the start of ``random_b32``)."""
    out: dict[str, str] = {}
    largest_first = sorted(sets, key=lambda k: -feed_len(sets[k][0]))
    for name, (feed, _) in sets.items():
        n = feed_len(feed)
        for other in largest_first:          # the largest such set, which is the start of no other
            big = sets[other][0]
            if feed_len(big) > n and all(k in big and big[k].dtype == v.dtype and np.array_equal(big[k][:n], v)
                                         for k, v in feed.items()):
                out[name] = other
                break
    return out


def judged_compare(out: np.ndarray, want: np.ndarray, tol: Tolerance, floor: float = 0.0) -> Comparison:
    """:func:`compare`, with a shape that differs recorded as a failed comparison that says so (a detector's
    variable number of boxes), not raised."""
    try:
        return compare(out, want, tol, floor)
    except ValueError:
        return Comparison(0.0, 0.0, 0.0, [], 1.0, 0.0, False, int(np.asarray(want).size),
                          note=f"shape {list(np.shape(out))} where the truth has {list(np.shape(want))}")


def noise_of(gots: dict[str, Outputs], expected: Outputs, out_name: str) -> tuple[float, str, str | None]:
    """How far the unfolded model moves one output on its own, on one input set: ``(error, run, unstable)``, the
    largest max abs error over the noise runs (the float32 program against the truth; reference.onnx under the
    server's optimisations against reference.onnx without them, or against the truth for an ONNX source) and the
    reason the output is unstable there, or None."""
    worst, by, unstable = 0.0, "", None
    for run in NOISE_RUNS:
        if run not in gots:
            continue
        base = gots["reference_onnx"] if run != "unfolded_torch" and "reference_onnx" in gots else expected
        got, want = np.asarray(gots[run][out_name]), np.asarray(base[out_name])
        if got.shape != want.shape:
            unstable = unstable or f"{run} gives shape {list(got.shape)} where the truth has {list(want.shape)}"
            continue
        c = compare(got, want, TOLERANCES["float32"])
        if exact(want):
            if c.max_abs:
                unstable = unstable or f"{run} gives {int(c.max_abs)} of {c.n} values that differ"
            continue
        scale = float(np.abs(np.asarray(want, np.float64)).max()) if want.size else 0.0
        if c.max_abs > UNSTABLE_REL * scale:
            unstable = unstable or f"{run} moves it by {c.max_abs / max(scale, 1e-30):.3g} of its scale"
        if c.max_abs >= worst:
            worst, by = c.max_abs, run
    return worst, by, unstable


# long function: every candidate on every set, the truth once per draw, invariance from the same runs
def _evaluate(candidates: dict[str, Run], sets: dict[str, tuple[Feed, np.ndarray | None]], truth: Run,
              tol: Tolerance, accuracy_output: str | None, truth_name: str = "reference_float64",
              served_tol: Tolerance | None = None, invariant: tuple[str, ...] = (), once: tuple[str, ...] = ()
              ) -> tuple[dict[str, CandidateResult], dict[str, float], dict[str, Comparison], NoiseFloor]:
    """Every candidate on every input set against the truth, output by output (each against its own scale);
    top-1 agreement and accuracy on ``accuracy_output`` (a classifier's logits).

    The noise runs (:data:`NOISE_RUNS`) measure the unfolded model's own float32 error on each output: the largest
    on any sample of the input sets is its floor; the other candidates are judged against the tolerance or that
    floor times ``NOISE_MARGIN``, whichever is larger; an unstable output is recorded and not judged.

    A set that is the start of a larger one (:func:`prefix_pairs`) takes its truth from the larger set's, and
    the ``invariant`` candidates' answers on it are compared with their answers on the same samples inside the
    larger batch: the batch-invariance check, at no extra run (the worst comparison per candidate is returned).
    The ``once`` candidates (torch runs, computed in chunks whatever the set) are run once per draw too."""
    parent = prefix_pairs(sets)
    order = sorted(sets, key=lambda k: k in parent)          # the larger sets first: their runs are reused
    truths: dict[str, Outputs] = {}
    kept: dict[tuple[str, str], Outputs] = {}      # (larger set, invariant or once candidate) -> its outputs
    invariance: dict[str, Comparison] = {}
    records: dict[tuple[str, str], dict[str, ComparisonRecord]] = {}
    results = {name: CandidateResult() for name in candidates}
    accuracy: dict[str, float] = {}
    noise = NoiseFloor(NOISE_MARGIN, [r for r in NOISE_RUNS if r in candidates])
    judgements: list[tuple[str, str, Comparison]] = []       # (candidate, output, comparison), judged at the end
    for set_name in order:
        x, y = sets[set_name]
        n = feed_len(x)
        big = parent.get(set_name)
        expected = ({k: v[:n] for k, v in truths[big].items()} if big else truth(x))
        if set_name in parent.values():
            truths[set_name] = expected
        outputs = list(expected)
        gots = {name: ({k: v[:n] for k, v in kept[(big, name)].items()} if big and name in once else run(x))
                for name, run in candidates.items()}
        floors = {out_name: noise_of(gots, expected, out_name) for out_name in outputs}
        for out_name, (err, by, unstable) in floors.items():
            noise.add(out_name, err, by, compare(expected[out_name], expected[out_name], tol).bound, unstable)
        for name, got in gots.items():
            c_tol = (served_tol if name == "served_onnx" and served_tol else
                     tol if name != "unfolded_torch" else tolerance_for("float32"))
            per: dict[str, ComparisonRecord] = {}
            for out_name in outputs:
                out, want = got[out_name], expected[out_name]
                c = judged_compare(out, want, c_tol)
                labelled = out_name == accuracy_output and c.note is None
                per[record_key(set_name, out_name, outputs)] = comparison_record(c, *((out, want) if labelled else ()))
                judgements.append((name, out_name, c))
                if labelled and y is not None:
                    accuracy[name] = float((out.argmax(1) == y).mean())
            records[(set_name, name)] = per
            if (name in invariant or name in once) and set_name in parent.values():
                kept[(set_name, name)] = got
            if name in invariant and big:
                inside = kept[(big, name)]
                worst = max((judged_compare(got[k], inside[k][:n], c_tol) for k in got if not floors[k][2]),
                            key=badness, default=None)
                if worst is not None and (name not in invariance or badness(worst) > badness(invariance[name])):
                    invariance[name] = worst
        if accuracy_output and y is not None:
            accuracy[truth_name] = float((expected[accuracy_output].argmax(1) == y).mean())
    for name, out_name, c in judgements:
        floor = noise.outputs[out_name]
        c.unstable = floor.unstable          # an output unstable on one set is unstable: its choices flip on ties
        if name not in NOISE_RUNS and c.note is None and c.bound > 0 and NOISE_MARGIN * floor.floor > c.bound:
            # the largest error the unfolded model shows on any sample of the draw, times the margin
            c.bound = c.floor = NOISE_MARGIN * floor.floor
            c.passed = c.max_abs <= c.bound
        if not c.unstable:
            results[name].passed &= c.passed
    for set_name in sets:                                     # recorded in the sets' order
        for name in candidates:
            results[name].inputs.update(records[(set_name, name)])
    for r in results.values():
        _summarise(r, accuracy_output is not None)
    return results, accuracy, invariance, noise


def _summarise(r: CandidateResult, classification: bool) -> None:
    per = r.inputs
    r.max_abs = max(v.max_abs for v in per.values())
    r.max_rel = max(v.max_rel for v in per.values())
    r.mean_abs = float(np.mean([v.mean_abs for v in per.values()]))
    worst_set = max(per, key=lambda k: per[k].max_abs / max(per[k].bound, 1e-30))
    r.worst = Worst(worst_set, per[worst_set].worst_index)
    r.frac_over = max(v.frac_over for v in per.values())
    labelled = [v.top1_agreement for v in per.values() if v.top1_agreement is not None]
    if classification and labelled:
        r.top1_agreement = min(labelled)


def _failure(results: dict[str, CandidateResult], invariance: dict[str, ComparisonRecord],
             first_bad: dict[str, Any] | None, truth_name: str, noise: NoiseFloor,
             gate_failure: str | None = None) -> str | None:
    bad_inv = [k for k, v in invariance.items() if not v.passed]
    if bad_inv:
        return (f"batch invariance failed for {bad_inv}: a sample gives a different answer alone (or in a smaller "
                f"batch) than inside a larger batch (a BN using batch statistics: train-mode export or "
                f"track_running_stats=False)")
    bad = [k for k, r in results.items() if not r.passed and k not in NOISE_RUNS]
    where = ""
    if first_bad and first_bad.get("bn"):
        where = f"; first layer over tolerance: {first_bad['layer']} (folded {first_bad['bn']})"
    elif first_bad:
        where = (f"; first layer whose error jumps: {first_bad['layer']} ({first_bad['op']}, error "
                 f"{first_bad['rel_error']:.3g} of its scale)")
    if not bad:
        if noise.sites_checked and noise.sites_agreed is False:
            return (f"the outputs {noise.unstable} are unstable (the unfolded model itself moves them) and a fold "
                    f"site disagrees with the unfolded graph{where}")
        return None
    if gate_failure and bad == ["served_onnx"]:
        return gate_failure + where
    truth = truth_name.replace("reference_", "")
    return (f"outputs differ from the {truth} truth beyond tolerance and beyond {noise.margin:g}x the unfolded "
            f"model's own float32 error for {bad}{where}")


# long function: one report, built in one place
def verify_entry(version_dir: str | Path, opts: VerifyOptions | None = None) -> VerificationReport:
    """Verify REPO/NAME/VERSION; returns the report (``report.passed``) and writes verification.json."""
    from folding.kinds import open_source

    t0 = time.perf_counter()
    opts = opts or VerifyOptions()
    vdir = Path(version_dir)
    for f in (MODEL_FILE, REFERENCE_FILE, FOLD_REPORT_FILE):
        if not (vdir / f).is_file():
            raise ConfigError(f"{vdir} is not a repository version written by `foldserve fold`: {f} is missing")
    source = open_source(vdir)
    reference, served = onnx.load(str(vdir / REFERENCE_FILE)), onnx.load(str(vdir / MODEL_FILE))
    fold_report = read_fold_report(vdir).onnx
    precision = read_precision(vdir)
    np_dtype = model_input_dtype(served)
    dtypes = model_input_dtypes(served)
    tol = tolerance_for(np_dtype.name, opts.rtol, opts.atol)
    served_tol = PRECISION_GATES[precision.precision].tolerance if precision.reduced else tol
    candidates, provider = _candidates(vdir, source, opts, dtypes)
    sets = source.input_sets(opts.batch_sizes, opts.seed, opts.max_validation, dtypes)
    classification = source.accuracy_output is not None
    truth_name = f"reference_{source.truth_dtype}"
    checked = tuple(name for name in ("reference_onnx", "served_onnx") if name in candidates and source.batched)
    once = tuple(name for name in ("unfolded_torch", "folded_torch", "reference_onnx_opt", "reference_onnx_ulp")
                 if name in candidates and source.batched)
    results, accuracy, from_sets, noise = _evaluate(candidates, sets, source.truth, tol, source.accuracy_output,
                                             truth_name, served_tol, checked, once)
    gate, gate_failure = None, None
    if precision.reduced:
        served_result = results["served_onnx"]
        gate, gate_failure = precision_gate(served_result.inputs, accuracy, precision.precision, truth_name, opts,
                                            classification, served_result.passed)
        if classification:
            served_result.passed = gate_failure is None
    bx = example_input_batch(sets)
    invariance = {name: comparison_record(from_sets[name] if name in from_sets else batch_invariance(
        candidates[name], bx, served_tol if name == "served_onnx" else tol)) for name in checked}
    sites: list[dict[str, Any]] = []
    x_loc = feed_slice(bx, 0, source.record.batch or feed_len(bx))
    noise.sites_checked = bool(noise.unstable) and not precision.reduced
    if (opts.localize and not results["served_onnx"].passed) or noise.sites_checked:
        sites = (localize_layers(reference, served, x_loc, PRECISION_GATES[precision.precision].layer_jump)
                 if precision.reduced else
                 localize(reference, served, fold_report.sites(), x_loc, tol, opts.optimization))
    if noise.sites_checked:
        noise.sites_agreed = all(s["passed"] for s in sites)
    first_bad = next((s for s in sites if not s["passed"]), None)
    failure = _failure(results, invariance, first_bad, truth_name, noise, gate_failure)
    report = VerificationReport(
        passed=failure is None, model_dir=vdir.name, dtype=np_dtype.name,
        source=VerifiedSource(source.record.kind, source.record.original, source.truth_dtype,
                              "dynamic" if source.batched else int(source.record.batch or 0)),
        tolerance=ToleranceRecord(tol.rtol, tol.atol, tol.rel_floor), provider=provider,
        optimization=opts.optimization, batch_sizes=list(opts.batch_sizes),
        inputs={record_key(k, name, source.input_names): list(a.shape) for k, (feed, _) in sets.items()
                for name, a in feed.items()}, candidates=results, accuracy=accuracy,
        batch_invariance=invariance,
        precision=VerifiedPrecision(**vars(precision), gate=gate),
        localization=Localization(first_bad["layer"] if first_bad else None,
                                  first_bad.get("bn") if first_bad else None, sites),
        noise=noise, warnings=sorted(set(lint_statistics(reference, served) + list(fold_report.warnings))),
        fold=FoldCounts(fold_report.bn_before, len(fold_report.folded), len(fold_report.skipped),
                        fold_report.bn_after),
        wall_s=round(time.perf_counter() - t0, 3), failure=failure)
    if opts.write:
        write_report(vdir, report)
    logger.info("verification of %s: %s in %.1f s", vdir, "PASSED" if report.passed else "FAILED", report.wall_s)
    return report


def write_report(vdir: Path, report: VerificationReport) -> Path:
    """verification.json with the SHA-256 of every file it covered (the server serves those bytes only). A
    failing report never replaces a passing one in place: it goes beside it (verification.failed.json) and
    ``report.written`` says so."""
    report.files = entry_digests(vdir)
    dest = vdir / VERIFICATION_FILE
    if not report.passed and _passed(dest):
        dest = vdir / VERIFICATION_FAILED_FILE
        report.kept = (f"{VERIFICATION_FILE} (passed) is kept; this failing report is {VERIFICATION_FAILED_FILE}. "
                       f"A server still refuses files whose bytes changed since that pass")
    report.written = dest.name
    write_record(dest, report)
    if dest.name == VERIFICATION_FILE and (vdir / VERIFICATION_FAILED_FILE).exists():
        (vdir / VERIFICATION_FAILED_FILE).unlink()       # a new pass supersedes an older failure
    return dest


def _passed(path: Path) -> bool:
    if not path.is_file():
        return False
    try:
        return read_record(VerificationReport, path).passed
    except RecordError:
        return False


def example_input_batch(sets: dict[str, tuple[Feed, Any]]) -> Feed:
    feed = max((v[0] for v in sets.values()), key=feed_len)
    return feed_slice(feed, 0, 16)


def noise_lines(report: VerificationReport) -> list[str]:
    """Per output: the served model's worst error, the bound it was judged on and what set it (the tolerance or
    the unfolded model's own noise), or why it was not judged; and what the fold sites said where they decided."""
    noise, served = report.noise, report.served
    if noise is None or served is None:
        return []
    lines = []
    truth = report.source.truth if report.source else "float64"
    for out, f in noise.outputs.items():
        mine = {k: c for k, c in served.inputs.items()
                if k.endswith("/" + out) or len(noise.outputs) == 1}
        if not mine:
            continue
        where = max(mine, key=lambda k: badness(mine[k]))      # the set where the output came closest to failing
        c = mine[where]
        if f.unstable:
            verdict = f"unstable, not judged: {f.reason}"
        elif c.note:
            verdict = f"FAIL: {c.note}"
        elif c.bound == 0.0:
            verdict = "compared exactly" + ("" if c.passed else f": {int(c.max_abs)} of {c.n} values differ")
        elif c.floor is not None:
            verdict = (f"bound {c.bound:.3g} = {noise.margin:g} x the unfolded model's own error ({f.set_by}; the "
                       f"tolerance alone would be {f.tolerance:.3g})")
        else:
            verdict = f"bound {c.bound:.3g} (the tolerance; the unfolded model's own error is under half of it there)"
        lines.append(f"output {out}: served max_abs {c.max_abs:.3g} on {where.split('/')[0]} against the {truth} "
                     f"truth, {'ok' if c.passed or f.unstable else 'FAIL'}; {verdict}")
    if noise.sites_checked:
        lines.append("fold sites: " + ("every site agrees with the unfolded graph within its noise"
                                       if noise.sites_agreed else "a site disagrees (below)"))
    return lines


def summary_table(report: VerificationReport) -> str:  # long function: one line per part of the report
    """The readable table ``foldserve verify`` prints."""
    lines = [f"{'candidate':<18} {'max_abs':>10} {'max_rel':>10} {'mean_abs':>10} {'over':>7} {'top1':>7}  result",
             "-" * 72]
    for name, r in report.candidates.items():
        top1 = f"{r.top1_agreement:.4f}" if r.top1_agreement is not None else "-"
        result = "noise run" if name in NOISE_RUNS else "ok" if r.passed else "FAIL"
        lines.append(f"{name:<18} {r.max_abs:>10.3g} {r.max_rel:>10.3g} {r.mean_abs:>10.3g} "
                     f"{r.frac_over:>7.2%} {top1:>7}  {result}")
    lines += noise_lines(report)
    for name, c in report.batch_invariance.items():
        lines.append(f"batch invariance {name:<15} max_abs={c.max_abs:.3g}  {'ok' if c.passed else 'FAIL'}")
    if report.accuracy:
        lines.append("accuracy (validation): " + ", ".join(f"{k}={v:.4f}" for k, v in report.accuracy.items()))
    prec = report.precision
    if prec.reduced:
        g = prec.gate
        line = f"precision {prec.precision}"
        if prec.calibration_method:
            line += (f", calibrated ({prec.calibration_method}) on {prec.calibration_samples} samples, "
                     f"{prec.activation_type} activations")
        if g is not None and g.basis != "elementwise":
            drop = g.accuracy_drop_points
            line += (f"; gate: top-1 agreement {g.top1_agreement or 0.0:.4f} (at least {g.min_top1}, {g.basis})" +
                     (f", accuracy drop {drop:.2f} points (at most {g.max_accuracy_drop_points:g})"
                      if drop is not None and g.max_accuracy_drop_points is not None else ""))
        lines.append(line)
        for k in prec.kept_float32[:5]:
            lines.append(f"kept in float32: {k}")
    src = report.source
    if src is not None:
        lines.append(f"source: {src.kind} {src.file}, truth in {src.truth}, batch {src.batch}")
    if report.tolerance is not None:
        lines.append(f"tolerance ({report.dtype}): |err| <= {report.tolerance.rtol:g} * max|y| + "
                     f"{report.tolerance.atol:g}; provider {report.provider}, optimisation {report.optimization}")
    for w in report.warnings:
        lines.append(f"warning: {w}")
    loc = report.localization
    if loc.first_failing_layer and loc.first_failing_bn:
        lines.append(f"first layer over tolerance: {loc.first_failing_layer} (folded {loc.first_failing_bn})")
    elif loc.first_failing_layer:
        lines.append(f"first layer whose error jumps: {loc.first_failing_layer}")
    lines.append(("PASSED" if report.passed else f"FAILED: {report.failure or ''}") + f"  ({report.wall_s:.1f} s)")
    if report.kept:
        lines.append(f"note: {report.kept}")
    return "\n".join(lines)
