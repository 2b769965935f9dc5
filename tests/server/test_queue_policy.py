"""The whole of Triton's ModelConfig parses; what foldserve implements of it is applied (the queue policy:
max_queue_size, the queue timeout with REJECT / DELAY and allow_timeout_override; priority levels), what it does
not is refused or ignored with a warning, per field and named."""
from __future__ import annotations

import asyncio
import shutil
import threading
import time

import numpy as np
import pytest
import tritonclient.http as thttp
from tritonclient.utils import InferenceServerException

from foldserve.errors import QueueRejected
from foldserve.model_config import read_config, write_config
from server.core.scheduler import Scheduler
from server.core.stats import Metrics, ModelStats
from server.core.types import BatchingSpec
from tests.server.conftest import ServerProcess, digits_batch

# --- the scheduler itself ----------------------------------------------------------------------------------


def _scheduler(policy: BatchingSpec, ran: list[int], max_batch: int = 2, delay_s: float = 0.001) -> Scheduler:
    def run(feeds, outputs):
        ran.extend(int(v) for v in feeds["x"][:, 0])
        time.sleep(0.02)
        return [feeds["x"] * 2]

    return Scheduler("m:1", run, max_batch_size=max_batch, max_delay_s=delay_s, max_queue=100, instances=1,
                     stats=ModelStats("m", "1"), metrics=Metrics(), policy=policy)


def _x(i: int) -> dict[str, np.ndarray]:
    return {"x": np.array([[i]], np.float32)}


def test_priority_levels_serve_level_1_first_then_arrival_order():
    async def main():
        ran: list[int] = []
        s = _scheduler(BatchingSpec(50_000, priority_levels=3, default_priority_level=2), ran)
        s.start()
        blocker = asyncio.create_task(s.infer(_x(0), ["y"], 1, 10))          # occupies the single instance
        await asyncio.sleep(0.005)
        tasks = [asyncio.create_task(s.infer(_x(i), ["y"], 1, 10, priority=p))
                 for i, p in ((1, 3), (2, 0), (3, 1), (4, 3), (5, 1))]
        await asyncio.gather(blocker, *tasks)
        await s.close()
        return ran
    assert asyncio.run(main()) == [0, 3, 5, 2, 1, 4]    # level 1, then the default level 2, then level 3


def test_queue_timeout_rejects_or_delays_and_a_request_may_override_it():
    async def main(action: str):
        ran: list[int] = []
        s = _scheduler(BatchingSpec(50_000, queue_timeout_us=8_000, timeout_action=action,
                                    allow_timeout_override=True), ran)
        s.start()
        first = asyncio.create_task(s.infer(_x(0), ["y"], 1, 10))
        await asyncio.sleep(0.005)                      # 0 is running alone; the others queue behind it
        late = [asyncio.create_task(s.infer(_x(i), ["y"], 1, 10)) for i in (1, 2)]
        patient = asyncio.create_task(s.infer(_x(3), ["y"], 1, 10, timeout_us=5_000_000))
        results = await asyncio.gather(first, *late, patient, return_exceptions=True)
        await s.close()
        return ran, results
    ran, results = asyncio.run(main("REJECT"))
    assert [isinstance(r, QueueRejected) for r in results] == [False, True, True, False]
    assert "Request timeout expired" in str(results[1]) and ran == [0, 3]    # the rejected never ran
    ran, results = asyncio.run(main("DELAY"))
    assert not any(isinstance(r, BaseException) for r in results)
    assert ran == [0, 3, 1, 2]                                              # past their timeout: served last


def test_max_queue_size_of_the_policy_is_tritons_unavailable():
    async def main():
        s = _scheduler(BatchingSpec(50_000, max_queue_size=2), [], max_batch=64, delay_s=0.2)
        s.start()
        tasks = [asyncio.create_task(s.infer(_x(i), ["y"], 1, 10)) for i in range(3)]
        results = await asyncio.gather(*tasks, return_exceptions=True)
        await s.close()
        return results
    results = asyncio.run(main())
    assert isinstance(results[2], QueueRejected) and "Exceeds maximum queue size" in str(results[2])
    assert not isinstance(results[0], BaseException) and not isinstance(results[1], BaseException)


# --- end to end --------------------------------------------------------------------------------------------

def _entry(repository, repo, name: str, edit) -> None:
    shutil.copytree(repository / "digits", repo / name)
    config = read_config(repo / name)
    config.name = name
    edit(config)
    write_config(repo / name, config)


@pytest.fixture(scope="module")
def policy_server(repository, tmp_path_factory):
    repo = tmp_path_factory.mktemp("policy")

    def small_queue(c):
        c.dynamic_batching.max_queue_delay_microseconds = 1_000_000
        c.dynamic_batching.default_queue_policy.max_queue_size = 2

    def priorities(c):
        c.dynamic_batching.priority_levels = 2
        c.dynamic_batching.default_priority_level = 2

    def triton_extras(c):        # what a Triton user's config has beside what foldserve implements
        c.response_cache.enable = True
        c.optimization.input_pinned_memory.enable = True
        c.metric_tags["team"] = "vision"
        c.instance_group[0].kind = c.instance_group[0].KIND_GPU

    def stateful(c):
        c.sequence_batching.max_sequence_idle_microseconds = 1000

    for name, edit in (("small_queue", small_queue), ("priorities", priorities), ("extras", triton_extras),
                       ("stateful", stateful)):
        _entry(repository, repo, name, edit)
    with ServerProcess(repo, "--no-strict-readiness") as srv:
        yield srv


def test_a_full_queue_answers_as_triton_does(policy_server):
    x = digits_batch(1)
    outcomes: list[str] = []

    def send():
        c = thttp.InferenceServerClient(policy_server.http)
        inp = thttp.InferInput("input", list(x.shape), "FP32")
        inp.set_data_from_numpy(x)
        try:
            c.infer("small_queue", [inp])
            outcomes.append("ok")
        except InferenceServerException as exc:
            outcomes.append(f"{exc.status()} {exc.message()}")
        finally:
            c.close()

    threads = [threading.Thread(target=send) for _ in range(3)]
    for t in threads:
        t.start()
        time.sleep(0.05)                 # all three arrive inside the 1 s batch window
    for t in threads:
        t.join(30)
    assert outcomes.count("ok") == 2, outcomes
    refused = next(o for o in outcomes if o != "ok")
    assert refused.startswith("503") and "Exceeds maximum queue size" in refused


def test_priority_parameter_is_checked_against_the_levels(policy_server):
    c = thttp.InferenceServerClient(policy_server.http)
    x = digits_batch(1)
    inp = thttp.InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    try:
        assert c.infer("priorities", [inp], priority=1).as_numpy("output").shape == (1, 10)
        with pytest.raises(InferenceServerException, match="priority 3 is out of range") as e:
            c.infer("priorities", [inp], priority=3)
        assert e.value.status() == "400"
        with pytest.raises(InferenceServerException, match="no priority levels"):
            c.infer("small_queue", [inp], priority=1)
    finally:
        c.close()


def test_triton_fields_foldserve_ignores_load_with_a_warning_and_refused_ones_are_named(policy_server):
    c = thttp.InferenceServerClient(policy_server.http)
    try:
        assert c.is_model_ready("extras")
        log = policy_server.log()
        assert "response_cache (the response cache (every request is computed)) is ignored" in log
        assert "metric_tags" in log and "instance_group kind ignored" in log
        assert not c.is_model_ready("stateful")
        index = {m["name"]: m for m in c.get_model_repository_index()}
        assert "sequence_batching (stateful sequence batching) is not supported" in index["stateful"]["reason"]
    finally:
        c.close()
