"""``foldserve bench``: the limits, our server and the baselines, measured in one run on one machine.

Sections (each in the JSON report; the Markdown table summarises them):

* ``folding``    fold + verify time of a ResNet-50-sized net; folded vs unfolded inference in torch eager
                 and onnxruntime (optimisations off / all).
* ``inprocess``  onnxruntime in-process on the served model file: p50 at batch 1, throughput per batch.
* ``floors``     bare grpc.aio and uvicorn echo servers with the same payload (the transport's own cost).
* ``server``     our server over gRPC and REST (binary and JSON), with and without dynamic batching.
* ``rest224``    a 3x224x224 input: binary REST vs gRPC vs JSON REST vs a plain FastAPI+pydantic endpoint.
* ``scaling``    Triton's perf_analyzer at concurrency 1/8/32/64 against 1 and 2 workers, with and without
                 system shared memory, on ResNet-20 and the 3x224x224 model; py-spy profiles under load.
* ``pytriton``   tritonserver's own front end (PyTriton) against foldserve with 1 and 2 workers: perf_analyzer over
                 gRPC and HTTP at concurrency 1 and 32, interleaved rounds, CPU time per request
                 (:mod:`bench.frontend`).
* ``balance``    load across 2 workers for a client with two connections: perf_analyzer at concurrency 8, 10 runs
                 with and without hand-off, against an even split (:mod:`bench.balance`).
* ``gpu``        onnxruntime CUDA EP (skipped without a GPU).
* ``tracing``    OpenTelemetry tracing off vs on at rate 1: gRPC p50 at c=1, throughput at c=32.
* ``reparam``    timm's MobileOne-S0 / RepVGG-A0: training form vs what ``fold`` serves (:mod:`bench.reparam`).
* ``burst``      a well-behaved gRPC client's p99 alone and during 5,000 REST + 5,000 gRPC requests at once
                 (:mod:`bench.burst`).
* ``bombs``      the same client's p99 alone and while 20 gzip bombs a second are refused (:mod:`bench.bombs`).
* ``fold_stages`` ``foldserve fold`` of torchvision's ResNet-50 .pt2 per stage (export, fold, verify).
* ``goals``      the issue's goals as ratios from this run, each with pass/fail.
"""
from __future__ import annotations

import asyncio
import datetime as dt
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.balance import bench_balance
from bench.balance import goals as balance_goals
from bench.balance import markdown as balance_markdown
from bench.bombs import bench_bombs
from bench.bombs import goals as bombs_goals
from bench.bombs import markdown as bombs_markdown
from bench.burst import bench_burst
from bench.burst import goals as burst_goals
from bench.burst import markdown as burst_markdown
from bench.frontend import bench_pytriton
from bench.frontend import goals as pytriton_goals
from bench.frontend import markdown as pytriton_markdown
from bench.loadgen import (
    closed_loop,
    free_port,
    grpc_sender_factory,
    http_request_bytes,
    http_sender_factory,
    median_ms,
    percentile,
)
from bench.process import FoldserveProcess, ServerProcess
from bench.reparam import bench_fold_stages, bench_reparam
from bench.reparam import goals as reparam_goals
from bench.reparam import markdown as reparam_markdown
from bench.tracing import bench_tracing
from bench.tracing import markdown as tracing_markdown
from foldserve.atomic import write_json, write_text
from foldserve.entry import INPUT_NAME

ROOT = Path(__file__).resolve().parent.parent


# --- models -----------------------------------------------------------------------------------------

def make_entry(repo: Path, name: str, arch: str, input_shape: list[int], num_classes: int = 10,
               overrides: dict | None = None, max_batch_size: int = 64) -> Path:
    """An untrained model with non-trivial BN statistics, folded and verified into ``repo/name/1``."""
    import torch

    from folding.export import FoldRequest, build_entry
    from folding.verify import VerifyOptions
    from trainer.checkpoint import save_checkpoint
    from trainer.models import build_model, resolve_arch_args

    torch.manual_seed(0)
    args = resolve_arch_args(arch, input_shape, num_classes, "before", overrides)
    model = build_model(arch, args)
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    ckpt_path = repo.parent / f"{name}.pt"
    save_checkpoint(ckpt_path, {"arch": arch, "arch_args": args, "model_state": model.state_dict(),
                                "task": "classification", "class_names": [str(i) for i in range(num_classes)],
                                "normalization": {"mean": [0.0] * input_shape[0], "std": [1.0] * input_shape[0]},
                                "input_shape": input_shape, "dataset": {"name": "random"}, "epoch": 0})
    build_entry(FoldRequest(ckpt_path, repo, name, 1, max_batch_size=max_batch_size,
                            verify_options=VerifyOptions(batch_sizes=(1, 4))))
    return repo / name / "1" / "model.onnx"


# --- sections ------------------------------------------------------------------------------------------

def bench_folding(quick: bool) -> dict[str, Any]:
    import torch

    from folding import fold_module, fold_onnx
    from folding.onnx_io import export_torchscript
    from folding.verify import ort_session
    from trainer.models import build_model, resolve_arch_args

    shape = [3, 64, 64]
    args = resolve_arch_args("resnet", shape, 1000, "before",
                             {"block": "bottleneck", "blocks": 4, "width": 64, "stages": 4, "stem_stride": 2})
    model = build_model("resnet", args).eval()
    x = torch.randn(8, *shape)
    t0 = time.perf_counter()
    folded, report = fold_module(model, (x,))
    fold_torch_s = time.perf_counter() - t0
    reference = export_torchscript(model, x[:2], "input", "output", keep_bn=True)
    t0 = time.perf_counter()
    folded_onnx, onnx_report = fold_onnx(reference)
    fold_onnx_s = time.perf_counter() - t0

    n = 3 if quick else 10
    with torch.no_grad():
        eager_unfolded = median_ms(lambda: model(x), n)
        eager_folded = median_ms(lambda: folded(x), n)
    xn = x.numpy()
    ort_ms = {}
    for label, m in (("unfolded", reference), ("folded", folded_onnx)):
        for level in ("disable", "all"):
            sess = ort_session(m.SerializeToString(), level, "cpu")
            ort_ms[f"{label}_{level}"] = median_ms(lambda: sess.run(None, {"input": xn}), n)
    params = sum(p.numel() for p in model.parameters())
    return {"model": f"ResNet-50-sized (bottleneck 4x4, width 64, {params / 1e6:.1f} M parameters), input "
                     f"8x{'x'.join(map(str, shape))}",
            "bn_folded": len(report.folded), "fold_module_s": fold_torch_s, "fold_onnx_s": fold_onnx_s,
            "torch_eager_ms": {"unfolded": eager_unfolded, "folded": eager_folded},
            "onnxruntime_ms": ort_ms, "onnx_bn_folded": len(onnx_report.folded)}


def bench_inprocess(model_path: Path, shape: list[int], quick: bool) -> dict[str, Any]:
    from folding.verify import ort_session

    sess = ort_session(model_path, "all", "cpu")
    out: dict[str, Any] = {"batch": {}}
    for b in (1, 8, 32, 64):
        x = np.random.rand(b, *shape).astype(np.float32)
        sess.run(None, {"input": x})
        n = max(5, (50 if quick else 200) // b)
        times = []
        for _ in range(n):
            t = time.perf_counter()
            sess.run(None, {"input": x})
            times.append(time.perf_counter() - t)
        p50 = percentile(times, 50)
        out["batch"][b] = {"p50_ms": p50 * 1000, "samples_per_s": b / p50}
    out["p50_ms_batch1"] = out["batch"][1]["p50_ms"]
    out["best_samples_per_s"] = max(v["samples_per_s"] for v in out["batch"].values())
    return out


def _infer_grpc_payload(model: str, x: np.ndarray) -> bytes:
    """A serialised ModelInferRequest, built by the project's one v2 client."""
    from foldserve.client import grpc_infer_request

    return grpc_infer_request(model, {INPUT_NAME: x}).SerializeToString()


def _infer_http_payloads(model: str, x: np.ndarray, port: int) -> tuple[bytes, bytes]:
    """(binary-extension request, plain JSON request) as raw HTTP bytes."""
    from foldserve.client import http_infer_body

    path = f"/v2/models/{model}/infer"
    body, headers = http_infer_body({INPUT_NAME: x})
    binary = http_request_bytes("127.0.0.1", port, path, body, headers)
    body = json.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": list(x.shape),
                                   "data": x.reshape(-1).tolist()}]}).encode()
    return binary, http_request_bytes("127.0.0.1", port, path, body)


def _run(coro):
    return asyncio.run(coro)


def bench_floors(payload_bytes: int, concurrencies: list[int], n: int) -> dict[str, Any]:
    out: dict[str, Any] = {"payload_bytes": payload_bytes}
    payload = os.urandom(payload_bytes)
    gport, hport = free_port(), free_port()
    g = ServerProcess([sys.executable, "-m", "bench.loadgen", "grpc", str(gport)], "ready")
    h = ServerProcess([sys.executable, "-m", "bench.loadgen", "http", str(hport)], "ready")
    try:
        out["grpc_echo"] = {c: _run(closed_loop(grpc_sender_factory(f"127.0.0.1:{gport}", "/echo.Echo/Echo", payload),
                                                c, n)).to_dict() for c in concurrencies}
        raw = http_request_bytes("127.0.0.1", hport, "/echo", payload, {"Content-Type": "application/octet-stream"})
        out["http_echo"] = {c: _run(closed_loop(http_sender_factory("127.0.0.1", hport, raw), c, n)).to_dict()
                            for c in concurrencies}
    finally:
        g.stop()
        h.stop()
    return out


def start_server(repo: Path, batching: bool, extra: list[str] | None = None) -> tuple[ServerProcess, int, int]:
    """Our server in its own process (the load generator runs in this one)."""
    srv = FoldserveProcess(repo, "--batching" if batching else "--no-batching", *(extra or []), log_level="WARNING",
                           timeout=120)
    return srv, srv.http_port, srv.grpc_port


def bench_server(repo: Path, model: str, x: np.ndarray, concurrencies: list[int], n: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for label, batching, extra in (("batching", True, []), ("batching_eager", True, ["--batch-policy", "eager"]),
                                   ("no_batching", False, [])):
        proc, hport, gport = start_server(repo, batching, extra)
        try:
            gp = _infer_grpc_payload(model, x)
            binary, js = _infer_http_payloads(model, x, hport)
            res = {"grpc": {}, "rest_binary": {}, "rest_json": {}}
            pids = proc.pids()
            for c in concurrencies:
                res["grpc"][c] = _run(closed_loop(grpc_sender_factory(f"127.0.0.1:{gport}",
                                                                      "/inference.GRPCInferenceService/ModelInfer", gp),
                                                  c, n, batch=len(x), server_pids=pids)).to_dict()
                res["rest_binary"][c] = _run(closed_loop(http_sender_factory("127.0.0.1", hport, binary), c, n,
                                                         batch=len(x), server_pids=pids)).to_dict()
                if c <= 8 or label == "no_batching":
                    res["rest_json"][c] = _run(closed_loop(http_sender_factory("127.0.0.1", hport, js), c,
                                                           max(n // 2, 20), batch=len(x), server_pids=pids)).to_dict()
            out[label] = res
        finally:
            proc.stop()
    return out


def bench_rest224(repo: Path, model: str, model_path: Path, quick: bool) -> dict[str, Any]:
    x = np.random.rand(1, 3, 224, 224).astype(np.float32)
    n = 30 if quick else 100
    proc, hport, gport = start_server(repo, False)
    out: dict[str, Any] = {"input": "1x3x224x224 FP32 (602 KB)"}
    try:
        gp = _infer_grpc_payload(model, x)
        binary, js = _infer_http_payloads(model, x, hport)
        out["grpc"] = _run(closed_loop(grpc_sender_factory(f"127.0.0.1:{gport}",
                                                           "/inference.GRPCInferenceService/ModelInfer", gp),
                                       1, n, warmup=5)).to_dict()
        out["rest_binary"] = _run(closed_loop(http_sender_factory("127.0.0.1", hport, binary), 1, n, warmup=5)).to_dict()
        out["rest_json"] = _run(closed_loop(http_sender_factory("127.0.0.1", hport, js), 1, max(n // 3, 10),
                                            warmup=3)).to_dict()
    finally:
        proc.stop()
    port = free_port()
    naive = ServerProcess([sys.executable, "-m", "bench.naive", str(port), str(model_path)], "ready")
    try:
        time.sleep(1.0)
        _, js_naive = _infer_http_payloads(model, x, port)
        out["naive_fastapi_json"] = _run(closed_loop(http_sender_factory("127.0.0.1", port, js_naive), 1,
                                                     5 if quick else 10, warmup=1)).to_dict()
    finally:
        naive.stop()
    return out


def bench_models(repo: Path, models: dict[str, tuple[Path, list[int]]], quick: bool) -> dict[str, Any]:
    """Each model: in-process onnxruntime, and our gRPC at concurrency 1 and 32 (batching on)."""
    out: dict[str, Any] = {}
    n = 100 if quick else 400
    proc, hport, gport = start_server(repo, True)
    try:
        for name, (path, shape) in models.items():
            x = np.random.rand(1, *shape).astype(np.float32)
            gp = _infer_grpc_payload(name, x)
            make = lambda: grpc_sender_factory(f"127.0.0.1:{gport}", "/inference.GRPCInferenceService/ModelInfer", gp)
            inproc = bench_inprocess(path, shape, quick)
            out[name] = {"input": "x".join(map(str, shape)), "inprocess_p50_ms_batch1": inproc["p50_ms_batch1"],
                         "inprocess_best_samples_per_s": inproc["best_samples_per_s"],
                         "grpc_c1": _run(closed_loop(make(), 1, max(n // 4, 20))).to_dict(),
                         "grpc_c32": _run(closed_loop(make(), 32, n)).to_dict()}
    finally:
        proc.stop()
    return out


def bench_peers(repo: Path, model_path: Path, x: np.ndarray, concurrencies: list[int], n: int, quick: bool,
                work: Path) -> dict[str, Any]:
    """perf_analyzer against our server, and MLServer under the same client and batching limits."""
    from bench import peers

    out: dict[str, Any] = {}
    if quick:
        out["perf_analyzer"] = {"skipped": "--quick (the full run sets perf_analyzer up and runs it)"}
        out["mlserver"] = {"skipped": "--quick (the full run sets MLServer up in its own venv and runs it)"}
        return out
    cmd = peers.ensure_perf_analyzer()
    if isinstance(cmd, str):
        out["perf_analyzer"] = {"skipped": cmd}
    else:
        res = {}
        for label, batching in (("batching", True), ("no_batching", False)):
            proc, hport, gport = start_server(repo, batching)
            try:
                res[label] = peers.perf_analyzer(cmd, "resnet20", f"127.0.0.1:{gport}", concurrencies, work,
                                                 server_pids=proc.pids())
            finally:
                proc.stop()
        out["perf_analyzer"] = res
    exe = peers.ensure_mlserver()
    if isinstance(exe, str):
        out["mlserver"] = {"skipped": exe}
        return out
    hport, gport = free_port(), free_port()
    try:
        peer = peers.MLServerPeer(exe, model_path, "resnet20", 64, 0.002, hport, gport, work)
    except RuntimeError as exc:
        out["mlserver"] = {"skipped": str(exc)}
        return out
    try:
        gp = _infer_grpc_payload("resnet20", x)
        pids = peers.process_tree(peer.proc.pid)
        grpc_res = {c: _run(closed_loop(grpc_sender_factory(f"127.0.0.1:{gport}",
                                                            "/inference.GRPCInferenceService/ModelInfer", gp),
                                        c, n, batch=len(x), server_pids=pids)).to_dict() for c in concurrencies}
        out["mlserver"] = {"version": peers.MLSERVER_VERSION, "max_batch_size": 64, "max_batch_time_s": 0.002,
                           "grpc": grpc_res}
        if not isinstance(cmd, str):
            out["mlserver"]["perf_analyzer"] = peers.perf_analyzer(cmd, "resnet20", f"127.0.0.1:{gport}",
                                                                   concurrencies, work,
                                                                   server_pids=peers.process_tree(peer.proc.pid))
    finally:
        peer.stop()
    return out


SCALING_MODELS = ("resnet20", "resnet18")


def bench_scaling(repo: Path, quick: bool, work: Path) -> dict[str, Any]:
    """Triton's perf_analyzer (a C++ client: the load generator costs little CPU) at concurrency 1/8/32/64
    against 1 and 2 workers, with and without system shared memory, on ResNet-20 (3x32x32) and the
    3x224x224 model, dynamic batching on; and py-spy profiles of the servers under load at concurrency 32."""
    from bench import peers

    if quick:
        return {"skipped": "--quick (the full run sets perf_analyzer up and runs it)"}
    cmd = peers.ensure_perf_analyzer()
    if isinstance(cmd, str):
        return {"skipped": cmd}
    conc = [1, 8, 32, 64]
    out: dict[str, Any] = {"concurrencies": conc, "runs": {}, "profiles": {}, "server_split": {}}
    for model in SCALING_MODELS:
        for workers in (1, 2):
            proc, _, gport = start_server(repo, True, ["--workers", str(workers), "--batch-policy", "eager"])
            address = f"127.0.0.1:{gport}"
            try:
                for shm in (False, True):
                    extra = ["--shared-memory", "system"] if shm else []
                    key = f"{model} workers={workers} {'shm' if shm else 'grpc'}"
                    out["runs"][key] = peers.perf_analyzer(cmd, model, address, conc, work, interval_ms=2000,
                                                           extra=extra, server_pids=proc.pids())
                    if (model == "resnet20" and not shm) or (model == "resnet18" and shm and workers == 1):
                        prof = peers.perf_analyzer(cmd, model, address, [32 if model == "resnet20" else 1], work,
                                                   interval_ms=2000, extra=extra,
                                                   during=lambda c: peers.profile(proc.pids()))
                        run = next(iter(prof.values()))
                        out["profiles"][key] = run.get("profile", {"skipped": "run failed"})
                        out["server_split"][key] = run.get("server", {"skipped": "perf_analyzer printed no Server: "
                                                                                 "section"})
                if model == "resnet20":   # MLServer cannot be driven by perf_analyzer: this client, last (its
                    # connections stay open until the server stops, and would count in the splits above)
                    x = np.random.rand(1, 3, 32, 32).astype(np.float32)
                    sender = grpc_sender_factory(address, "/inference.GRPCInferenceService/ModelInfer",
                                                 _infer_grpc_payload(model, x))
                    out.setdefault("python_client_c32", {})[f"workers={workers}"] = _run(
                        closed_loop(sender, 32, 2000)).to_dict()
            finally:
                proc.stop()
    return out


def _pa(r: dict[str, Any], key: str, c: int) -> dict[str, Any] | None:
    v = r.get("scaling", {}).get("runs", {}).get(key, {}).get(c)
    return v if v and "error" not in v else None


def _best_scaling(r: dict[str, Any]) -> tuple[str, dict[str, Any]] | None:
    """perf_analyzer's best ResNet-20 run at concurrency 32 (its name and figures), or None."""
    sc = r.get("scaling", {})
    if not isinstance(sc, dict) or "runs" not in sc:
        return None
    best = max(((k, _pa(r, k, 32)) for k in sc["runs"] if k.startswith("resnet20 ")),
               key=lambda kv: kv[1]["throughput"] if kv[1] else -1, default=None)
    return best if best and best[1] else None


def scaling_goals(r: dict[str, Any]) -> list[dict[str, Any]]:
    """The serving goals from perf_analyzer's figures (issue 14), each with where the time goes if missed."""
    sc = r.get("scaling", {})
    if "runs" not in sc:
        return [{"goal": "serving goals measured with perf_analyzer", "measured": "not run", "limit": "-",
                 "passed": None, "skipped": sc.get("skipped", "no perf_analyzer")}]
    g = []
    inp, fl = r["inprocess"], r["floors"]
    where = lambda key: sc["profiles"].get(key, {}).get("stages_pct")
    best = _best_scaling(r)
    limit = 0.7 * inp["batch"][32]["samples_per_s"]
    if best:
        g.append({"goal": "perf_analyzer: throughput at concurrency 32 with batching >= 0.7 x in-process batch-32 "
                          "samples/s (ResNet-20)", "measured": f"{best[1]['throughput']:.0f} req/s ({best[0]})",
                  "limit": f"{limit:.0f} req/s", "passed": best[1]["throughput"] >= limit,
                  "where": where("resnet20 workers=1 grpc")})
    one = _pa(r, "resnet20 workers=1 grpc", 1)
    if one:
        bound = inp["p50_ms_batch1"] + 1.2 * fl["grpc_echo"][1]["p50_ms"]
        g.append({"goal": "perf_analyzer: gRPC p50 at batch 1 <= in-process p50 + 1.2 x bare gRPC echo p50",
                  "measured": f"{one['p50_ms']:.3f} ms", "limit": f"{bound:.3f} ms", "passed": one["p50_ms"] <= bound,
                  "where": where("resnet20 workers=1 grpc")})
    shm224 = _pa(r, "resnet18 workers=1 shm", 1)
    base = r.get("models", {}).get("resnet18", {}).get("inprocess_p50_ms_batch1")
    if shm224 and base:
        g.append({"goal": "perf_analyzer: with system shared memory at 3x224x224, p50 within 1.1 x in-process "
                          "onnxruntime", "measured": f"{shm224['p50_ms']:.2f} ms", "limit": f"{1.1 * base:.2f} ms",
                  "passed": shm224["p50_ms"] <= 1.1 * base, "where": where("resnet18 workers=1 shm")})
    return g


def plot(report: dict[str, Any], path: Path) -> None:
    """PNG: latency (p50, p99) and throughput vs concurrency for each target (our load generator)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = {}
    for mode, res in report["server"].items():
        for proto in ("grpc", "rest_binary"):
            series[f"foldserve {proto} ({mode})"] = res[proto]
    for name in ("grpc_echo", "http_echo"):
        series[f"bare {name}"] = report["floors"][name]
    ml = report.get("peers", {}).get("mlserver", {})
    if "grpc" in ml:
        series["MLServer grpc (adaptive batching)"] = ml["grpc"]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 4.5))
    for label, pts in series.items():
        cs = sorted(int(c) for c in pts)
        a1.plot(cs, [pts[c if c in pts else str(c)]["p50_ms"] for c in cs], marker="o", label=label)
        a2.plot(cs, [pts[c if c in pts else str(c)]["throughput"] for c in cs], marker="o", label=label)
    for a, ylabel in ((a1, "p50 latency (ms)"), (a2, "throughput (req/s)")):
        a.set_xscale("log", base=2)
        a.set_xlabel("concurrency")
        a.set_ylabel(ylabel)
        a.grid(alpha=0.3)
    a1.set_yscale("log")
    a2.set_yscale("log")
    a2.legend(fontsize=7, loc="best")
    fig.suptitle(f"ResNet-20 3x32x32, batch 1 per request - {report['meta']['machine']}")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def bench_gpu(model_path: Path) -> dict[str, Any]:
    from server.core.runtime import gpu_count

    if gpu_count() == 0:
        return {"skipped": "no CUDA device visible"}
    from folding.verify import ort_session

    out = {}
    sess = ort_session(model_path, "all", "cuda")
    for b in (1, 64):
        x = np.random.rand(b, 3, 32, 32).astype(np.float32)
        sess.run(None, {"input": x})
        t = time.perf_counter()
        for _ in range(20):
            sess.run(None, {"input": x})
        out[f"batch{b}_samples_per_s"] = 20 * b / (time.perf_counter() - t)
    out["provider"] = sess.get_providers()[0]
    return out


def _precision_entries(work: Path, quick: bool) -> tuple[Path, dict[str, Any]]:
    """ResNet-20 trained on digits32 (3x32x32) as fp32 and int8 (fp16 too when a GPU is visible), and the
    ResNet-18-sized model (untrained, calibrated on random inputs: agreement only) unless --quick."""
    from folding.export import FoldRequest, build_entry
    from folding.programs import Options
    from folding.verify import VerifyOptions
    from foldserve.records import PRECISIONS
    from server.core.runtime import gpu_count
    from trainer.train import TrainConfig, train

    repo = work / "precision"
    run_dir = work / "r20_digits32"
    t = time.perf_counter()
    train(TrainConfig(arch="resnet20", dataset="digits32", out=str(run_dir), epochs=2 if quick else 8, progress=False))
    info: dict[str, Any] = {"train_s": round(time.perf_counter() - t, 1), "entries": {}}
    precisions = [p for p in PRECISIONS if p != "fp16" or gpu_count()]      # fp16 pays on a GPU only
    opts = VerifyOptions(batch_sizes=(1, 8))
    jobs = [(f"resnet20_{p}", run_dir / "checkpoint.pt", p, Options()) for p in precisions]
    if not quick:
        r18 = make_entry(repo, "resnet18_fp32", "resnet18", [3, 224, 224], max_batch_size=32)
        calib = work / "r18_calibration.npz"
        np.savez(calib, x=np.random.default_rng(0).normal(size=(32, 3, 224, 224)).astype(np.float32))
        info["entries"]["resnet18_fp32"] = {"precision": "fp32", "verified": True, "model": str(r18)}
        jobs.append(("resnet18_int8", work / "resnet18_fp32.pt", "int8", Options(calibration_data=str(calib))))
    for name, src, precision, options in jobs:
        t = time.perf_counter()
        v = build_entry(FoldRequest(src, repo, name, 1, precision=precision, verify_options=opts, options=options,
                                    max_batch_size=32)).verification
        if v is None:
            raise RuntimeError(f"{name}: the entry was not verified")
        gate, served = v.precision.gate, v.served
        info["entries"][name] = {
            "precision": precision, "fold_s": round(time.perf_counter() - t, 1), "verified": v.passed,
            "failure": v.failure, "accuracy": v.accuracy.get("served_onnx"),
            "accuracy_float64": v.accuracy.get("reference_float64"),
            "top1_agreement": gate.top1_agreement if gate and gate.top1_agreement is not None
            else served.top1_agreement if served else None}
    return repo, info


def bench_precision(work: Path, quick: bool) -> dict[str, Any]:
    """fp32 vs int8 (CPU) and fp32 vs fp16 (GPU): in-process samples/s and p50 at batch 32, served gRPC at
    concurrency 1 and 32 (batch-1 requests, dynamic batching), accuracy next to speed."""
    from folding.verify import ort_session
    from server.core.runtime import gpu_count

    repo, info = _precision_entries(work, quick)
    shapes = {name: [3, 224, 224] if name.startswith("resnet18") else [3, 32, 32] for name in info["entries"]}
    for name, e in info["entries"].items():        # in-process first: no server competing for the cores
        devices = ["cpu"] + (["cuda"] if gpu_count() and e["precision"] in ("fp32", "fp16") else [])
        for device in devices:
            if device == "cpu" and e["precision"] == "fp16":
                continue
            sess = ort_session(repo / name / "1" / "model.onnx", "all", device)
            x32 = (np.random.rand(32, *shapes[name]) * 255).astype(np.float32)
            sess.run(None, {INPUT_NAME: x32})
            times = []
            for _ in range(5 if quick else 30):
                t = time.perf_counter()
                sess.run(None, {INPUT_NAME: x32})
                times.append(time.perf_counter() - t)
            p50 = percentile(times, 50)
            e[f"inprocess_{device}_b32"] = {"p50_ms": p50 * 1000, "samples_per_s": 32 / p50}
            del sess
    n = 100 if quick else 400
    unverified = any(not e.get("verified", True) for e in info["entries"].values())
    proc, hport, gport = start_server(repo, True, ["--allow-unverified"] if unverified else [])
    try:
        for name, e in info["entries"].items():
            gp = _infer_grpc_payload(name, (np.random.rand(1, *shapes[name]) * 255).astype(np.float32))
            make = lambda: grpc_sender_factory(f"127.0.0.1:{gport}", "/inference.GRPCInferenceService/ModelInfer", gp)
            e["grpc_c1"] = _run(closed_loop(make(), 1, max(n // 4, 20))).to_dict()
            e["grpc_c32"] = _run(closed_loop(make(), 32, n)).to_dict()
    finally:
        proc.stop()
    return info


def mlserver_goal(r: dict[str, Any]) -> dict[str, Any]:
    """The one MLServer goal (>= 2 x its throughput at concurrency 32, lower p99), from the best evidence this run
    has: perf_analyzer against both, else the same Python client against both (perf_analyzer cannot drive
    MLServer, which has no ModelConfig RPC), else our load generator's batching run."""
    ml = r.get("peers", {}).get("mlserver", {})
    sc = r.get("scaling", {})
    best = _best_scaling(r)
    ml_pa = ml.get("perf_analyzer", {}).get(32) if isinstance(ml.get("perf_analyzer"), dict) else None
    ours = sc.get("python_client_c32", {}) if isinstance(sc, dict) else {}
    if best and ml_pa and "error" not in ml_pa:
        ratio = best[1]["throughput"] / ml_pa["throughput"]
        return {"goal": "perf_analyzer: >= 2 x MLServer's throughput at concurrency 32, with lower p99",
                "measured": f"{ratio:.1f}x ({best[1]['throughput']:.0f} vs {ml_pa['throughput']:.0f} req/s); "
                            f"p99 {best[1]['p99_ms']:.1f} vs {ml_pa['p99_ms']:.1f} ms", "limit": "2x, lower p99",
                "passed": ratio >= 2 and best[1]["p99_ms"] < ml_pa["p99_ms"]}
    if "grpc" in ml and ours:
        theirs = ml["grpc"][32]
        # the configuration that meets both halves of the goal if one does (a user picks the worker count)
        label, top = max(ours.items(), key=lambda kv: (kv[1]["throughput"] >= 2 * theirs["throughput"]
                                                        and kv[1]["p99_ms"] < theirs["p99_ms"],
                                                        kv[1]["throughput"]))
        ratio = top["throughput"] / theirs["throughput"]
        return {"goal": ">= 2 x MLServer's throughput at concurrency 32, with lower p99 (the same Python client on "
                        "both: perf_analyzer cannot drive MLServer, which has no ModelConfig RPC)",
                "measured": f"{ratio:.1f}x ({top['throughput']:.0f} req/s, {label}, vs {theirs['throughput']:.0f}); "
                            f"p99 {top['p99_ms']:.1f} vs {theirs['p99_ms']:.1f} ms", "limit": "2x, lower p99",
                "passed": ratio >= 2 and top["p99_ms"] < theirs["p99_ms"]}
    if "grpc" in ml:
        ours_b, theirs = r["server"]["batching"]["grpc"][32], ml["grpc"][32]
        ratio = ours_b["throughput"] / theirs["throughput"]
        return {"goal": ">= 2 x MLServer's throughput at concurrency 32, and lower p99 (same model, client, "
                        "batching limits)", "measured": f"{ratio:.1f}x ({ours_b['throughput']:.0f} vs "
                        f"{theirs['throughput']:.0f} req/s); p99 {ours_b['p99_ms']:.1f} vs {theirs['p99_ms']:.1f} ms",
                "limit": "2x, lower p99", "passed": ratio >= 2 and ours_b["p99_ms"] < theirs["p99_ms"]}
    return {"goal": ">= 2 x MLServer's throughput at concurrency 32", "measured": "not run", "limit": "2x",
            "passed": None, "skipped": ml.get("skipped", "no MLServer")}


def goals(r: dict[str, Any]) -> list[dict[str, Any]]:
    g = []
    inp, fl, srv = r["inprocess"], r["floors"], r["server"]
    c_hi = 32
    grpc_p50 = srv["no_batching"]["grpc"][1]["p50_ms"]
    bound = inp["p50_ms_batch1"] + 1.2 * fl["grpc_echo"][1]["p50_ms"]
    g.append({"goal": "gRPC p50 at batch 1 <= in-process p50 + 1.2 x bare gRPC echo p50",
              "measured": f"{grpc_p50:.3f} ms", "limit": f"{bound:.3f} ms", "passed": grpc_p50 <= bound})
    thr = srv["batching"]["grpc"][c_hi]["throughput"]
    limit = 0.7 * min(inp["batch"][32]["samples_per_s"], fl["grpc_echo"][c_hi]["throughput"])
    g.append({"goal": f"throughput at concurrency {c_hi} with batching >= 0.7 x min(in-process batch 32, "
                      f"gRPC echo at {c_hi})", "measured": f"{thr:.0f} req/s", "limit": f"{limit:.0f} req/s",
              "passed": thr >= limit})
    r224 = r["rest224"]
    g.append({"goal": "binary REST p50 <= 1.3 x gRPC p50 at 3x224x224",
              "measured": f"{r224['rest_binary']['p50_ms']:.2f} ms", "limit": f"{1.3 * r224['grpc']['p50_ms']:.2f} ms",
              "passed": r224["rest_binary"]["p50_ms"] <= 1.3 * r224["grpc"]["p50_ms"]})
    json_bound = 1.5 * r224["rest_binary"]["p50_ms"]
    g.append({"goal": "JSON REST p50 <= 1.5 x binary REST p50 at 3x224x224",
              "measured": f"{r224['rest_json']['p50_ms']:.2f} ms (a plain FastAPI+pydantic endpoint: "
                          f"{r224['naive_fastapi_json']['p50_ms']:.0f} ms)", "limit": f"{json_bound:.2f} ms",
              "passed": r224["rest_json"]["p50_ms"] <= json_bound})
    g.append(mlserver_goal(r))
    pe = r.get("precision", {}).get("entries", {})
    if "resnet20_int8" in pe and "resnet20_fp32" in pe:
        fp, q8 = pe["resnet20_fp32"], pe["resnet20_int8"]
        speed = q8["inprocess_cpu_b32"]["samples_per_s"] / fp["inprocess_cpu_b32"]["samples_per_s"]
        drop = (fp["accuracy_float64"] - q8["accuracy"]) * 100
        g.append({"goal": "int8 >= 1.5 x fp32 in-process throughput at batch 32 on the CPU, <= 1 point of accuracy "
                          "lost (ResNet-20, 3x32x32)", "measured": f"{speed:.2f}x ({q8['inprocess_cpu_b32']['samples_per_s']:.0f} "
                          f"vs {fp['inprocess_cpu_b32']['samples_per_s']:.0f} samples/s), accuracy {q8['accuracy']:.4f} vs "
                          f"{fp['accuracy_float64']:.4f} (float64)", "limit": "1.5x, 1 point",
                  "passed": speed >= 1.5 and drop <= 1.0 and q8["verified"]})
    g += scaling_goals(r)
    g += pytriton_goals(r)
    g += balance_goals(r)
    f = r["folding"]
    g.append({"goal": "fold a ResNet-50-sized model in < 2 s", "measured": f"{f['fold_module_s']:.2f} s (torch.fx), "
              f"{f['fold_onnx_s']:.2f} s (ONNX)", "limit": "2 s", "passed": max(f["fold_module_s"], f["fold_onnx_s"]) < 2})
    g += reparam_goals(r)
    g += burst_goals(r)
    g += bombs_goals(r)
    return g


def _by_c(points: dict) -> list:
    """Concurrency points in numeric order (JSON keys come back as sorted strings)."""
    return sorted(points.items(), key=lambda kv: int(kv[0]))


def markdown(report: dict[str, Any]) -> str:
    """The Markdown summary of a report (as run() returns it or as latest.json holds it)."""
    r = _intkeys(report)
    m = r["meta"]
    lines = [f"Benchmark of {m['date']} on {m['machine']} (commit {m['commit']}, quick={m['quick']}).", ""]
    lines += ["| goal | measured | limit | result |", "|---|---|---|---|"]
    lines += [f"| {g['goal']} | {g['measured']} | {g['limit']} | "
              f"{'skipped' if g['passed'] is None else 'pass' if g['passed'] else 'MISS'} |" for g in r["goals"]]
    for g in r["goals"]:
        if g.get("passed") is False and g.get("where"):
            lines.append(f"\nMISS, {g['goal']}: where the server's time goes (py-spy, share of samples): "
                         + ", ".join(f"{k} {v}%" for k, v in g["where"].items()))
    lines += ["", "ResNet-20 (3x32x32, batch 1 per request): p50 / p99 latency (ms), throughput (req/s) and the "
                  "serving processes' CPU time per request (ms)", "",
              "| target | concurrency | p50 | p99 | req/s | CPU ms/request |", "|---|---|---|---|---|---|"]
    inp = r["inprocess"]
    lines.append(f"| in-process onnxruntime (batch 1) | 1 | {inp['p50_ms_batch1']:.3f} | - | "
                 f"{1000 / inp['p50_ms_batch1']:.0f} | - |")
    lines.append(f"| in-process onnxruntime (batch 32) | - | {inp['batch'][32]['p50_ms']:.3f} | - | "
                 f"{inp['batch'][32]['samples_per_s']:.0f} samples/s | - |")
    for name in ("grpc_echo", "http_echo"):
        for c, v in _by_c(r["floors"][name]):
            lines.append(f"| bare {name.replace('_', ' ')} | {c} | {v['p50_ms']:.3f} | {v['p99_ms']:.3f} | "
                         f"{v['throughput']:.0f} | - |")
    for mode, res in r["server"].items():
        for proto, per_c in res.items():
            for c, v in _by_c(per_c):
                lines.append(f"| foldserve {proto} ({mode.replace('_', ' ')}) | {c} | {v['p50_ms']:.3f} | "
                             f"{v['p99_ms']:.3f} | {v['throughput']:.0f} | {v.get('cpu_ms_per_request', '-')} |")
    peers_r = r.get("peers", {})
    ml = peers_r.get("mlserver", {})
    for c, v in _by_c(ml.get("grpc", {})):
        lines.append(f"| MLServer {ml.get('version', '')} grpc (adaptive batching) | {c} | {v['p50_ms']:.3f} | "
                     f"{v['p99_ms']:.3f} | {v['throughput']:.0f} | {v.get('cpu_ms_per_request', '-')} |")
    pa = peers_r.get("perf_analyzer", {})
    if "skipped" not in pa and pa:
        lines += ["", "Triton's perf_analyzer (gRPC, ResNet-20): req/s, p50 / p99 (ms), the serving processes' CPU "
                      "time per request (ms)", "",
                  "| target | concurrency | req/s | p50 | p99 | CPU ms/request |", "|---|---|---|---|---|---|"]
        rows = [(f"foldserve ({mode.replace('_', ' ')})", res) for mode, res in pa.items()]
        if isinstance(ml.get("perf_analyzer"), dict):
            rows.append(("MLServer", ml["perf_analyzer"]))
        for label, res in rows:
            for c, v in _by_c(res):
                if "error" in v:
                    reason = next((ln.strip() for ln in v["error"].splitlines() if "rror" in ln or "ailed" in ln),
                                  "error")
                    lines.append(f"| {label} | {c} | {reason[:90]} | - | - | - |")
                else:
                    lines.append(f"| {label} | {c} | {v['throughput']:.0f} | {v['p50_ms']:.2f} | {v['p99_ms']:.2f} | "
                                 f"{v.get('cpu_ms_per_request', '-')} |")
    else:
        lines.append(f"\nperf_analyzer: {pa.get('skipped', 'not run')}; MLServer: {ml.get('skipped', 'run')}")
    lines += scaling_markdown(r)
    lines += pytriton_markdown(r)
    lines += balance_markdown(r)
    lines += ["", "Models (in-process onnxruntime vs our gRPC with batching; p50 in ms, throughput in req/s)", "",
              "| model | input | in-process p50 (b=1) | in-process best samples/s | gRPC p50 c=1 | gRPC req/s c=32 |",
              "|---|---|---|---|---|---|"]
    for name, m in r.get("models", {}).items():
        lines.append(f"| {name} | {m['input']} | {m['inprocess_p50_ms_batch1']:.3f} | "
                     f"{m['inprocess_best_samples_per_s']:.0f} | {m['grpc_c1']['p50_ms']:.3f} | "
                     f"{m['grpc_c32']['throughput']:.0f} |")
    r224 = r["rest224"]
    lines += ["", "3x224x224 input (ResNet-18-sized, concurrency 1): p50 (ms)", "", "| path | p50 | p99 |", "|---|---|---|"]
    for k in ("grpc", "rest_binary", "rest_json", "naive_fastapi_json"):
        lines.append(f"| {k} | {r224[k]['p50_ms']:.2f} | {r224[k]['p99_ms']:.2f} |")
    f = r["folding"]
    lines += ["", f"Folding, {f['model']}: fold_module {f['fold_module_s']:.2f} s, fold_onnx {f['fold_onnx_s']:.2f} s; "
              f"torch eager {f['torch_eager_ms']['unfolded']:.1f} -> {f['torch_eager_ms']['folded']:.1f} ms; "
              f"onnxruntime no-opt {f['onnxruntime_ms']['unfolded_disable']:.1f} -> "
              f"{f['onnxruntime_ms']['folded_disable']:.1f} ms, all-opt {f['onnxruntime_ms']['unfolded_all']:.1f} -> "
              f"{f['onnxruntime_ms']['folded_all']:.1f} ms (unfolded -> folded)."]
    pr = r.get("precision", {})
    if pr.get("entries"):
        lines += ["", f"Precision (in-process at batch 32; served gRPC with batch-1 requests and dynamic batching; "
                      f"ResNet-20 trained {pr.get('train_s')} s on digits32)", "",
                  "| entry | verified | accuracy (float64) | top-1 agreement | in-process samples/s | in-process p50 ms | "
                  "gRPC p50 c=1 | gRPC req/s c=32 |", "|---|---|---|---|---|---|---|---|"]
        for name, e in pr["entries"].items():
            ip = e.get("inprocess_cpu_b32") or e.get("inprocess_cuda_b32") or {}
            acc = (f"{e['accuracy']:.4f} ({e['accuracy_float64']:.4f})" if e.get("accuracy") is not None
                   else "- (untrained, random inputs)")
            agree = f"{e['top1_agreement']:.4f}" if e.get("top1_agreement") is not None else "-"
            lines.append(f"| {name} | {'yes' if e.get('verified') else 'NO: ' + str(e.get('failure'))[:60]} | {acc} | "
                         f"{agree} | {ip.get('samples_per_s', 0):.0f} | {ip.get('p50_ms', 0):.2f} | "
                         f"{e['grpc_c1']['p50_ms']:.3f} | {e['grpc_c32']['throughput']:.0f} |")
            if "inprocess_cuda_b32" in e:
                lines.append(f"| {name} (CUDA) | | | | {e['inprocess_cuda_b32']['samples_per_s']:.0f} | "
                             f"{e['inprocess_cuda_b32']['p50_ms']:.2f} | | |")
    lines += tracing_markdown(r)
    lines += reparam_markdown(r)
    lines += burst_markdown(r)
    lines += bombs_markdown(r)
    lines += ["", f"GPU: {json.dumps(r['gpu'])}"]
    return "\n".join(lines) + "\n"


def scaling_markdown(r: dict[str, Any]) -> list[str]:
    sc = r.get("scaling", {})
    if "runs" not in sc:
        return ["", f"perf_analyzer scaling section: {sc.get('skipped', 'not run')}"]
    lines = ["", "perf_analyzer (C++ client, gRPC, batch-1 requests, dynamic batching): req/s, p50 / p99 (ms), "
                 "TCP connections the client held (with 2 workers: how many each got), the serving processes' CPU time "
                 "per request", "",
             "| model, workers, transport | concurrency | req/s | p50 | p99 | connections | CPU ms/request |",
             "|---|---|---|---|---|---|---|"]
    for key, per_c in sc["runs"].items():
        for c, v in _by_c(per_c):
            if "error" in v:
                lines.append(f"| {key} | {c} | error: {v['error'].strip().splitlines()[-1][:80] if v['error'].strip() else ''} | - | - | - | - |")
            else:
                split = "" if len(v.get("per_worker") or []) < 2 else f" ({':'.join(map(str, v['per_worker']))})"
                lines.append(f"| {key} | {c} | {v['throughput']:.0f} | {v['p50_ms']:.2f} | {v['p99_ms']:.2f} | "
                             f"{v.get('connections', '-')}{split} | {v.get('cpu_ms_per_request', '-')} |")
    for label, v in sc.get("python_client_c32", {}).items():
        lines.append(f"\nOur Python client (4 gRPC connections; the client MLServer is measured with) at concurrency 32, "
                     f"ResNet-20, {label}: {v['throughput']:.0f} req/s, p50 {v['p50_ms']:.2f} ms, p99 {v['p99_ms']:.2f} ms.")
    for key, prof in sc.get("profiles", {}).items():
        if "stages_pct" not in prof:
            lines.append(f"\nProfile of {key}: {prof.get('skipped', 'none')}")
            continue
        stages = ", ".join(f"{k} {v}%" for k, v in prof["stages_pct"].items())
        top = ", ".join(f"{t['function']} {t['pct']}%" for t in prof["top_own_pct"][:6])
        lines.append(f"\nWhere the time goes, {key} (py-spy, {prof['samples']} samples over the serving processes): "
                     f"{stages}. Most own time: {top}.")
        split = sc.get("server_split", {}).get(key, {})
        if "avg_request_us" in split:
            from bench.peers import SERVER_PARTS

            parts = " + ".join(f"{p} {split.get(p.replace(' ', '_') + '_us', '-')} us" for p in SERVER_PARTS)
            lines.append(f"perf_analyzer's server-side split (the statistics extension) for the same run: "
                         f"{split['avg_request_us']} us per request = {parts}; {split.get('inference_count', '-')} "
                         f"inferences in {split.get('execution_count', '-')} executions.")
    return lines


def run(out_dir: Path, quick: bool = False) -> dict[str, Any]:
    t0 = time.perf_counter()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout.strip()
    meta = {"date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.python_implementation()} "
                       f"{platform.python_version()}", "commit": commit or "unknown", "quick": quick}
    work = Path(tempfile.mkdtemp(prefix="foldserve-bench-"))
    try:
        repo = work / "repo"
        repo.mkdir()
        r20 = make_entry(repo, "resnet20", "resnet20", [3, 32, 32])
        r18 = make_entry(repo, "resnet18", "resnet18", [3, 224, 224], max_batch_size=8)
        digits = make_entry(repo, "digits", "resnet", [1, 8, 8])
        conc = [1, 8, 32] if quick else [1, 8, 32, 64]
        n = 300 if quick else 2000
        x = np.random.rand(1, 3, 32, 32).astype(np.float32)
        report: dict[str, Any] = {"meta": meta}
        report["folding"] = bench_folding(quick)
        report["inprocess"] = bench_inprocess(r20, [3, 32, 32], quick)
        report["floors"] = bench_floors(x.nbytes + 64, conc, n)
        report["server"] = bench_server(repo, "resnet20", x, conc, n)
        report["rest224"] = bench_rest224(repo, "resnet18", r18, quick)
        report["models"] = bench_models(repo, {"digits": (digits, [1, 8, 8]), "resnet20": (r20, [3, 32, 32]),
                                               "resnet18": (r18, [3, 224, 224])}, quick)
        report["peers"] = bench_peers(repo, r20, x, conc, n, quick, work)
        report["scaling"] = bench_scaling(repo, quick, work)
        report["pytriton"] = bench_pytriton(repo, quick, work)
        report["balance"] = bench_balance(repo, quick, work)
        report["precision"] = bench_precision(work, quick)
        report["gpu"] = bench_gpu(r20)
        report["tracing"] = bench_tracing(repo, "resnet20", [3, 32, 32], quick)
        report["burst"] = bench_burst(repo, quick)
        report["bombs"] = bench_bombs(repo, quick)
        report["reparam"] = bench_reparam(work, quick)
        report["fold_stages"] = bench_fold_stages(work, quick)
        report["goals"] = goals(report)
        report["meta"]["wall_s"] = round(time.perf_counter() - t0, 1)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report = json.loads(json.dumps(report, default=str))  # int keys -> str, as the file will hold them
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(out_dir / f"bench-{stamp}.json", report)
    write_text(out_dir / f"bench-{stamp}.md", markdown(_intkeys(report)))
    write_json(out_dir / "latest.json", report)
    write_text(out_dir / "latest.md", markdown(_intkeys(report)))
    try:
        plot(_intkeys(report), out_dir / f"bench-{stamp}.png")
        shutil.copy(out_dir / f"bench-{stamp}.png", out_dir / "latest.png")
    except Exception as exc:  # a plot is a convenience; the JSON and Markdown are the record
        print(f"plot failed: {exc}", file=sys.stderr)
    return report


def _intkeys(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {(int(k) if isinstance(k, str) and k.isdigit() else k): _intkeys(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_intkeys(v) for v in obj]
    return obj
