"""What SOCKET-layer CLOSE events carry on eBPFDivert: is the local port there (unlike CONNECT's)?

Shows: with a SOCKET handle (SNIFF | RECV_ONLY) open in ns client, a connected UDP socket sends one
datagram and closes, then an unconnected one does the same; every event is printed with its local and
remote address and port. Run as root: python3 scripts/repro/close_event_ports.py
"""

from __future__ import annotations

import socket
import sys
import time

import _pair


def watch() -> None:
    from awg_split_tunnel.platform.divert import SocketEventHandle

    handles = [SocketEventHandle("udp"), SocketEventHandle.flows()]
    for handle in handles:
        handle.open()
    try:
        time.sleep(0.2)
        connected = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        connected.connect((_pair.SERVER_IP, 9999))
        connected.send(b"x")
        print("connected UDP socket's port", connected.getsockname()[1])
        connected.close()
        loose = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        loose.sendto(b"y", (_pair.SERVER_IP, 9998))
        print("unconnected UDP socket's port", loose.getsockname()[1])
        loose.close()
        time.sleep(0.5)
        for name, handle in zip(("SOCKET", "FLOW"), handles, strict=True):
            while (event := handle.recv(100)) is not None:
                local = f"{event.local_addr.hex()}:{event.local_port}"
                print(
                    f"{name} {event.kind.name} pid={event.pid} local {local} remote port {event.remote_port}"
                )
    finally:
        for handle in handles:
            handle.close()


if __name__ == "__main__":
    if "--inside" in sys.argv:
        watch()
    else:
        with _pair.namespace_pair() as pair:
            done = _pair.inside(pair, pair.client, __file__)
            print(done.stdout.strip() or done.stderr[-1500:])
