"""Super-packets on loopback: most pass the divert handle undiverted ("too big"), reinjection may fail.

Shows: a handle diverting `tcp.DstPort == 9000` on loopback (MTU 65536) reinjects every packet of an
8 MB transfer unchanged; it prints how many packets it got, the largest, the send errors, and the
backend's own too_big counter. Seen here (kernel 6.18): ~6 packets diverted, ~90 counted too_big and
passed undiverted, no send error. An earlier run saw `OSError: [Errno 90] ebpfdivert_send: Message too
long` reinjecting a 7,292-byte coalesced packet on loopback.
Consequence: the router never diverts loopback (its filter says `!loopback`; loopback is never tunnelled),
and NetworkHandle.send() counts EMSGSIZE (``oversize``) instead of raising into the loop.
Run as root: python3 scripts/repro/oversize_send.py
"""

from __future__ import annotations

import socket
import sys
import threading

import _pair


def inside() -> None:
    import pydivert

    server = socket.socket()
    server.bind(("127.0.0.1", 9000))
    server.listen()

    def sink() -> None:
        conn, _ = server.accept()
        while conn.recv(1 << 20):
            pass

    threading.Thread(target=sink, daemon=True).start()
    errors: dict[str, int] = {}
    largest = count = 0
    with pydivert.Divert("tcp.DstPort == 9000") as h:

        def pump() -> None:
            nonlocal largest, count
            while True:
                try:
                    p = h.recv(timeout=1.0)
                except (TimeoutError, OSError):
                    return
                count += 1
                largest = max(largest, len(p.raw))
                try:
                    h.send(p, recalculate_checksum=False)
                except OSError as exc:
                    errors[str(exc)] = errors.get(str(exc), 0) + 1

        t = threading.Thread(target=pump)
        t.start()
        client = socket.create_connection(("127.0.0.1", 9000))
        client.settimeout(5)
        try:
            client.sendall(b"x" * (8 << 20))
        except OSError as exc:
            print(f"sender: {exc}")
        client.close()
        t.join()
        stats = h.stats()
    print(f"{count} packets diverted, largest {largest} bytes; send errors: {errors or 'none'}")
    print(f"backend counters: too_big={stats.get('too_big')} diverted={stats.get('diverted')}")


if __name__ == "__main__":
    if "--inside" in sys.argv:
        inside()
    else:
        with _pair.namespace_pair() as pair:
            done = _pair.inside(pair, pair.client, __file__, timeout=60)
            print(done.stdout, done.stderr[-2000:])
