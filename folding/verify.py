"""Verifier: prove that the folded model computes what the unfolded one did, or refuse it.

Ground truth is the trainer's model in eval mode run in float64. Against it, on the same inputs:

* ``unfolded_torch``   the same model in float32 (the rounding budget a fold may not exceed by much);
* ``folded_torch``     ``fold_module`` of it;
* ``reference_onnx``   ``reference.onnx`` (BN kept) in onnxruntime with optimisations disabled;
* ``served_onnx``      ``model.onnx`` as the server runs it: optimisation level, provider, precision.

Inputs are random draws that match the saved normalisation at several batch sizes, plus the real
validation samples when the training data can be reloaded. On failure the error is localised: each fold
site's tensor (same name in both graphs) is compared in topological order and the first layer over
tolerance is named. A batch-invariance check catches BNs that use batch statistics (train-mode exports,
``track_running_stats=False``), which dynamic batching would expose. ``verification.json`` is written
next to the model.
"""
from __future__ import annotations

import copy
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import onnx
import torch

from foldserve.atomic import write_json
from foldserve.errors import ConfigError
from folding.fold_math import FP16_MAX, BNParams
from folding.tolerances import Comparison, Tolerance, compare, tolerance_for

logger = logging.getLogger(__name__)

REPORT_VERSION = 1


@dataclass
class VerifyOptions:
    batch_sizes: tuple[int, ...] = (1, 7, 32)
    seed: int = 0
    rtol: float | None = None
    atol: float | None = None
    provider: str = "auto"            # auto | cpu | cuda: what the server will use
    optimization: str = "all"         # the server's graph optimisation level
    max_validation: int = 512
    localize: bool = True
    write: bool = True


# --- onnxruntime -----------------------------------------------------------------------------------

def ort_session(path_or_bytes: Any, optimization: str = "all", provider: str = "cpu"):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = {
        "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL, "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED, "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }[optimization]
    opts.log_severity_level = 3
    providers = ["CPUExecutionProvider"]
    if provider == "cuda" or (provider == "auto" and cuda_available()):
        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    src = str(path_or_bytes) if isinstance(path_or_bytes, Path) else path_or_bytes
    return ort.InferenceSession(src, sess_options=opts, providers=providers)


def cuda_available() -> bool:
    try:
        import onnxruntime as ort

        return "CUDAExecutionProvider" in ort.get_available_providers() and torch.cuda.is_available()
    except Exception:
        return False


def _run(sess, x: np.ndarray) -> np.ndarray:
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


# --- checks ----------------------------------------------------------------------------------------

def batch_invariance(run: Callable[[np.ndarray], np.ndarray], x: np.ndarray, tol: Tolerance) -> Comparison:
    """Each sample alone vs inside the batch: equal for eval-mode BN, different for batch statistics."""
    together = run(x)
    alone = np.concatenate([run(x[i:i + 1]) for i in range(len(x))])
    return compare(alone, together, tol)


def lint_statistics(model: torch.nn.Module, served: onnx.ModelProto) -> list[str]:
    warnings: list[str] = []
    for name, bn in model.named_modules():
        if isinstance(bn, torch.nn.modules.batchnorm._BatchNorm) and bn.running_var is not None:
            p = BNParams.create(bn.running_mean.double().numpy(), bn.running_var.double().numpy(),
                                None if bn.weight is None else bn.weight.detach().double().numpy(),
                                None if bn.bias is None else bn.bias.detach().double().numpy(), bn.eps)
            warnings += p.lint(name)
    from onnx import numpy_helper

    for t in served.graph.initializer:
        if t.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE):
            a = numpy_helper.to_array(t)
            if a.size and np.isfinite(a).all() and np.abs(a).max() > FP16_MAX:
                warnings.append(f"initializer {t.name}: values reach {np.abs(a).max():.3g}, beyond the float16 range")
            elif a.size and not np.isfinite(a).all():
                warnings.append(f"initializer {t.name}: contains NaN/Inf")
    return warnings


def localize(reference: onnx.ModelProto, served: onnx.ModelProto, sites: list[dict[str, Any]], x: np.ndarray,
             tol: Tolerance) -> list[dict[str, Any]]:
    """Compare each fold site's tensor (same name in both graphs) in the reference's topological order."""
    order = {o: i for i, n in enumerate(reference.graph.node) for o in n.output}
    sites = sorted((s for s in sites if s.get("tensor") in order), key=lambda s: order[s["tensor"]])
    if not sites:
        return []
    elem = served.graph.input[0].type.tensor_type.elem_type

    def with_outputs(m: onnx.ModelProto) -> onnx.ModelProto:
        m = copy.deepcopy(m)
        known = {o.name for o in m.graph.output}
        for s in sites:
            if s["tensor"] not in known:
                m.graph.output.append(onnx.helper.make_tensor_value_info(s["tensor"], elem, None))
        return m

    names = [s["tensor"] for s in sites]
    ref_sess = ort_session(with_outputs(reference).SerializeToString(), "disable", "cpu")
    srv_sess = ort_session(with_outputs(served).SerializeToString(), "disable", "cpu")
    ref_out = dict(zip(names, ref_sess.run(names, {ref_sess.get_inputs()[0].name: x})))
    srv_out = dict(zip(names, srv_sess.run(names, {srv_sess.get_inputs()[0].name: x})))
    results = []
    for s in sites:
        c = compare(srv_out[s["tensor"]], ref_out[s["tensor"]], tol)
        results.append({"layer": s["into"], "bn": s["bn"], "direction": s["direction"], "tensor": s["tensor"],
                        **c.to_dict()})
    return results


# --- inputs ----------------------------------------------------------------------------------------

def input_sets(ckpt: dict[str, Any], opts: VerifyOptions) -> dict[str, tuple[np.ndarray, np.ndarray | None]]:
    from folding.export import example_input

    sets: dict[str, tuple[np.ndarray, np.ndarray | None]] = {}
    for i, b in enumerate(opts.batch_sizes):
        sets[f"random_b{b}"] = (example_input(ckpt, b, seed=opts.seed + i).numpy(), None)
    ds_info = ckpt.get("dataset") or {}
    if ds_info.get("name") in ("digits", "synthetic") or (ds_info.get("data") and Path(ds_info["data"]).exists()):
        try:
            from trainer.data import load_dataset
            from trainer.models import arch_spec

            ds = load_dataset(ds_info["name"], data=ds_info.get("data"), seed=ds_info.get("seed", 0),
                              val_fraction=ds_info.get("val_fraction", 0.2), image_size=ds_info.get("image_size", 32),
                              input_kind=arch_spec(ckpt["arch"]).input_kind)
            n = min(len(ds.x_val), opts.max_validation)
            sets["validation"] = (ds.x_val[:n], ds.y_val[:n])
        except Exception as exc:  # the random sets still verify the fold
            logger.warning("validation data not available for verification: %s", exc)
    return sets


# --- the verifier ----------------------------------------------------------------------------------

def verify_entry(version_dir: str | Path, opts: VerifyOptions | None = None) -> dict[str, Any]:
    """Verify REPO/NAME/VERSION; returns the report (``report["passed"]``) and writes verification.json."""
    from folding.export import load_source, model_input_dtype
    from folding.torch_fold import fold_module
    from trainer.checkpoint import model_from_checkpoint

    t0 = time.perf_counter()
    opts = opts or VerifyOptions()
    vdir = Path(version_dir)
    for f in ("model.onnx", "reference.onnx", "source.pt", "fold_report.json"):
        if not (vdir / f).is_file():
            raise ConfigError(f"{vdir} is not a repository version written by `foldserve fold`: {f} is missing")
    ckpt = load_source(vdir)
    model = model_from_checkpoint(ckpt)
    model64 = copy.deepcopy(model).double()
    folded_torch, _ = fold_module(model)
    reference = onnx.load(str(vdir / "reference.onnx"))
    served = onnx.load(str(vdir / "model.onnx"))
    fold_report = json.loads((vdir / "fold_report.json").read_text())
    dtype = model_input_dtype(served)
    tol = tolerance_for(dtype, opts.rtol, opts.atol)
    np_dtype = {"float16": np.float16, "float64": np.float64}.get(dtype, np.float32)

    ref_sess = ort_session(vdir / "reference.onnx", "disable", "cpu")
    served_sess = ort_session(vdir / "model.onnx", opts.optimization, opts.provider)
    served_provider = served_sess.get_providers()[0]
    candidates: dict[str, Callable[[np.ndarray], np.ndarray]] = {
        "unfolded_torch": lambda x: _torch_run(model, x),
        "folded_torch": lambda x: _torch_run(folded_torch, x),
        "reference_onnx": lambda x: _run(ref_sess, x.astype(np.float32)),
        "served_onnx": lambda x: _run(served_sess, x.astype(np_dtype)),
    }
    classification = ckpt["task"] == "classification"
    results: dict[str, Any] = {name: {"passed": True, "inputs": {}} for name in candidates}
    accuracy: dict[str, Any] = {}
    sets = input_sets(ckpt, opts)
    for set_name, (x, y) in sets.items():
        with torch.no_grad():
            truth = model64(torch.from_numpy(x).double()).numpy()
        for name, run in candidates.items():
            out = run(x)
            c = compare(out, truth, tol if name != "unfolded_torch" else tolerance_for("float32"))
            entry = c.to_dict()
            if classification:
                entry["top1_agreement"] = float((out.argmax(1) == truth.argmax(1)).mean())
                if y is not None:
                    accuracy[name] = float((out.argmax(1) == y).mean())
            results[name]["inputs"][set_name] = entry
            results[name]["passed"] &= c.passed
        if classification and y is not None:
            accuracy["reference_float64"] = float((truth.argmax(1) == y).mean())
    for name, r in results.items():
        r["max_abs"] = max(v["max_abs"] for v in r["inputs"].values())
        r["max_rel"] = max(v["max_rel"] for v in r["inputs"].values())
        r["mean_abs"] = float(np.mean([v["mean_abs"] for v in r["inputs"].values()]))
        worst_set = max(r["inputs"], key=lambda k: r["inputs"][k]["max_abs"] / max(r["inputs"][k]["bound"], 1e-30))
        r["worst"] = {"input": worst_set, "index": r["inputs"][worst_set]["worst_index"]}
        r["frac_over"] = max(v["frac_over"] for v in r["inputs"].values())
        if classification:
            r["top1_agreement"] = min(v["top1_agreement"] for v in r["inputs"].values())

    bx = example_input_batch(sets)
    invariance = {
        "reference_onnx": batch_invariance(candidates["reference_onnx"], bx, tol).to_dict(),
        "served_onnx": batch_invariance(candidates["served_onnx"], bx, tol).to_dict(),
    }
    invariance_ok = all(v["passed"] for v in invariance.values())
    folds_ok = all(r["passed"] for r in results.values())

    first_bad = None
    sites_result: list[dict[str, Any]] = []
    if opts.localize and not results["served_onnx"]["passed"]:
        sites_result = localize(reference, served, fold_report["onnx"]["folded"], bx.astype(np_dtype), tol)
        first_bad = next((s for s in sites_result if not s["passed"]), None)

    report = {
        "report_version": REPORT_VERSION,
        "passed": bool(folds_ok and invariance_ok),
        "model_dir": str(vdir),
        "dtype": dtype,
        "tolerance": {"rtol": tol.rtol, "atol": tol.atol, "rel_floor": tol.rel_floor},
        "provider": served_provider,
        "optimization": opts.optimization,
        "batch_sizes": list(opts.batch_sizes),
        "inputs": {k: list(v[0].shape) for k, v in sets.items()},
        "candidates": results,
        "accuracy": accuracy,
        "batch_invariance": invariance,
        "localization": {"first_failing_layer": first_bad["layer"] if first_bad else None,
                         "first_failing_bn": first_bad["bn"] if first_bad else None, "sites": sites_result},
        "warnings": lint_statistics(model, served) + list(fold_report["onnx"].get("warnings", [])),
        "fold": {"bn_before": fold_report["onnx"]["bn_before"], "folded": len(fold_report["onnx"]["folded"]),
                 "skipped": len(fold_report["onnx"]["skipped"])},
        "wall_s": round(time.perf_counter() - t0, 3),
    }
    report["warnings"] = sorted(set(report["warnings"]))
    if not invariance_ok:
        bad = [k for k, v in invariance.items() if not v["passed"]]
        report["failure"] = (f"batch invariance failed for {bad}: a sample gives a different answer alone than "
                             f"inside a batch (a BN using batch statistics: train-mode export or "
                             f"track_running_stats=False)")
    elif not folds_ok:
        bad = [k for k, r in results.items() if not r["passed"]]
        where = f"; first layer over tolerance: {first_bad['layer']} (folded {first_bad['bn']})" if first_bad else ""
        report["failure"] = f"outputs differ from the float64 reference beyond tolerance for {bad}{where}"
    if opts.write:
        write_json(vdir / "verification.json", report)
    logger.info("verification of %s: %s in %.1f s", vdir, "PASSED" if report["passed"] else "FAILED", report["wall_s"])
    return report


def example_input_batch(sets: dict[str, tuple[np.ndarray, Any]]) -> np.ndarray:
    x = max((v[0] for v in sets.values()), key=len)
    return x[:16]


def _torch_run(model: torch.nn.Module, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))).numpy()


def summary_table(report: dict[str, Any]) -> str:
    """The readable table ``foldserve verify`` prints."""
    lines = [f"{'candidate':<16} {'max_abs':>10} {'max_rel':>10} {'mean_abs':>10} {'over':>7} {'top1':>7}  result",
             "-" * 72]
    for name, r in report["candidates"].items():
        top1 = f"{r['top1_agreement']:.4f}" if "top1_agreement" in r else "-"
        lines.append(f"{name:<16} {r['max_abs']:>10.3g} {r['max_rel']:>10.3g} {r['mean_abs']:>10.3g} "
                     f"{r['frac_over']:>7.2%} {top1:>7}  {'ok' if r['passed'] else 'FAIL'}")
    for name, c in report["batch_invariance"].items():
        lines.append(f"batch invariance {name:<15} max_abs={c['max_abs']:.3g}  {'ok' if c['passed'] else 'FAIL'}")
    if report.get("accuracy"):
        lines.append("accuracy (validation): " + ", ".join(f"{k}={v:.4f}" for k, v in report["accuracy"].items()))
    lines.append(f"tolerance ({report['dtype']}): |err| <= {report['tolerance']['rtol']:g} * max|y| + "
                 f"{report['tolerance']['atol']:g}; provider {report['provider']}, optimisation {report['optimization']}")
    for w in report["warnings"]:
        lines.append(f"warning: {w}")
    if report.get("localization", {}).get("first_failing_layer"):
        lines.append(f"first layer over tolerance: {report['localization']['first_failing_layer']} "
                     f"(folded {report['localization']['first_failing_bn']})")
    lines.append(("PASSED" if report["passed"] else f"FAILED: {report.get('failure', '')}") +
                 f"  ({report['wall_s']:.1f} s)")
    return "\n".join(lines)
