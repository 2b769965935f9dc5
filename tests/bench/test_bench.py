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
    for section in ("meta", "folding", "inprocess", "floors", "server", "rest224", "models", "peers", "precision", "gpu", "reparam", "fold_stages", "tracing", "goals"):
        assert section in report, section
    assert set(report["server"]) == {"batching", "batching_eager", "no_batching"}
    for mode in report["server"].values():
        assert {"grpc", "rest_binary", "rest_json"} <= set(mode)
        for per_c in mode.values():
            for point in per_c.values():
                assert point["requests"] > 0 and point["errors"] == 0
                assert {"p50_ms", "p90_ms", "p99_ms", "throughput"} <= set(point)
    assert {"grpc_echo", "http_echo"} <= set(report["floors"])
    assert {"grpc", "rest_binary", "rest_json", "naive_fastapi_json"} <= set(report["rest224"])
    assert all({"goal", "measured", "limit", "passed"} <= set(g) for g in report["goals"])
    assert {"perf_analyzer", "mlserver"} <= set(report["peers"])
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
    assert any("re-parameterisation" in g["goal"] for g in report["goals"])
    assert report["tracing"]["exports_received"] > 0 and report["tracing"]["on_rate_1"]["grpc_c32"]["errors"] == 0
    assert (tmp_path / "latest.png").read_bytes()[:4] == b"\x89PNG"
    assert report["meta"]["commit"] and report["meta"]["machine"]
    md = (tmp_path / "latest.md").read_text()
    assert "| goal | measured | limit | result |" in md and "foldserve grpc (batching)" in md and "| resnet20_int8 |" in md
