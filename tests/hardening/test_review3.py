"""The third outside review's smaller holes (items 10-13): scalar JSON data, files that lead out of the repository,
an open admin API on the network, and what a killed supervisor leaves behind."""
from __future__ import annotations

import json
import os
import shutil
import signal
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from server.settings import Settings
from tests.hardening.conftest import post_json
from tests.server.conftest import ServerProcess

pytestmark = [pytest.mark.hardening, pytest.mark.subprocess]


@pytest.mark.parametrize("data", [1.0, True, "1", {"a": 1}, None], ids=["float", "bool", "string", "object", "null"])
def test_scalar_or_object_json_data_is_a_400_naming_the_field(hserver, data):
    body = json.dumps({"inputs": [{"name": "input", "shape": [1, 1, 8, 8], "datatype": "FP32", "data": data}]})
    code, text = post_json(hserver.http, "/v2/models/digits/infer", body.encode())
    assert code == 400, text
    assert "'input'" in text and "data" in text and "Traceback" not in text, text


def test_a_labels_file_linked_out_of_the_repository_never_reaches_a_client(repository, tmp_path):
    """labels.txt in a version folder, a symbolic link to a file outside the repository (not in the record)."""
    secret = tmp_path / "secret.txt"
    secret.write_text("".join(f"secret-line-{i}\n" for i in range(10)))
    repo = tmp_path / "repo"
    shutil.copytree(repository / "digits", repo / "digits")
    vdir = repo / "digits" / "1"
    (repo / "digits" / "labels.txt").unlink()
    (vdir / "labels.txt").unlink()
    report = json.loads((vdir / "verification.json").read_text())
    report["files"].pop("labels.txt", None)          # the record does not list it: no digest catches it
    (vdir / "verification.json").write_text(json.dumps(report))
    (vdir / "labels.txt").symlink_to(secret)
    with ServerProcess(repo) as srv:
        with urllib.request.urlopen(f"http://{srv.http}/v2/repository/index", data=b"{}", timeout=10) as r:
            index = json.loads(r.read())
        entry = next(m for m in index if m["name"] == "digits")
        assert entry["state"] != "READY" and "outside the model repository" in entry["reason"], entry
        body = json.dumps({"inputs": [{"name": "input", "shape": [1, 1, 8, 8], "datatype": "FP32",
                                       "data": [0.0] * 64}],
                           "outputs": [{"name": "output", "parameters": {"classification": 3}}]}).encode()
        code, text = post_json(srv.http, "/v2/models/digits/infer", body)
        assert code != 200 and "secret-line" not in text, text
        assert "secret-line" not in srv.log()


@pytest.mark.parametrize("host,flags,refused", [
    ("0.0.0.0", {}, True),
    ("::", {}, True),
    ("10.1.2.3", {}, True),
    ("0.0.0.0", {"admin_token": "s3cret"}, False),
    ("0.0.0.0", {"insecure_admin": True}, False),
    ("127.0.0.1", {}, False),
    ("::1", {}, False),
    ("localhost", {}, False),
])
def test_an_open_repository_api_is_refused_on_a_network_address(host, flags, refused):
    problem = Settings(repository_api=True, host=host, **flags).fail_open()
    assert (problem is not None) == refused, problem
    if refused:
        assert "--admin-token" in problem and "--insecure-admin" in problem


def _run_dirs() -> set[Path]:
    return set(Path(tempfile.gettempdir()).glob("foldserve-run-*"))


def test_a_killed_supervisor_leaves_no_token_on_disk_and_its_folder_is_removed_next_start(repository, tmp_path):
    repo = tmp_path / "repo"
    shutil.copytree(repository / "digits", repo / "digits")
    token = "t0k-" + os.urandom(8).hex()
    before = _run_dirs()
    srv = ServerProcess(repo, "--workers", "2", "--auth-token", token)
    try:
        (run_dir,) = _run_dirs() - before
        for path in run_dir.rglob("*"):           # the tokens reach the workers through a pipe only
            if path.is_file():
                assert token.encode() not in path.read_bytes(), path
        workers = srv.info["pids"]
        srv.proc.send_signal(signal.SIGKILL)
        srv.proc.wait(10)
        deadline = time.time() + 30              # the workers follow it (PR_SET_PDEATHSIG)
        while any(Path(f"/proc/{p}").exists() for p in workers) and time.time() < deadline:
            time.sleep(0.2)
        assert run_dir.exists()                  # a SIGKILL leaves it behind ...
    finally:
        srv.stop()
    with ServerProcess(repo, "--workers", "2", "--auth-token", token):
        assert not run_dir.exists()              # ... and the next start removes it
