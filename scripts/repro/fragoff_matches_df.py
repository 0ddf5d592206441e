"""Which packets a fragment clause in a filter really matches on eBPFDivert.

Shows: three kinds of outbound IPv4 UDP packets are sent while a SNIFF handle counts what each filter
matches: a small datagram with DF set (Linux's default path-MTU discovery), a small one without DF, and
a 4000-byte datagram fragmented to the 1500-byte MTU (3 fragments, DF clear).
Run as root: python3 scripts/repro/fragoff_matches_df.py
"""

from __future__ import annotations

import socket
import threading
import time

import _pair

IP_MTU_DISCOVER, IP_PMTUDISC_DONT, IP_PMTUDISC_DO = 10, 0, 2

FILTERS = (
    "outbound and ip.FragOff > 0",
    "outbound and ip.MF",
    "outbound and !ip.DF and ip.FragOff > 0",
    "outbound and (ip.MF or (!ip.DF and ip.FragOff > 0))",
)


def count(filter: str) -> None:
    """In ns client: sniff with `filter` while sending each kind of packet; print what matched."""
    import pydivert

    results = []
    with pydivert.Divert(filter, flags=pydivert.Flag.SNIFF) as handle:
        for kind, size, pmtu in (
            ("DF small", 100, IP_PMTUDISC_DO),
            ("no-DF small", 100, IP_PMTUDISC_DONT),
            ("fragmented 4000", 4000, IP_PMTUDISC_DONT),
        ):
            seen: list[object] = []

            def drain(into: list[object]) -> None:
                deadline = time.monotonic() + 0.6
                while time.monotonic() < deadline:
                    try:
                        into.append(handle.recv(timeout=0.1))
                    except (TimeoutError, OSError):
                        continue

            t = threading.Thread(target=drain, args=(seen,))
            t.start()
            app = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            app.setsockopt(socket.IPPROTO_IP, IP_MTU_DISCOVER, pmtu)
            app.sendto(b"x" * size, (_pair.SERVER_IP, 9999))
            app.close()
            t.join()
            results.append(f"{kind}: {len(seen)}")
    print(f"{filter!r}: " + ", ".join(results))


if __name__ == "__main__":
    _pair.run_cases(__file__, FILTERS, count)
