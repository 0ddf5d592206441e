"""SOCKET-layer CONNECT events on Linux carry local address/port 0: the pid cannot be found by local port.

Shows: of N TCP connects, how many CONNECT events carried the local port the connection then used
(expected on Windows: all; seen on Linux: none), and that the remote address/port and pid are right.
Consequence: the router matches CONNECT events to SYNs by (protocol, remote address, remote port).
Run as root: python3 scripts/repro/connect_local_port.py
"""

from __future__ import annotations

import os
import socket
import sys
import time

import _pair

N = 20


def inside() -> None:
    import pydivert

    with pydivert.Divert(
        "tcp", layer=pydivert.Layer.SOCKET, flags=pydivert.Flag.SNIFF | pydivert.Flag.RECV_ONLY
    ) as h:
        used = set()
        for _ in range(N):
            s = socket.create_connection((_pair.SERVER_IP, 8080), timeout=3)
            used.add(s.getsockname()[1])
            s.close()
        carried, connects, right_pid = 0, 0, 0
        for p in _pair.sniffed(h):
            a = p.wd_addr
            if a.Event == 4 and a.Socket.RemotePort == 8080:  # CONNECT
                connects += 1
                carried += a.Socket.LocalPort in used
                right_pid += a.Socket.ProcessId == os.getpid()
        print(
            f"{connects} CONNECT events for {N} connects; {right_pid} with our pid; "
            f"{carried} carried the local port the connection used"
        )


if __name__ == "__main__":
    if "--inside" in sys.argv:
        inside()
    else:
        with _pair.namespace_pair() as pair:
            server = _pair.serve_tcp(pair, 8080)
            time.sleep(0.5)
            done = _pair.inside(pair, pair.client, __file__)
            server.kill()
            print(done.stdout, done.stderr[-2000:])
