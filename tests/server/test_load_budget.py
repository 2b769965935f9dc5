"""A model load is judged by its own allocation: memory that other work of the process takes during the load
(an inference client's large request) cannot fail it, and a load that really takes more than its budget is
still refused."""
from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from foldserve.errors import ModelNotReady
from server.core.loader import build_version, rss_bytes
from server.core.repository import ModelRepository
from server.core.stats import Metrics
from server.settings import Settings
from tests.server.conftest import identity_entry


def _warmup(dims: int, count: int) -> str:
    return (f'model_warmup [{{ name: "w" batch_size: 1 count: {count} inputs {{ key: "INPUT0" value: '
            f'{{ data_type: TYPE_FP32 dims: [{dims}] zero_data: true }} }} }}]')


@pytest.fixture
def budgeted(tmp_path):
    identity_entry(tmp_path, "slow", "FP32", "-1", _warmup(16, 200_000))          # a second or more of warm-up
    identity_entry(tmp_path, "heavy", "FP32", "-1", _warmup(50_000_000, 1))       # 200 MB inputs and outputs
    settings = Settings(repository=tmp_path, allow_unverified=True, max_model_memory_mb=64, max_elements=1 << 40)
    return ModelRepository(tmp_path), settings


def test_memory_others_take_during_a_load_does_not_fail_it(budgeted):
    repo, settings = budgeted
    held: list[np.ndarray] = []
    started = threading.Event()

    def other_work() -> None:          # a request decoded while the model warms up: 400 MB, kept past the load
        started.set()
        time.sleep(0.2)
        held.append(np.ones(100 << 20, np.float32))

    before = rss_bytes()
    worker = threading.Thread(target=other_work)
    worker.start()
    started.wait()
    lv = build_version(repo, "slow", 1, repo.config("slow"), settings, Metrics())
    worker.join()
    assert held and rss_bytes() - before > 300 << 20     # the process really grew past the budget meanwhile
    assert lv.version == 1 and lv.spec.name == "slow"


def test_a_load_that_takes_more_than_its_budget_is_refused(budgeted):
    repo, settings = budgeted
    with pytest.raises(ModelNotReady, match=r"takes \d+ MB \(measured alone\), more than the 64 MB"):
        build_version(repo, "heavy", 1, repo.config("heavy"), settings, Metrics())
