from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def run_cli(*args: str, timeout: float = 300, env: dict | None = None, **kw) -> subprocess.CompletedProcess:
    """Run the installed ``foldserve`` command in a subprocess, as a user would."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run([str(BIN / "foldserve"), *args], capture_output=True, text=True, timeout=timeout,
                          env=full_env, cwd=kw.pop("cwd", ROOT), **kw)


def metric_samples(text: str) -> list[tuple[str, dict[str, str], float]]:
    """Every sample of a Prometheus text exposition, parsed by prometheus_client's own parser."""
    from prometheus_client.parser import text_string_to_metric_families

    return [(s.name, dict(s.labels), s.value) for family in text_string_to_metric_families(text)
            for s in family.samples]


def metric_value(text: str, name: str, **labels: str) -> float:
    """The value of the one sample called ``name`` with these labels; fails if there is none."""
    found = [v for n, lab, v in metric_samples(text) if n == name and all(lab.get(k) == w for k, w in labels.items())]
    assert len(found) == 1, f"{len(found)} samples of {name}{labels} in the metrics"
    return found[0]


@pytest.fixture(scope="session")
def digits_run(tmp_path_factory) -> Path:
    """A short digits ResNet training run shared by tests that need a real checkpoint."""
    from trainer.train import TrainConfig, train

    out = tmp_path_factory.mktemp("digits_run")
    train(TrainConfig(arch="resnet", dataset="digits", out=str(out), epochs=3, progress=False))
    return out


@pytest.fixture(scope="session")
def repository(digits_run, tmp_path_factory) -> Path:
    """A repository with the digits model ('digits') built by the real pipeline (train -> fold -> verify)."""
    from folding.export import FoldRequest, build_entry

    repo = tmp_path_factory.mktemp("repository")
    build_entry(FoldRequest(digits_run / "checkpoint.pt", repo, "digits", 1))
    return repo
