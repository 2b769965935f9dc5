"""``foldserve verify --server ADDRESS ENTRY``: verify what a running server serves.

Sends the verifier's inputs to the server (gRPC or HTTP, through :mod:`foldserve.client`) and compares the
served outputs with the local unfolded reference (the source model in float64), end to end: transport,
batching, provider and all. The model name and version come from the entry path (REPO/NAME/VERSION)
unless given; names and shapes come from the server's metadata, and a served model that does not match the
entry is reported in one line.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from folding.kinds import open_source
from folding.tolerances import PRECISION_GATES, compare, tolerance_for
from folding.verify import comparison_record, precision_gate
from foldserve.client import connect
from foldserve.entry import read_precision, split_entry_path
from foldserve.errors import ConfigError
from foldserve.metadata import ModelMetadata
from foldserve.records import ComparisonRecord


def _check_interface(meta: ModelMetadata, x: np.ndarray, truth: np.ndarray, where: str, batched: bool) -> None:
    inp, out = meta.inputs[0], meta.outputs[0]
    for what, t, arr in (("input", inp, x), ("output", out, truth)):
        shape = ([-1] if batched else [arr.shape[0]]) + list(arr.shape[1:])
        if len(t.shape) != len(shape) or any(s not in (-1, w) for s, w in zip(t.shape[1:], shape[1:], strict=False)):
            raise ConfigError(f"{where} and the entry differ in their {what}s: served {what} {t.name!r} has shape "
                              f"{t.shape}, the entry's model {shape}: is it the same model?")


def _served(client, model: str, version: str, meta: ModelMetadata, x: np.ndarray, max_batch: int) -> np.ndarray:
    inp, out = meta.inputs[0], meta.outputs[0]
    outs = []
    for start in range(0, len(x), max_batch):
        chunk = np.ascontiguousarray(x[start:start + max_batch], dtype=np.float32)
        outs.append(client.infer(model, {inp.name: chunk}, version=version, datatypes={inp.name: inp.datatype},
                                 outputs=[out.name])[out.name])
    return np.concatenate(outs).astype(np.float64)


# long function: one live report, built in one place (inputs, precision gate, table)
def verify_live(address: str, entry: Path, opts: Any, *, model: str | None = None, version: str | None = None,
                token: str | None = None) -> dict[str, Any]:
    t0 = time.perf_counter()
    entry = Path(entry)
    _, entry_name, entry_version = split_entry_path(entry)
    source = open_source(entry)
    model = model or entry_name
    version = str(version or entry_version)
    client = connect(address, token=token)
    meta = client.metadata(model, version)
    max_batch = max(1, int(client.config(model, version).get("max_batch_size", 1) or 1))
    if not source.batched:
        max_batch = source.record.batch
    where = f"the served model {model!r} version {version}"
    precision = read_precision(entry).precision
    reduced = precision != "fp32"
    tol = PRECISION_GATES[precision].tolerance if reduced else tolerance_for("float32", opts.rtol, opts.atol)
    truth_name = f"reference_{source.truth_dtype}"
    results: dict[str, dict[str, Any]] = {}
    per: dict[str, ComparisonRecord] = {}
    passed, accuracy = True, {}
    for name, (x, y) in source.input_sets(opts.batch_sizes, opts.seed, opts.max_validation).items():
        truth = source.truth(x)
        _check_interface(meta, x, truth, where, source.batched)
        served = _served(client, model, version, meta, x, max_batch)
        if served.shape != truth.shape:
            raise ConfigError(f"{where} and the entry differ in their outputs: served {list(served.shape)}, "
                              f"entry {list(truth.shape)}")
        c = compare(served, truth, tol)
        per[name] = comparison_record(c, *((served, truth) if source.task == "classification" else ()))
        r = per[name].to_json()
        if source.task == "classification":
            if y is not None:
                r["accuracy"] = float((served.argmax(1) == y).mean())
                if name == "validation":
                    accuracy = {"served_onnx": r["accuracy"], truth_name: float((truth.argmax(1) == y).mean())}
        results[name] = r
        passed &= c.passed
    client.close()
    gate = None
    if reduced:  # fp16/int8: the verifier's gate (top-1 agreement, accuracy drop), not elementwise tolerances
        record, failure = precision_gate(per, accuracy, precision, truth_name, opts, source.task == "classification",
                                         passed)
        passed = failure is None
        gate = record.to_json()
        if failure:
            gate["failure"] = failure
    lines = [f"{'inputs':<14} {'max_abs':>10} {'max_rel':>10} {'top1':>7}  result"]
    for name, r in results.items():
        top1 = f"{r['top1_agreement']:.4f}" if r.get("top1_agreement") is not None else "-"
        lines.append(f"{name:<14} {r['max_abs']:>10.3g} {r['max_rel']:>10.3g} {top1:>7}  "
                     f"{'ok' if r['passed'] else 'FAIL'}")
    if gate:
        lines.append(f"precision {precision}: " + (gate.get("failure") or "gate passed") +
                     (f" (top-1 agreement {gate['top1_agreement']:.4f}, {gate['basis']})"
                      if gate.get("top1_agreement") is not None else ""))
    lines.append(f"{'PASSED' if passed else 'FAILED'}: server {address} model {model} version {version} vs local "
                 f"{source.truth_dtype} reference ({time.perf_counter() - t0:.1f} s)")
    return {"passed": bool(passed), "server": address, "model": model, "version": version, "inputs": results,
            "tolerance": {"rtol": tol.rtol, "atol": tol.atol}, "precision": precision, "gate": gate,
            "table": "\n".join(lines)}
