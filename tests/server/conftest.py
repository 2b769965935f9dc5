"""Server fixtures: a real repository entry and the server as a real process on free ports.

The test process talks to the server with tritonclient. It never imports our generated stubs
(foldserve.protocol): both define proto package ``inference`` and cannot live in one process.
"""
from __future__ import annotations

import shutil

import numpy as np
import pytest

from bench.loadgen import free_port  # noqa: F401  (tests import it from here)
from bench.process import FoldserveProcess

#: ``foldserve serve`` on free ports, as a real process; a context manager (shared with the benchmark)
ServerProcess = FoldserveProcess


@pytest.fixture(scope="module")
def server(repository, tmp_path_factory):
    repo = tmp_path_factory.mktemp("served")
    shutil.copytree(repository / "digits", repo / "digits")
    shutil.copytree(repository / "digits", repo / "digits_b")
    cfg = (repo / "digits_b" / "config.pbtxt")
    cfg.write_text(cfg.read_text().replace('name: "digits"', 'name: "digits_b"'))
    with ServerProcess(repo, "--repository-api") as srv:
        srv.repo = repo
        yield srv


@pytest.fixture(scope="session")
def reference_session(repository):
    import onnxruntime as ort

    return ort.InferenceSession(str(repository / "digits" / "1" / "model.onnx"), providers=["CPUExecutionProvider"])


def digits_batch(n: int, seed: int = 0) -> np.ndarray:
    return (np.random.default_rng(seed).random((n, 1, 8, 8)) * 16).astype(np.float32)
