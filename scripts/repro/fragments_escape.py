"""Later IP fragments of a UDP datagram escape a divert handle's port filter: a leak path.

Shows: a 4000-byte UDP datagram (fragmented to the 1500-byte MTU) is sent while a handle diverts — and
drops — `outbound and udp.DstPort == 9999`; a packet socket in ns server counts which fragments still
arrived. Then the same with the filter `outbound and udp` (no port). Fragments after the first carry no
UDP header, so a port filter cannot match them.
Consequence: the router's filter has no ports, and it drops every fragment of a tunnelled flow (the
first by its flow, the later ones by the (source, destination, IP id) remembered from the first).
Run as root: python3 scripts/repro/fragments_escape.py
"""

from __future__ import annotations

import socket
import struct
import subprocess
import sys
import time

import _pair

ETH_P_IP = 0x0800


def count_fragments(seconds: float) -> None:
    """In ns server: print how many fragments (offset 0 / later) from the client arrive."""
    s = socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, socket.htons(ETH_P_IP))
    s.settimeout(0.2)
    first = later = 0
    print("listening", flush=True)
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            data = s.recv(65535)
        except TimeoutError:
            continue
        if data[12:16] != socket.inet_aton(_pair.CLIENT_IP) or data[9] != 17:
            continue
        frag = struct.unpack("!H", data[6:8])[0]
        if frag & 0x3FFF == 0:
            continue
        if frag & 0x1FFF:
            later += 1
        else:
            first += 1
    print(f"first fragments: {first}, later fragments: {later}")


def divert_and_send(filter: str) -> None:
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
        app = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        app.setsockopt(socket.IPPROTO_IP, 10, 0)  # IP_MTU_DISCOVER = IP_PMTUDISC_DONT: allow fragmenting
        app.sendto(b"x" * 4000, (_pair.SERVER_IP, 9999))
        t.join()
        print(f"diverted (and dropped) by '{filter}': {len(diverted)} packets")


if __name__ == "__main__":
    if "--count" in sys.argv:
        count_fragments(float(sys.argv[2]))
    elif "--inside" in sys.argv:
        divert_and_send(sys.argv[2])
    else:
        with _pair.namespace_pair() as pair:
            for filter in ("outbound and udp.DstPort == 9999", "outbound and udp"):
                counter = subprocess.Popen(pair.nsenter(pair.server, sys.executable, __file__, "--count", "4"),
                                           stdout=subprocess.PIPE, text=True)
                assert counter.stdout is not None
                counter.stdout.readline()
                done = _pair.inside(pair, pair.client, __file__, filter)
                print(done.stdout.strip(), done.stderr[-1000:])
                print("  at the server:", counter.communicate(timeout=10)[0].strip())
