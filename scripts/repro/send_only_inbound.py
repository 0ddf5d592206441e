"""Does a handle opened with Flag.SEND_ONLY inject INBOUND packets? (It was reported to fail silently.)

Shows: an outbound UDP datagram is captured, hairpinned (addresses swapped, destination port set to a
local listener, marked INBOUND) and injected (a) through a second, SEND_ONLY handle and (b) through the
capture handle itself, and whether each reached the listener. On kernel 6.18 / pydivert 4.0.1 here both
were delivered (filters "false" and "true", priorities 0 and 2): the note did NOT reproduce. NetworkHandle
injects on the handle it captured from anyway — one handle fewer, and safe either way.
Run as root: python3 scripts/repro/send_only_inbound.py
"""

from __future__ import annotations

import socket
import sys

import _pair


def inside() -> None:
    import pydivert

    listener = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    listener.bind(("0.0.0.0", 15002))
    listener.settimeout(1.0)
    app = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with (
        pydivert.Divert("outbound and udp.DstPort == 9999", priority=1) as capture,
        pydivert.Divert("false", priority=2, flags=pydivert.Flag.SEND_ONLY) as send_only,
    ):
        for label, injector in (("SEND_ONLY handle", send_only), ("capture handle", capture)):
            app.sendto(label.encode(), (_pair.SERVER_IP, 9999))
            packet = capture.recv(timeout=2)
            packet.src_addr, packet.dst_addr = packet.dst_addr, packet.src_addr
            packet.udp.dst_port = 15002
            packet.direction = pydivert.Direction.INBOUND
            sent = injector.send(packet)
            try:
                data, _ = listener.recvfrom(100)
                result = f"delivered ({data.decode()})"
            except TimeoutError:
                result = "NOT delivered"
            print(f"inject via {label}: send() returned {sent}, {result}")


if __name__ == "__main__":
    if "--inside" in sys.argv:
        inside()
    else:
        with _pair.namespace_pair() as pair:
            done = _pair.inside(pair, pair.client, __file__)
            print(done.stdout, done.stderr[-2000:])
