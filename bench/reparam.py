"""Benchmark sections for issue 22: what branch merging buys, and how long ``fold`` takes on a big program.

* ``reparam``: timm's MobileOne-S0, RepVGG-A0 and FastViT-T8 in their training form (branches, BN kept: what a user who
  only has the exported file would serve) against what ``foldserve fold`` serves (the deploy form), in-process
  in onnxruntime at batch 8 (all graph optimisations on: onnxruntime fuses Conv+BN itself but not branches)
  and over our gRPC at concurrency 1 and 8.
* ``fold_stages``: ``foldserve fold`` of torchvision's ResNet-50 as a ``.pt2``, per stage (export to ONNX,
  the ONNX passes, verification), in total in-process (the goal), and as a command in a fresh process
  (``command_s``: Python's imports and the first use of torch.export's and torch.onnx's machinery included).
"""
from __future__ import annotations

import io
import shutil
import subprocess
import time
import warnings
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from bench.libraries import library, randomize_bn
from bench.loadgen import closed_loop, grpc_sender_factory, median_ms
from bench.process import BIN, FoldserveProcess

INFER = "/inference.GRPCInferenceService/ModelInfer"


def _export(model: Any, size: int) -> Any:
    import onnx
    import torch

    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.randn(1, 3, size, size),), buf, dynamo=False, do_constant_folding=False,
                          opset_version=17, input_names=["input"], output_names=["output"],
                          dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}})
    return onnx.load_from_string(buf.getvalue())


def _ops(model: Any) -> dict[str, int]:
    out: dict[str, int] = {}
    for n in model.graph.node:
        if n.op_type in ("Conv", "BatchNormalization", "Add"):
            out[n.op_type] = out.get(n.op_type, 0) + 1
    return out


def _grpc(port: int, model: str, x: np.ndarray, concurrency: int, n: int) -> dict[str, Any]:
    import asyncio

    from foldserve.client import grpc_infer_request

    payload = grpc_infer_request(model, {"input": x}).SerializeToString()
    return asyncio.run(closed_loop(grpc_sender_factory(f"127.0.0.1:{port}", INFER, payload), concurrency, n,
                                   warmup=5, batch=len(x))).to_dict()


# long function: two models, two forms, in-process and served, in one table
def bench_reparam(work: Path, quick: bool) -> dict[str, Any]:
    try:
        timm = library("timm")
    except ImportError as exc:
        return {"skipped": f"timm is not installed ({exc})"}
    import onnx

    from folding.export import FoldRequest, build_entry
    from folding.onnx_passes import fold_onnx
    from folding.programs import Options
    from folding.verify import VerifyOptions, ort_session

    size = 128 if quick else 224
    n = 5 if quick else 20
    repo = work / "reparam_repo"
    out: dict[str, Any] = {"input": f"8x3x{size}x{size}", "models": {}}
    for name in ("mobileone_s0", "repvgg_a0", "fastvit_t8"):
        model = randomize_bn(timm.create_model(name, pretrained=False))
        training = _export(model, size)
        t0 = time.perf_counter()
        served, _ = fold_onnx(training)
        fold_s = time.perf_counter() - t0
        x8 = np.random.default_rng(0).normal(size=(8, 3, size, size)).astype(np.float32)
        row: dict[str, Any] = {"ops_training": _ops(training), "ops_served": _ops(served), "fold_onnx_s": fold_s}
        for label, m in (("training", training), ("served", served)):
            sess = ort_session(m.SerializeToString(), "all", "cpu")
            row[f"inprocess_b8_ms_{label}"] = median_ms(partial(sess.run, None, {"input": x8}), n)
        row["inprocess_speedup"] = row["inprocess_b8_ms_training"] / row["inprocess_b8_ms_served"]
        src = work / f"{name}.onnx"
        onnx.save(training, str(src))
        build_entry(FoldRequest(src, repo, name, 1, max_batch_size=8, options=Options(),
                                verify_options=VerifyOptions(batch_sizes=(1, 2))))
        shutil.copytree(repo / name, repo / f"{name}_training")          # the training form, served as it is
        cfg = (repo / f"{name}_training" / "config.pbtxt")
        cfg.write_text(cfg.read_text().replace(f'name: "{name}"', f'name: "{name}_training"'))
        vdir = repo / f"{name}_training" / "1"
        shutil.copyfile(vdir / "reference.onnx", vdir / "model.onnx")
        (vdir / "verification.json").unlink()
        out["models"][name] = row
    with FoldserveProcess(repo, "--allow-unverified", log_level="WARNING", timeout=180) as srv:
        for name, row in out["models"].items():
            x8 = np.random.default_rng(1).normal(size=(8, 3, size, size)).astype(np.float32)
            x1 = x8[:1]
            for label, model_name in (("training", f"{name}_training"), ("served", name)):
                row[f"grpc_b8_c1_{label}"] = _grpc(srv.grpc_port, model_name, x8, 1, max(n, 10))
                row[f"grpc_b1_c8_{label}"] = _grpc(srv.grpc_port, model_name, x1, 8, 4 * max(n, 10))
            row["grpc_b8_c1_speedup"] = (row["grpc_b8_c1_training"]["p50_ms"] / row["grpc_b8_c1_served"]["p50_ms"])
    return out


def bench_fold_stages(work: Path, quick: bool) -> dict[str, Any]:
    """``foldserve fold`` of torchvision's ResNet-50 (.pt2), per stage and in total."""
    try:
        tv = library("torchvision")
    except ImportError as exc:
        return {"skipped": f"torchvision is not installed ({exc})"}
    import torch

    from folding.export import FoldRequest, build_entry
    from folding.kinds import PT2
    from folding.onnx_passes import fold_onnx
    from folding.programs import Options
    from folding.verify import VerifyOptions, verify_entry

    arch = "resnet18" if quick else "resnet50"
    model = randomize_bn(getattr(tv.models, arch)())
    src = work / f"{arch}.pt2"
    x = torch.randn(2, 3, 224, 224)
    torch.export.save(torch.export.export(model, (x,), dynamic_shapes=({0: torch.export.Dim("batch", max=1024)},)),
                      str(src))
    repo = work / "fold_repo"
    t0 = time.perf_counter()
    build_entry(FoldRequest(src, repo, arch, 1, options=Options(), verify_options=VerifyOptions()))
    total = time.perf_counter() - t0
    t0 = time.perf_counter()
    reference, _, _ = PT2.reference(src, Options())  # type: ignore[attr-defined]
    export_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    fold_onnx(reference)
    fold_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    report = verify_entry(repo / arch / "1", VerifyOptions(write=False))
    verify_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    cmd = subprocess.run([str(BIN / "foldserve"), "fold", str(src), "--repository", str(work / "fold_repo_cli"),
                          "--name", arch], capture_output=True, text=True)
    command_s = time.perf_counter() - t0
    return {"model": f"torchvision {arch} (.pt2, 224x224, default --batch-sizes 1,7,32)", "total_s": total,
            "export_s": export_s, "fold_s": fold_s, "verify_s": verify_s, "verified": report.passed,
            "command_s": command_s, "command_verified": cmd.returncode == 0}


def goals(r: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    rep = r.get("reparam", {}).get("models", {})
    if "mobileone_s0" in rep:
        m = rep["mobileone_s0"]
        out.append({"goal": "re-parameterisation: MobileOne-S0 as fold serves it >= 3 x its training form, "
                            "in-process at batch 8",
                    "measured": f"{m['inprocess_speedup']:.2f} x ({m['inprocess_b8_ms_training']:.1f} -> "
                                f"{m['inprocess_b8_ms_served']:.1f} ms; gRPC batch 8: {m['grpc_b8_c1_speedup']:.2f} x)",
                    "limit": "3x", "passed": m["inprocess_speedup"] >= 3})
    else:
        out.append({"goal": "re-parameterisation >= 3 x (MobileOne-S0)", "measured": "not run", "limit": "3x",
                    "passed": None})
    f = r.get("fold_stages", {})
    if "total_s" in f:
        out.append({"goal": f"foldserve fold of a {f['model'].split()[1]} .pt2 <= 15 s on this machine",
                    "measured": f"{f['total_s']:.1f} s in-process (export {f['export_s']:.1f}, fold {f['fold_s']:.1f}, "
                                f"verify {f['verify_s']:.1f}); the command in a fresh process "
                                f"{f.get('command_s', float('nan')):.1f} s", "limit": "15 s",
                    "passed": f["total_s"] <= 15})
    return out


def markdown(r: dict[str, Any]) -> list[str]:
    rep = r.get("reparam", {})
    if "models" not in rep:
        return ["", f"Re-parameterisation: {rep.get('skipped', 'not run')}"]
    lines = ["", f"Re-parameterisation (timm, random weights, input {rep['input']}): training form (branches, BN kept) "
                 f"vs what fold serves; onnxruntime with all optimisations", "",
             "| model | Conv / BN / Add (training -> served) | in-process b=8 ms | gRPC b=8 c=1 p50 ms | gRPC b=1 c=8 req/s |",
             "|---|---|---|---|---|"]
    for name, m in rep["models"].items():
        t, s = m["ops_training"], m["ops_served"]
        lines.append(f"| {name} | {t.get('Conv', 0)}/{t.get('BatchNormalization', 0)}/{t.get('Add', 0)} -> "
                     f"{s.get('Conv', 0)}/{s.get('BatchNormalization', 0)}/{s.get('Add', 0)} | "
                     f"{m['inprocess_b8_ms_training']:.1f} -> {m['inprocess_b8_ms_served']:.1f} | "
                     f"{m['grpc_b8_c1_training']['p50_ms']:.1f} -> {m['grpc_b8_c1_served']['p50_ms']:.1f} | "
                     f"{m['grpc_b1_c8_training']['throughput']:.0f} -> {m['grpc_b1_c8_served']['throughput']:.0f} |")
    f = r.get("fold_stages", {})
    if "total_s" in f:
        lines += ["", f"foldserve fold, {f['model']}: {f['total_s']:.1f} s in all (export {f['export_s']:.1f} s, "
                      f"ONNX passes {f['fold_s']:.1f} s, verification {f['verify_s']:.1f} s)"]
    return lines
