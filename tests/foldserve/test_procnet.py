"""foldserve.procnet reads the kernel's TCP table and a process's socket descriptors: checked on real sockets."""
from __future__ import annotations

import os
import socket

import pytest

from foldserve.procnet import socket_descriptors, tcp_sockets


@pytest.mark.parametrize("family,host", [(socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")], ids=["ipv4", "ipv6"])
def test_an_established_connection_is_found_with_its_addresses_and_descriptor(family, host):
    try:
        listener = socket.socket(family)
        listener.bind((host, 0))
    except OSError:
        pytest.skip(f"no {host} on this machine")
    listener.listen(1)
    port = listener.getsockname()[1]
    client = socket.create_connection((host, port))
    server, _ = listener.accept()
    try:
        found = [t for t in tcp_sockets() if t.local[1] == port]
        assert len(found) == 1 and found[0].local == (host, port) and found[0].state == "01"
        assert found[0].remote == (host, client.getsockname()[1])
        ours = socket_descriptors()
        assert ours[found[0].inode] == server.fileno()
        assert os.fstat(server.fileno()).st_ino == found[0].inode
        listening = [t for t in tcp_sockets(state=None) if t.local[1] == port and t.state == "0A"]
        assert len(listening) == 1 and listening[0].inode in ours
    finally:
        for s in (client, server, listener):
            s.close()
    assert not [t for t in tcp_sockets() if t.local[1] == port and t.inode in socket_descriptors()]
