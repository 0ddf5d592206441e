"""The SOCKET-layer event handle as the router opens it reports no loopback connections (its filter says
``!loopback``, docs/WINDOWS.md): a connection to 127.0.0.1 gives an event to a handle without that
condition and none to the router's."""

from __future__ import annotations

import socket
import time

from tests.e2e.marks import NEEDS_ROOT

from awg_split_tunnel.platform.divert import SocketEventHandle

pytestmark = NEEDS_ROOT


def _events_for(handle: SocketEventHandle, port: int, seconds: float = 0.5) -> int:
    seen = 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        event = handle.recv(50)
        if event is not None and event.remote_port == port:
            seen += 1
    return seen


def test_the_router_s_event_handle_skips_loopback_connections() -> None:
    with (
        SocketEventHandle() as router_handle,
        SocketEventHandle("tcp or udp", priority=1100) as control,
        socket.socket() as server,
    ):
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        with socket.create_connection(("127.0.0.1", port)):
            assert _events_for(control, port) >= 1, "the control handle saw no event: nothing tested"
            assert _events_for(router_handle, port, seconds=0.1) == 0
