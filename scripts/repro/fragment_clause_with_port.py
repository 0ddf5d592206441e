"""Does a fragment clause beside a UDP source-port exclusion still exclude that port on eBPFDivert?

Shows: while a SNIFF handle counts what each filter matches, 20 small datagrams and 5 UDP GSO batches are
sent from an excluded source port (a packet tunnel's own socket) and one 4000-byte datagram from another
port is fragmented to the 1500-byte MTU (3 fragments: the first carries the UDP header, the two later
ones only IP). A filter that works sees none from the port and 3 fragments (or 2 later ones, when it has
no ``udp`` clause). It does, with the fragment clause too; yet GSO batches from that port were lost while
a diverting handle had the clause (``packet_tunnels.DIVERT_SAFE_UDP_GSO``), a loss no handle sees.
Run as root: python3 scripts/repro/fragment_clause_with_port.py
"""

from __future__ import annotations

import socket
import threading
import time

import _pair

IP_MTU_DISCOVER, IP_PMTUDISC_DONT = 10, 0
UDP_SEGMENT = 103
EXCLUDED = 51000
BASE = f"outbound and !loopback and (tcp or (udp and udp.SrcPort != {EXCLUDED}) or ipv6.NextHdr == 44"

TWO = BASE.replace(
    f"udp.SrcPort != {EXCLUDED}", f"udp.SrcPort != {EXCLUDED} and udp.SrcPort != {EXCLUDED + 1}"
)

FILTERS = (
    BASE + ")",
    BASE + " or ip.FragOff > 0)",
    TWO + " or ip.FragOff > 0)",
    "outbound and !loopback and ip.FragOff > 0",
)


def count(filter: str) -> None:
    """In ns client: sniff with ``filter`` while sending; print what matched."""
    import pydivert

    seen: list[bytes] = []
    with pydivert.Divert(filter, flags=pydivert.Flag.SNIFF) as handle:

        def drain() -> None:
            deadline = time.monotonic() + 1.0
            while time.monotonic() < deadline:
                try:
                    seen.append(bytes(handle.recv(timeout=0.1).raw))
                except (TimeoutError, OSError):
                    continue

        t = threading.Thread(target=drain)
        t.start()
        tunnel = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        tunnel.bind(("0.0.0.0", EXCLUDED))
        for _ in range(20):
            tunnel.sendto(b"t" * 100, (_pair.SERVER_IP, 9999))
        tunnel.setsockopt(socket.IPPROTO_UDP, UDP_SEGMENT, 100)
        for _ in range(5):
            tunnel.sendto(b"g" * 1000, (_pair.SERVER_IP, 9999))  # one GSO batch of 10 datagrams each
        tunnel.close()
        app = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        app.setsockopt(socket.IPPROTO_IP, IP_MTU_DISCOVER, IP_PMTUDISC_DONT)
        app.sendto(b"x" * 4000, (_pair.SERVER_IP, 9999))
        app.close()
        t.join()
    mine = [p for p in seen if p[9] == 17 and not p[6] & 0x3F and int.from_bytes(p[20:22]) == EXCLUDED]
    from_port = sum(1 for p in mine if len(p) < 1000)
    gso = sum(1 for p in mine if len(p) >= 1000)
    fragments = sum(1 for p in seen if int.from_bytes(p[6:8]) & 0x3FFF)
    print(
        f"{filter!r}: from the excluded port {from_port} of 20 + GSO batches {gso} of 5,"
        f" fragments {fragments} of 3"
    )


if __name__ == "__main__":
    _pair.run_cases(__file__, FILTERS, count)
