"""`foldserve bench --quick` runs end to end and its report has every section (no timing is asserted)."""
from __future__ import annotations

import json

import pytest

from tests.conftest import run_cli


@pytest.mark.slow
@pytest.mark.subprocess
def test_quick_bench_report_has_every_section(tmp_path):
    proc = run_cli("--log-level", "WARNING", "bench", "--quick", "--out", str(tmp_path), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "latest.json").read_text())
    for section in ("meta", "folding", "inprocess", "floors", "server", "rest224", "models", "peers", "precision", "gpu", "reparam", "fold_stages", "tracing", "burst", "bombs", "pytriton", "balance", "goals"):
        assert section in report, section
    assert set(report["server"]) == {"batching", "batching_eager", "no_batching"}
    for mode in report["server"].values():
        assert {"grpc", "rest_binary", "rest_json"} <= set(mode)
        for per_c in mode.values():
            for point in per_c.values():
                assert point["requests"] > 0 and point["errors"] == 0
                assert {"p50_ms", "p90_ms", "p99_ms", "throughput", "cpu_ms_per_request"} <= set(point)
                assert point["cpu_ms_per_request"] > 0
    assert {"grpc_echo", "http_echo"} <= set(report["floors"])
    assert {"grpc", "rest_binary", "rest_json", "naive_fastapi_json"} <= set(report["rest224"])
    assert all({"goal", "measured", "limit", "passed"} <= set(g) for g in report["goals"])
    assert {"perf_analyzer", "mlserver"} <= set(report["peers"])
    # --quick skips what needs perf_analyzer and PyTriton, saying so, and their goals say so too
    assert "--quick" in report["pytriton"]["skipped"] and "--quick" in report["balance"]["skipped"]
    assert any("PyTriton" in g["goal"] and g["passed"] is None for g in report["goals"])
    assert set(report["models"]) == {"digits", "resnet20", "resnet18"}
    precision = report["precision"]["entries"]
    assert {"resnet20_fp32", "resnet20_int8"} <= set(precision)
    for e in precision.values():
        assert e["inprocess_cpu_b32"]["samples_per_s"] > 0 and e["grpc_c32"]["errors"] == 0
    assert precision["resnet20_int8"]["accuracy"] is not None
    assert any("int8" in g["goal"] for g in report["goals"])
    rep = report["reparam"]["models"]["mobileone_s0"]
    assert rep["ops_served"]["Conv"] < rep["ops_training"]["Conv"] and rep["grpc_b8_c1_served"]["errors"] == 0
    assert rep["grpc_b8_c1_training"]["requests"] > 0 and report["fold_stages"]["verified"]
    assert report["fold_stages"]["command_verified"]
    assert any("re-parameterisation" in g["goal"] for g in report["goals"])
    assert report["tracing"]["exports_received"] > 0 and report["tracing"]["on_rate_1"]["grpc_c32"]["errors"] == 0
    assert report["bombs"]["bombs"] > 0 and set(report["bombs"]["codes"]) == {"413"}
    assert any("gzip bombs" in g["goal"] for g in report["goals"])
    assert (tmp_path / "latest.png").read_bytes()[:4] == b"\x89PNG"
    assert report["meta"]["commit"] and report["meta"]["machine"]
    md = (tmp_path / "latest.md").read_text()
    assert "| goal | measured | limit | result |" in md and "foldserve grpc (batching)" in md and "| resnet20_int8 |" in md


# perf_analyzer 2.60's output against foldserve (ResNet-50, concurrency 2), as the benchmark reads it (its
# section headers end in a space, written \x20)
PERF_ANALYZER_OUTPUT = """\
Request concurrency: 2
  Client:\x20
    Request count: 356
    Throughput: 32.5839 infer/sec
    Avg latency: 60528 usec (standard deviation 4568 usec)
    p50 latency: 60270 usec
    Avg gRPC time: 60499 usec ((un)marshal request/response 79 usec + response wait 60420 usec)
  Server:\x20
    Inference count: 356
    Execution count: 355
    Successful request count: 356
    Avg request latency: 56982 usec (overhead 2292 usec + queue 25875 usec + compute input 3 usec + compute infer 28799 usec + compute output 12 usec)
Inferences/Second vs. Client Average Batch Latency
Concurrency: 2, throughput: 32.5839 infer/sec, latency 60528 usec
"""


def test_perf_analyzer_server_section_is_read_in_full():
    from bench.peers import server_section

    assert server_section(PERF_ANALYZER_OUTPUT) == {
        "inference_count": 356, "execution_count": 355, "success_count": 356, "avg_request_us": 56982,
        "overhead_us": 2292, "queue_us": 25875, "compute_input_us": 3, "compute_infer_us": 28799,
        "compute_output_us": 12}
    # the parts add up to the average (each rounded to a microsecond by perf_analyzer)
    s = server_section(PERF_ANALYZER_OUTPUT)
    assert s and abs(sum(s[k] for k in ("overhead_us", "queue_us", "compute_input_us", "compute_infer_us",
                                        "compute_output_us")) - s["avg_request_us"]) <= 5
    assert server_section("Request concurrency: 2\n  Client: \n    Request count: 3\n") is None


def test_pytriton_section_takes_medians_and_judges_ratios():
    from bench import frontend

    def point(thr, p50, p99):
        return {"throughput": thr, "p50_ms": p50, "p90_ms": p99 / 2, "p99_ms": p99, "cpu_ms_per_request": 1.0}

    rounds = [{1: point(300, 3.0, 5.0), 32: point(1300, 20, 30)}, {1: point(280, 3.2, 6.0), 32: {"error": "x"}},
              {1: point(290, 3.1, 5.5), 32: point(1500, 19, 28)}]
    med = frontend.medians(rounds)
    assert med[1]["throughput"] == 290 and med[1]["p50_ms"] == 3.1 and med[32]["throughput"] == 1400
    theirs = {1: point(180, 5.3, 8.0), 32: point(1200, 26, 29)}
    r = {"pytriton": {"median": {"foldserve": {"grpc": med, "http": med},
                                 "pytriton": {"grpc": theirs, "http": theirs}}}}
    goals = {g["goal"]: g["passed"] for g in frontend.goals(r)}
    assert goals["grpc: throughput at concurrency 32 >= 1.2 x PyTriton's"] is False       # 1400 / 1200 = 1.17
    assert goals["http: p99 at concurrency 32 <= PyTriton's"] is True                      # 29.0 <= 29
    assert goals["grpc: p50 at concurrency 1 <= PyTriton's"] is True
    assert frontend.goals({"pytriton": {"skipped": "why"}})[0]["passed"] is None
    compile(__import__("bench.peers").peers.PYTRITON_RUNNER, "runner.py", "exec")       # the peer's script is Python


def test_balance_section_judges_every_run_against_an_even_split():
    from bench import balance

    def run(thr, split):
        return {"throughput": thr, "per_worker": split}

    result = {"handoff": [run(100, [1, 1]), run(92, [2, 0]), run(104, [1, 1]), {"error": "x"}],
              "no_handoff": [run(55, [0, 2]), run(98, [1, 1])]}
    j = balance.judge(result)
    assert j["reference"] == 102 and j["handoff_worst"] == round(92 / 102, 3) and j["handoff_failed"] == 1
    assert j["no_handoff_worst"] == round(55 / 102, 3) and j["no_handoff_one_sided"] == 1
    g = balance.goals({"balance": {"runs_per_mode": 4, "models": {"m": {**result, **j}}}})
    assert g[0]["passed"] is False                        # a failed run fails the goal
    assert balance.judge({"handoff": [run(50, [2, 0])], "no_handoff": [run(50, [0, 2])]}) == {"reference": None}
