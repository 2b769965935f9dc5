"""``balance``: load across workers when a client holds few connections.

perf_analyzer at concurrency 8 holds two gRPC connections, and SO_REUSEPORT hashes each new connection to a
worker: with ``--workers 2`` both land on one worker half of the time. For each model (the 3x224x224
ResNet-18-sized one, whose requests are mostly compute, and ResNet-20 at 3x32x32, mostly front end) two servers
with two workers run side by side, one with the hand-off of executions between workers (the default; see
server/core/handoff.py) and one without (``--no-handoff``: the connections decide alone), and each gets RUNS runs
of a fresh perf_analyzer (its connections land anew each time), alternating between the two. Every run records
its throughput, p99, how its connections were split between the workers and the CPU time per request.

The reference is an even split: the median throughput of the runs (with hand-off) whose two connections landed
on different workers. The goal: no run with hand-off below 0.9x of it.
"""
from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from bench import peers
from bench.process import FoldserveProcess

MODELS = ("resnet18", "resnet20")
RUNS = 10
CONCURRENCY = 8
SHARE = 0.9


def bench_balance(repo: Path, quick: bool, work: Path, runs: int = RUNS) -> dict[str, Any]:
    if quick:
        return {"skipped": "--quick (the full run sets perf_analyzer up and runs it)"}
    cmd = peers.ensure_perf_analyzer()
    if isinstance(cmd, str):
        return {"skipped": cmd}
    out: dict[str, Any] = {"concurrency": CONCURRENCY, "runs_per_mode": runs, "models": {}}
    for model in MODELS:
        servers = {mode: FoldserveProcess(repo, "--workers", "2", *extra, log_level="WARNING", timeout=180)
                   for mode, extra in (("handoff", []), ("no_handoff", ["--no-handoff"]))}
        result: dict[str, list[dict[str, Any]]] = {mode: [] for mode in servers}
        try:
            for _ in range(runs):
                for mode, srv in servers.items():
                    point = peers.perf_analyzer(cmd, model, f"127.0.0.1:{srv.grpc_port}", [CONCURRENCY], work,
                                                interval_ms=2000, server_pids=srv.pids())[CONCURRENCY]
                    result[mode].append(point)
        finally:
            for srv in servers.values():
                srv.stop()
        out["models"][model] = {**result, **judge(result)}
    return out


def _even(point: dict[str, Any]) -> bool:
    split = point.get("per_worker") or []
    return len(split) == 2 and split[0] == split[1]


def judge(result: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """The even-split reference and each mode's worst run against it."""
    good = {mode: [p for p in points if "error" not in p] for mode, points in result.items()}
    even = [p["throughput"] for p in good["handoff"] if _even(p)] or \
        [p["throughput"] for p in good["no_handoff"] if _even(p)]
    if not even:
        return {"reference": None}
    ref = statistics.median(even)
    summary: dict[str, Any] = {"reference": ref, "reference_runs": len(even)}
    for mode, points in good.items():
        if points:
            summary[mode + "_worst"] = round(min(p["throughput"] for p in points) / ref, 3)
            summary[mode + "_one_sided"] = sum(1 for p in points if not _even(p))
            summary[mode + "_failed"] = len(result[mode]) - len(points)
    return summary


def goals(r: dict[str, Any]) -> list[dict[str, Any]]:
    sec = r.get("balance", {})
    if "models" not in sec:
        return [{"goal": f"workers share the load: every run at concurrency {CONCURRENCY} with 2 workers >= {SHARE}x "
                         "an even split", "measured": "not run", "limit": "-", "passed": None,
                 "skipped": sec.get("skipped", "not run")}]
    g = []
    for model, m in sec["models"].items():
        goal = (f"{model}: perf_analyzer at concurrency {CONCURRENCY}, 2 workers: no run of {sec['runs_per_mode']} "
                f"below {SHARE}x an even split's throughput")
        if m.get("reference") is None or "handoff_worst" not in m:
            g.append({"goal": goal, "measured": "no run split its connections evenly", "limit": f"{SHARE}x",
                      "passed": None})
            continue
        g.append({"goal": goal, "measured": f"worst {m['handoff_worst']:.2f}x of {m['reference']:.0f} req/s "
                                            f"({m['handoff_one_sided']} runs with both connections on one worker, "
                                            f"{m['handoff_failed']} failed); without hand-off worst "
                                            f"{m.get('no_handoff_worst', 0):.2f}x "
                                            f"({m.get('no_handoff_one_sided', 0)} one-sided)",
                  "limit": f"{SHARE}x", "passed": m["handoff_worst"] >= SHARE and not m["handoff_failed"]})
    return g


def markdown(r: dict[str, Any]) -> list[str]:
    sec = r.get("balance", {})
    if "models" not in sec:
        return ["", f"Load across workers: {sec.get('skipped', 'not run')}"]
    lines = ["", f"Load across workers: perf_analyzer at concurrency {sec['concurrency']}, 2 workers, "
                 f"{sec['runs_per_mode']} runs per mode (a fresh client each), with and without hand-off; req/s "
                 "(connections per worker), p99 ms", "",
             "| model | mode | runs: req/s (split) | worst / even split |", "|---|---|---|---|"]
    for model, m in sec["models"].items():
        for mode in ("handoff", "no_handoff"):
            runs = ", ".join(f"{p['throughput']:.0f} ({':'.join(map(str, p.get('per_worker') or []))})"
                             if "error" not in p else "failed" for p in m.get(mode, []))
            worst = m.get(f"{mode}_worst")
            lines.append(f"| {model} | {mode.replace('_', ' ')} | {runs} | "
                         f"{'-' if worst is None else f'{worst:.2f}x'} |")
    return lines
