"""The daemon's own connections carry the mark that keeps them out of the kernel data path's gate."""

from __future__ import annotations

import asyncio
import os
import socket
import sys

import pytest

from awg_split_tunnel.provider.interface import connect_to_server, set_own_socket_mark

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux") or os.geteuid() != 0, reason="SO_MARK needs Linux and root"
)
MARK = 0x00010000


def _mark(sock: socket.socket) -> int:
    return sock.getsockopt(socket.SOL_SOCKET, socket.SO_MARK)


def test_connections_to_servers_carry_the_mark_from_before_their_syn() -> None:
    async def main() -> int:
        server = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        set_own_socket_mark(MARK)
        try:
            _, writer = await connect_to_server("test", "127.0.0.1", port, 2.0)
            mark = _mark(writer.get_extra_info("socket"))
            writer.close()
        finally:
            set_own_socket_mark(0)
            server.close()
        return mark

    assert asyncio.run(main()) == MARK


def test_without_a_mark_connections_are_left_alone() -> None:
    async def main() -> int:
        server = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0)
        _, writer = await connect_to_server("test", "127.0.0.1", server.sockets[0].getsockname()[1], 2.0)
        mark = _mark(writer.get_extra_info("socket"))
        writer.close()
        server.close()
        return mark

    assert asyncio.run(main()) == 0
