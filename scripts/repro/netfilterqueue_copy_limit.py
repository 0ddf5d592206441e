"""NetfilterQueue 1.1.0 hands over at most 4016 bytes of a queued packet.

Shows: a 5000-byte UDP datagram queued by ``-j NFQUEUE`` arrives in the callback with a payload of 4016
bytes (its receive buffer is 4096 bytes, 80 of them for metadata: ``MaxCopySize``), while the IPv4 header
says 5028. Consequence: ``platform.linux.kernel_datapath.KernelGate`` decides such first packets by their
headers alone (the payload is never re-injected), instead of taking them for malformed.
Run as root: python3 scripts/repro/netfilterqueue_copy_limit.py
"""

from __future__ import annotations

import socket
import struct
import subprocess
import threading

import _pair

QUEUE = 4712


def inside(case: str) -> None:
    from netfilterqueue import NetfilterQueue

    seen: list[tuple[int, int]] = []

    def queued(packet: object) -> None:
        payload = packet.get_payload()  # type: ignore[attr-defined]
        seen.append((len(payload), struct.unpack_from("!H", payload, 2)[0]))
        packet.accept()  # type: ignore[attr-defined]

    rule = ["-p", "udp", "--dport", "9999", "-j", "NFQUEUE", "--queue-num", str(QUEUE)]
    subprocess.run(["iptables", "-w", "-t", "mangle", "-A", "OUTPUT", *rule], check=True)
    queue = NetfilterQueue()
    queue.bind(QUEUE, queued)
    reader = threading.Thread(target=queue.run, daemon=True)
    reader.start()
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.sendto(b"x" * 5000, (_pair.SERVER_IP, 9999))
    reader.join(2.0)
    for copied, total in seen:
        print(f"queued datagram: IPv4 total length {total}, payload handed over {copied} bytes")


if __name__ == "__main__":
    _pair.run_cases(__file__, ["5000-byte datagram"], inside)
