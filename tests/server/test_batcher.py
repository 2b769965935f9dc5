"""The dynamic batcher with variable shapes: only requests whose shapes agree past the batch axis share an execution
(as Triton does without ragged batching), so concurrent requests of several shapes to a ``-1`` model are each
answered, and the model keeps serving."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import tritonclient.http as thttp

from tests.server.conftest import ServerProcess, identity_entry

pytestmark = pytest.mark.subprocess


@pytest.mark.parametrize("kind", ["FP32", "BYTES"])
def test_concurrent_requests_of_mixed_shapes_are_each_answered(tmp_path, kind):
    identity_entry(tmp_path, "var", "STRING" if kind == "BYTES" else kind, "-1",
                   "dynamic_batching { max_queue_delay_microseconds: 50000 }\n")

    def data(n: int, i: int) -> np.ndarray:
        values = np.arange(n, dtype=np.float32)[None] + 100 * i
        return values if kind == "FP32" else values.astype(str).astype(object)

    with ServerProcess(tmp_path, "--allow-unverified") as srv:
        def call(i: int) -> tuple[np.ndarray, np.ndarray]:
            client = thttp.InferenceServerClient(srv.http, network_timeout=20)
            try:
                x = data(1 + i % 4, i)
                inp = thttp.InferInput("INPUT0", list(x.shape), kind)
                inp.set_data_from_numpy(x)
                return x, client.infer("var", [inp]).as_numpy("OUTPUT0")
            finally:
                client.close()

        with ThreadPoolExecutor(16) as pool:        # 4 shapes, 32 requests, within one batching window
            for x, got in pool.map(call, range(32)):
                got = got if kind == "FP32" else got.astype(str).astype(object)
                assert got.shape == x.shape and (got == x).all()
        x, got = call(5)                             # and the model still serves afterwards
        assert got.shape == x.shape
