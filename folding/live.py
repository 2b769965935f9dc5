"""``foldserve verify --url ADDRESS ENTRY``: verify what a running server serves.

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
from folding.source import Feed, Outputs, as_float64, feed_len, feed_slice
from folding.tolerances import PRECISION_GATES, compare, tolerance_for
from folding.verify import comparison_record, precision_gate, record_key
from foldserve.client import connect
from foldserve.datatypes import lookup
from foldserve.entry import read_precision, split_entry_path
from foldserve.errors import ConfigError
from foldserve.metadata import ModelMetadata
from foldserve.records import ComparisonRecord


def _check_interface(meta: ModelMetadata, feed: Feed, truth: Outputs, where: str, batched: bool) -> None:
    served = {t.name: t for t in (*meta.inputs, *meta.outputs)}
    for what, arrays, tensors in (("input", feed, meta.inputs), ("output", truth, meta.outputs)):
        if sorted(arrays) != sorted(t.name for t in tensors):
            raise ConfigError(f"{where} and the entry differ in their {what}s: served {[t.name for t in tensors]}, "
                              f"the entry's model {list(arrays)}: is it the same model?")
        for name, arr in arrays.items():
            t = served[name]
            shape = ([-1] if batched else [arr.shape[0]]) + list(arr.shape[1:])
            if len(t.shape) != len(shape) or any(s not in (-1, w) for s, w in zip(t.shape[1:], shape[1:],
                                                                                  strict=False)):
                raise ConfigError(f"{where} and the entry differ in their {what}s: served {what} {t.name!r} has shape "
                                  f"{t.shape}, the entry's model {shape}: is it the same model?")


def _served(client, model: str, version: str, meta: ModelMetadata, feed: Feed, max_batch: int) -> Outputs:
    types = {t.name: t.datatype for t in meta.inputs}
    names = [t.name for t in meta.outputs]
    parts = []
    for start in range(0, feed_len(feed), max_batch):
        chunk = {k: np.ascontiguousarray(v) for k, v in feed_slice(feed, start, start + max_batch).items()}
        parts.append(client.infer(model, chunk, version=version, datatypes=types, outputs=names))
    return as_float64({k: np.concatenate([p[k] for p in parts]) for k in names})


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
    dtypes = {t.name: lookup(t.datatype, "v2", f"served input {t.name!r}").numpy for t in meta.inputs}
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
    labelled = source.accuracy_output
    for set_name, (feed, y) in source.input_sets(opts.batch_sizes, opts.seed, opts.max_validation, dtypes).items():
        truth = source.truth(feed)
        _check_interface(meta, feed, truth, where, source.batched)
        served_all = _served(client, model, version, meta, feed, max_batch)
        for out_name, want in truth.items():
            served = served_all[out_name]
            if served.shape != want.shape:
                raise ConfigError(f"{where} and the entry differ in output {out_name!r}: served "
                                  f"{list(served.shape)}, entry {list(want.shape)}")
            key = record_key(set_name, out_name, list(truth))
            c = compare(served, want, tol)
            per[key] = comparison_record(c, *((served, want) if out_name == labelled else ()))
            r = per[key].to_json()
            if out_name == labelled and y is not None:
                r["accuracy"] = float((served.argmax(1) == y).mean())
                if set_name == "validation":
                    accuracy = {"served_onnx": r["accuracy"], truth_name: float((want.argmax(1) == y).mean())}
            results[key] = r
            passed &= c.passed
    client.close()
    gate = None
    if reduced:  # fp16/int8: the verifier's gate (top-1 agreement, accuracy drop), not elementwise tolerances
        record, failure = precision_gate(per, accuracy, precision, truth_name, opts, labelled is not None, passed)
        passed = failure is None
        gate = record.to_json()
        if failure:
            gate["failure"] = failure
    width = max([14, *(len(k) for k in results)])
    lines = [f"{'inputs':<{width}} {'max_abs':>10} {'max_rel':>10} {'top1':>7}  result"]
    for name, r in results.items():
        top1 = f"{r['top1_agreement']:.4f}" if r.get("top1_agreement") is not None else "-"
        lines.append(f"{name:<{width}} {r['max_abs']:>10.3g} {r['max_rel']:>10.3g} {top1:>7}  "
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
