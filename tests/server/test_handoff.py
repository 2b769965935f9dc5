"""With ``--workers 2`` load follows work, not connections (server/core/handoff.py): a client that holds one
connection is served by both workers, with the model's own answers; and the hand-off's parts in process: the
load board's choice of a peer, the wire format, a peer that declines, fails or is not there."""
from __future__ import annotations

import asyncio
import os
import shutil
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as tgrpc

from bench.peers import tcp_connections_to
from foldserve.errors import InvalidInput, ModelNotReady
from server.core.handoff import MARGIN, Balance, Execution, LoadBoard
from server.core.runfolder import CLOSED, RunFolder
from tests.conftest import metric_value
from tests.server.conftest import ServerProcess, digits_batch


@pytest.mark.slow
@pytest.mark.subprocess
def test_a_client_with_one_connection_is_served_by_both_workers(repository, reference_session, tmp_path):
    repo = tmp_path / "repo"
    shutil.copytree(repository / "digits", repo / "digits")
    x = digits_batch(64, seed=3)
    expected = reference_session.run(None, {"input": x})[0]
    with ServerProcess(repo, "--workers", "2") as srv:
        client = tgrpc.InferenceServerClient(f"127.0.0.1:{srv.grpc_port}")

        def one(i: int) -> np.ndarray:
            inp = tgrpc.InferInput("input", [1, 1, 8, 8], "FP32")
            inp.set_data_from_numpy(x[i:i + 1])
            return client.infer("digits", [inp]).as_numpy("output")

        with ThreadPoolExecutor(16) as pool:
            for _ in range(4):
                got = np.concatenate(list(pool.map(one, range(64))))
                np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
        # one connection (so the kernel put all of it on one worker), yet the other worker executed some of it
        assert tcp_connections_to(srv.grpc_port, os.getpid()) == 1
        with urllib.request.urlopen(f"http://127.0.0.1:{srv.http_port}/metrics", timeout=30) as r:
            text = r.read().decode()
        sent = metric_value(text, "foldserve_handoffs_total", model="digits", direction="sent")
        received = metric_value(text, "foldserve_handoffs_total", model="digits", direction="received")
        assert sent > 0 and received >= sent
        client.close()


def _balance(tmp_path: Path, index: int, workers: int = 3) -> Balance:
    run = RunFolder(tmp_path)
    if not run.board.exists():
        run.create_board(workers)
    return Balance(LoadBoard(run.board, workers), index, [run.handoff(i) for i in range(workers)])


def test_a_worker_hands_over_only_when_it_is_margin_ahead_of_an_open_peer(tmp_path):
    me, other, third = (_balance(tmp_path, i) for i in range(3))
    me.running = 10
    assert me.pick() is None                             # every peer closed (not ready, stopping, dead)
    other.board.set(1, 0)
    me.running = MARGIN - 1
    assert me.pick() is None                             # not far enough ahead
    me.running = MARGIN
    assert me.pick() == 1
    third.board.set(2, 0)
    other.board.set(1, 1)
    assert me.pick() == 2                                # the least busy one
    me.running, me.in_transit[2] = MARGIN + 1, 2         # ... counting what is on its way there
    assert me.pick() == 1
    me.in_transit[2] = 0
    with me.under_way():
        assert me.board.counts()[0] == CLOSED            # a worker not taking hand-offs keeps its slot closed
    for b in (me, other, third):
        b.close()


def test_executions_travel_whole_and_errors_come_back_as_themselves(tmp_path):
    feeds = {"a": np.arange(12, dtype=np.float16).reshape(3, 4), "b": np.array([[True, False]]),
             "c": np.arange(24, dtype=np.int64).reshape(2, 3, 4)[:, ::2],       # not contiguous
             "d": np.zeros((0, 5), np.float32)}

    async def run(ex: Execution):
        if ex.model == "gone":
            raise ModelNotReady("model gone is being unloaded")
        if ex.model == "bad":
            raise InvalidInput("input 'a': shape [3, 4] does not fit")
        assert (ex.version, ex.outputs, ex.batch, ex.priority, ex.timeout_us) == ("7", ["y", "z"], 3, 2, 500)
        return [ex.feeds["a"] * 2, ex.feeds["c"], ex.feeds["d"], ex.feeds["b"]], 0.25, (1, 2, 3), 9

    async def scenario():
        receiver, sender = _balance(tmp_path, 1, 2), _balance(tmp_path, 0, 2)
        assert await sender.send(1, Execution("ok", "7", feeds, ["y", "z"], 3, 5.0, 2, 500)) is None   # not there
        await receiver.open(run)
        try:
            arrays, queued, compute, exec_batch = await sender.send(
                1, Execution("ok", "7", feeds, ["y", "z"], 3, 5.0, 2, 500))
            for got, want in zip(arrays, [feeds["a"] * 2, feeds["c"], feeds["d"], feeds["b"]], strict=True):
                assert got.dtype == want.dtype and got.shape == want.shape and np.array_equal(got, want)
            assert (queued, compute, exec_batch) == (0.25, (1, 2, 3), 9)
            # a peer that cannot take it: run it here; one whose execution failed: the same error
            assert await sender.send(1, Execution("gone", "1", feeds, ["y"], 3, 5.0)) is None
            with pytest.raises(InvalidInput, match="does not fit"):
                await sender.send(1, Execution("bad", "1", feeds, ["y"], 3, 5.0))
            assert len(sender._idle[1]) == 1                 # the connection is kept for the next one
            receiver.stop_taking()
            assert receiver.board.counts()[1] == CLOSED
        finally:
            sender.close()
            receiver.close()

    asyncio.run(scenario())


def test_string_tensors_stay_where_they_arrived():
    assert not Execution("m", "1", {"s": np.array([b"x"], dtype=object)}, ["y"], 1, 1.0).portable()
    assert Execution("m", "1", {"s": np.zeros(2, np.float32)}, ["y"], 1, 1.0).portable()


def test_a_sender_that_gives_up_cancels_the_execution_on_the_peer(tmp_path):
    async def scenario():
        started, cancelled = asyncio.Event(), asyncio.Event()

        async def run(ex: Execution):
            started.set()
            try:
                await asyncio.sleep(30)
            except asyncio.CancelledError:
                cancelled.set()
                raise

        receiver, sender = _balance(tmp_path, 1, 2), _balance(tmp_path, 0, 2)
        await receiver.open(run)
        try:
            task = asyncio.ensure_future(sender.send(1, Execution("m", "1", {"x": np.ones(3)}, ["y"], 1, 30.0)))
            await asyncio.wait_for(started.wait(), 5)
            task.cancel()                                  # the client went away
            await asyncio.wait_for(cancelled.wait(), 5)    # ... and the peer stops working for it
            assert not sender._idle.get(1)                 # that connection is not reused
        finally:
            sender.close()
            receiver.close()

    asyncio.run(scenario())


def test_a_peer_that_does_not_take_the_execution_in_time_is_passed_over(tmp_path):
    """A stopped or hung worker (its socket accepts, its loop never reads): the request runs where it arrived
    after ACK_S, and that peer gets nothing more for SUSPECT_S."""
    from server.core.handoff import ACK_S

    async def scenario():
        sender = _balance(tmp_path, 0, 2)
        held = []

        async def hung(reader, writer):        # accepts, never answers (the kernel buffers what is written)
            held.append(writer)

        server = await asyncio.start_unix_server(hung, path=str(sender.sockets[1]))
        sender.board.set(1, 0)
        try:
            t0 = asyncio.get_running_loop().time()
            assert await sender.send(1, Execution("m", "1", {"x": np.ones(3)}, ["y"], 1, 30.0)) is None
            assert asyncio.get_running_loop().time() - t0 < ACK_S + 2
            sender.running = 10
            assert sender.pick() is None                   # the only peer is passed over for a while
        finally:
            server.close()
            sender.close()

    asyncio.run(scenario())
