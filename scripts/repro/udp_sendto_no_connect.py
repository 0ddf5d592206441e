"""UDP sendto() on an unconnected socket raises no SOCKET CONNECT event on Linux; the FLOW layer sees it.

Shows: for one datagram sent with sendto() (no connect()) and one sent on a connected UDP socket, how many
SOCKET CONNECT and FLOW ESTABLISHED events name the remote. (On Windows the first datagram to each new
remote raises a CONNECT.) Consequence: the router also opens a FLOW-layer handle for UDP
(SocketEventHandle.flows()); its ESTABLISHED events carry the full 5-tuple and are matched exactly.
Run as root: python3 scripts/repro/udp_sendto_no_connect.py
"""

from __future__ import annotations

import socket
import sys
import threading
import time

import _pair


def inside() -> None:
    import pydivert

    flags = pydivert.Flag.SNIFF | pydivert.Flag.RECV_ONLY
    seen: dict[tuple[str, int], int] = {}
    opened = threading.Barrier(3)

    def watch(layer: pydivert.Layer, name: str, stop: float) -> None:
        with pydivert.Divert("udp", layer=layer, flags=flags, priority=int(layer)) as h:
            opened.wait()
            while time.monotonic() < stop:
                try:
                    p = h.recv(timeout=0.1)
                except TimeoutError:
                    continue
                a = p.wd_addr
                s = a.Socket if layer == pydivert.Layer.SOCKET else a.Flow
                if s.RemotePort in (9001, 9002) and a.Event in (1, 4):  # ESTABLISHED / CONNECT
                    seen[(name, s.RemotePort)] = seen.get((name, s.RemotePort), 0) + 1

    stop = time.monotonic() + 5
    threads = [
        threading.Thread(target=watch, args=(layer, name, stop))
        for layer, name in (
            (pydivert.Layer.SOCKET, "SOCKET CONNECT"),
            (pydivert.Layer.FLOW, "FLOW ESTABLISHED"),
        )
    ]
    for t in threads:
        t.start()
    opened.wait()
    unconnected = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    unconnected.sendto(b"x", (_pair.SERVER_IP, 9001))
    connected = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    connected.connect((_pair.SERVER_IP, 9002))
    connected.send(b"x")
    for t in threads:
        t.join()
    for port, how in ((9001, "sendto() unconnected"), (9002, "connect() + send()")):
        counts = ", ".join(
            f"{name}: {seen.get((name, port), 0)}" for name in ("SOCKET CONNECT", "FLOW ESTABLISHED")
        )
        print(f"{how:22} -> {counts}")


if __name__ == "__main__":
    if "--inside" in sys.argv:
        inside()
    else:
        with _pair.namespace_pair() as pair:
            done = _pair.inside(pair, pair.client, __file__)
            print(done.stdout, done.stderr[-2000:])
