"""``pytriton``: tritonserver's own front end against ours, under one client, in one run.

perf_analyzer drives each target over gRPC and over HTTP (binary tensors) at concurrency 1 and 32: foldserve
with one worker (what ``foldserve serve`` starts), foldserve with two workers, and tritonserver through PyTriton
(:class:`bench.peers.PyTritonPeer`) serving the same ONNX file with onnxruntime under the same session options
(graph optimisations, intra-op threads, spinning) and dynamic batching at the entry's limits (its
``max_batch_size`` and ``max_queue_delay_microseconds``). The three run side by side and are measured in turn,
round after round (A B C A B C), so that a slow moment of the machine falls on every target; each figure is the
target's median over the rounds. Every point also records the serving processes' CPU time per request (every
process of the target: for PyTriton, tritonserver, the Python backend's stub and the process running the callable),
which explains the ratios on a machine of 2 cores where the client takes its share too.

The goals compare the default server (one worker) with PyTriton: throughput at concurrency 32 at least 1.2x on
both transports, p99 at concurrency 32 and p50 at concurrency 1 no higher.
"""
from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from bench import peers
from bench.process import FoldserveProcess
from foldserve.model_config import read_config
from server.settings import Settings

MODEL = "resnet20"
TARGETS = ("foldserve", "foldserve 2 workers", "pytriton")
PROTOCOLS = ("grpc", "http")
CONCURRENCIES = (1, 32)
FIGURES = ("throughput", "p50_ms", "p90_ms", "p99_ms", "cpu_ms_per_request")
THROUGHPUT_RATIO = 1.2


def bench_pytriton(repo: Path, quick: bool, work: Path, rounds: int = 3) -> dict[str, Any]:
    """The section: per target and transport, each round's perf_analyzer figures and their medians."""
    if quick:
        return {"skipped": "--quick (the full run sets PyTriton up in its own venv and runs it)"}
    cmd = peers.ensure_perf_analyzer()
    if isinstance(cmd, str):
        return {"skipped": cmd}
    python = peers.ensure_pytriton()
    if isinstance(python, str):
        return {"skipped": python}
    config = read_config(repo / MODEL)
    delay_us = config.dynamic_batching.max_queue_delay_microseconds
    spin = Settings().spin             # what `foldserve serve` uses (--spin); PyTriton's session gets the same
    ours = [FoldserveProcess(repo, "--batching", *extra, log_level="WARNING", timeout=120)
            for extra in ([], ["--workers", "2"])]
    try:
        peer = peers.PyTritonPeer(python, repo / MODEL / "1" / "model.onnx", MODEL, list(config.input[0].dims),
                                  config.max_batch_size, delay_us, 0, spin, work)
    except RuntimeError as exc:
        for srv in ours:
            srv.stop()
        return {"skipped": f"PyTriton {peers.PYTRITON_VERSION} did not start: {exc}"}
    addresses = {"foldserve": {"grpc": ours[0].grpc_port, "http": ours[0].http_port},
                 "foldserve 2 workers": {"grpc": ours[1].grpc_port, "http": ours[1].http_port},
                 "pytriton": {"grpc": peer.grpc_port, "http": peer.http_port}}
    pids = {"foldserve": ours[0].pids, "foldserve 2 workers": ours[1].pids, "pytriton": peer.pids}
    runs: dict[str, dict[str, list[Any]]] = {t: {p: [] for p in PROTOCOLS} for t in TARGETS}
    try:
        for _ in range(rounds):
            for proto in PROTOCOLS:
                for target in TARGETS:
                    runs[target][proto].append(peers.perf_analyzer(
                        cmd, MODEL, f"127.0.0.1:{addresses[target][proto]}", list(CONCURRENCIES), work,
                        interval_ms=2000, server_pids=pids[target](), protocol=proto))
    finally:
        peer.stop()
        for srv in ours:
            srv.stop()
    return {"model": MODEL, "pytriton_version": peers.PYTRITON_VERSION, "rounds": rounds,
            "max_batch_size": config.max_batch_size, "max_queue_delay_us": delay_us, "spin": spin,
            "runs": runs, "median": {t: {p: medians(runs[t][p]) for p in PROTOCOLS} for t in TARGETS}}


def medians(rounds: list[dict[Any, Any]]) -> dict[int, dict[str, float]]:
    """Per concurrency, each figure's median over the rounds that measured it (a failed round counts nothing)."""
    out: dict[int, dict[str, float]] = {}
    for c in CONCURRENCIES:
        points = [r.get(c) or r.get(str(c)) for r in rounds]
        good = [p for p in points if p and "error" not in p]
        if good:
            out[c] = {f: round(statistics.median(p[f] for p in good if f in p), 3)
                      for f in FIGURES if any(f in p for p in good)}
    return out


def _point(r: dict[str, Any], target: str, proto: str, c: int) -> dict[str, float] | None:
    per_c = r.get("pytriton", {}).get("median", {}).get(target, {}).get(proto, {})
    return per_c.get(c) or per_c.get(str(c))


def goals(r: dict[str, Any]) -> list[dict[str, Any]]:
    sec = r.get("pytriton", {})
    if "median" not in sec:
        return [{"goal": "foldserve against tritonserver's front end (PyTriton)", "measured": "not run", "limit": "-",
                 "passed": None, "skipped": sec.get("skipped", "not run")}]
    g = []
    for proto in PROTOCOLS:
        ours, theirs = _point(r, "foldserve", proto, 32), _point(r, "pytriton", proto, 32)
        if ours and theirs:
            ratio = ours["throughput"] / theirs["throughput"]
            g.append({"goal": f"{proto}: throughput at concurrency 32 >= {THROUGHPUT_RATIO} x PyTriton's",
                      "measured": f"{ratio:.2f}x ({ours['throughput']:.0f} vs {theirs['throughput']:.0f} req/s; CPU "
                                  f"{ours.get('cpu_ms_per_request', 0):.2f} vs {theirs.get('cpu_ms_per_request', 0):.2f}"
                                  f" ms per request)", "limit": f"{THROUGHPUT_RATIO}x",
                      "passed": ratio >= THROUGHPUT_RATIO})
            g.append({"goal": f"{proto}: p99 at concurrency 32 <= PyTriton's",
                      "measured": f"{ours['p99_ms']:.1f} ms (p90 {ours['p90_ms']:.1f})",
                      "limit": f"{theirs['p99_ms']:.1f} ms", "passed": ours["p99_ms"] <= theirs["p99_ms"]})
        ours, theirs = _point(r, "foldserve", proto, 1), _point(r, "pytriton", proto, 1)
        if ours and theirs:
            g.append({"goal": f"{proto}: p50 at concurrency 1 <= PyTriton's", "measured": f"{ours['p50_ms']:.2f} ms",
                      "limit": f"{theirs['p50_ms']:.2f} ms", "passed": ours["p50_ms"] <= theirs["p50_ms"]})
    return g


def markdown(r: dict[str, Any]) -> list[str]:
    sec = r.get("pytriton", {})
    if "median" not in sec:
        return ["", f"PyTriton (tritonserver's front end): {sec.get('skipped', 'not run')}"]
    lines = ["", f"tritonserver's front end (PyTriton {sec['pytriton_version']}) against foldserve: perf_analyzer, "
                 f"{sec['model']}, batch-1 requests, dynamic batching (max batch {sec['max_batch_size']}, queue delay "
                 f"{sec['max_queue_delay_us']} us), median of {sec['rounds']} interleaved rounds; CPU: the serving "
                 f"processes' CPU time per request", "",
             "| target | transport | concurrency | req/s | p50 ms | p90 ms | p99 ms | CPU ms/request |",
             "|---|---|---|---|---|---|---|---|"]
    for target in TARGETS:
        for proto in PROTOCOLS:
            for c in CONCURRENCIES:
                p = _point(r, target, proto, c)
                if p is None:
                    lines.append(f"| {target} | {proto} | {c} | failed | - | - | - | - |")
                    continue
                lines.append(f"| {target} | {proto} | {c} | {p['throughput']:.0f} | {p['p50_ms']:.2f} | "
                             f"{p['p90_ms']:.2f} | {p['p99_ms']:.2f} | {p.get('cpu_ms_per_request', 0):.3f} |")
    return lines
