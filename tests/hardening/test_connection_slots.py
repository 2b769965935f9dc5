"""Item 3 of the third review: connection slots held by clients that send nothing. 4,096 idle keep-alive REST
connections (one public health request each) gave every new REST client 503 for 60 s, and 4,096 idle TCP
connections to the gRPC port made every new gRPC client UNAVAILABLE for the whole attack. Here at a cap of 32.
On gRPC, connections that never finish their handshake are dropped by grpc core after --header-timeout-s, and
those that finished it and sit idle (after a call or without one) are closed by the janitor
(server/grpc/janitor.py) when slots run short."""
from __future__ import annotations

import socket
import time
import urllib.request

import grpc
import pytest
from tritonclient.grpc import service_pb2 as tpb
from tritonclient.grpc import service_pb2_grpc as tpb_grpc

from tests.server.conftest import ServerProcess

pytestmark = [pytest.mark.hardening, pytest.mark.subprocess]
CAP = 32


def _keep_alive_after_one_request(port: int) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    s.sendall(b"GET /v2/health/live HTTP/1.1\r\nhost: x\r\n\r\n")
    assert s.recv(4096).startswith(b"HTTP/1.1 200")
    return s


@pytest.mark.parametrize("token", [None, "t0k"], ids=["open", "with-token"])
def test_idle_rest_connections_at_the_cap_make_room_for_a_new_client(hardening_repo, token):
    flags = ["--max-connections", str(CAP), *(["--auth-token", token] if token else [])]
    with ServerProcess(hardening_repo, *flags) as srv:
        held = [_keep_alive_after_one_request(srv.http_port) for _ in range(CAP)]
        held += [socket.create_connection(("127.0.0.1", srv.http_port)) for _ in range(CAP)]  # never send
        time.sleep(1.5)     # past the grace a silent new connection gets to send its request (EVICT_GRACE_S)
        try:
            for _ in range(10):              # each new client is served: the oldest idle connection makes room
                with urllib.request.urlopen(f"http://{srv.http}/v2/health/ready", timeout=5) as r:
                    assert r.status == 200
            closed = 0
            for s in held:
                s.settimeout(0.2)
                try:
                    closed += s.recv(1) == b""
                except (TimeoutError, ConnectionResetError):
                    pass
            assert closed >= CAP, closed     # the oldest idle ones were closed, not the new clients refused
        finally:
            for s in held:
                s.close()


@pytest.mark.parametrize("preface", [b"", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"], ids=["raw", "http2-preface"])
def test_grpc_connections_that_never_finish_their_handshake_free_their_slot(hardening_repo, preface):
    """grpc core cannot close idle connections to make room at its cap; a connection that does not finish its
    handshake within --header-timeout-s is dropped, so a new client is served seconds later, not never."""
    with ServerProcess(hardening_repo, "--max-connections", str(CAP), "--header-timeout-s", "2") as srv:
        held = []
        for _ in range(CAP + 8):
            s = socket.create_connection(("127.0.0.1", srv.grpc_port))
            if preface:
                s.sendall(preface)
            held.append(s)
        try:
            t0, served = time.monotonic(), None
            while time.monotonic() - t0 < 20 and served is None:
                try:
                    with grpc.insecure_channel(srv.grpc) as ch:
                        tpb_grpc.GRPCInferenceServiceStub(ch).ServerLive(tpb.ServerLiveRequest(), timeout=2)
                    served = time.monotonic() - t0
                except grpc.RpcError:
                    pass
            assert served is not None and served < 10, served
        finally:
            for s in held:
                s.close()


def _own_connection(target: str) -> grpc.Channel:
    """A channel with a connection of its own (channels to one target otherwise share grpc's subchannels)."""
    return grpc.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)])


H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
H2_SETTINGS, H2_SETTINGS_ACK = b"\x00\x00\x00\x04\x00\x00\x00\x00\x00", b"\x00\x00\x00\x04\x01\x00\x00\x00\x00"


def _silent_http2(port: int) -> socket.socket:
    """A connection that completes the HTTP/2 handshake (preface, SETTINGS both ways, ACK) and sends nothing
    more: what grpc core keeps until max_connection_idle."""
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    s.sendall(H2_PREFACE + H2_SETTINGS)
    assert s.recv(4096)[3] == 4                      # the server's SETTINGS frame
    s.sendall(H2_SETTINGS_ACK)
    return s


def _is_closed(s: socket.socket) -> bool:
    s.settimeout(0.05)
    try:
        while True:                                   # drain what the server sent (SETTINGS ACK, GOAWAY)
            if s.recv(4096) == b"":
                return True
    except (TimeoutError, BlockingIOError):
        return False
    except OSError:
        return True


@pytest.mark.parametrize("called", [True, False], ids=["idle-after-a-call", "handshake-then-silent"])
def test_idle_grpc_connections_at_the_cap_make_room_for_a_new_client(hardening_repo, called):
    with ServerProcess(hardening_repo, "--max-connections", str(CAP)) as srv:
        channels, sockets = [], []
        try:
            for _ in range(CAP):
                if called:
                    ch = _own_connection(srv.grpc)
                    tpb_grpc.GRPCInferenceServiceStub(ch).ServerLive(tpb.ServerLiveRequest(), timeout=5,
                                                                     wait_for_ready=True)
                    channels.append(ch)
                else:
                    sockets.append(_silent_http2(srv.grpc_port))
            time.sleep(1.5)              # a few sweeps: a connection is taken once idle for MIN_IDLE_MS
            for i in range(10):          # each new client is served at its first call, no retry
                with _own_connection(srv.grpc) as ch:
                    assert tpb_grpc.GRPCInferenceServiceStub(ch).ServerLive(tpb.ServerLiveRequest(), timeout=5).live, i
            closed = (sum(ch._channel.check_connectivity_state(False) != 2 for ch in channels)   # 2: READY
                      + sum(_is_closed(s) for s in sockets))
            assert closed >= 2, closed   # the idlest were closed to make room
        finally:
            for ch in channels:
                ch.close()
            for s in sockets:
                s.close()


def test_the_janitor_never_closes_a_connection_with_a_call_in_flight(hardening_repo):
    """Past the slots' threshold, only idle connections are closed: long-lived calls (health Watch streams)
    on the other connections go on."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with ServerProcess(hardening_repo, "--max-connections", str(CAP)) as srv:
        watching, idle = [], []
        try:
            for _ in range(CAP - 4):
                ch = _own_connection(srv.grpc)
                call = health_pb2_grpc.HealthStub(ch).Watch(health_pb2.HealthCheckRequest(service=""), timeout=60)
                assert next(call).status == health_pb2.HealthCheckResponse.SERVING
                watching.append((ch, call))
            for _ in range(4):
                ch = _own_connection(srv.grpc)
                tpb_grpc.GRPCInferenceServiceStub(ch).ServerLive(tpb.ServerLiveRequest(), timeout=5)
                idle.append(ch)
            time.sleep(2.0)
            assert all(call.is_active() for _, call in watching)
            assert all(ch._channel.check_connectivity_state(False) == 2 for ch, _ in watching)   # READY
            assert sum(ch._channel.check_connectivity_state(False) != 2 for ch in idle) >= 2
        finally:
            for ch, call in watching:
                call.cancel()
                ch.close()
            for ch in idle:
                ch.close()


def test_public_watch_streams_cannot_lock_authenticated_clients_out(hardening_repo):
    """A health Watch stream needs no token: one per connection on every slot locked every gRPC client out (an
    authenticated one included) until --idle-timeout-s. Watch-only connections count as busy up to a bound below the
    cap; past it the idlest are closed, and a client with the token is served."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with ServerProcess(hardening_repo, "--max-connections", str(CAP), "--auth-token", "tok") as srv:
        watching = []
        try:
            for _ in range(CAP):
                ch = _own_connection(srv.grpc)
                call = health_pb2_grpc.HealthStub(ch).Watch(health_pb2.HealthCheckRequest(service=""), timeout=60)
                assert next(call).status == health_pb2.HealthCheckResponse.SERVING
                watching.append((ch, call))
            time.sleep(1.5)                  # a few sweeps
            x = b"\x00" * 256
            for i in range(5):               # each authenticated client is served at its first call
                with _own_connection(srv.grpc) as ch:
                    req = tpb.ModelInferRequest(model_name="digits", raw_input_contents=[x])
                    req.inputs.add(name="input", datatype="FP32", shape=[1, 1, 8, 8])
                    out = tpb_grpc.GRPCInferenceServiceStub(ch).ModelInfer(
                        req, timeout=5, metadata=(("authorization", "Bearer tok"),))
                    assert out.model_name == "digits", i
            alive = sum(call.is_active() for _, call in watching)
            assert CAP - 2 * max(2, CAP // 16) <= alive < CAP, alive   # the oldest watchers kept, the rest closed
        finally:
            for ch, call in watching:
                call.cancel()
                ch.close()
