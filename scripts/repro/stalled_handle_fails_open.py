"""Does a divert handle keep holding packets when its owner stops reading, or is stopped?

Shows: in ns client a NETWORK handle diverts outbound UDP to port 9999 and never hands anything back, so
every such datagram must stay inside. A sender in the same namespace sends one datagram every 100 ms for
6 s; a capture in ns server counts what arrives. Case 1: the owner is alive but does not read. Case 2:
the owner is stopped (SIGSTOP, as a debugger or a frozen VM would leave it) for 5 s. Run as root:
python3 scripts/repro/stalled_handle_fails_open.py
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import _pair

SECONDS, PORT = 6.0, 9999


def hold(stop_self: bool) -> None:
    import pydivert

    handle = pydivert.Divert(f"outbound and udp.DstPort == {PORT}", layer=pydivert.Layer.NETWORK, priority=7)
    handle.open()
    sender = os.fork()
    if sender == 0:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        started = time.monotonic()
        while (elapsed := time.monotonic() - started) < SECONDS:
            sock.sendto(f"t={elapsed:.1f}s".encode(), (_pair.SERVER_IP, PORT))
            time.sleep(0.1)
        os._exit(0)
    if stop_self:  # stopped from outside for 5 s: every thread of the process, the library's own included
        subprocess.Popen(["sh", "-c", f"kill -STOP {os.getpid()}; sleep 5; kill -CONT {os.getpid()}"])
    os.waitpid(sender, 0)
    handle.close()


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--inside":
        hold(sys.argv[2] == "stop")
        return
    with _pair.namespace_pair() as pair:
        for case in ("noread", "stop"):
            capture = subprocess.Popen(
                pair.nsenter(pair.server, "tcpdump", "-l", "-n", "-A", "-i", "any", f"udp port {PORT}"),
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                text=True,
            )
            time.sleep(1.0)
            done = _pair.inside(pair, pair.client, __file__, case)
            time.sleep(0.5)
            capture.send_signal(signal.SIGINT)
            out = capture.communicate(timeout=10)[0]
            arrived = [line.strip()[-6:] for line in out.splitlines() if "t=" in line]
            label = "owner alive, not reading" if case == "noread" else "owner stopped 5 s"
            print(f"{label}: {len(arrived)} of ~{int(SECONDS * 10)} datagrams left the namespace", end="")
            print(f" (first at {arrived[0]})" if arrived else "", done.stderr.strip()[-300:])


if __name__ == "__main__":
    main()
