"""``foldserve verify --server HOST:PORT --model NAME ENTRY``: verify what a running server serves.

Sends the verifier's inputs to the server over gRPC and compares the served outputs with the local
unfolded reference (the trainer model in float64), end to end: transport, batching, provider and all.
"""
from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from foldserve.errors import ConfigError
from folding.tolerances import compare, tolerance_for
from folding.verify import VerifyOptions, input_sets


def _served(stub, pb, model: str, x: np.ndarray, max_batch: int) -> np.ndarray:
    outs = []
    for start in range(0, len(x), max_batch):
        chunk = np.ascontiguousarray(x[start:start + max_batch], dtype=np.float32)
        req = pb.ModelInferRequest(model_name=model)
        req.inputs.add(name="input", datatype="FP32", shape=list(chunk.shape))
        req.raw_input_contents.append(chunk.tobytes())
        resp = stub.ModelInfer(req, timeout=60)
        shape = list(resp.outputs[0].shape)
        outs.append(np.frombuffer(resp.raw_output_contents[0], dtype=np.float32).reshape(shape))
    return np.concatenate(outs)


def verify_live(address: str, model: str, entry: Path, opts: VerifyOptions) -> dict[str, Any]:
    import grpc

    from folding.export import load_source
    from server.protocol import grpc_service_pb2 as pb
    from server.protocol import grpc_service_pb2_grpc as pb_grpc
    from trainer.checkpoint import model_from_checkpoint

    t0 = time.perf_counter()
    if not (entry / "source.pt").is_file():
        raise ConfigError(f"{entry}: not a repository version written by `foldserve fold` (source.pt missing)")
    ckpt = load_source(entry)
    model64 = copy.deepcopy(model_from_checkpoint(ckpt)).double()
    stub = pb_grpc.GRPCInferenceServiceStub(grpc.insecure_channel(address))
    try:
        cfg = stub.ModelConfig(pb.ModelConfigRequest(name=model), timeout=30).config
    except grpc.RpcError as exc:
        raise ConfigError(f"server {address}: {exc.code().name}: {exc.details()}") from None
    max_batch = max(1, cfg.max_batch_size)
    tol = tolerance_for("float32", opts.rtol, opts.atol)
    results, passed = {}, True
    for name, (x, y) in input_sets(ckpt, opts).items():
        with torch.no_grad():
            truth = model64(torch.from_numpy(x).double()).numpy()
        served = _served(stub, pb, model, x, max_batch)
        c = compare(served, truth, tol)
        entry_r = c.to_dict()
        if ckpt["task"] == "classification":
            entry_r["top1_agreement"] = float((served.argmax(1) == truth.argmax(1)).mean())
            if y is not None:
                entry_r["accuracy"] = float((served.argmax(1) == y).mean())
        results[name] = entry_r
        passed &= c.passed
    lines = [f"{'inputs':<14} {'max_abs':>10} {'max_rel':>10} {'top1':>7}  result"]
    for name, r in results.items():
        top1 = f"{r['top1_agreement']:.4f}" if "top1_agreement" in r else "-"
        lines.append(f"{name:<14} {r['max_abs']:>10.3g} {r['max_rel']:>10.3g} {top1:>7}  {'ok' if r['passed'] else 'FAIL'}")
    lines.append(f"{'PASSED' if passed else 'FAILED'}: server {address} model {model} vs local float64 reference "
                 f"({time.perf_counter() - t0:.1f} s)")
    return {"passed": bool(passed), "server": address, "model": model, "inputs": results,
            "tolerance": {"rtol": tol.rtol, "atol": tol.atol}, "table": "\n".join(lines)}
