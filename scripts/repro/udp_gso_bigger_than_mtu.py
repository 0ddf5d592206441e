"""UDP GSO does not fragment: a segment bigger than the path's MTU is refused, a plain send is fragmented.

Shows: from the client namespace (veth MTU 1500) to a UDP socket in the server namespace, datagrams of
1472 bytes (the most a 1500-byte IPv4 link carries in one packet) and of 1484 bytes (an AmneziaWG transport
message with S4 = 32 and MTU 1420), each sent with one `sendto` and as four segments of one GSO
`sendmsg` (`UDP_SEGMENT`). Seen here (kernel 6.18): every `sendto` arrives (1484 bytes in two fragments,
reassembled); the GSO write of 1472-byte segments arrives, the one of 1484-byte segments fails with
`[Errno 90] Message too long` and nothing of it is sent.
Consequence: `DatagramSocket.send_batch` (provider/wireguard/device.py) sends the datagrams of a refused
GSO write one by one, and datagrams of that size and bigger one by one from then on (`oversize`); the
device logs once that the tunnel's MTU is too big for the path — as wireguard-go, whose sends are plain,
the tunnel then works fragmented instead of dropping every batch.
Run as root: python3 scripts/repro/udp_gso_bigger_than_mtu.py
"""

from __future__ import annotations

import socket
import struct
import subprocess
import sys
import time

import _pair

SOL_UDP, UDP_SEGMENT = 17, 103
PORT = 9003


def inside() -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    target = (_pair.SERVER_IP, PORT)
    for size in (1472, 1484):
        sock.sendto(bytes(size), target)
        print(f"sendto {size}: sent")
        try:
            sock.sendmsg([bytes(size)] * 4, [(SOL_UDP, UDP_SEGMENT, struct.pack("H", size))], 0, target)
            print(f"GSO 4 x {size}: sent")
        except OSError as exc:
            print(f"GSO 4 x {size}: {exc}")
        time.sleep(0.2)


RECEIVE = f"""
import socket
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", {PORT}))
s.settimeout(1.5)
sizes = []
try:
    while True:
        sizes.append(len(s.recv(65535)))
except TimeoutError:
    pass
print("received:", ", ".join(f"{{n}}" for n in sizes))
"""


if __name__ == "__main__":
    if "--inside" in sys.argv:
        inside()
    else:
        with _pair.namespace_pair() as pair:
            receiver = subprocess.Popen(
                pair.nsenter(pair.server, sys.executable, "-c", RECEIVE), stdout=subprocess.PIPE, text=True
            )
            time.sleep(0.3)
            done = _pair.inside(pair, pair.client, __file__)
            print(done.stdout, done.stderr[-2000:])
            print(receiver.communicate(timeout=10)[0])
