"""The owner of one socket through sock_diag (Linux): found on loopback sockets of this test's own."""

from __future__ import annotations

import os
import socket
import sys

import pytest

from awg_split_tunnel.process.lookup import os_lookup_pid

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="sock_diag is Linux's")

LOOPBACK = socket.inet_aton("127.0.0.1")


def test_the_owner_of_a_connected_tcp_socket_and_of_a_bound_udp_socket_is_found() -> None:
    from awg_split_tunnel.platform.linux.sock_diag import SockDiag

    diag = SockDiag()
    with (
        socket.create_server(("127.0.0.1", 0)) as server,
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp,
    ):
        with socket.create_connection(server.getsockname()) as client:
            local, remote = client.getsockname()[1], server.getsockname()[1]
            found = diag.find(socket.IPPROTO_TCP, LOOPBACK, local, LOOPBACK, remote)
            assert found is not None and found.inode == os.fstat(client.fileno()).st_ino
            assert os_lookup_pid(socket.IPPROTO_TCP, LOOPBACK, local, LOOPBACK, remote) == os.getpid()
            assert diag.find(socket.IPPROTO_TCP, LOOPBACK, local, LOOPBACK, 9) is None, "no such socket"
        udp.bind(("0.0.0.0", 0))  # unconnected: sendto() any remote
        port = udp.getsockname()[1]
        remote_addr = socket.inet_aton("198.18.0.10")
        assert diag.udp
        assert os_lookup_pid(socket.IPPROTO_UDP, LOOPBACK, port, remote_addr, 53) == os.getpid()
    diag.close()


def test_a_socket_that_is_gone_has_no_owner() -> None:
    with socket.create_server(("127.0.0.1", 0)) as server:
        client = socket.create_connection(server.getsockname())
        local, remote = client.getsockname()[1], server.getsockname()[1]
        client.close()
    assert os_lookup_pid(socket.IPPROTO_TCP, LOOPBACK, local, LOOPBACK, remote) is None
