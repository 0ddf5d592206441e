"""Does a second divert handle, opened by a live process that never reads it, hold what a stopped handle
owner would let pass?

Shows: in ns client a child process opens a NETWORK handle on outbound UDP to port 9999 and never reads it;
a sender in the same namespace sends one datagram every 100 ms for 6 s; a capture in ns server counts what
arrives. Case ``alive``: the owner lives (nothing passes). Case ``stopped``: the owner is stopped (SIGSTOP)
0.5 s after it opened the handle (from ~3 s on, packets pass). Case ``guard``: the same stop, and 1 s later
the parent (alive) opens a handle with the same filter at another priority, never reads it, and kills the
stopped owner. Run as root: python3 scripts/repro/guard_handle_holds.py [alive|stopped|guard ...]
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
FILTER = f"outbound and udp.DstPort == {PORT}"


def _handle(priority: int) -> object:
    import pydivert

    handle = pydivert.Divert(FILTER, layer=pydivert.Layer.NETWORK, priority=priority)
    handle.open()
    return handle


def scenario(mode: str) -> None:
    guard = mode == "guard"
    ready_r, ready_w = os.pipe()
    owner = os.fork()
    if owner == 0:
        _kept = _handle(1041)  # kept: a handle that is garbage-collected closes
        os.write(ready_w, b"x")
        while True:
            time.sleep(1)
    os.read(ready_r, 1)
    time.sleep(0.5)
    if mode != "alive":
        os.kill(owner, signal.SIGSTOP)
    sender = os.fork()
    if sender == 0:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        started = time.monotonic()
        while (elapsed := time.monotonic() - started) < SECONDS:
            sock.sendto(f"t={elapsed:.1f}s".encode(), (_pair.SERVER_IP, PORT))
            time.sleep(0.1)
        os._exit(0)
    held = None
    if guard:
        time.sleep(1.0)
        held = _handle(1042)  # this process stays alive and never reads it
        os.kill(owner, signal.SIGKILL)
    os.waitpid(sender, 0)
    os.kill(owner, signal.SIGKILL)
    os.waitpid(owner, 0)
    del held


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--inside":
        scenario(sys.argv[2])
        return
    with _pair.namespace_pair() as pair:
        for case in sys.argv[1:] or ("alive", "stopped", "guard"):
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
            print(f"{case}: {len(arrived)} of ~{int(SECONDS * 10)} datagrams left the namespace", end="")
            print(
                f" (first at {arrived[0]}, last at {arrived[-1]})" if arrived else "",
                done.stderr.strip()[-300:],
            )


if __name__ == "__main__":
    main()
