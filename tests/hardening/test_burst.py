"""Item 14 of the third review: a burst of 5,000 REST and 5,000 gRPC requests at once (in `make test` too: since
the REST path skips FastAPI's router, a server on 2 cores answers a burst of 2 x 1,000 in about a second without
shedding anything, which would leave the shedding untested).
Well-behaved gRPC clients saw p99 266-450 ms and maxima of 3.5-4.7 s. The excess is now shed early (REST before
routing, both transports while the event loop runs late). What this test asserts is the behaviour: every request
of the burst is answered or shed with a status (never reset, closed without an answer, or left hanging), the
well-behaved client is answered or shed, never failed, and the server serves normally right after. The latency
goal (the admitted client's p99) is the benchmark's section ``burst`` (bench/burst.py): it is a timing, and on 2
shared cores it moves with the machine."""
from __future__ import annotations

import pytest
from tritonclient.grpc import service_pb2 as tpb

from bench.burst import SHED, measure
from tests.hardening.conftest import FULL
from tests.server.conftest import ServerProcess, digits_batch

pytestmark = [pytest.mark.hardening, pytest.mark.subprocess]
N = 5000


def test_a_burst_is_answered_or_shed_and_the_server_keeps_serving(hardening_repo):
    x = digits_batch(1)
    req = tpb.ModelInferRequest(model_name="digits", raw_input_contents=[x.tobytes()])
    req.inputs.add(name="input", datatype="FP32", shape=list(x.shape))
    with ServerProcess(hardening_repo) as srv:
        m = measure(srv.http_port, srv.grpc_port, N, req.SerializeToString(), 6 if FULL else 3)
    a, d = m["alone"], m["during"]
    print(f"well-behaved p50/p99/max {a['p50_ms']:.2f}/{a['p99_ms']:.2f}/{a['max_ms']:.0f} ms alone, "
          f"{d['p50_ms']:.2f}/{d['p99_ms']:.2f}/{d['max_ms']:.0f} ms ({d['shed']} shed) during the burst "
          f"({m['burst_s']} s) {m['codes']}")
    assert set(m["codes"]) <= SHED, m["codes"]                 # answered or shed, never an error or a hang
    assert sum(m["codes"].values()) == 2 * N
    assert m["codes"].get("rest_429", 0) + m["codes"].get("rest_503", 0) > 0     # the excess was shed
    assert not d["errors"] and d["answered"] > 0, d                               # the well-behaved client
    assert m["after"]["answered"] > 0 and not m["after"]["errors"], m["after"]
