"""Later IP fragments of a UDP datagram escape a divert handle's port filter: a leak path.

Shows: a 4000-byte UDP datagram (fragmented to the 1500-byte MTU) is sent while a handle diverts — and
drops — what its filter matches; a packet socket in ns server counts which fragments still arrived.
Seen: with `udp.DstPort == 9999` AND with plain `udp`, the later fragments escape (they carry no UDP
header, so the filter's `udp` does not match them, IPv4 and IPv6 alike); only a filter naming them
(`ip.FragOff > 0`, `ipv6.NextHdr == 44`) diverts them.
Consequence: the router's filter (core.packet_router.ROUTER_FILTER) names fragments explicitly, and the
router drops every fragment of a tunnelled flow (the first by its flow, the later ones by the
(source, destination, IP id) remembered from the first).
Run as root: python3 scripts/repro/fragments_escape.py
"""

from __future__ import annotations

import socket
import struct
import subprocess
import sys
import time

import _pair

ETH_P_ALL = 0x0003
ROUTER_FILTER = "outbound and (tcp or udp or ip.FragOff > 0 or ipv6.NextHdr == 44)"


def count_fragments(seconds: float) -> None:
    """In ns server: print how many fragments (first / later) from the client arrive, IPv4 and IPv6."""
    s = socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, socket.htons(ETH_P_ALL))
    s.settimeout(0.2)
    first = later = 0
    client4, client6 = socket.inet_aton(_pair.CLIENT_IP), socket.inet_pton(socket.AF_INET6, _pair.CLIENT_IP6)
    print("listening", flush=True)
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            data = s.recv(65535)
        except TimeoutError:
            continue
        if data[0] >> 4 == 4 and data[12:16] == client4:
            frag = struct.unpack("!H", data[6:8])[0]
            if frag & 0x3FFF:
                later += bool(frag & 0x1FFF)
                first += not frag & 0x1FFF
        elif data[0] >> 4 == 6 and data[8:24] == client6 and data[6] == 44:
            offset = struct.unpack("!H", data[42:44])[0] >> 3
            later += bool(offset)
            first += not offset
    print(f"first fragments: {first}, later fragments: {later}")


def divert_and_send(filter: str, family: str) -> None:
    """In ns client: drop what the filter diverts, send one big datagram."""
    import threading

    import pydivert

    with pydivert.Divert(filter) as h:
        diverted = []

        def drain() -> None:
            while True:
                try:
                    p = h.recv(timeout=1)
                except (TimeoutError, OSError):
                    return
                diverted.append(p)  # not reinjected: dropped

        t = threading.Thread(target=drain)
        t.start()
        if family == "6":
            app = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
            app.sendto(b"x" * 4000, (_pair.SERVER_IP6, 9999))
        else:
            app = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            app.setsockopt(socket.IPPROTO_IP, 10, 0)  # IP_MTU_DISCOVER = IP_PMTUDISC_DONT: may fragment
            app.sendto(b"x" * 4000, (_pair.SERVER_IP, 9999))
        t.join()
        print(f"diverted (and dropped) by '{filter}': {len(diverted)} packets")


if __name__ == "__main__":
    if "--count" in sys.argv:
        count_fragments(float(sys.argv[2]))
    elif "--inside" in sys.argv:
        divert_and_send(sys.argv[2], sys.argv[3])
    else:
        with _pair.namespace_pair() as pair:
            cases = [
                (f, "4") for f in ("outbound and udp.DstPort == 9999", "outbound and udp", ROUTER_FILTER)
            ]
            cases += [(f, "6") for f in ("outbound and udp", ROUTER_FILTER)]
            for filter, family in cases:
                counter = subprocess.Popen(
                    pair.nsenter(pair.server, sys.executable, __file__, "--count", "4"),
                    stdout=subprocess.PIPE,
                    text=True,
                )
                assert counter.stdout is not None
                counter.stdout.readline()
                done = _pair.inside(pair, pair.client, __file__, filter, family)
                print(f"IPv{family}", done.stdout.strip(), done.stderr[-1000:])
                print("  at the server:", counter.communicate(timeout=10)[0].strip())
